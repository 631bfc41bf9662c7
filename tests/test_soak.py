"""The soak and fault benchmark in its short form: a real server under mixed, partly hostile traffic."""
import json
import subprocess
import sys

from tests.conftest import ROOT


def test_a_60_second_soak_has_no_5xx_no_leaks_and_bounded_memory(tmp_path):
    report_file = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, "-m", "tools.soak", "--seconds", "60", "--clients", "6",
                          "--json", str(report_file)], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert report["passed"] and not report["failures"]
    kinds = {key.split()[0] for key in report["status_counts"]}
    assert {"valid", "damaged", "bomb", "oversize", "wrong_type"} <= kinds  # the mix really ran
    assert report["protocol_errors"] == 0
    assert report["rss_mb"]["peak"] < 2048 and report["rss_mb"]["end"] - report["rss_mb"]["start"] < 200
    assert report["temp_files"] == [] and report["fds"]["end"] <= report["fds"]["start"] + 2
    assert report["valid_ok_per_s"] > 0
