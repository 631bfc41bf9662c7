"""Soak and fault benchmark: mixed, concurrent, partly hostile traffic against a real server process.

    python -m tools.soak [--seconds 600] [--clients 8] [--weights FILE] [--json FILE]

About 80% of the requests are valid JPEG, PNG and WebP photos of several sizes (raw bodies and
multipart). The rest are what a public service meets: JPEGs whose header was forged to claim more
pixels than their data holds, decompression bombs, oversized bodies, wrong content types, clients that
leave while queued and clients that send their body too slowly.

Since the connection guard: forged JPEGs whose scan data ends early, HEIC, valid PNGs with a large text
chunk, headers sent one line at a time and sockets that send nothing. A client error (a reset, a closed
connection) is a failure: it counts as a protocol error.

It reports throughput, p50/p99 latency of the valid requests, the status counts, the server's RSS
(start, peak, end), and its open file descriptors and temp files at the end; then checks the acceptance:
no 5xx other than 503 with Retry-After, every valid request answered 200 (or 503 under overload), the
right 4xx for each bad kind, RSS peak under 2 GB and the end within 200 MB of the start, no leaked file
descriptors or temp files. Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

import model.images  # noqa: F401 (registers the HEIF opener the soak writes HEIC with)
from tools.serving import start_app

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"MONET_UI": "false", "MONET_MAX_UPLOAD_BYTES": str(4 * 1024 * 1024), "MONET_UPLOAD_TIMEOUT_S": "3",
            "MONET_HEADER_TIMEOUT_S": "2", "MONET_DEVICE": "cpu"}
KEEPALIVE_EXPIRY_S = 3.0  # under the server's keep-alive timeout (uvicorn's default, 5 s)
EXPECTED = {"damaged": {400}, "short_jpeg": {400}, "bomb": {413}, "oversize": {413}, "wrong_type": {415},
            "heic": {200, 503}, "slow": {408}, "slow_headers": {408}, "idle_socket": {408}, "text_png": {200, 503},
            "queued_then_gone": {None}}  # None: the client left, nobody reads an answer
MIX = [("valid", 72), ("damaged", 4), ("short_jpeg", 2), ("bomb", 4), ("oversize", 3), ("wrong_type", 4),
       ("heic", 2), ("text_png", 2), ("queued_then_gone", 3), ("slow", 2), ("slow_headers", 1), ("idle_socket", 1)]


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8), "RGB")


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def forged_jpeg(data: bytes, side: int = 2000) -> bytes:
    """A real JPEG whose SOF0 header now claims side x side pixels."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", side, side) + data[at + 9 :]


def png_bomb(side: int = 50_000) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))


def png_with_text(img: Image.Image, text_bytes: int = 2_000_000) -> bytes:
    """A valid PNG with a large compressed text chunk (zTXt) before its pixels."""
    data = encoded(img, "PNG")
    body = b"Comment\x00\x00" + zlib.compress(b"monet " * (text_bytes // 6))
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    at = data.index(b"IDAT") - 4
    return data[:at] + chunk + data[at:]


def heic(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "HEIF", quality=80)  # pillow-heif, registered by model.images
    return buf.getvalue()


def header_request(host: str, port: int, pace_s: float | None) -> int | None:
    """A request whose headers come one line every ``pace_s`` (None: a socket that sends nothing). Returns the
    status the server answers with before the headers are done, None if it never answers."""
    with socket.create_connection((host, port), timeout=30) as s:
        if pace_s is None:
            reply = s.recv(64)
        else:
            s.settimeout(pace_s)
            reply = b""
            try:
                s.sendall(b"POST /translate HTTP/1.1\r\n")
                for i in range(60):
                    try:
                        reply = s.recv(64)
                        break
                    except socket.timeout:
                        s.sendall(f"X-Slow-{i}: 1\r\n".encode())
            except OSError:  # closed by the server between two lines
                pass
        return int(reply.split()[1]) if reply else None


class Traffic:
    def __init__(self, seed: int = 0):
        sizes = [(256, 256), (512, 384), (384, 512), (1024, 768)]
        self.valid = []
        for i, (w, h) in enumerate(sizes):
            img = photo(w, h, i)
            for fmt, media in (("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")):
                self.valid.append((encoded(img, fmt), media))
        self.forged = forged_jpeg(encoded(photo(64, 64, 9), "JPEG"))
        self.short = forged_jpeg(encoded(photo(64, 64, 8), "JPEG"), 500)  # 60x its data: libjpeg ends early
        self.text_png = png_with_text(photo(256, 256, 7))
        self.heic = heic(photo(512, 384, 6))
        self.bomb = png_bomb()
        self.big = os.urandom(5 * 1024 * 1024)
        self.rng = random.Random(seed)

    def kind(self) -> str:
        return self.rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]


def raw_request(host: str, port: int, body: bytes, media: str, pace_s: float | None, leave_after_s: float | None):
    """Send a request over a plain socket: slowly (``pace_s`` between 1 KB pieces), or in full and then
    hang up after ``leave_after_s``. Returns the status (None if the client left)."""
    head = (f"POST /translate HTTP/1.1\r\nHost: {host}\r\nContent-Type: {media}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(head)
        if pace_s is not None:
            s.settimeout(0.05)
            for i in range(0, len(body), 1024):
                s.sendall(body[i : i + 1024])
                try:
                    reply = s.recv(64)
                    if reply:
                        return int(reply.split()[1])
                except socket.timeout:
                    pass
                time.sleep(pace_s)
            s.settimeout(30)
            return int(s.recv(64).split()[1])
        s.sendall(body)
        time.sleep(leave_after_s or 0)
        return None


class Sampler(threading.Thread):
    """The server's RSS: every ``every`` seconds into ``series``, and its peak at 20 Hz."""

    def __init__(self, pid: int, every: float = 2.0):
        super().__init__(daemon=True)
        self.pid, self.every, self.series, self.peak = pid, every, [], 0.0
        self.stop = threading.Event()

    def rss(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))

    def run(self) -> None:
        start, last = time.time(), -1e9
        while not self.stop.is_set():
            now, mb = time.time(), self.rss()
            self.peak = max(self.peak, mb)
            if now - last >= self.every:
                self.series.append((round(now - start, 1), round(mb, 1)))
                last = now
            time.sleep(0.05)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def metric_sum(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--weights", type=Path, default=ROOT / "weights" / "photo2monet.safetensors")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)

    host = "127.0.0.1"
    tmpdir = Path(tempfile.mkdtemp(prefix="monet-soak-"))
    log = open(tmpdir.parent / f"{tmpdir.name}.log", "w+")
    proc, port = start_app({**SETTINGS, "MONET_WEIGHTS": str(args.weights), "TMPDIR": str(tmpdir)}, stdout=log)
    url = f"http://{host}:{port}"
    traffic = Traffic()
    try:
        for body, media in traffic.valid:  # warm up every size and format once, then take the baselines
            httpx.post(url + "/translate", content=body, headers={"content-type": media}, timeout=60)
        time.sleep(1)
        fds_start = fds(proc.pid)
        sampler = Sampler(proc.pid)
        sampler.start()
        time.sleep(0.2)
        rss_start = sampler.series[0][1]
        results: list[tuple[str, int | None, float, bool]] = []  # kind, status, seconds, retry-after present
        lock, stop_at = threading.Lock(), time.time() + args.seconds

        def client(seed: int) -> None:
            rng = random.Random(seed)
            # a kept-alive connection is dropped by the client before the server's keep-alive timeout (uvicorn's
            # 5 s) can close it: with httpx's default expiry, also 5 s, a POST sent on a connection idle for 5 s
            # (a client busy for that long on its raw sockets) races the server's close and is lost without an
            # answer (RemoteProtocolError; HTTP/1.1 lets the server close an idle connection at any time)
            limits = httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)
            with httpx.Client(base_url=url, timeout=60, limits=limits) as http:
                while time.time() < stop_at:
                    with lock:
                        kind = traffic.kind()
                    started, retry = time.perf_counter(), False
                    try:
                        if kind == "valid":
                            body, media = rng.choice(traffic.valid)
                            if rng.random() < 0.3:
                                r = http.post("/translate", files={"image": ("photo", body, media)})
                            else:
                                r = http.post("/translate", content=body, headers={"content-type": media})
                            status, retry = r.status_code, "retry-after" in r.headers
                        elif kind == "damaged":
                            status = http.post("/translate", content=traffic.forged,
                                               headers={"content-type": "image/jpeg"}).status_code
                        elif kind in ("short_jpeg", "heic", "text_png"):
                            body, media = {"short_jpeg": (traffic.short, "image/jpeg"), "heic": (traffic.heic, "image/heic"),
                                           "text_png": (traffic.text_png, "image/png")}[kind]
                            status = http.post("/translate", content=body, headers={"content-type": media}).status_code
                        elif kind == "slow_headers":  # a header line every 0.7 s, past MONET_HEADER_TIMEOUT_S
                            status = header_request(host, port, 0.7)
                        elif kind == "idle_socket":
                            status = header_request(host, port, None)
                        elif kind == "bomb":
                            status = http.post("/translate", content=traffic.bomb,
                                               headers={"content-type": "image/png"}).status_code
                        elif kind == "oversize":
                            status = http.post("/translate", content=traffic.big,
                                               headers={"content-type": "image/jpeg"}).status_code
                        elif kind == "wrong_type":
                            status = http.post("/translate", content=b"hello",
                                               headers={"content-type": "text/plain"}).status_code
                        elif kind == "queued_then_gone":
                            body, media = traffic.valid[-3]  # a 1024x768 JPEG: it queues
                            status = raw_request(host, port, body, media, None, 0.05)
                        else:  # slow: 1 KB every 0.5 s, past MONET_UPLOAD_TIMEOUT_S
                            status = raw_request(host, port, traffic.valid[0][0], "image/jpeg", 0.5, None)
                    except (httpx.HTTPError, OSError, ValueError, IndexError) as exc:
                        status = f"client error: {type(exc).__name__}"
                    with lock:
                        results.append((kind, status, time.perf_counter() - started, retry))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = args.seconds
        time.sleep(3)  # let the server settle: connections close, memory is handed back
        sampler.stop.set()
        sampler.join()
        rss_end, rss_peak = sampler.rss(), sampler.peak
        fds_end = fds(proc.pid)
        temp_files = [str(f) for f in tmpdir.rglob("*") if f.is_file()]
        server_metrics = httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.seek(0)
    server_log = log.read()

    valid = [r for r in results if r[0] == "valid"]
    latencies = [s for _, status, s, _ in valid if status == 200]
    counts = Counter((kind, status) for kind, status, _, _ in results)
    server_5xx = metric_sum(server_metrics, 'monet_requests_total{route="/translate",status="5') - \
        metric_sum(server_metrics, 'monet_requests_total{route="/translate",status="503"')
    report = {
        "seconds": elapsed, "clients": args.clients, "requests": len(results),
        "valid_ok_per_s": len(latencies) / elapsed,
        "valid_p50_ms": percentile(latencies, 50) * 1000, "valid_p99_ms": percentile(latencies, 99) * 1000,
        "status_counts": {f"{k} {s}": n for (k, s), n in sorted(counts.items(), key=str)},
        "server_499": metric_sum(server_metrics, 'monet_requests_total{route="/translate",status="499"'),
        "rss_mb": {"start": rss_start, "peak": round(rss_peak, 1), "end": round(rss_end, 1)},
        "rss_series": sampler.series, "fds": {"start": fds_start, "end": fds_end}, "temp_files": temp_files,
        "tracebacks_in_log": server_log.count("Traceback"),
        "protocol_errors": sum(isinstance(status, str) for _, status, _, _ in results),
    }
    failures = []
    for kind, status, _, retry in results:
        if kind == "valid":
            if not (status == 200 or (status == 503 and retry)):
                failures.append(f"valid request answered {status}")
        elif status not in EXPECTED[kind]:
            failures.append(f"{kind} answered {status}, expected {sorted(EXPECTED[kind], key=str)}")
    if server_5xx:
        failures.append(f"the server counted {server_5xx:.0f} 5xx answers other than 503")
    if rss_peak >= 2048:
        failures.append(f"RSS peak {rss_peak:.0f} MB >= 2048 MB")
    if rss_end - rss_start > 200:
        failures.append(f"RSS ended {rss_end - rss_start:.0f} MB above its start")
    if fds_end > fds_start + 2:
        failures.append(f"file descriptors {fds_start} -> {fds_end}")
    if temp_files:
        failures.append(f"{len(temp_files)} temp files left")
    if report["tracebacks_in_log"]:
        failures.append(f"{report['tracebacks_in_log']} tracebacks in the server log")
    if not latencies:
        failures.append("no valid request succeeded")
    report["failures"] = sorted(set(failures))
    report["passed"] = not failures

    print(f"soak: {elapsed:.0f} s, {args.clients} clients, {len(results)} requests "
          f"({len(valid)} valid, {len(results) - len(valid)} bad)")
    print(f"valid: {report['valid_ok_per_s']:.2f} ok/s, p50 {report['valid_p50_ms']:.0f} ms, "
          f"p99 {report['valid_p99_ms']:.0f} ms")
    print("| kind | status | count |\n| --- | --- | --- |")
    for (kind, status), n in sorted(counts.items(), key=str):
        print(f"| {kind} | {status if status is not None else 'left (server: 499)'} | {n} |")
    r = report["rss_mb"]
    print(f"RSS MB: start {r['start']:.0f}, peak {r['peak']:.0f}, end {r['end']:.0f}; "
          f"fds {fds_start} -> {fds_end}; temp files left {len(temp_files)}; server 499s {report['server_499']:.0f}; "
          f"protocol errors {report['protocol_errors']}")
    print("PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
