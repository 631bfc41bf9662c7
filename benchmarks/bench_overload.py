"""How fast an overloaded server says no: N concurrent 256x256 uploads against the default queue (64), the
latency of the 503s beside that of the 200s, and how many uploads were decoded (each refusal should cost none).

    python -m benchmarks.bench_overload [--clients 200] [--weights FILE] [--multipart]
"""
from __future__ import annotations

import argparse
import io
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from model.weights import SHIPPED_WEIGHTS
from tools.serving import Server


def upload(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS)
    p.add_argument("--multipart", action="store_true", help="send multipart bodies (curl -F) instead of raw ones")
    args = p.parse_args(argv)
    server = Server({"MONET_WEIGHTS": str(args.weights), "MONET_UI": "false"}).wait_ready()
    try:
        body = upload(0)
        start = threading.Barrier(args.clients)
        results: list[tuple[int, float]] = []

        def one():
            with httpx.Client(timeout=120) as client:
                start.wait()
                t = time.perf_counter()
                if args.multipart:
                    r = client.post(server.url + "/translate", files={"image": ("p.jpg", body, "image/jpeg")})
                else:
                    r = client.post(server.url + "/translate", content=body, headers={"content-type": "image/jpeg"})
                results.append((r.status_code, (time.perf_counter() - t) * 1000))

        threads = [threading.Thread(target=one) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = httpx.get(server.url + "/metrics").text
        decodes = float(re.search(r"^monet_decodes_total (\S+)$", metrics, re.M).group(1))
    finally:
        server.stop()
    ok = [ms for status, ms in results if status == 200]
    busy = [ms for status, ms in results if status == 503]
    other = sorted({status for status, _ in results} - {200, 503})
    print(f"{args.clients} concurrent 256x256 JPEG uploads ({'multipart' if args.multipart else 'raw'}), queue 64")
    print(f"  200: {len(ok)}, p50 {percentile(ok, 50):.0f} ms, p99 {percentile(ok, 99):.0f} ms")
    print(f"  503: {len(busy)}, p50 {percentile(busy, 50):.0f} ms, p99 {percentile(busy, 99):.0f} ms")
    print(f"  other statuses: {other or 'none'}; uploads decoded: {decodes:.0f} (of {args.clients})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
