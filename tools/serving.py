"""The one helper that starts real service processes, for the tests, the benchmarks and the soak:
`python -m app` on a free loopback port, configured through MONET_* variables, polled until ready."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import httpx
except ImportError:  # a GPU machine with torch alone: the benchmarks that start no server (bench_convert) still run
    httpx = None

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 180, client=None) -> httpx.Response:
    """GET ``url`` until it answers 200 and return that answer; through ``client`` (a TestClient) when given,
    else over HTTP. Raises RuntimeError when ``proc`` exits first or ``timeout`` seconds pass."""
    get = client.get if client is not None else (lambda u: httpx.get(u, timeout=2))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process behind {url} exited during start-up (exit code {proc.returncode})")
        try:
            answer = get(url)
            if answer.status_code == 200:
                return answer
        except httpx.HTTPError:
            pass
        time.sleep(0.05 if client is not None else 0.1)
    raise RuntimeError(f"{url} not ready in {timeout:.0f} s")


class Server:
    """`python -m app` in a subprocess with ``env`` on top of this process's environment (``settings`` become
    MONET_* variables: ``queue_size=1`` is MONET_QUEUE_SIZE=1). Its output goes to ``log`` (a path, readable
    through ``output()``) or to ``stdout`` (an open file); else it is discarded. ``root``: the checkout whose
    code runs (a benchmark's git worktree of another revision)."""

    def __init__(self, env: dict | None = None, log: Path | None = None, stdout=None, port: int | None = None,
                 root: Path = ROOT, **settings):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full = {**os.environ, "MONET_DEVICE": "cpu", "PYTHONUNBUFFERED": "1", **(env or {})}
        full.update({f"MONET_{k.upper()}": str(v) for k, v in settings.items()})
        full["MONET_PORT"] = str(self.port)
        self.log = open(log, "w+") if log is not None else None
        self.proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=root, env=full,
                                     stdout=self.log or stdout or subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> "Server":
        try:
            wait_ready(self.url + "/readyz", self.proc, timeout)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}: {self.output()}") from None
        return self

    def wait_large_ready(self, timeout: float = 180) -> "Server":
        """Wait until the default style's graphs for large paintings are converted (``/info`` painting.large_ready;
        a server without that key, an older revision, counts as ready): a benchmark then measures the steady
        state, not the conversion's start-up CPU."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if httpx.get(self.url + "/info").json().get("painting", {}).get("large_ready", True):
                break
            time.sleep(0.5)
        return self

    def output(self) -> str:
        if self.log is None:
            return ""
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.log is not None:
            self.log.close()


def start_app(env: dict[str, str], stdout=None, ready: bool = True) -> tuple[subprocess.Popen, int]:
    """A ``Server`` with ``env`` (output to the open file ``stdout``, default discarded); returns its process
    and port, once /readyz answers 200 unless ``ready`` is False."""
    server = Server(env, stdout=stdout)
    if ready:
        wait_ready(server.url + "/readyz", server.proc)
    return server.proc, server.port


@contextlib.contextmanager
def revision(rev: str | None):
    """A git worktree of ``rev`` of this checkout (detached; removed afterwards), for a benchmark that runs the
    previous main beside ours in the same run; None: nothing (yields None)."""
    if not rev:
        yield None
        return
    path = Path(tempfile.mkdtemp(prefix="bench_rev_"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False,
                       capture_output=True)
