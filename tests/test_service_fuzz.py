"""Schemathesis fuzzes every operation of the OpenAPI schema against the real server: no 5xx."""
import os
import shutil
import subprocess
import sys

import httpx

from model.weights import save_generator
from tests.conftest import Server, small_generator


def test_openapi_fuzz_finds_no_server_errors(tmp_path):
    weights = tmp_path / "g.safetensors"
    save_generator(weights, small_generator())
    server = Server(weights, ui="false", max_side=256).wait_ready()
    st = shutil.which("st") or shutil.which("schemathesis")
    cmd = [st] if st else [sys.executable, "-m", "schemathesis.cli"]
    try:
        r = subprocess.run([*cmd, "run", server.url + "/openapi.json", "--checks", "not_a_server_error",
                            "--max-examples", "60", "--seed", "1", "--workers", "2", "--request-timeout", "30"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false", "NO_COLOR": "1"})
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
        assert "No issues found" in r.stdout
        metrics = httpx.get(server.url + "/metrics").text
        fuzzed = [line for line in metrics.splitlines() if line.startswith('monet_requests_total{route="/translate"')]
        assert fuzzed and not any('status="5' in line for line in metrics.splitlines() if "requests_total{" in line)
    finally:
        server.stop()
