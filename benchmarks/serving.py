"""Starting real service processes for the benchmarks: `python -m app` on a free loopback port, ready."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    """Wait until ``url`` answers 200; exit with a one-line error if ``proc`` dies or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"error: the process behind {url} exited during start-up")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    if proc is not None:
        proc.kill()
    raise SystemExit(f"error: {url} not ready in {timeout:.0f} s")


def start_app(env: dict[str, str], stdout=subprocess.DEVNULL, ready: bool = True) -> tuple[subprocess.Popen, int]:
    """`python -m app` with ``env`` (MONET_* settings and the like) on a free port; returns the process and
    its port, once /readyz answers 200 (unless ``ready`` is False: then at once)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, stdout=stdout, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **env, "MONET_PORT": str(port)})
    if ready:
        wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
    return proc, port
