"""Several styles in one real server (`python -m app` on a folder of weight files): each request painted by the
style it named, /styles, unknown styles, SIGHUP and admin reloads under load, poisoned replacements, the LRU
and its memory, and per-style fairness in the batcher."""
import asyncio
import io
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model.networks import ResnetGenerator, init_weights
from model.translator import Translator
from model.weights import file_version, save_generator
from tests.conftest import Server, encode, photo, small_generator

TOKEN = "let-me-in"


def full_log(srv) -> str:
    return Path(srv.log.name).read_text()


def style_folder(root: Path, names=("alpha", "beta"), **kw) -> Path:
    folder = root / "styles"
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        save_generator(folder / f"{name}.safetensors", small_generator(seed=10 + i, ngf=8, n_blocks=1),
                       name=name.title(), scores={"heldout_kid": 0.01 * (i + 1)}, **kw)
    return folder


def replace(path: Path, generator=None, data: bytes | None = None) -> None:
    """Swap a style's file the way deployments do: write beside it, rename over it."""
    tmp = path.with_name(f".{path.name}.new")
    if data is not None:
        tmp.write_bytes(data)
    else:
        save_generator(tmp, generator)
    os.replace(tmp, path)


def post(url: str, body: bytes, style: str | None = None, **kw) -> httpx.Response:
    params = {"style": style} if style else {}
    return httpx.post(url + "/translate", params=params, content=body, headers={"content-type": "image/png"},
                      timeout=60, **kw)


def painted(response: httpx.Response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)


@pytest.fixture
def two_styles(tmp_path):
    folder = style_folder(tmp_path)
    srv = Server(folder, admin_token=TOKEN, ui="false", max_batch_size=4).wait_ready()
    yield srv, folder
    srv.stop()


def test_each_request_is_painted_by_the_style_it_names(two_styles):
    srv, folder = two_styles
    src = photo(64, 48, seed=5)
    body = encode(src, "PNG")
    expected = {name: Translator.from_file(folder / f"{name}.safetensors", device="cpu", precision="fp32")
                .translate_many([np.asarray(src)])[0].astype(np.int16) for name in ("alpha", "beta")}
    assert np.abs(expected["alpha"] - expected["beta"]).mean() > 5  # the two styles paint differently
    asked = ["alpha", "beta", None] * 8
    with ThreadPoolExecutor(8) as pool:  # concurrently, so batches form: none may mix the two
        responses = list(pool.map(lambda s: post(srv.url, body, s), asked))
    for style, r in zip(asked, responses):
        assert r.status_code == 200, r.text
        name = style or "alpha"  # the default: the first name (no photo2monet in the folder)
        assert r.headers["x-style"] == name
        assert r.headers["x-model-version"] == file_version(folder / f"{name}.safetensors")
        assert np.abs(painted(r) - expected[name]).mean() < 1.0, name

    listed = httpx.get(srv.url + "/styles").json()
    assert listed["default"] == "alpha" and [s["name"] for s in listed["styles"]] == ["alpha", "beta"]
    beta = listed["styles"][1]
    assert beta["display_name"] == "Beta" and beta["architecture"] == "resnet" and beta["loaded"]
    assert beta["scores"] == {"heldout_kid": 0.02} and beta["version"] == file_version(folder / "beta.safetensors")
    info = httpx.get(srv.url + "/info").json()
    assert info["default_style"] == "alpha" and set(info["styles"]) == {"alpha", "beta"}
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'monet_paintings_total{style="beta"} 8.0' in metrics and 'monet_paintings_total{style="alpha"} 16.0' in metrics

    r = post(srv.url, body, "gamma")
    assert r.status_code == 404 and r.json()["detail"].startswith("unknown style 'gamma'")
    assert "alpha, beta" in r.json()["detail"]
    assert post(srv.url, body, "x" * 65).status_code == 422
    assert '"style": "beta"' in full_log(srv)  # the access log says which style answered


class Load:
    """``clients`` threads posting for the given styles until stopped; every answer kept."""

    def __init__(self, url: str, styles: list[str], clients: int = 8):
        self.url, self.styles, self.stop = url, styles, threading.Event()
        self.answers: list[tuple[str, int, str, float]] = []  # style, status, version, time
        self.errors: list[str] = []
        self.body = encode(photo(48, 40, seed=1), "PNG")
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=60) as client:
            n = 0
            while not self.stop.is_set():
                style = self.styles[(i + n) % len(self.styles)]
                n += 1
                try:
                    r = client.post(self.url + "/translate", params={"style": style}, content=self.body,
                                    headers={"content-type": "image/png"})
                    self.answers.append((style, r.status_code, r.headers.get("x-model-version", ""), time.time()))
                except httpx.HTTPError as exc:
                    self.errors.append(f"{style}: {exc!r}")

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def wait_for(self, n: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        start = len(self.answers)
        while len(self.answers) - start < n and time.time() < deadline:
            time.sleep(0.02)


def reload_admin(url: str) -> dict:
    r = httpx.post(url + "/admin/reload", headers={"authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def wait_version(url: str, style: str, version: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        listed = {s["name"]: s["version"] for s in httpx.get(url + "/styles").json()["styles"]}
        if listed.get(style) == version:
            return
        time.sleep(0.05)
    raise AssertionError(f"{style} did not reach version {version}")


def test_sighup_and_admin_reload_under_load_lose_no_request(two_styles):
    srv, folder = two_styles
    old = file_version(folder / "beta.safetensors")
    with Load(srv.url, ["alpha", "beta"]) as load:
        load.wait_for(16)
        replace(folder / "beta.safetensors", small_generator(seed=99, ngf=8, n_blocks=1))
        new = file_version(folder / "beta.safetensors")
        os.kill(srv.proc.pid, signal.SIGHUP)
        wait_version(srv.url, "beta", new)
        swapped = time.time()
        load.wait_for(16)
        # the admin route: a third style appears, beta is replaced once more
        save_generator(folder / "gamma.safetensors", small_generator(seed=7, ngf=8, n_blocks=1))
        replace(folder / "beta.safetensors", small_generator(seed=100, ngf=8, n_blocks=1))
        newest = file_version(folder / "beta.safetensors")
        report = reload_admin(srv.url)
        assert report["added"] == ["gamma"] and report["replaced"] == ["beta"] and report["refused"] == {}
        load.styles = ["alpha", "beta", "gamma"]
        load.wait_for(24)
    assert load.errors == [], load.errors[:3]
    codes = [status for _, status, _, _ in load.answers]
    assert codes and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    betas = [(version, t) for style, _, version, t in load.answers if style == "beta"]
    assert {v for v, _ in betas} >= {old, new, newest}
    assert all(v != old for v, t in betas if t > swapped + 1.0), "the old version answered long after the swap"
    assert any(style == "gamma" for style, *_ in load.answers)
    (folder / "gamma.safetensors").unlink()  # and a style removed
    assert reload_admin(srv.url)["removed"] == ["gamma"]
    assert post(srv.url, encode(photo(32, 32), "PNG"), "gamma").status_code == 404
    assert [s["name"] for s in httpx.get(srv.url + "/styles").json()["styles"]] == ["alpha", "beta"]
    log = full_log(srv)
    assert "reload (SIGHUP)" in log and "reload (admin)" in log and "Traceback" not in log


def test_admin_reload_needs_the_token(two_styles, tmp_path):
    srv, _ = two_styles
    r = httpx.post(srv.url + "/admin/reload")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "token" in r.json()["detail"]
    r = httpx.post(srv.url + "/admin/reload", headers={"authorization": "Bearer let-me-i"})
    assert r.status_code == 401
    (tmp_path / "plain").mkdir()
    plain = Server(style_folder(tmp_path / "plain"), ui="false").wait_ready()
    try:
        assert httpx.post(plain.url + "/admin/reload").status_code == 404  # no token set: no admin route
    finally:
        plain.stop()


def poisons(path: Path) -> dict[str, bytes]:
    import pickle

    good = path.read_bytes()
    nan = small_generator(seed=3, ngf=8, n_blocks=1)
    with torch.no_grad():
        nan.model[1].weight[0, 0, 0, 0] = float("nan")
    tmp = path.with_name("nan.tmp")
    save_generator(tmp, nan)
    return {"pickle": pickle.dumps({"model.1.weight": torch.zeros(1)}), "nan": tmp.read_bytes(),
            "truncated": good[: len(good) // 2]}


def test_a_poisoned_replacement_is_refused_and_the_old_version_keeps_serving(two_styles):
    srv, folder = two_styles
    beta = folder / "beta.safetensors"
    version = file_version(beta)
    body = encode(photo(40, 40), "PNG")
    before = painted(post(srv.url, body, "beta"))  # beta loaded
    with Load(srv.url, ["alpha", "beta"]) as load:
        for kind, data in poisons(beta).items():
            replace(beta, data=data)
            report = reload_admin(srv.url)
            assert list(report["refused"]) == ["beta.safetensors"], (kind, report)
            assert f"version {version} keeps serving" in report["refused"]["beta.safetensors"]
            assert report["replaced"] == [] and "beta" in report["styles"]
            r = post(srv.url, body, "beta")
            assert r.status_code == 200 and r.headers["x-model-version"] == version
            assert np.array_equal(painted(r), before)
        load.wait_for(8)
    assert {status for _, status, _, _ in load.answers} == {200} and load.errors == []
    styles = httpx.get(srv.url + "/styles").json()
    assert "beta.safetensors" in styles["refused"]
    log = full_log(srv)
    assert log.count("style file beta.safetensors refused") == 3 and "Traceback" not in log
    assert "pickle" in log and "non-finite" in log


def rss_mb(pid: int) -> tuple[float, float]:
    """The process's resident memory now and at its peak (VmHWM), in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def test_the_lru_unloads_and_memory_stays_bounded(tmp_path):
    """Six styles the size of the shipped generator (ngf 32, 6 blocks), at most two loaded: cycling through all
    of them three times keeps two loaded, and the peak memory of the later rounds stays within that of the
    first round plus allocator slack, however many loads happened."""
    folder = tmp_path / "styles"
    folder.mkdir()
    names = [f"s{i}" for i in range(6)]
    for i, name in enumerate(names):
        torch.manual_seed(i)
        save_generator(folder / f"{name}.safetensors", init_weights(ResnetGenerator(ngf=32, n_blocks=6,
                                                                                    upsample="resize")))
    srv = Server(folder, ui="false", max_loaded_styles=2).wait_ready()
    try:
        body = encode(photo(256, 256, seed=2))
        peaks, loaded = [], []
        for _ in range(3):
            for name in names:
                with ThreadPoolExecutor(2) as pool:
                    codes = [r.status_code for r in pool.map(lambda _: post(srv.url, body, name), range(2))]
                assert codes == [200, 200]
                loaded.append(httpx.get(srv.url + "/info").json()["loaded_styles"])
            peaks.append(rss_mb(srv.proc.pid)[1])
        assert all(len(now) <= 2 for now in loaded), loaded
        assert all(now[-1] == name for now, name in zip(loaded, names * 3))  # the one just used is kept
        assert 'monet_styles_loaded 2.0' in httpx.get(srv.url + "/metrics").text
        assert full_log(srv).count("unloaded (least recently used") >= 12
        print(f"peak RSS after each round of 6 styles (2 loaded at most): {[round(p) for p in peaks]} MB")
        # 18 loads in all: an unloaded style's memory is given back (else each of 12 more loads would add its own)
        assert peaks[2] - peaks[0] < 80, peaks
    finally:
        srv.stop()


def test_one_styles_heavy_traffic_does_not_starve_another(weights_file, tmp_path):
    """In the batcher itself: 32 requests of style A queued before one of style B. Styles take turns a batch
    each, so B's request is answered after at most one batch of A, not after all of A's."""
    from app.batcher import Batcher

    save_generator(tmp_path / "b.safetensors", small_generator(seed=5))
    a = Translator.from_file(weights_file, device="cpu", precision="fp32", backend="torch")
    b = Translator.from_file(tmp_path / "b.safetensors", device="cpu", precision="fp32", backend="torch")
    done: list[str] = []
    batches: list[set] = []
    for name, t in (("a", a), ("b", b)):
        original = t.translate_many
        t.translate_many = (lambda images, o=original, n=name: batches.append({n}) or o(images))

    async def scenario():
        batcher = Batcher(None, max_batch=4, max_wait_s=0, queue_size=64, translators=lambda: [a, b])
        batcher.start()
        image = np.zeros((32, 32, 3), np.uint8)

        async def one(name, translator):
            await batcher.submit(image, 30, translator=translator)
            done.append(name)

        try:
            tasks = [asyncio.create_task(one("a", a)) for _ in range(32)]
            await asyncio.sleep(0)  # A's requests are queued first
            tasks.append(asyncio.create_task(one("b", b)))
            await asyncio.gather(*tasks)
        finally:
            await batcher.stop()

    asyncio.run(scenario())
    assert len(done) == 33 and done.count("b") == 1
    assert done.index("b") <= 8, done  # after at most two batches of A (one running, one gathered), not 32
    assert len(batches) >= 9 and all(len(s) == 1 for s in batches)
