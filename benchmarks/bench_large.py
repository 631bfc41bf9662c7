"""Full-size painting of phone-sized photos: wall time and peak memory through the CLI and the service, and how
long a 256x256 request waits while a 48 MP painting is in progress.

    python -m benchmarks.bench_large [--sizes 24,48] [--skip-cli] [--skip-service] [--skip-hol] [--tiles]
        [--against REV]

The photos are the bundled app/examples/summer-palace.jpg enlarged to 24 MP (5952x4032) and 48 MP (8064x6048)
with fine noise added, so that their JPEGs carry the bytes of real photos (about 8-15 MB).

1. CLI, ``python -m model.translate`` in a subprocess per run, peak RSS from the kernel (ru_maxrss):
   - today's path before this change: ``--tile 0 --stroke-scale 1`` (the whole image as one forward pass; only at
     24 MP, since 48 MP needs more than this machine's memory);
   - full size pixel for pixel in tiles: ``--stroke-scale 1``;
   - the default: stroke scale from the size (longer side / 1024), painted in tiles where needed, guided upsampling.
2. The service (``python -m app`` with its defaults): the same photos posted one at a time, with the server's
   peak RSS; beside it the old default ``MONET_MAX_SIDE=1024`` (a 1024-pixel painting back).
3. Head-of-line blocking: 256x256 requests from 4 clients, each one after another, p50/p99, first alone, then
   while 48 MP photos are painted (the default stroke scale, back to back) by another client; with the server's
   peak RSS. ``--against REV`` runs REV's server the same way in the same run.
4. ``--tiles``: the CLI on a 4032x3024 photo at the default stroke scale and at ``--stroke-scale 3`` (tiles).
"""
from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tools.serving import ROOT, Server, revision

SIZES = {24: (5952, 4032), 48: (8064, 6048)}


def big_photo(size: tuple[int, int], seed: int = 0) -> bytes:
    src = Image.open(ROOT / "app" / "examples" / "summer-palace.jpg").convert("RGB")
    img = np.asarray(src.resize(size, Image.Resampling.LANCZOS), dtype=np.int16)
    noise = np.random.default_rng(seed).integers(-6, 7, size=img.shape[:2] + (1,), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=88)
    return buf.getvalue()


MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def cli_run(src: Path, out: Path, flags: list[str], root: Path = ROOT) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one model.translate run in a fresh process (measured by a wrapper
    process of its own, whose only child it is)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "model.translate", str(src),
                           "--out", str(out), *flags], cwd=root, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"model.translate {flags} failed: {done.stderr.strip()[-500:]}")
    return wall, int(done.stdout.split()[-1]) / 1024


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


class PeakRSS:
    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, rss_mb(pid), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def post(url: str, body: bytes, **params) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    r = httpx.post(url + "/translate", content=body, params={"format": "jpeg", **params},
                   headers={"content-type": "image/jpeg"}, timeout=600)
    return r, time.perf_counter() - started


def service_rows(photos: dict[int, bytes]) -> None:
    print("\n| service, one request at a time | photo | answer | wall s | server Server-Timing | server peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, env in (("old default: MONET_MAX_SIDE=1024", {"max_side": 1024}), ("full size (the defaults)", {})):
        srv = Server(request_timeout_s=600, **env).wait_ready()
        try:
            post(srv.url, photos[min(photos)])  # warm the large path
            for mp, body in photos.items():
                with PeakRSS(srv.proc.pid) as rss:
                    r, wall = post(srv.url, body)
                size = Image.open(io.BytesIO(r.content)).size if r.status_code == 200 else r.text[:80]
                print(f"| {label} | {mp} MP | {r.status_code} {size} | {wall:.1f} | "
                      f"{r.headers.get('server-timing', '')} | {rss.peak:.0f} |", flush=True)
        finally:
            srv.stop()


def hol_rows(photo48: bytes, roots: dict[str, Path], clients: int = 4, n: int = 30) -> None:
    """256x256 requests from ``clients`` clients, each one after another: alone, then while one more client
    sends 48 MP photos (the default stroke scale) back to back; per server root, with the server's peak RSS."""
    small = io.BytesIO()
    Image.open(ROOT / "app" / "examples" / "kunming-lake.jpg").convert("RGB").resize((256, 256)).save(small, "JPEG")
    body = small.getvalue()

    def p(xs, q):
        return float(np.percentile(xs, q)) if xs else float("nan")

    def smalls(url: str, keep_going) -> list[float]:
        out: list[float] = []

        def one_client():
            while keep_going(len(out)):
                r, wall = post(url, body)
                assert r.status_code == 200, r.text
                out.append(wall * 1000)

        threads = [threading.Thread(target=one_client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    print(f"\n| 256x256 requests, {clients} clients one after another | server | n | p50 ms | p99 ms | "
          "server peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, root in roots.items():
        srv = Server(request_timeout_s=600, root=root).wait_ready()
        try:
            for _ in range(3):
                post(srv.url, body)
            srv.wait_large_ready()  # where it exists: the stages and tile graphs converted in the background
            post(srv.url, photo48)  # the large path warm
            alone = smalls(srv.url, lambda done: done < n * clients)
            result, painting = {}, threading.Event()

            def large():
                for _ in range(3):
                    r, wall = post(srv.url, photo48)
                    result.update(status=r.status_code, wall=wall, timing=r.headers.get("server-timing", ""))
                painting.set()

            with PeakRSS(srv.proc.pid) as rss:
                painter = threading.Thread(target=large)
                painter.start()
                time.sleep(1.0)  # uploaded and decoding
                during = smalls(srv.url, lambda done: not painting.is_set())
                painter.join()
        finally:
            srv.stop()
        print(f"| alone | {name} | {len(alone)} | {p(alone, 50):.0f} | {p(alone, 99):.0f} | |")
        print(f"| while 48 MP photos are painted, back to back | {name} | {len(during)} | {p(during, 50):.0f} | "
              f"{p(during, 99):.0f} | {rss.peak:.0f} |")
        print(f"(p99 during / alone: {p(during, 99) / p(alone, 99):.2f}; the last 48 MP painting: "
              f"{result.get('status')} in {result.get('wall', 0):.1f} s; {result.get('timing')})", flush=True)


def tile_rows(roots: dict[str, Path]) -> None:
    """``model.translate --stroke-scale 3`` on a 4032x3024 photo (tiles with shared statistics) beside the default
    stroke scale (painted whole), per checkout: time should follow the pixels painted."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "phone.jpg"
        src.write_bytes(big_photo((4032, 3024)))
        print("\n| CLI on a 4032x3024 photo | checkout | wall s | peak RSS MB |")
        print("| --- | --- | --- | --- |")
        for name, root in roots.items():
            for label, flags in (("default stroke scale (3.9: 1032x774, whole)", []),
                                 ("--stroke-scale 3 (1344x1008: tiles of 1024)", ["--stroke-scale", "3"])):
                wall, peak = cli_run(src, Path(tmp) / "out", flags, root)
                print(f"| {label} | {name} | {wall:.1f} | {peak:.0f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="24,48", help="megapixels: 24 and/or 48")
    p.add_argument("--skip-cli", action="store_true")
    p.add_argument("--skip-service", action="store_true")
    p.add_argument("--skip-hol", action="store_true")
    p.add_argument("--tiles", action="store_true", help="the CLI on a 4032x3024 photo at the default stroke scale "
                   "and at 3 (tiles)")
    p.add_argument("--against", help="--tiles and the head-of-line rows: also run this git revision (a worktree, "
                   "e.g. the previous main) in the same run")
    p.add_argument("--defaults-only", action="store_true", help="CLI: only the default stroke scale (the pixel for "
                   "pixel and whole-image rows take minutes)")
    args = p.parse_args()
    photos = {int(s): big_photo(SIZES[int(s)]) for s in args.sizes.split(",")}
    for mp, body in photos.items():
        print(f"{mp} MP photo: {SIZES[mp][0]}x{SIZES[mp][1]}, JPEG {len(body) / 1e6:.1f} MB")
    if not args.skip_cli:
        print("\n| CLI (model.translate) | photo | wall s | peak RSS MB |")
        print("| --- | --- | --- | --- |")
        with tempfile.TemporaryDirectory() as tmp:
            for mp, body in photos.items():
                src = Path(tmp) / f"photo{mp}.jpg"
                src.write_bytes(body)
                plan = [("default (stroke scale from the size)", [])]
                if mp == 24 and not args.defaults_only:  # pixel for pixel is about 4 minutes a 48 MP photo here, and the old path 16 GB
                    plan += [("pixel for pixel, tiles of 1024", ["--stroke-scale", "1"]),
                             ("the path before: whole image, one pass", ["--tile", "0", "--stroke-scale", "1"])]
                for label, flags in plan:
                    wall, peak = cli_run(src, Path(tmp) / "out", flags)
                    print(f"| {label} | {mp} MP | {wall:.1f} | {peak:.0f} |", flush=True)
    if not args.skip_service:
        service_rows(photos)
    with revision(args.against) as other:
        roots = ({f"main ({args.against})": other} if other else {}) | {"ours": ROOT}
        if args.tiles:
            tile_rows(roots)
        if not args.skip_hol and 48 in photos:
            hol_rows(photos[48], roots)


if __name__ == "__main__":
    main()
