"""Video painting: speed, flicker, and what a running job costs the service's small requests.

    python -m benchmarks.bench_video [--device auto|cpu|cuda] [--frames 24] [--weights FILE] [--no-server]

1. Frames per second of `model.video.paint_clip` (decode, paint, encode; default settings: steady mode, the
   default stroke scale) at 640x360 and 1280x720, on the device (and, where CUDA is present, on CPU beside it).
2. Flicker: the mean absolute change between consecutive painted frames divided by the same for the input
   frames, on a still scene with sensor noise and on a pan, steady mode against per-frame painting.
3. With the server (unless --no-server): p50 / p99 of sequential 256x256 POST /translate requests with no job,
   then while a 640x360 clip is being painted as a job.
Clips are generated (tests/clips.py); figures are printed as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.runtime import resolve_device  # noqa: E402
from model.translator import Translator  # noqa: E402
from model.video import paint_clip, read_frames  # noqa: E402
from model.weights import SHIPPED_WEIGHTS  # noqa: E402
from tests.clips import pan, still, write_clip  # noqa: E402


def flicker(frames: list[np.ndarray]) -> float:
    return float(np.mean([np.abs(a.astype(np.int16) - b).mean() for a, b in zip(frames, frames[1:])]))


def speed(translator: Translator, folder: Path, frames: int) -> list[dict]:
    rows = []
    for w, h in ((640, 360), (1280, 720)):
        src = write_clip(folder / f"pan{w}.mp4", pan(w, h, frames, step=3), fps=24)
        paint_clip(translator, src, folder / "warm.mp4")  # first-call costs (threads, allocator) out of the timing
        start = time.perf_counter()
        result = paint_clip(translator, src, folder / f"out{w}.mp4")
        seconds = time.perf_counter() - start
        rows.append({"size": f"{w}x{h}", "device": str(translator.device), "frames": result.frames,
                     "frames_per_s": round(result.frames / seconds, 2)})
    return rows


def flicker_rows(translator: Translator, folder: Path, frames: int) -> list[dict]:
    rows = []
    for name, clip in (("still, noisy", still(320, 192, frames)), ("pan", pan(320, 192, frames))):
        src = write_clip(folder / "f.mp4", clip)
        moved = flicker(read_frames(src)[0])
        row = {"clip": name, "input_change": round(moved, 2)}
        for mode in ("per-frame", "steady"):
            paint_clip(translator, src, folder / "fo.mp4", mode=mode)
            row[mode] = round(flicker(read_frames(folder / "fo.mp4")[0]) / moved, 3)
        row["steady / per-frame"] = round(row["steady"] / row["per-frame"], 3)
        rows.append(row)
    return rows


def server_rows(weights: Path, folder: Path) -> list[dict]:
    import httpx

    from tests.conftest import encode, photo
    from tools.serving import Server

    srv = Server({"MONET_WEIGHTS": str(weights)}, log=folder / "server.log", ui="false",
                 jobs_dir=str(folder / "jobs")).wait_ready()
    body = encode(photo(256, 256, seed=1))

    def latencies(n: int, while_job: str | None = None) -> list[float]:
        out = []
        for _ in range(n):
            if while_job is not None and httpx.get(f"{srv.url}/jobs/{while_job}").json()["state"] != "running":
                break
            start = time.perf_counter()
            r = httpx.post(srv.url + "/translate", content=body, headers={"content-type": "image/jpeg"}, timeout=60)
            assert r.status_code == 200
            out.append((time.perf_counter() - start) * 1000)
        return out

    try:
        latencies(5)
        idle = latencies(40)
        clip = write_clip(folder / "job.mp4", pan(640, 360, 240, step=2), fps=24)
        job = httpx.post(srv.url + "/jobs", content=clip.read_bytes(), headers={"content-type": "video/mp4"}).json()
        while httpx.get(f"{srv.url}/jobs/{job['id']}").json()["state"] != "running":
            time.sleep(0.05)
        busy = latencies(40, job["id"])
        httpx.delete(f"{srv.url}/jobs/{job['id']}")
    finally:
        srv.stop()
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 1)  # noqa: E731
    return [{"requests": "256x256, no job", "n": len(idle), "p50_ms": pct(idle, 50), "p99_ms": pct(idle, 99)},
            {"requests": "256x256, a 640x360 job running", "n": len(busy), "p50_ms": pct(busy, 50),
             "p99_ms": pct(busy, 99)}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS)
    p.add_argument("--no-server", action="store_true")
    args = p.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        devices = [device] + ([resolve_device("cpu")] if device.type == "cuda" else [])
        for d in devices:
            translator = Translator.from_file(args.weights, device=str(d))
            for row in speed(translator, folder, args.frames):
                print(json.dumps({"bench": "speed", **row}), flush=True)
        translator = Translator.from_file(args.weights, device=str(device))
        for row in flicker_rows(translator, folder, max(args.frames, 12)):
            print(json.dumps({"bench": "flicker", **row}), flush=True)
        if not args.no_server:
            for row in server_rows(args.weights, folder):
                print(json.dumps({"bench": "service", **row}), flush=True)


if __name__ == "__main__":
    main()
