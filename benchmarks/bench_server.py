"""Server throughput and latency under N concurrent clients on loopback, beside its ceiling and a plain baseline.

    python benchmarks/bench_server.py [--clients 8] [--seconds 15] [--weights FILE] [--device auto]

Measured in one run, one after the other:
  ceiling   the Translator alone, in this process, on batches of --max-batch 256x256 images;
  batched   `python -m app` with dynamic batching (max batch --max-batch, wait --wait-ms);
  plain     `python -m app` with batching off (MONET_MAX_BATCH_SIZE=1), the plain-server baseline.
Clients post 256x256 JPEGs (raw image/jpeg bodies) back to back for --seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.networks import ResnetGenerator, init_weights  # noqa: E402
from model.translator import DEFAULT_WEIGHTS, Translator  # noqa: E402
from model.weights import save_generator  # noqa: E402


def jpegs(n: int, photos: Path | None) -> list[bytes]:
    files = sorted(photos.glob("*.jpg"))[:n] if photos and photos.is_dir() else []
    out = []
    for i in range(n):
        if files:
            img = Image.open(files[i % len(files)]).convert("RGB").resize((256, 256))
        else:
            rng = np.random.default_rng(i)
            img = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def ceiling(weights: Path, device: str, batch: int, seconds: float) -> float:
    t = Translator.from_file(weights, device=device, max_batch=batch)
    arr = np.random.default_rng(0).integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8)
    t.translate_arrays(arr)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t.translate_arrays(arr)
        n += batch
    return n / (time.perf_counter() - start)


def start_server(weights: Path, device: str, max_batch: int, wait_ms: float, clients: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MONET_WEIGHTS": str(weights), "MONET_PORT": str(port), "MONET_DEVICE": device,
           "MONET_MAX_BATCH_SIZE": str(max_batch), "MONET_MAX_BATCH_WAIT_MS": str(wait_ms),
           "MONET_QUEUE_SIZE": str(max(64, clients * 2)), "MONET_UI": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not become ready")


async def load(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    latencies, errors = [], 0
    stop_at = time.perf_counter() + seconds

    async def client(i: int, http: httpx.AsyncClient):
        nonlocal errors
        k = i
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            r = await http.post(url + "/translate", content=bodies[k % len(bodies)],
                                headers={"content-type": "image/jpeg"})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
            k += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await client(0, http)  # one warm-up request path
        latencies.clear()
        start = time.perf_counter()
        stop_at = start + seconds
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"images_per_s": len(latencies) / elapsed, "errors": errors, "n": len(latencies),
            "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p95": float(np.percentile(ms, 95)) if len(ms) else float("nan"),
            "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--wait-ms", type=float, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", type=Path, default=None, help="default: weights/ if present, else a random 9-block generator")
    p.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "photo")
    args = p.parse_args()
    weights = args.weights or (DEFAULT_WEIGHTS if DEFAULT_WEIGHTS.exists() else None)
    if weights is None:
        weights = Path(tempfile.mkdtemp()) / "random9.safetensors"
        save_generator(weights, init_weights(ResnetGenerator()))
    bodies = jpegs(32, args.photos)
    print(f"weights {weights}; {args.clients} clients; {args.seconds:g} s per run; 256x256 JPEG bodies", flush=True)
    top = ceiling(weights, args.device, args.max_batch, args.seconds)
    print(f"ceiling  translator alone, batch {args.max_batch:<2}      : {top:7.2f} images/s", flush=True)
    results = {}
    for name, max_batch in (("batched", args.max_batch), ("plain", 1)):
        proc, url = start_server(weights, args.device, max_batch, args.wait_ms, args.clients)
        try:
            results[name] = r = asyncio.run(load(url, bodies, args.clients, args.seconds))
        finally:
            proc.terminate()
            proc.wait(30)
        label = f"server, batching {'on (max ' + str(max_batch) + ')' if max_batch > 1 else 'off'}"
        print(f"{name:<8} {label:<30}: {r['images_per_s']:7.2f} images/s  p50 {r['p50']:7.1f} ms  "
              f"p95 {r['p95']:7.1f} ms  p99 {r['p99']:7.1f} ms  errors {r['errors']}", flush=True)
    b, plain = results["batched"]["images_per_s"], results["plain"]["images_per_s"]
    print(f"batched / ceiling = {b / top:.2f}   batched / plain = {b / plain:.2f}")


if __name__ == "__main__":
    main()
