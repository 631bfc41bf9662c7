"""Video (model/video.py, app/jobs.py): clips painted with steady colours, from the CLI and as jobs of the real
server. The clips are made here (tests/clips.py)."""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from model.translator import Translator
from model.video import VideoError, paint_clip, probe, read_frames
from model.weights import SHIPPED_WEIGHTS, save_generator
from tests.clips import cut, pan, still, write_clip
from tests.conftest import ROOT, Server, encode, photo, run_module, small_generator

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "g.safetensors"
    save_generator(path, small_generator(ngf=8, n_blocks=1))
    return path


@pytest.fixture(scope="module")
def small(weights):
    return Translator.from_file(weights, device="cpu", backend="torch", precision="fp32")


def audio_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as c:
        if not c.streams.audio:
            return []
        return [bytes(p) for p in c.demux(c.streams.audio[0]) if p.size]


def flicker(frames: list[np.ndarray]) -> float:
    """Mean absolute change between consecutive frames."""
    return float(np.mean([np.abs(a.astype(np.int16) - b).mean() for a, b in zip(frames, frames[1:])]))


def test_a_rotated_clip_with_sound_keeps_frames_rate_size_rotation_and_audio(small, tmp_path):
    src = write_clip(tmp_path / "phone.mp4", pan(160, 96, 10), fps=15, audio=True, rotation=90)
    result = paint_clip(small, src, tmp_path / "out" / "phone.mp4")
    before, after = probe(src, rotation=True), probe(tmp_path / "out" / "phone.mp4", rotation=True)
    assert result.frames == 10 and after.frames == 10
    assert (after.width, after.height, after.fps, after.rotation) == (160, 96, 15.0, 90) == (
        before.width, before.height, before.fps, before.rotation)
    assert after.audio == "aac" and audio_packets(tmp_path / "out" / "phone.mp4") == audio_packets(src)
    frames, _ = read_frames(tmp_path / "out" / "phone.mp4")
    source, _ = read_frames(src)
    assert np.abs(frames[3].astype(int) - source[3]).mean() > 5  # painted, not copied


def test_variable_frame_rate_odd_size_and_no_audio_are_kept(small, tmp_path):
    pts = [0, 40, 120, 160, 300, 333, 500]
    src = write_clip(tmp_path / "vfr.mp4", still(161, 95, 7), pts=pts)
    paint_clip(small, src, tmp_path / "vfr-out.mp4")
    info = probe(tmp_path / "vfr-out.mp4")
    assert (info.width, info.height, info.audio) == (161, 95, None)
    _, before = read_frames(src)
    frames, after = read_frames(tmp_path / "vfr-out.mp4")
    assert len(frames) == 7 and after == before


def test_shots_are_found_from_the_frames(small, tmp_path):
    assert paint_clip(small, write_clip(tmp_path / "cut.mp4", cut(128, 96, 8)), tmp_path / "a.mp4").shots == 2
    assert paint_clip(small, write_clip(tmp_path / "pan.mp4", pan(128, 96, 8)), tmp_path / "b.mp4").shots == 1


def test_steady_mode_flickers_clearly_less_than_per_frame_painting(tmp_path):
    """The shipped generator paints sensor noise as texture: painted frame by frame, a still noisy scene
    shimmers (its frame-to-frame change is twice the input's); steady mode must cut that clearly, and must
    not add flicker on a pan."""
    translator = Translator.from_file(SHIPPED_WEIGHTS, device="cpu", backend="torch", precision="fp32")
    ratios = {}
    for name, frames in (("still", still(192, 128, 10)), ("pan", pan(192, 128, 10))):
        src = write_clip(tmp_path / f"{name}.mp4", frames)
        moved = flicker(read_frames(src)[0])
        for mode in ("per-frame", "steady"):
            paint_clip(translator, src, tmp_path / f"{name}-{mode}.mp4", mode=mode)
            ratios[name, mode] = flicker(read_frames(tmp_path / f"{name}-{mode}.mp4")[0]) / moved
    assert ratios["still", "steady"] < 0.6 * ratios["still", "per-frame"], ratios
    assert ratios["pan", "steady"] <= 1.05 * ratios["pan", "per-frame"], ratios


def test_a_frame_lets_a_waiting_request_use_the_model_between_its_layers(small):
    """A frame holds the model for all its layers; a request that asks for the model mid-frame gets it at the
    next layer boundary, not after the frame (the lock is FIFO: the frame takes it back after the request)."""
    import threading

    from model.video import FramePainter

    painter = FramePainter(small, (96, 64))
    lock, events = small._lock, []
    hooks = [layer.register_forward_hook(lambda *_: events.append("layer")) for layer in painter.net.net.model]
    frame = np.asarray(photo(96, 64).convert("RGB"))

    def request():
        with lock:
            events.append("request")

    def queued(n):  # threads holding a ticket: the one served and those waiting
        deadline = time.monotonic() + 10
        while lock._next - lock._serving < n and time.monotonic() < deadline:
            time.sleep(0.001)

    try:
        with lock:  # the frame, then the request, queue behind the test
            frame_thread = threading.Thread(target=painter.paint, args=(frame,))
            frame_thread.start()
            queued(2)
            request_thread = threading.Thread(target=request)
            request_thread.start()
            queued(3)
        frame_thread.join(30), request_thread.join(30)
    finally:
        for h in hooks:
            h.remove()
    layers = len(painter.net.net.model)
    assert events.count("layer") == layers and events.count("request") == 1
    assert events.index("request") == 1, events  # right after the frame's first layer
    # and the painting is the same as without turn-taking
    alone = FramePainter(small, (96, 64)).paint(frame)
    assert np.array_equal(alone, FramePainter(small, (96, 64)).paint(frame))


def test_damaged_truncated_and_empty_clips_are_refused_in_one_line(small, tmp_path):
    good = write_clip(tmp_path / "good.mp4", pan(96, 64, 6))
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video")
    (tmp_path / "cut.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with av.open(str(tmp_path / "empty.mp4"), "w") as out:  # a header and no frames
        s = out.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    photo(64, 48).save(tmp_path / "photo.mp4", "JPEG")  # a photo named like a clip
    for name in ("junk.mp4", "cut.mp4", "empty.mp4", "photo.mp4"):
        with pytest.raises(VideoError) as err:
            paint_clip(small, tmp_path / name, tmp_path / "out" / name)
        assert "\n" not in str(err.value) and str(err.value)
        assert not (tmp_path / "out" / name).exists()
    assert not list((tmp_path / "out").glob(".*"))  # nothing half-written left behind


def test_the_cli_paints_folders_mixing_photos_and_clips(weights, tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    write_clip(src / "sub" / "walk.mp4", pan(96, 64, 5), audio=True)
    photo(80, 60).save(src / "view.jpg")
    (src / "broken.mov").write_bytes(b"\x00" * 100)
    run = run_module("model.translate", str(src), "--out", str(tmp_path / "out"), "--weights", str(weights),
                     "--device", "cpu")
    assert run.returncode == 1
    assert (tmp_path / "out" / "view.png").exists() and probe(tmp_path / "out" / "sub" / "walk.mp4").frames == 5
    warnings = [line for line in run.stderr.splitlines() if "broken.mov" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: skipping")
    assert "Traceback" not in run.stderr
    per_frame = run_module("model.translate", str(src / "sub"), "--out", str(tmp_path / "pf"), "--weights",
                           str(weights), "--device", "cpu", "--video-mode", "per-frame")
    assert per_frame.returncode == 0 and (tmp_path / "pf" / "walk.mp4").exists()
    bad = run_module("model.translate", str(src), "--out", str(tmp_path / "x"), "--smoothing", "1.5")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


# -- the service's jobs ---------------------------------------------------------------------------------

def log_of(server: Server) -> str:
    """The server's whole log (``output()`` keeps only its end)."""
    server.log.seek(0)
    return server.log.read()


def wait_for(url: str, job_id: str, states=("done", "failed", "cancelled"), timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(f"{url}/jobs/{job_id}").json()
        if state["state"] in states:
            return state
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {states}: {state}")


@pytest.fixture
def server(weights, tmp_path):
    srv = Server(weights, ui="false", jobs_dir=str(tmp_path / "jobs"), jobs_max_duration_s=30,
                 jobs_max_upload_bytes=2_000_000).wait_ready()
    yield srv
    srv.stop()


def test_job_lifecycle_submit_poll_download_delete(server, tmp_path):
    clip = write_clip(tmp_path / "walk.mp4", pan(128, 96, 12), fps=12, audio=True)
    r = httpx.post(server.url + "/jobs", files={"file": ("walk.mp4", clip.read_bytes(), "video/mp4")})
    assert r.status_code == 202 and r.headers["location"] == f"/jobs/{r.json()['id']}"
    job = r.json()
    assert job["state"] in ("queued", "running") and job["frames_total"] == 12
    done = wait_for(server.url, job["id"])
    assert done["state"] == "done" and done["frames_done"] == 12 and done["error"] is None
    result = httpx.get(server.url + done["result_url"])
    assert result.status_code == 200 and result.headers["content-type"] == "video/mp4"
    (tmp_path / "got.mp4").write_bytes(result.content)
    got = probe(tmp_path / "got.mp4")
    assert (got.frames, got.width, got.height, got.audio) == (12, 128, 96, "aac")
    raw = httpx.post(server.url + "/jobs", content=clip.read_bytes(), headers={"content-type": "video/mp4"})
    assert raw.status_code == 202
    assert wait_for(server.url, raw.json()["id"])["state"] == "done"
    metrics = httpx.get(server.url + "/metrics").text
    assert 'monet_jobs{state="done"} 2.0' in metrics and "monet_video_frames_painted_total 24.0" in metrics
    gone = httpx.delete(f"{server.url}/jobs/{job['id']}")
    assert gone.status_code == 200
    assert httpx.get(f"{server.url}/jobs/{job['id']}").status_code == 404
    assert httpx.get(f"{server.url}/jobs/{job['id']}/result").status_code == 404
    assert not (tmp_path / "jobs" / job["id"]).exists()
    events = [line for line in log_of(server).splitlines() if f"job {job['id']}" in line]
    assert [e.split(f"job {job['id']} ")[1].split(":")[0].split(" (")[0] for e in events] == ["queued", "running",
                                                                                              "done"]


def zip_of(path: Path, entries: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def test_a_zip_of_photos_is_painted_as_a_job_and_bad_photos_are_skipped_by_name(server, tmp_path):
    import io
    import zipfile

    from PIL import Image

    rotated = io.BytesIO()  # stored 80x60, shown 60x80 (EXIF orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo(80, 60, seed=3).save(rotated, "JPEG", exif=exif)
    upload = zip_of(tmp_path / "holiday.zip", {
        "a/beach.jpg": encode(photo(96, 64)), "b/beach.jpg": encode(photo(64, 96, seed=1)),
        "phone.jpg": rotated.getvalue(), "broken.png": b"\x89PNG\r\n\x1a\n not really",
        "notes.txt": b"not a photo", "__MACOSX/a/._beach.jpg": b"resource fork", "empty/": b""})
    r = httpx.post(server.url + "/jobs", files={"file": ("holiday.zip", upload.read_bytes(), "application/zip")})
    assert r.status_code == 202, r.text
    assert r.json()["kind"] == "photos" and r.json()["frames_total"] == 4
    done = wait_for(server.url, r.json()["id"])
    assert done["state"] == "done" and done["frames_done"] == 4
    assert len(done["skipped"]) == 1 and done["skipped"][0].startswith("broken.png: ")
    got = httpx.get(server.url + done["result_url"])
    assert got.status_code == 200 and got.headers["content-type"] == "application/zip"
    assert 'filename="holiday-monet.zip"' in got.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(got.content)) as z:
        sizes = {name: Image.open(io.BytesIO(z.read(name))).size for name in z.namelist()}
    assert sizes == {"beach.png": (96, 64), "beach-2.png": (64, 96), "phone.png": (60, 80)}
    assert "monet_video_frames_painted_total 0.0" in httpx.get(server.url + "/metrics").text
    # a zip with no photo, or a damaged one: 415; nothing left behind
    for bad in ({"notes.txt": b"hello"}, None):
        body = zip_of(tmp_path / "bad.zip", bad).read_bytes() if bad else upload.read_bytes()[:-60]
        r = httpx.post(server.url + "/jobs", content=body, headers={"content-type": "application/zip"})
        assert r.status_code == 415 and "zip" in r.json()["detail"], r.text
    assert len([p for p in (tmp_path / "jobs").iterdir()]) == 1


def test_a_zip_over_the_photo_limits_is_refused_from_its_directory(weights, tmp_path):
    srv = Server(weights, ui="false", jobs_dir=str(tmp_path / "jobs"), jobs_max_photos=2,
                 max_upload_bytes=50_000).wait_ready()
    try:
        three = zip_of(tmp_path / "three.zip", {f"{i}.jpg": encode(photo(32, 32, seed=i)) for i in range(3)})
        r = httpx.post(srv.url + "/jobs", content=three.read_bytes(), headers={"content-type": "application/zip"})
        assert r.status_code == 413 and "MONET_JOBS_MAX_PHOTOS" in r.json()["detail"]
        big = zip_of(tmp_path / "big.zip", {"big.png": bytes(60_000)})
        r = httpx.post(srv.url + "/jobs", content=big.read_bytes(), headers={"content-type": "application/zip"})
        assert r.status_code == 413 and "MONET_MAX_UPLOAD_BYTES" in r.json()["detail"]
        assert httpx.get(srv.url + "/healthz").status_code == 200
    finally:
        srv.stop()


def test_jobs_refuse_bad_input_with_the_right_status(server, tmp_path):
    url = server.url + "/jobs"
    r = httpx.post(url, content=b"not a video at all", headers={"content-type": "video/mp4"})
    assert r.status_code == 415 and "MP4" in r.json()["detail"]
    r = httpx.post(url, content=encode(photo(64, 48)), headers={"content-type": "image/jpeg"})
    assert r.status_code == 415
    long_clip = write_clip(tmp_path / "long.mp4", still(64, 48, 40, noise=0), fps=1)  # 40 s > 30 s
    r = httpx.post(url, content=long_clip.read_bytes(), headers={"content-type": "video/mp4"})
    assert r.status_code == 413 and "MONET_JOBS_MAX_DURATION_S" in r.json()["detail"]
    r = httpx.post(url, content=b"\0" * 2_100_000, headers={"content-type": "video/mp4"})
    assert r.status_code == 413
    r = httpx.post(url, files={"image": ("a.mp4", b"x", "video/mp4")})
    assert r.status_code == 422 and "'file'" in r.json()["detail"]
    assert httpx.get(server.url + "/jobs/0123456789abcdef").status_code == 404
    truncated = write_clip(tmp_path / "t.mp4", pan(96, 64, 8))
    data = truncated.read_bytes()
    r = httpx.post(url, content=data[: len(data) * 2 // 3], headers={"content-type": "video/mp4"})
    if r.status_code == 202:  # the header survived: the job fails with one line
        state = wait_for(server.url, r.json()["id"])
        assert state["state"] == "failed" and "\n" not in state["error"]
        assert httpx.get(f"{server.url}/jobs/{r.json()['id']}/result").status_code == 409
    else:
        assert r.status_code == 415
    assert not [p for p in (tmp_path / "jobs").rglob("*") if p.name.startswith(".")]
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_a_running_job_is_cancelled_and_small_requests_are_answered_meanwhile(server, tmp_path):
    clip = write_clip(tmp_path / "long.mp4", pan(320, 192, 120, step=2), fps=24)
    job = httpx.post(server.url + "/jobs", content=clip.read_bytes(), headers={"content-type": "video/mp4"}).json()
    wait_for(server.url, job["id"], states=("running",))
    deadline = time.monotonic() + 60
    while httpx.get(f"{server.url}/jobs/{job['id']}").json()["frames_done"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    small = httpx.post(server.url + "/translate", content=encode(photo(256, 256)),
                       headers={"content-type": "image/jpeg"}, timeout=60)
    assert small.status_code == 200
    state = httpx.get(f"{server.url}/jobs/{job['id']}").json()
    assert state["state"] == "running" and 0 < state["frames_done"] < 120 and state["eta_s"] is not None
    assert httpx.delete(f"{server.url}/jobs/{job['id']}").json()["state"] == "cancelled"
    deadline = time.monotonic() + 30
    while (tmp_path / "jobs" / job["id"]).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (tmp_path / "jobs" / job["id"]).exists()
    assert f"job {job['id']} cancelled" in log_of(server)


def test_finished_jobs_expire_after_their_ttl(weights, tmp_path):
    srv = Server(weights, ui="false", jobs_dir=str(tmp_path / "jobs"), jobs_ttl_s=1).wait_ready()
    try:
        clip = write_clip(tmp_path / "c.mp4", pan(96, 64, 4))
        job = httpx.post(srv.url + "/jobs", content=clip.read_bytes(), headers={"content-type": "video/mp4"}).json()
        wait_for(srv.url, job["id"])
        deadline = time.monotonic() + 10
        while httpx.get(f"{srv.url}/jobs/{job['id']}").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(f"{srv.url}/jobs/{job['id']}").status_code == 404
        assert not (tmp_path / "jobs" / job["id"]).exists() and f"job {job['id']} expired" in log_of(srv)
    finally:
        srv.stop()


def test_a_restart_fails_the_interrupted_job_and_keeps_finished_ones(weights, tmp_path):
    jobs = tmp_path / "jobs"
    srv = Server(weights, ui="false", jobs_dir=str(jobs)).wait_ready()
    short = write_clip(tmp_path / "s.mp4", pan(96, 64, 4))
    finished = httpx.post(srv.url + "/jobs", content=short.read_bytes(), headers={"content-type": "video/mp4"}).json()
    wait_for(srv.url, finished["id"])
    long_clip = write_clip(tmp_path / "l.mp4", pan(320, 192, 200, step=1), fps=24)
    running = httpx.post(srv.url + "/jobs", content=long_clip.read_bytes(),
                         headers={"content-type": "video/mp4"}).json()
    wait_for(srv.url, running["id"], states=("running",))
    srv.proc.send_signal(signal.SIGKILL)  # a crash: nothing is tidied up
    srv.proc.wait(30)
    srv.stop()
    again = Server(weights, ui="false", jobs_dir=str(jobs)).wait_ready()
    try:
        state = httpx.get(f"{again.url}/jobs/{running['id']}").json()
        assert state["state"] == "failed" and "restart" in state["error"]
        assert httpx.get(f"{again.url}/jobs/{finished['id']}").json()["state"] == "done"
        assert httpx.get(f"{again.url}/jobs/{finished['id']}/result").status_code == 200
        assert not [p for p in jobs.rglob("*") if p.name.startswith(".")]  # no half-written result
    finally:
        again.stop()


def test_the_ui_paints_a_clip_through_a_job(weights, tmp_path):
    from gradio_client import Client, handle_file

    srv = Server(weights, jobs_dir=str(tmp_path / "jobs")).wait_ready()
    try:
        clip = write_clip(tmp_path / "ui.mp4", pan(96, 64, 6))
        client = Client(srv.url + "/ui/", verbose=False)
        shown, download = client.predict(handle_file(str(clip)), api_name="/paint_clip")
        path = shown["video"] if isinstance(shown, dict) else shown
        assert probe(path).frames == 6 and probe(download).frames == 6
    finally:
        srv.stop()


def test_video_module_keeps_model_free_of_the_web_stack():
    code = "import sys, model.video; print(any(m.split('.')[0] in ('fastapi', 'gradio', 'starlette') for m in sys.modules))"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
