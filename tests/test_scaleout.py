"""Three real replicas (`python -m app`) behind a real HAProxy (deploy/haproxy/haproxy.cfg): spreading,
a rolling restart without loss, a replica killed mid-load, and the Gradio UI through the balancer."""
import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from model.weights import save_generator
from tests.conftest import ROOT, Server, encode, free_port, photo, small_generator

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy is not installed (apt-get install haproxy; .ci/run installs it)")

REPLICA_SETTINGS = {"max_batch_size": 4, "drain_s": 2, "shutdown_grace_s": 10}


class Balancer:
    def __init__(self, replicas: list[Server], folder):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "LB_BIND": f"127.0.0.1:{self.port}", "LB_STATS_SOCKET": str(folder / "haproxy.sock")}
        env.update({f"MONET_REPLICA{i + 1}": f"127.0.0.1:{r.port}" for i, r in enumerate(replicas)})
        self.log = open(folder / "haproxy.log", "w+")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(ROOT / "deploy" / "haproxy" / "haproxy.cfg")],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def replicas_up(self, n: int, timeout: float = 30) -> set[str]:
        """Wait until requests through the balancer have reached ``n`` different replicas."""
        seen, deadline = set(), time.time() + timeout
        while len(seen) < n:
            assert time.time() < deadline, f"only {seen} answered: " + self.output()
            assert self.proc.poll() is None, self.output()
            try:
                seen.add(httpx.get(self.url + "/info", timeout=5).headers.get("x-replica"))
            except httpx.HTTPError:
                pass
            seen.discard(None)
            time.sleep(0.05)
        return seen

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scaleout")
    weights = folder / "g.safetensors"
    save_generator(weights, small_generator(ngf=16, n_blocks=2))
    replicas = [Server(weights, **REPLICA_SETTINGS) for _ in range(3)]
    for r in replicas:
        r.wait_ready()
    lb = Balancer(replicas, folder)
    lb.replicas_up(3)
    yield lb, replicas, weights
    lb.stop()
    for r in replicas:
        if r.proc.poll() is None:
            r.stop()


JPEG = encode(photo(96, 64))


def steady_load(url: str, seconds: float, clients: int = 6) -> list[dict]:
    """``clients`` threads posting photos back to back; one record per request."""
    records, stop_at = [], time.time() + seconds

    def client():
        with httpx.Client(timeout=30) as http:
            while time.time() < stop_at:
                started = time.time()
                try:
                    r = http.post(url + "/translate", content=JPEG, headers={"content-type": "image/jpeg"})
                    rec = {"status": r.status_code, "replica": r.headers.get("x-replica"),
                           "retry_after": "retry-after" in r.headers}
                except httpx.HTTPError as exc:
                    rec = {"status": type(exc).__name__, "replica": None, "retry_after": False}
                records.append({**rec, "started": started, "ended": time.time()})

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def test_requests_are_spread_across_all_three_replicas(cluster):
    lb, replicas, _ = cluster
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: httpx.post(lb.url + "/translate", content=JPEG,
                                                     headers={"content-type": "image/jpeg"}, timeout=30), range(36)))
    assert all(r.status_code == 200 for r in answers)
    assert {r.headers["x-replica"] for r in answers} == {"web1", "web2", "web3"}
    # /info names the process behind each replica
    assert len({httpx.get(f"{r.url}/info").json()["replica"] for r in replicas}) == 3


def test_the_gradio_ui_works_through_the_balancer_and_sticks_to_one_replica(cluster, tmp_path):
    from gradio_client import Client, handle_file

    lb, _, _ = cluster
    first = httpx.get(lb.url + "/ui/")
    assert first.status_code == 200 and "monet-replica=" in first.headers.get("set-cookie", "")
    cookie = first.cookies["monet-replica"]
    # with the cookie, every UI request goes to the same replica
    assert {httpx.get(lb.url + "/ui/config", cookies={"monet-replica": cookie}).headers["x-replica"]
            for _ in range(6)} == {cookie}
    src = tmp_path / "photo.jpg"
    photo(80, 60).save(src)
    client = Client(lb.url + "/ui/", verbose=False)
    slider, download = client.predict(handle_file(str(src)), api_name="/translate")
    assert os.path.getsize(download) > 0


def test_a_rolling_restart_loses_no_request(cluster):
    lb, replicas, weights = cluster
    victim = replicas[0]
    results, killer_done = {}, threading.Event()

    def terminate_midway():
        time.sleep(2)
        results["sigterm_at"] = time.time()
        victim.proc.send_signal(signal.SIGTERM)
        results["exit"] = victim.proc.wait(30)
        results["exited_at"] = time.time()
        killer_done.set()

    threading.Thread(target=terminate_midway).start()
    records = steady_load(lb.url, 8)
    assert killer_done.wait(30)
    assert results["exit"] == 0, victim.output()
    lost = [r for r in records if not (r["status"] == 200 or (r["status"] == 503 and r["retry_after"]))]
    assert lost == [], lost  # each answer is a painting, or a 503 the client may retry
    assert sum(r["status"] == 200 for r in records) > 20
    # HAProxy took the replica out as soon as its /readyz turned 503: nothing started a second after the
    # signal went to it
    late = [r for r in records if r["replica"] == "web1" and r["started"] > results["sigterm_at"] + 1.0]
    assert late == []
    print(f"SIGTERM: {len(records)} requests, {sum(r['status'] == 200 for r in records)} paintings, "
          f"{sum(r['status'] == 503 for r in records)} 503 with Retry-After, 0 lost")
    # a new replica on the same address rejoins
    replicas[0] = Server(weights, port=victim.port, **REPLICA_SETTINGS).wait_ready()
    assert "web1" in lb.replicas_up(3)


def test_a_replica_killed_mid_load_fails_only_its_requests_in_flight(cluster):
    lb, replicas, _ = cluster
    victim, info = replicas[1], {}

    def kill_midway():
        time.sleep(2)
        info["killed_at"] = time.time()
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        info["gone_at"] = time.time()  # the kernel has closed its sockets (tearing down ~0.6 GB takes a while)

    threading.Thread(target=kill_midway).start()
    records = steady_load(lb.url, 7)
    failed = [r for r in records if r["status"] != 200]
    # a failed request was on the replica while it died: sent before it was gone, not finished when killed
    bad = [r for r in failed if not (r["started"] < info["gone_at"] and r["ended"] > info["killed_at"])]
    assert not bad, [(r["status"], r["started"] - info["killed_at"]) for r in bad]
    assert len(failed) <= 6, failed  # at most one per client
    after = [r for r in records if r["started"] > info["gone_at"]]
    assert after and all(r["status"] == 200 and r["replica"] != "web2" for r in after)
    print(f"SIGKILL: {len(failed)} of {len(records)} requests failed, all in flight on the killed replica "
          f"(died in {(info['gone_at'] - info['killed_at']) * 1000:.0f} ms)")
