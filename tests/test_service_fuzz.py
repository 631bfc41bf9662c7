"""Schemathesis fuzzes every operation of the OpenAPI schema against the real server: no 5xx."""
import os
import shutil
import subprocess
import sys

import httpx

from model.weights import save_generator
from tests.conftest import Server, small_generator


def server_errors(url: str) -> dict[str, float]:
    """The server's own count of 5xx answers, per route and status, from /metrics."""
    counts = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("monet_requests_total{") and 'status="5' in line:
            labels, value = line.rsplit(" ", 1)
            counts[labels] = float(value)
    return counts


def test_openapi_fuzz_finds_no_server_errors(tmp_path):
    weights = tmp_path / "g.safetensors"
    save_generator(weights, small_generator())
    server = Server(weights, ui="false", max_side=256).wait_ready()
    before = server_errors(server.url)  # e.g. the 503s /readyz gave our own readiness polling
    st = shutil.which("st") or shutil.which("schemathesis")
    cmd = [st] if st else [sys.executable, "-m", "schemathesis.cli"]
    # every warning but one: POST /jobs refuses all the fuzzer's bodies (415), as random bytes are never a video,
    # and schemathesis warns of a schema "stricter than documented" when one operation answers only 4xx
    from schemathesis.core.warnings import SchemathesisWarning
    warnings = ",".join(w.value for w in SchemathesisWarning if w.value != "validation_mismatch")
    try:
        r = subprocess.run([*cmd, "run", server.url + "/openapi.json", "--checks", "not_a_server_error",
                            "--max-examples", "60", "--seed", "1", "--workers", "2", "--request-timeout", "30",
                            "--warnings", warnings],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false", "NO_COLOR": "1"})
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
        assert "No issues found" in r.stdout
        metrics = httpx.get(server.url + "/metrics").text
        assert any(line.startswith('monet_requests_total{route="/translate"') for line in metrics.splitlines())
        assert server_errors(server.url) == before, "the fuzz run's requests got 5xx answers"
    finally:
        server.stop()
