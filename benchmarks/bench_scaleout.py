"""Throughput and latency through HAProxy (deploy/haproxy/haproxy.cfg) with 1, 2 and 3 replicas, beside one
replica reached directly (the balancer's own overhead).

    python -m benchmarks.bench_scaleout [--seconds 15] [--clients 8] [--replicas 1,2,3] [--size 256]

Each replica is a real `python -m app` process with the shipped weights; with N replicas each gets
cores/N torch threads, as N pods would each get their share of a node. On a 2-core machine the aggregate
cannot grow with replicas, so the table also gives images/s per core.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tools.serving import free_port, start_app, wait_ready

ROOT = Path(__file__).resolve().parent.parent
CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


def jpeg(size: int) -> bytes:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    arr = np.stack([x / size, y / size, (x + y) / (2 * size)], -1) * 200 + rng.normal(0, 12, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def start_replicas(n: int, threads: int) -> list[tuple[subprocess.Popen, int]]:
    env = {"MONET_UI": "false", "MONET_DEVICE": "cpu", "OMP_NUM_THREADS": str(threads)}
    replicas = [start_app(env, ready=False) for _ in range(n)]  # they load their weights side by side
    for proc, port in replicas:
        wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
    return replicas


def start_haproxy(ports: list[int]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "LB_BIND": f"127.0.0.1:{port}", "LB_STATS_SOCKET": f"/tmp/bench-haproxy-{port}.sock"}
    for i in range(3):  # fewer replicas: the spare server lines name the same ones again
        env[f"MONET_REPLICA{i + 1}"] = f"127.0.0.1:{ports[i % len(ports)]}"
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(CFG)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
    return proc, f"http://127.0.0.1:{port}"


def load(url: str, body: bytes, clients: int, seconds: float) -> dict:
    latencies, errors, lock = [], 0, threading.Lock()
    for _ in range(2):  # warm-up
        httpx.post(url + "/translate", content=body, headers={"content-type": "image/jpeg"}, timeout=60)
    stop_at = time.time() + seconds

    def client():
        nonlocal errors
        with httpx.Client(timeout=60) as http:
            while time.time() < stop_at:
                t = time.perf_counter()
                r = http.post(url + "/translate", content=body, headers={"content-type": "image/jpeg"})
                with lock:
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t)
                    else:
                        errors += 1

    started = time.time()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - started
    return {"images_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(latencies, 50)) * 1000,
            "p99_ms": float(np.percentile(latencies, 99)) * 1000, "errors": errors}


def stop(procs) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--replicas", default="1,2,3")
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    body = jpeg(args.size)
    rows = []
    for n in (int(v) for v in args.replicas.split(",")):
        threads = max(1, cores // n)
        replicas = start_replicas(n, threads)
        try:
            if n == 1:
                direct = load(f"http://127.0.0.1:{replicas[0][1]}", body, args.clients, args.seconds)
                rows.append(("1 replica, direct (no balancer)", 1, direct))
            lb, url = start_haproxy([port for _, port in replicas])
            try:
                rows.append((f"{n} replica{'s' if n > 1 else ''} through HAProxy", n, load(url, body, args.clients,
                                                                                           args.seconds)))
            finally:
                stop([lb])
        finally:
            stop([proc for proc, _ in replicas])
    print(f"{cores} cores, {args.clients} clients, {args.size}x{args.size} JPEG, {args.seconds:.0f} s per row")
    print("| setup | images/s | per core | p50 ms | p99 ms | errors |\n| --- | --- | --- | --- | --- | --- |")
    for name, _, r in rows:
        print(f"| {name} | {r['images_per_s']:.2f} | {r['images_per_s'] / cores:.2f} | {r['p50_ms']:.0f} | "
              f"{r['p99_ms']:.0f} | {r['errors']} |")
    direct = next(r for name, _, r in rows if "direct" in name)
    via = next((r for name, n, r in rows if n == 1 and "HAProxy" in name), None)
    if via:
        print(f"balancer overhead at 1 replica: {via['images_per_s'] / direct['images_per_s'] * 100:.1f}% of direct "
              f"throughput, p50 {via['p50_ms'] - direct['p50_ms']:+.1f} ms")


if __name__ == "__main__":
    main()
