"""Runs written before the training loop was rebuilt (tests/fixtures/run_before_refactor_*: a config.json with
its folders under "folders" and a step-2 checkpoint of tiny networks, written by the old code) resume on the
current code, finish their schedule and export a generator the translator loads."""
import json
import shutil

import pytest

from model.translator import Translator
from tests.conftest import ROOT, photo, run_module, unpaired_folders


@pytest.mark.parametrize("model", ["fastcut", "cyclegan"])
def test_a_run_from_before_the_rebuild_resumes_and_exports(tmp_path, model):
    run = tmp_path / "run"
    shutil.copytree(ROOT / "tests" / "fixtures" / f"run_before_refactor_{model}", run)
    old = json.loads((run / "config.json").read_text())
    assert "folders" in old and "photos" not in old  # the old layout
    folders = unpaired_folders(tmp_path, photos=6, paintings=6)
    result = run_module("training.fit", "--out", str(run), "--resume", "--photos", str(folders / "photos"),
                        "--paintings", str(folders / "paintings"), "--num-workers", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "steps 2->4 of 4" in result.stdout and "done: 4 steps" in result.stdout, result.stdout
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"] == model and saved["ngf"] == 4 and saved["photos"] == str((folders / "photos").resolve())
    translator = Translator.from_file(run / "photo2monet.safetensors", device="cpu", backend="torch")
    assert translator.info.training["step"] == 4
    (painting,) = translator.translate([photo(40, 28)])
    assert painting.size == (40, 28)
