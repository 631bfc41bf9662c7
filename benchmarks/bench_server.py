"""The server beside its model: throughput with 8 clients as a share of the translator alone at its best batch
size, at 256x256 and at 1024x768; latency at 1 client; and where a request's time goes (Server-Timing).

    python -m benchmarks.bench_server [--clients 8] [--seconds 15] [--weights FILE] [--device auto] [--sizes 256x256,1024x768]

On CUDA the defaults grow to 256 clients, batches of up to 64 and a ceiling measured on batches up to 128,
and each server run also reports the GPU memory its process holds (nvidia-smi).

Measured in one run, one after the other, for each size:
  ceiling   the Translator alone, in this process, on batches of 1, 2, 4, 8 same-size images (its best);
  server    `python -m app` (dynamic batching, max --max-batch), --clients clients posting JPEGs back to back;
  1 client  the same server with one client: p50 against the translator's own batch-1 time;
  plain     at the first size only: the server with batching off (MONET_MAX_BATCH_SIZE=1).
The server's Server-Timing headers (decode, queue, compute, encode) are averaged; the rest of the latency
is HTTP, routing and scheduling. "Outside the forward pass" is the share of a request's time not in compute
(on CUDA: the host's share).

    python -m benchmarks.bench_server --overhead [--against REV] [--repeats 2] [--seconds 15]

One server process's own ceiling, whatever the model: a near-free generator, 256x256 JPEGs in and PNGs out,
raw and multipart bodies, --clients keep-alive connections from one asyncio loop on raw sockets (httpx would
cost the 2 cores more than the server does); requests/s, p50/p99, the 1-client p50 and the server process's
CPU milliseconds per request. ``--against REV`` runs REV's server (a git worktree) the same way, alternating.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tools.serving import Server, start_app

ROOT = Path(__file__).resolve().parent.parent

from model.networks import ResnetGenerator, init_weights
from model.runtime import resolve_device
from model.translator import Translator
from model.weights import SHIPPED_WEIGHTS as DEFAULT_WEIGHTS
from model.weights import save_generator


def jpegs(n: int, photos: Path | None, size: tuple[int, int] = (256, 256)) -> list[bytes]:
    files = sorted(photos.glob("*.jpg"))[:n] if photos and photos.is_dir() else []
    out = []
    for i in range(n):
        if files:
            img = Image.open(files[i % len(files)]).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        else:
            rng = np.random.default_rng(i)
            y, x = np.mgrid[0 : size[1], 0 : size[0]]
            base = np.stack([x / size[0], y / size[1], (x + y) / sum(size)], -1) * 200
            img = Image.fromarray(np.clip(base + rng.normal(0, 15, base.shape), 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def ceiling(weights: Path, device: str, size: tuple[int, int], seconds: float,
            batches=(1, 2, 4, 8)) -> tuple[dict[int, float], str]:
    """Images/s of the Translator alone (as the server loads it) on each batch size, and its backend."""
    t = Translator.from_file(weights, device=device, max_batch=max(batches))
    out = {}
    for batch in batches:
        arr = np.asarray(Image.open(io.BytesIO(jpegs(1, None, size)[0])))[None].repeat(batch, 0)
        t.translate_arrays(arr)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / len(batches) or n < 3 * batch:
            t.translate_arrays(arr)
            n += batch
        out[batch] = n / (time.perf_counter() - start)
    return out, t.backend


def start_server(weights: Path, device: str, max_batch: int, wait_ms: float | None, clients: int):
    proc, port = start_app({"MONET_WEIGHTS": str(weights), "MONET_DEVICE": device,
                            "MONET_MAX_BATCH_SIZE": str(max_batch),
                            **({"MONET_MAX_BATCH_WAIT_MS": str(wait_ms)} if wait_ms is not None else {}),
                            "MONET_QUEUE_SIZE": str(max(64, clients * 2)), "MONET_UI": "false"})
    return proc, f"http://127.0.0.1:{port}"


def server_timing(header: str) -> dict[str, float]:
    parts = (p.strip().split(";dur=") for p in header.split(",") if ";dur=" in p)
    return {name: float(ms) for name, ms in parts}


async def load(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    latencies, errors, timings = [], 0, []
    stop_at = time.perf_counter() + seconds

    async def client(i: int, http: httpx.AsyncClient):
        nonlocal errors
        k = i
        while True:  # at least one request each (the warm-up is exactly one)
            t0 = time.perf_counter()
            r = await http.post(url + "/translate", content=bodies[k % len(bodies)],
                                headers={"content-type": "image/jpeg"})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
                timings.append(server_timing(r.headers.get("server-timing", "")))
            else:
                errors += 1
            k += clients
            if time.perf_counter() >= stop_at:
                break

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        stop_at = 0.0  # one warm-up request: the client loop runs once
        await client(0, http)
        latencies.clear()
        timings.clear()
        start = time.perf_counter()
        stop_at = start + seconds
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    breakdown = {k: float(np.mean([t.get(k, 0.0) for t in timings])) for k in ("decode", "queue", "compute", "encode")}
    breakdown["http and the rest"] = float(ms.mean()) - sum(breakdown.values()) if len(ms) else float("nan")
    return {"images_per_s": len(latencies) / elapsed, "errors": errors, "n": len(latencies), "breakdown": breakdown,
            "mean": float(ms.mean()) if len(ms) else float("nan"),
            "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p95": float(np.percentile(ms, 95)) if len(ms) else float("nan"),
            "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan")}


_LAST_SERVER_GPU_MIB: list[int | None] = [None]


def gpu_memory_of_last_server() -> int | None:
    return _LAST_SERVER_GPU_MIB[0]


def _gpu_memory_mib(pid: int) -> int | None:
    """The GPU memory ``pid`` holds, from nvidia-smi (None without it)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            return int(fields[1])
    return None


def run_server(weights, device, max_batch, wait_ms, clients, bodies, seconds) -> dict:
    proc, url = start_server(weights, device, max_batch, wait_ms, clients)
    try:
        result = asyncio.run(load(url, bodies, clients, seconds))
        _LAST_SERVER_GPU_MIB[0] = _gpu_memory_mib(proc.pid) if resolve_device(device).type == "cuda" else None
        return result
    finally:
        proc.terminate()
        proc.wait(30)


async def keep_alive_load(port: int, requests: list[bytes], clients: int, seconds: float) -> dict:
    """``clients`` keep-alive connections from one asyncio loop on raw sockets, each sending ``requests`` in turn
    back to back for ``seconds``: a client that costs the 2 cores far less per request than httpx does (about
    0.1 ms against 1-2 ms), so the figure is the server's, not the client's. Requests/s of 200s, their latency
    percentiles, and the other answers."""
    latencies, other = [], 0

    async def client(i: int) -> None:
        nonlocal other
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        k = i
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(requests[k % len(requests)])
            k += clients
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            if head[9:12] == b"200":
                latencies.append(time.perf_counter() - t0)
            else:
                other += 1
        writer.close()

    stop_at = time.perf_counter() + 1.0  # a second of warm-up on every connection
    await asyncio.gather(*(client(i) for i in range(clients)))
    latencies.clear()
    other = 0
    start = time.perf_counter()
    stop_at = start + seconds
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"requests_per_s": len(ms) / elapsed, "other_answers": other,
            "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """The user + system CPU time so far of process ``pid`` (all its threads), or of its ``thread`` (Linux
    /proc; the main thread's id is the pid: the event loop's own time)."""
    path = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def overhead(args, bodies: list[bytes]) -> dict:
    """One server process's own ceiling with a near-free model: requests/s at ``args.clients`` keep-alive
    clients and the 1-client p50, for raw and multipart bodies (256x256 JPEG in, PNG out), and the server's CPU
    milliseconds per request; with ``--against REV`` the same for REV's code (a git worktree), alternating."""
    from benchmarks.bench_overload import request_bytes

    weights = Path(tempfile.mkdtemp()) / "near-free.safetensors"
    save_generator(weights, init_weights(ResnetGenerator(ngf=4, n_blocks=1)))
    roots = {"ours": ROOT}
    worktree = None
    if args.against:
        worktree = Path(tempfile.mkdtemp(prefix="bench_server_rev_"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.against],
                       check=True, capture_output=True)
        roots = {f"main ({args.against})": worktree, "ours": ROOT}
    kinds = {kind: [request_bytes(b, kind == "multipart", keep_alive=True) for b in bodies]
             for kind in ("raw", "multipart")}
    report: dict = {name: {kind: [] for kind in kinds} for name in roots}
    try:
        for round_ in range(args.repeats):
            for name, root in roots.items():
                # codec threads as on a GPU host, where this ceiling is what binds (older code ignores the setting)
                server = Server({"MONET_WEIGHTS": str(weights), "MONET_DEVICE": args.device, "MONET_UI": "false",
                                 "MONET_CODEC_THREADS": str(args.codec_threads),
                                 "MONET_MAX_BATCH_SIZE": str(args.max_batch),
                                 "MONET_QUEUE_SIZE": str(max(64, args.clients * 2))}, root=root).wait_ready()
                try:
                    for kind, requests in kinds.items():
                        pid = server.proc.pid
                        cpu0, loop0 = cpu_seconds(pid), cpu_seconds(pid, pid)
                        many = asyncio.run(keep_alive_load(server.port, requests, args.clients, args.seconds))
                        n = max(1.0, many["requests_per_s"] * (args.seconds + 1.0))  # + the warm-up second's
                        cpu_ms = (cpu_seconds(pid) - cpu0) * 1000 / n
                        loop_ms = (cpu_seconds(pid, pid) - loop0) * 1000 / n
                        one = asyncio.run(keep_alive_load(server.port, requests, 1, args.seconds / 3))
                        row = {"requests_per_s": many["requests_per_s"], "p50": many["p50"], "p99": many["p99"],
                               "other_answers": many["other_answers"] + one["other_answers"],
                               "one_client_p50": one["p50"], "server_cpu_ms_per_request": cpu_ms,
                               "event_loop_cpu_ms_per_request": loop_ms}
                        report[name][kind].append(row)
                        print(f"round {round_ + 1} {name:>18} {kind:>9}: {row['requests_per_s']:7.1f} requests/s "
                              f"({args.clients} clients; p50 {row['p50']:.1f} ms, p99 {row['p99']:.1f} ms), 1 client "
                              f"p50 {row['one_client_p50']:.2f} ms, server CPU {cpu_ms:.2f} ms/request (event loop "
                              f"{loop_ms:.2f} ms: at most {1000 / loop_ms:.0f} requests/s), "
                              f"other answers {row['other_answers']}", flush=True)
                finally:
                    server.stop()
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
    print("\nbest of the rounds: requests/s; the event loop's CPU per request and the requests/s it allows "
          "(the ceiling of one process whatever the model, as on a GPU); median 1-client p50:")
    for kind in kinds:
        best = {name: max(r["requests_per_s"] for r in report[name][kind]) for name in roots}
        loop = {name: min(r["event_loop_cpu_ms_per_request"] for r in report[name][kind]) for name in roots}
        p50 = {name: statistics.median(r["one_client_p50"] for r in report[name][kind]) for name in roots}
        line = ", ".join(f"{name} {best[name]:.1f}/s, loop {loop[name]:.2f} ms = {1000 / loop[name]:.0f}/s, "
                         f"1-client p50 {p50[name]:.2f} ms" for name in roots)
        if len(roots) == 2:
            (a, b), (la, lb) = best.values(), loop.values()
            line += f"; ratios {b / a:.2f}x measured, {la / lb:.2f}x event-loop ceiling"
        print(f"  {kind}: {line}")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=None, help="default 8 on CPU, 256 on CUDA")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--max-batch", type=int, default=None, help="MONET_MAX_BATCH_SIZE (default 8 on CPU, 64 on CUDA)")
    p.add_argument("--wait-ms", type=float, default=None, help="MONET_MAX_BATCH_WAIT_MS (default: the server's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--sizes", default="256x256,1024x768", help="upload sizes, WxH")
    p.add_argument("--weights", type=Path, default=None, help="default: weights/ if present, else a random 9-block generator")
    p.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "photo")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--overhead", action="store_true",
                   help="serve a near-free random generator (ngf 4, 1 block): the HTTP, decode and encode path's own "
                        "ceiling, i.e. how many requests/s one server process can take whatever the model; 256x256 "
                        "JPEG in, PNG out, raw and multipart bodies, from keep-alive raw-socket clients")
    p.add_argument("--against", help="--overhead: also measure this git revision (a worktree), alternating")
    p.add_argument("--repeats", type=int, default=2, help="--overhead: rounds of each")
    p.add_argument("--codec-threads", type=int, default=2, help="--overhead: MONET_CODEC_THREADS (as on a GPU host)")
    args = p.parse_args()
    cuda = resolve_device(args.device).type == "cuda"
    args.clients = args.clients or (256 if cuda else 8)
    args.max_batch = args.max_batch or (64 if cuda else 8)
    ceiling_batches = (1, 16, 32, 64, 128) if cuda else (1, 2, 4, 8)
    if args.overhead:
        report = overhead(args, jpegs(16, args.photos, (256, 256)))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return
    weights = args.weights or (DEFAULT_WEIGHTS if DEFAULT_WEIGHTS.exists() else None)
    if weights is None:
        weights = Path(tempfile.mkdtemp()) / "random9.safetensors"
        save_generator(weights, init_weights(ResnetGenerator()))
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    print(f"weights {weights}; {args.clients} clients; {args.seconds:g} s per run", flush=True)
    report = {}
    for i, size in enumerate(sizes):
        label = f"{size[0]}x{size[1]}"
        bodies = jpegs(16, args.photos, size)
        top, backend = ceiling(weights, args.device, size, args.seconds, ceiling_batches)
        best = max(top, key=top.get)
        batch1_ms = 1000 / top[1]
        served = run_server(weights, args.device, args.max_batch, args.wait_ms, args.clients, bodies, args.seconds)
        served["gpu_memory_mib"] = gpu_memory_of_last_server()
        one = run_server(weights, args.device, args.max_batch, args.wait_ms, 1, bodies, args.seconds)
        row = {"backend": backend, "translator": top, "best_batch": best, "server": served, "one_client": one,
               "server_share_of_translator": served["images_per_s"] / top[best],
               "one_client_p50_vs_batch1": one["p50"] / batch1_ms}
        if i == 0:
            row["plain"] = run_server(weights, args.device, 1, args.wait_ms, args.clients, bodies, args.seconds)
        report[label] = row
        print(f"\n{label} JPEG uploads (PNG answers), backend {backend}")
        print("  translator alone: " + ", ".join(f"batch {b} {v:.2f}/s" for b, v in top.items()) +
              f"  (best: batch {best})")
        r = served
        print(f"  server, {args.clients} clients: {r['images_per_s']:.2f} images/s = "
              f"**{row['server_share_of_translator']:.0%}** of the translator at batch {best}; "
              f"p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms, errors {r['errors']}"
              + (f", server GPU memory {r['gpu_memory_mib']} MiB" if r.get("gpu_memory_mib") is not None else ""))
        if "plain" in row:
            pr = row["plain"]
            print(f"  plain server (batching off), {args.clients} clients: {pr['images_per_s']:.2f} images/s, "
                  f"p50 {pr['p50']:.0f} ms, p99 {pr['p99']:.0f} ms")
        print(f"  1 client: p50 {one['p50']:.1f} ms vs translator batch 1 {batch1_ms:.1f} ms = "
              f"**{row['one_client_p50_vs_batch1']:.2f}x**")
        for name, res in ((f"{args.clients} clients", served), ("1 client", one)):
            b = res["breakdown"]
            host = 1 - b["compute"] / res["mean"] if res["mean"] else float("nan")
            print(f"  where the time goes, {name} (mean ms): " + ", ".join(f"{k} {v:.1f}" for k, v in b.items()) +
                  f"; total {res['mean']:.1f}; outside the forward pass {host:.0%}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
