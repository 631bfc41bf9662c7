"""How fast an overloaded server says no: N concurrent 256x256 uploads against the default queue (64), the
latency of the 503s beside that of the 200s, and how many uploads were decoded (each refusal should cost none).

    python -m benchmarks.bench_overload [--clients 200] [--weights FILE] [--multipart] [--against REV] [--rounds N] [--size WxH] [--keep-alive]

``--against REV`` runs REV's server (a git worktree, e.g. the previous main) the same way, alternating, in the
same run.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from model.weights import SHIPPED_WEIGHTS
from tools.serving import ROOT, Server, revision


def upload(seed: int, size: tuple[int, int] = (256, 256)) -> bytes:
    """A JPEG of ``size``: noise at 256x256; larger, the bundled example photo enlarged (a photo's bytes)."""
    if size != (256, 256):
        from benchmarks.bench_large import big_photo

        return big_photo(size, seed)
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def request_bytes(body: bytes, multipart: bool, keep_alive: bool = False) -> bytes:
    """One complete POST /translate, raw or multipart (as curl -F sends it); the connection closes after it
    unless ``keep_alive``."""
    kind = "image/jpeg"
    if multipart:
        boundary = "----monetbench"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + body + f"\r\n--{boundary}--\r\n".encode()
        kind = f"multipart/form-data; boundary={boundary}"
    head = (f"POST /translate HTTP/1.1\r\nHost: bench\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n").encode()
    return head + body


async def burst(url: str, request: bytes, clients: int, keep_alive: bool = False) -> list[tuple[int, float]]:
    """``clients`` connections opened first, then the same request sent on all of them at once; each
    answer's status and milliseconds from its send. One asyncio client: little client time in the figures
    (a thread per client on 2 cores put hundreds of milliseconds of the client's own GIL waits in them)."""
    host, port = url.removeprefix("http://").split(":")
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(clients)]
    go = asyncio.Event()

    async def one(reader, writer) -> tuple[int, float]:
        await go.wait()
        t = time.perf_counter()
        writer.write(request)
        await writer.drain()
        if keep_alive:  # the answer ends where its Content-Length says
            answer = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"content-length: (\d+)", answer, re.I).group(1))
            answer += await reader.readexactly(length)
        else:
            answer = await reader.read()  # Connection: close: the answer ends with the connection
        writer.close()
        return int(answer.split(b" ", 2)[1]), (time.perf_counter() - t) * 1000

    tasks = [asyncio.create_task(one(r, w)) for r, w in conns]
    await asyncio.sleep(0.2)
    go.set()
    return await asyncio.gather(*tasks)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def one_burst(root: Path, weights: Path, request: bytes, clients: int, keep_alive: bool = False) -> dict:
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = Server({"MONET_WEIGHTS": str(weights), "MONET_UI": "false"}, log=log, root=root).wait_ready()
    server.wait_large_ready()
    try:
        results = asyncio.run(burst(server.url, request, clients, keep_alive))
        metrics = httpx.get(server.url + "/metrics").text
        decodes = float(re.search(r"^monet_decodes_total (\S+)$", metrics, re.M).group(1))
    finally:
        server.stop()
    served = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"method": "POST"')]
    return {"ok": [ms for status, ms in results if status == 200],
            "busy": [ms for status, ms in results if status == 503],
            "inside": [r["ms"] for r in served if r["status"] == 503],  # the server's own time, middleware in to out
            "other": sorted({status for status, _ in results} - {200, 503}), "decodes": decodes,
            "late": [ms for status, ms in results if status == 504]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS)
    p.add_argument("--multipart", action="store_true", help="send multipart bodies (curl -F) instead of raw ones")
    p.add_argument("--against", help="also run this git revision's server (a worktree), alternating")
    p.add_argument("--rounds", type=int, default=1, help="bursts per server")
    p.add_argument("--size", default="256x256", help="the uploads' WxH (e.g. 1024x768, 6000x6000)")
    p.add_argument("--keep-alive", action="store_true", help="keep-alive connections, as browsers and HTTP "
                   "libraries send (default: Connection: close)")
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    request = request_bytes(upload(0, size), args.multipart, args.keep_alive)
    print(f"{args.clients} concurrent {args.size} JPEG uploads ({'multipart' if args.multipart else 'raw'}, "
          f"{'keep-alive' if args.keep_alive else 'Connection: close'}, "
          f"{len(request) / 1e6:.1f} MB each), queue 64")
    with revision(args.against) as other:
        roots = ({f"main ({args.against})": other} if other else {}) | {"ours": ROOT}
        for round_ in range(args.rounds):
            for name, root in roots.items():
                r = one_burst(root, args.weights, request, args.clients, args.keep_alive)
                ok, busy, inside = r["ok"], r["busy"], r["inside"]
                print(f"round {round_ + 1} {name}:")
                print(f"  200: {len(ok)}, p50 {percentile(ok, 50):.0f} ms, p99 {percentile(ok, 99):.0f} ms")
                print(f"  503: {len(busy)}, p50 {percentile(busy, 50):.0f} ms, p99 {percentile(busy, 99):.0f} ms "
                      f"(in the server: p50 {percentile(inside, 50):.0f} ms, p99 {percentile(inside, 99):.0f} ms)")
                print(f"  other statuses: {r['other'] or 'none'} (504: {len(r['late'])}); uploads decoded: "
                      f"{r['decodes']:.0f} (of {args.clients})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
