"""Small doors a newcomer tripped on: `--zip` alone means a zip of JPEGs (what Kaggle takes), weight files and
/info show no absolute path of the machines involved, the UI mounts without Gradio's favicon warning, and a
transparent photo's painting keeps its transparency."""
import io
import json
import time
import warnings
import zipfile

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from model.weights import read_info, save_generator
from tests.conftest import encode, photo, run_module, small_generator, unpaired_folders


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


def transparent_photo(width: int = 48, height: int = 32) -> Image.Image:
    """A photo with an alpha channel: a clear left third, a half-transparent band, opaque elsewhere."""
    img = photo(width, height, seed=5).convert("RGBA")
    alpha = np.full((height, width), 255, np.uint8)
    alpha[:, : width // 3] = 0
    alpha[: height // 2, width // 3 : width // 2] = 128
    img.putalpha(Image.fromarray(alpha))
    return img


def test_a_transparent_photo_keeps_its_alpha_in_png_and_webp_answers_and_the_cli(tmp_path, weights_file):
    img = transparent_photo()
    alpha = np.asarray(img.getchannel("A"))
    with TestClient(create_app(Settings(weights=weights_file, device="cpu", ui=False))) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)

        def paint(data: bytes, fmt: str) -> Image.Image:
            r = client.post(f"/translate?format={fmt}", content=data, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            return Image.open(io.BytesIO(r.content))

        png = paint(encode(img, "PNG"), "png")
        assert png.mode == "RGBA" and np.array_equal(np.asarray(png.getchannel("A")), alpha)
        assert np.asarray(png)[..., :3][alpha == 0].std() > 0  # the colours under the clear part are painted
        webp = paint(encode(img, "PNG"), "webp")
        assert webp.mode == "RGBA" and np.abs(np.asarray(webp.getchannel("A")).astype(int) - alpha).max() <= 2
        assert paint(encode(img, "PNG"), "jpeg").mode == "RGB"  # JPEG has no alpha: painted over white, as before
        palette = img.convert("RGB").quantize(16)  # a GIF-style palette with one transparent entry
        palette.info["transparency"] = int(np.asarray(palette)[0, 0])
        clear = np.asarray(palette) == palette.info["transparency"]
        painted = paint(encode(palette, "PNG", transparency=palette.info["transparency"]), "png")
        assert painted.mode == "RGBA" and np.array_equal(np.asarray(painted.getchannel("A")) == 0, clear)
        assert paint(encode(photo(48, 32), "PNG"), "png").mode == "RGB"  # no transparency: no alpha channel
    (tmp_path / "in").mkdir()
    img.save(tmp_path / "in" / "logo.png")
    r = run_module("model.translate", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--weights",
                   str(weights_file))
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "out" / "logo.png") as out:
        assert out.mode == "RGBA" and np.array_equal(np.asarray(out.getchannel("A")), alpha)
    r = run_module("model.translate", str(tmp_path / "in"), "--out", str(tmp_path / "jpg"), "--weights",
                   str(weights_file), "--format", "jpeg")
    assert r.returncode == 0 and Image.open(tmp_path / "jpg" / "logo.jpg").mode == "RGB"
