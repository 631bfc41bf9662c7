"""Small doors a newcomer tripped on: `--zip` alone means a zip of JPEGs (what Kaggle takes), weight files and
/info show no absolute path of the machines involved, and the UI mounts without Gradio's favicon warning."""
import json
import time
import warnings
import zipfile

from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from model.weights import read_info, save_generator
from tests.conftest import photo, run_module, small_generator, unpaired_folders


def test_zip_without_a_format_is_a_zip_of_jpegs(tmp_path, weights_file):
    (tmp_path / "in").mkdir()
    photo(40, 30, seed=1).save(tmp_path / "in" / "a.png")
    r = run_module("model.translate", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--weights",
                   str(weights_file), "--zip", str(tmp_path / "images.zip"))
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(tmp_path / "images.zip") as zf:
        assert zf.namelist() == ["a.jpg"]
        assert zf.read("a.jpg")[:3] == b"\xff\xd8\xff"
    r = run_module("model.translate", str(tmp_path / "in"), "--out", str(tmp_path / "out2"), "--weights",
                   str(weights_file), "--zip", str(tmp_path / "pngs.zip"), "--format", "png")
    assert r.returncode == 0 and zipfile.ZipFile(tmp_path / "pngs.zip").namelist() == ["a.png"]


def absolute_paths(value) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in absolute_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in absolute_paths(v)]
    return [value] if isinstance(value, str) and value.startswith("/") else []


def test_weight_files_and_info_show_no_absolute_paths(tmp_path):
    # a file written before exports dropped them: its machine's paths are cut to names when it is read
    old = tmp_path / "old.safetensors"
    save_generator(old, small_generator(), training={"config": {"photos": "/home/someone/data/photo_train",
                                                                "paintings": "/srv/shared/monet", "steps": 4}})
    info, _ = read_info(old, tensors=False)
    assert info.training["config"] == {"photos": "photo_train", "paintings": "monet", "steps": 4}
    with TestClient(create_app(Settings(weights=old, device="cpu", ui=False))) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:  # loads in the background
            time.sleep(0.1)
        shown = client.get("/info").json()
    assert shown["model"]["path"] == "old.safetensors" and not absolute_paths(shown), absolute_paths(shown)
    # a run exports its folders by name
    (tmp_path / "data").mkdir()
    folders = unpaired_folders(tmp_path / "data")
    run = tmp_path / "run"
    r = run_module("training.fit", "--photos", str(folders / "photos"), "--paintings", str(folders / "paintings"),
                   "--out", str(run), "--preset", "cpu", "--ngf", "8", "--n-blocks", "1", "--ndf", "8",
                   "--num-workers", "0", "--image-size", "32", "--steps", "2", "--eval-every", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    from safetensors import safe_open

    with safe_open(str(run / "photo2monet.safetensors"), "pt") as f:
        written = json.loads(f.metadata()["training"])
    assert not absolute_paths(written) and written["config"]["photos"] == "photos"


def test_the_ui_mounts_without_gradios_favicon_warning(tmp_path):
    weights = tmp_path / "g.safetensors"
    save_generator(weights, small_generator())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_app(Settings(weights=weights, device="cpu", ui=True))
    assert not [w for w in caught if "favicon" in str(w.message)], [str(w.message) for w in caught]
