"""The real server's connections (`python -m app` under uvicorn): SIGTERM loses no request, a connection cap,
a header deadline. Protocol errors are counted, not only statuses."""
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app.connections import refuse_new_handshakes
from model.weights import save_generator
from tests.conftest import Server, encode, photo, small_generator


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("connections") / "g.safetensors"
    save_generator(path, small_generator(ngf=16, n_blocks=2))
    return path


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_sigterm_drains_finishes_accepted_requests_and_exits_0(weights):
    srv = Server(weights, ui="false", max_batch_size=1, drain_s=1.5, shutdown_grace_s=20).wait_ready()
    body = encode(photo(768, 768, seed=3))
    try:
        with ThreadPoolExecutor(12) as pool:
            burst = [pool.submit(httpx.post, srv.url + "/translate", content=body,
                                 headers={"content-type": "image/jpeg"}, timeout=60) for _ in range(12)]
            deadline = time.time() + 30  # wait until all 12 have arrived (12 and the /metrics request itself)
            while metric(httpx.get(srv.url + "/metrics").text, "monet_requests_in_progress") < 13:
                assert time.time() < deadline, "the burst never arrived"
                time.sleep(0.02)
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            ready = httpx.get(srv.url + "/readyz")
            late = httpx.post(srv.url + "/translate", content=body, headers={"content-type": "image/jpeg"})
            answers = [f.result() for f in burst]
        assert ready.status_code == 503 and ready.json()["detail"] == "shutting down"
        assert late.status_code == 503 and "shutting down" in late.json()["detail"]
        assert late.headers["connection"] == "close"
        # every request that arrived before the signal got its painting, uploads still arriving included
        assert [r.status_code for r in answers] == [200] * 12
        assert srv.proc.wait(timeout=30) == 0
    finally:
        if srv.proc.poll() is None:
            srv.stop()


def read_answers(sock: socket.socket, n: int) -> list[int]:
    """The statuses of up to ``n`` HTTP/1.1 answers read from ``sock`` (stopping at Connection: close)."""
    f, statuses = sock.makefile("rb"), []
    for _ in range(n):
        line = f.readline()
        if not line:
            break
        status, length, close = int(line.split()[1]), 0, False
        while (header := f.readline()) not in (b"\r\n", b""):
            name, _, value = header.decode().partition(":")
            length = int(value) if name.lower() == "content-length" else length
            close = close or (name.lower() == "connection" and "close" in value.lower())
        f.read(length)
        statuses.append(status)
        if close:
            break
    return statuses


def sigterm_under_load(srv, threads: list, after_s: float, at_signal=lambda: None) -> None:
    """Start the client ``threads``, after ``after_s`` call ``at_signal`` and send SIGTERM, wait for the
    clients, and assert the server exits 0 (stopped in any case)."""
    try:
        for t in threads:
            t.start()
        time.sleep(after_s)
        at_signal()
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(90)
        assert srv.proc.wait(timeout=30) == 0
    finally:
        if srv.proc.poll() is None:
            srv.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux socket filter")
def test_refusing_new_handshakes_keeps_the_connections_already_made():
    """The drain's last step before closing the listener: new connection attempts are dropped by the kernel
    (the client's connect goes unanswered, then is refused once the port closes), while a connection whose
    handshake completed stays in the backlog, with what it sent, to be accepted."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as early:
            early.sendall(b"sent before")
            assert refuse_new_handshakes(listener)
            with pytest.raises(TimeoutError):
                socket.create_connection(("127.0.0.1", port), timeout=0.5)
            conn, _ = listener.accept()
            with conn:
                assert conn.recv(64) == b"sent before"
                conn.sendall(b"answered")
                assert early.recv(64) == b"answered"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_sigterm_under_steady_reconnects_resets_no_connection(weights):
    """16 clients open a fresh connection for every request, back to back, through the SIGTERM and the
    listener's close, until a connect is refused. There is no lull to close the listener in, so connections
    wait in the kernel's backlog when it closes: each must be taken and answered, none reset with its request
    sent (on uvloop, uvicorn's default loop where installed, the backlog was not taken: 12-13 of the 16 were
    reset at every SIGTERM)."""
    srv = Server(weights, ui="false", drain_s=0.3, shutdown_grace_s=20).wait_ready()
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    answered, lost = [], []

    def client() -> None:
        end = time.time() + 60
        while time.time() < end:
            try:
                sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            except OSError:
                return  # the listener is closed: nothing was sent
            with sock:
                try:
                    sock.sendall(request)
                    statuses = read_answers(sock, 1)
                except OSError as exc:
                    lost.append(type(exc).__name__)
                    continue
            (answered if statuses else lost).append(statuses[0] if statuses else "no answer")

    before = []
    sigterm_under_load(srv, [threading.Thread(target=client) for _ in range(16)], 0.5,
                       at_signal=lambda: before.append(len(answered)))
    assert not lost, f"{len(lost)} connections lost: {lost[:5]}; the server said: {srv.output()}"
    assert len(answered) > before[0] and set(answered) == {200}  # served through the drain, every one answered


@pytest.mark.parametrize("attempt", range(20))
def test_sigterm_under_keep_alive_load_loses_no_request(weights, attempt):
    """16 clients on keep-alive connections send back to back, 2 more pipeline two requests per write, and 2
    uploads are mid-body when SIGTERM comes. Each client goes on (after a 503 it waits its Retry-After) until
    the server no longer accepts connections. Nothing sent may end in a protocol error: the drain closes
    connections only between requests, with Connection: close, and the listener closes without resetting a
    connection it let in (issue 34, item 3: 1 lost request in 3 SIGTERMs under 8 clients before)."""
    srv = Server(weights, ui="false", max_batch_size=8, drain_s=1.0, shutdown_grace_s=20).wait_ready()
    body = encode(photo(64, 48, seed=attempt))
    port = int(srv.url.rsplit(":", 1)[1])
    raw = (f"POST /translate HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n"
           f"\r\n").encode() + body
    signalled = threading.Event()
    outcomes: list[tuple] = []

    def client() -> None:
        with httpx.Client(timeout=30) as c:
            end = time.time() + 60
            while time.time() < end:
                after = signalled.is_set()
                try:
                    r = c.post(srv.url + "/translate", content=body, headers={"content-type": "image/jpeg"})
                except httpx.ConnectError:
                    return  # the listener is closed: nothing was sent
                except httpx.TransportError as exc:  # sent, and no answer: a lost request
                    outcomes.append(("lost", type(exc).__name__, after))
                    return
                outcomes.append((r.status_code, r.headers.get("connection"), after,
                                 r.json()["detail"] if r.status_code != 200 else ""))
                if r.status_code == 503:
                    time.sleep(float(r.headers.get("retry-after", 1)))

    def pipeliner() -> None:
        end = time.time() + 60
        while time.time() < end:
            try:
                sock = socket.create_connection(("127.0.0.1", port))
            except OSError:
                return
            with sock:
                try:
                    sock.sendall(raw + raw)
                    statuses = read_answers(sock, 2)
                except OSError as exc:
                    outcomes.append(("lost", type(exc).__name__, signalled.is_set()))
                    return
            if not statuses:
                outcomes.append(("lost", "no answer", signalled.is_set()))
                return
            outcomes.extend((status, "raw", signalled.is_set(), "shutting down") for status in statuses)
            if 503 in statuses:
                time.sleep(1)

    def mid_body() -> None:  # half the upload before the signal, the rest after it
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(raw[: len(raw) // 2])
            signalled.wait(30)
            time.sleep(0.05)
            sock.sendall(raw[len(raw) // 2 :])
            statuses = read_answers(sock, 1)
        outcomes.append((statuses[0], "mid-body", False, "") if statuses else ("lost", "mid-body", True))

    threads = [threading.Thread(target=client) for _ in range(16)] + \
        [threading.Thread(target=pipeliner) for _ in range(2)] + [threading.Thread(target=mid_body) for _ in range(2)]
    sigterm_under_load(srv, threads, 1.0 + 0.1 * (attempt % 5), at_signal=signalled.set)
    lost = [o for o in outcomes if o[0] == "lost"]
    assert not lost, f"{len(lost)} requests lost: {lost}; the server said: {srv.output()}"
    assert {o[0] for o in outcomes} <= {200, 503}
    assert all("shutting down" in o[3] for o in outcomes if o[0] == 503)
    refused = [o for o in outcomes if o[0] == 503 and o[1] not in ("raw", "mid-body")]
    assert refused and all(o[1] == "close" for o in refused)  # the drain closes connections as it answers
    assert sum(o[0] == 200 for o in outcomes if not o[2]) > 8  # real load ran before the signal
    # the uploads mid-body at the signal had begun arriving before it: they are served
    assert [o[0] for o in outcomes if o[1] == "mid-body"] == [200, 200]


def test_a_keep_alive_connection_idle_when_the_listener_closes_is_answered_not_dropped(weights):
    """A client idle on a kept-alive connection through the whole drain (asleep on a Retry-After, say) sends
    its next request after the listener has closed: it gets 503 "shutting down" with Connection: close, not
    a closed socket (which loses a request sent as the close crosses it; 2 lost in 1 CI run of 20 SIGTERMs)."""
    srv = Server(weights, ui="false", drain_s=0.5, shutdown_grace_s=20).wait_ready()
    port = int(srv.url.rsplit(":", 1)[1])
    body = encode(photo(64, 48))
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(20)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_answers(sock, 1) == [200]
            srv.proc.send_signal(signal.SIGTERM)
            deadline = time.time() + 4  # within uvicorn's 5 s keep-alive timeout
            while True:  # until the listener refuses (probes 0.3 s apart: it closes in a lull)
                assert time.time() < deadline, "the listener never closed"
                time.sleep(0.3)
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    break
            sock.sendall(f"POST /translate HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            f = sock.makefile("rb")
            answer = f.read()  # to the close
        head, _, detail = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer[:200]
        assert b"connection: close" in head.lower() and b"retry-after" in head.lower()
        assert b"shutting down" in detail
        assert srv.proc.wait(timeout=30) == 0
    finally:
        if srv.proc.poll() is None:
            srv.stop()


@pytest.fixture
def guarded(weights):
    srv = Server(weights, ui="false", max_connections=50, header_timeout_s=1.5).wait_ready()
    yield srv
    srv.stop()


def test_a_thousand_idle_sockets_cost_bounded_fds_and_real_requests_still_flow(guarded):
    host, port = guarded.url.removeprefix("http://").split(":")
    before = open_fds(guarded.proc.pid)
    idle = []
    try:
        for _ in range(1000):
            idle.append(socket.create_connection((host, int(port))))
        body = encode(photo(64, 48))
        with httpx.Client(timeout=30) as c:  # while the 1,000 are held: real requests get their paintings
            answers = [c.post(guarded.url + "/translate", content=body, headers={"content-type": "image/jpeg"})
                       for _ in range(5)]
        assert [r.status_code for r in answers] == [200] * 5
        time.sleep(0.3)
        held = open_fds(guarded.proc.pid)
        assert held <= before + 50 + 5, (before, held)  # the cap, not the clients, bounds the server's fds
        text = httpx.get(guarded.url + "/metrics").text
        assert metric(text, 'monet_connections_refused_total{reason="evicted"}') >= 900
    finally:
        for s in idle:
            s.close()
    time.sleep(2.0)
    assert open_fds(guarded.proc.pid) <= before + 5


def test_headers_that_never_finish_get_408_and_the_connection_closes(guarded):
    host, port = guarded.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:  # one header line a second: never finishes in time
        s.settimeout(10)
        s.sendall(b"POST /translate HTTP/1.1\r\n")
        started, answer = time.time(), b""
        try:
            for i in range(8):
                s.sendall(f"X-Slow-{i}: 1\r\n".encode())
                time.sleep(0.5)
        except OSError:
            pass  # the server closed the connection: the rest could not be sent
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"did not arrive within 1.5 s" in answer
    assert time.time() - started < 6
    with socket.create_connection((host, int(port))) as s:  # a socket that sends nothing: 408 and closed too
        s.settimeout(10)
        assert s.recv(65536).startswith(b"HTTP/1.1 408")
        assert s.recv(65536) == b""
    # a kept-alive connection's next request gets the same deadline from its first byte
    with httpx.Client(timeout=10) as c:
        assert c.get(guarded.url + "/healthz").status_code == 200
        time.sleep(2.0)  # idle between requests is the keep-alive timeout's business, not the header deadline's
        assert c.get(guarded.url + "/healthz").status_code == 200
    text = httpx.get(guarded.url + "/metrics").text
    assert metric(text, 'monet_connections_refused_total{reason="header_timeout"}') >= 2


def test_a_refusal_on_arrival_is_answered_before_the_body_and_the_rest_is_discarded(tmp_path):
    """Issue 34, item 6: a POST /translate the service refuses anyway (here: weights that cannot load) is
    answered from its headers, before its body has come, so a burst's 503s do not wait behind the burst's
    uploads. The client sends the rest anyway, as HTTP clients do: the server discards it, a kept-alive
    connection then answers its next request, and one that asked to close is closed, not reset."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    srv = Server(bad, ui="false")
    try:
        ready_by = time.time() + 120
        while time.time() < ready_by:
            try:
                if httpx.get(srv.url + "/readyz").status_code == 503:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        body = bytes(2 * 1024 * 1024)

        def answer(sock) -> tuple[bytes, dict]:
            got = b""
            while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < int(
                    re.search(rb"content-length: (\d+)", got, re.I).group(1)):
                chunk = sock.recv(65536)
                assert chunk, got  # closed or reset before the whole answer
                got += chunk
            head, detail = got.split(b"\r\n\r\n", 1)
            return head, json.loads(detail)

        for connection in ("keep-alive", "close"):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                sock.sendall(f"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                             f"Content-Length: {len(body)}\r\nConnection: {connection}\r\n\r\n".encode())
                sock.sendall(body[:65536])  # the rest is not sent until the answer has come
                head, detail = answer(sock)
                assert head.split()[1] == b"503" and "cannot serve" in detail["detail"], head
                sock.sendall(body[65536:])
                if connection == "keep-alive":
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    head, _ = answer(sock)
                    assert head.split()[1] == b"200", head
                else:
                    assert sock.recv(65536) == b""  # closed once the body is in (a reset would raise)
        assert "Traceback" not in srv.output()
    finally:
        srv.stop()


def test_a_request_read_with_the_end_of_a_discarded_body_is_not_closed_by_the_keep_alive_timeout(weights):
    """The soak's flaky RemoteProtocolError (a valid request lost, the server counting a 499 after ~5 s): a
    kept-alive connection's request refused from its header (413) has the rest of its body discarded; when the
    next request's head came in the same read as that body's last bytes, the discard re-armed the keep-alive
    timeout *after* the read had cancelled it, and 5 s later (uvicorn's keep-alive timeout) the server closed the
    connection under the request it was serving. Under load (a server reading late, a request queued for
    seconds) that happened in about one soak in three on a 2-core machine. Here the two are sent in one piece
    and the next request's body comes after the keep-alive timeout: it must be answered, not dropped."""
    limit = 1024 * 1024
    srv = Server(weights, ui="false", max_upload_bytes=limit).wait_ready()
    photo_body = encode(photo(64, 48, seed=6))
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as sock:
            sock.sendall(b"POST /translate HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: %d\r\n\r\n" % (limit + 1) + bytes(65536))
            f = sock.makefile("rb")
            status_line = f.readline()
            assert status_line.split()[1] == b"413", status_line
            length = 0
            while (header := f.readline()) != b"\r\n":
                name, _, value = header.decode().partition(":")
                length = int(value) if name.lower() == "content-length" else length
                assert not (name.lower() == "connection" and "close" in value.lower()), "kept alive"
            f.read(length)
            sock.sendall(bytes(limit + 1 - 65536 - 100))
            time.sleep(0.5)  # the server has read (and discarded) all but the body's last 100 bytes
            sock.sendall(bytes(100) + b"POST /translate HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(photo_body))  # one segment: one read
            time.sleep(6.0)  # longer than uvicorn's keep-alive timeout (5 s), far under the upload timeout
            sock.sendall(photo_body)
            status_line = f.readline()
            assert status_line.split()[1:2] == [b"200"], f"answered {status_line!r} (b'': closed unanswered)"
        assert "Traceback" not in srv.output()
    finally:
        srv.stop()


def test_a_burst_beyond_the_queue_is_refused_as_it_arrives_and_a_stalled_upload_holds_no_place_for_long(weights):
    """Issue 34, item 6: a request holds its place in the queue from its headers until its body is in, for a
    second at most. With a queue of 2 and two uploads mid-body, the third request is answered 503 before its
    own body is sent (before, every upload of a burst was read before the first 503); once the stalled uploads'
    holds run out, other requests are painted while they still stall; and the stalled ones, once their bodies
    come, are painted too."""
    srv = Server(weights, ui="false", queue_size=2, max_batch_size=1).wait_ready()
    body = encode(photo(64, 48, seed=5))
    head = (f"POST /translate HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    stalled = [socket.create_connection(("127.0.0.1", srv.port), timeout=20) for _ in range(2)]
    try:
        for sock in stalled:
            sock.sendall(head + body[:100])
        deadline = time.time() + 20  # both have arrived (and the /metrics request itself)
        while metric(httpx.get(srv.url + "/metrics").text, "monet_requests_in_progress") < 3:
            assert time.time() < deadline, "the stalled uploads never arrived"
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as third:
            third.sendall(head + body[:100])  # the rest of its body is never sent
            answer = third.makefile("rb").read()  # the answer, then the close
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.split()[1] == b"503" and b"retry-after: 1" in rest.lower(), answer
        assert "busy" in json.loads(rest.split(b"\r\n\r\n", 1)[1])["detail"]
        deadline = time.time() + 20  # the holds run out after a second: a complete upload is painted
        while (r := httpx.post(srv.url + "/translate", content=body, headers={"content-type": "image/jpeg"},
                               timeout=20)).status_code == 503:
            assert time.time() < deadline, r.text
            time.sleep(0.1)
        assert r.status_code == 200, r.text
        for sock in stalled:
            sock.sendall(body[100:])
            assert read_answers(sock, 1) == [200]
        assert "Traceback" not in srv.output()
    finally:
        for sock in stalled:
            sock.close()
        srv.stop()
