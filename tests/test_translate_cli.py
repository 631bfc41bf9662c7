import zipfile

from PIL import Image

from tests.conftest import photo, run_module


def make_inputs(folder):
    (folder / "sub").mkdir(parents=True)
    photo(40, 30, seed=1).save(folder / "a.jpg")
    photo(33, 21, seed=2).save(folder / "sub" / "b.png")
    photo(40, 30, seed=3, mode="RGBA").save(folder / "c.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image extension")


def test_converts_a_folder_keeps_sizes_and_reports_skips(tmp_path, weights_file):
    make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    result = run_module("model.translate", str(tmp_path / "in"), "--out", str(out), "--weights", str(weights_file),
                        "--batch-size", "2")
    assert result.returncode == 1, result.stderr  # one unreadable input
    assert "broken.jpg" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a.png", "c.png", "sub/b.png"]
    with Image.open(out / "sub" / "b.png") as img:
        assert img.size == (33, 21)
    assert not list(out.rglob("*.tmp"))


def test_kaggle_zip_of_jpegs(tmp_path, weights_file):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        photo(32, 32, seed=i).save(src / f"{i}.jpg")
    archive = tmp_path / "images.zip"
    result = run_module("model.translate", str(src), "--out", str(tmp_path / "out"), "--weights", str(weights_file),
                        "--format", "jpeg", "--zip", str(archive), "--max-side", "16")
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["0.jpg", "1.jpg", "2.jpg"]
        with zf.open("0.jpg") as f, Image.open(f) as img:
            assert img.format == "JPEG" and img.size == (16, 16)


def test_bad_weights_and_missing_inputs_give_one_line_errors(tmp_path, weights_file):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nonsense")
    result = run_module("model.translate", str(tmp_path), "--out", str(tmp_path / "o"), "--weights", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "bad.safetensors" in result.stderr
    result = run_module("model.translate", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                        "--weights", str(weights_file))
    assert result.returncode == 1 and "no such file or folder" in result.stderr


def test_the_shipped_default_weights_work_without_flags(tmp_path):
    from model.translator import Translator
    from model.weights import SHIPPED_WEIGHTS as DEFAULT_WEIGHTS

    translator = Translator.from_file(DEFAULT_WEIGHTS, device="cpu")
    assert translator.info.direction == "photo->monet" and translator.info.training["preset"] == "cut-cpu-256"
    src = tmp_path / "in"
    src.mkdir()
    photo(96, 64).save(src / "p.jpg")
    result = run_module("model.translate", str(src), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "out" / "p.png") as img:
        assert img.size == (96, 64)


def test_poisoned_weights_fail_with_one_line_and_write_nothing(tmp_path):
    import torch

    from model.weights import save_generator
    from tests.conftest import small_generator

    (tmp_path / "in").mkdir()
    photo(40, 30).save(tmp_path / "in" / "a.jpg")
    for name, value in (("nan.safetensors", float("nan")), ("huge.safetensors", 3e38)):
        g = small_generator()
        with torch.no_grad():
            g.model[1].weight.fill_(value)
        save_generator(tmp_path / name, g)
        # torch's kernels overflow to Inf on the huge weights (OpenVINO's stay finite, its picture is noise)
        result = run_module("model.translate", str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                            "--weights", str(tmp_path / name), "--device", "cpu", "--backend", "torch")
        assert result.returncode == 2, result.stdout
        assert result.stderr.strip().count("\n") == 0 and "non-finite" in result.stderr and name in result.stderr
        assert not list((tmp_path / "o").glob("*")) if (tmp_path / "o").exists() else True


def test_workers_overlap_reading_and_writing_with_painting_and_write_what_one_thread_writes(tmp_path, weights_file):
    """--workers N reads, decodes, encodes and writes on threads while the model paints (the folder conversion's
    pipeline, issue 35): the same files, byte for byte, in the same zip order, the same skips, as --workers 0, on
    Pillow's path and on the device-codec path (torchvision's JPEG codecs, here on the CPU)."""
    src = tmp_path / "in"
    make_inputs(src)
    for i in range(9):
        photo(36 + i, 28, seed=10 + i).save(src / f"j{i}.jpg", quality=90)
    photo(30, 30, seed=40).convert("CMYK").save(src / "cmyk.jpg")  # the device path hands it to Pillow's
    for codec, fmt in (("pil", "png"), ("torchvision", "jpeg")):
        outputs = {}
        for workers in ("0", "3"):
            out, archive = tmp_path / f"{codec}-{workers}", tmp_path / f"{codec}-{workers}.zip"
            r = run_module("model.translate", str(src), "--out", str(out), "--weights", str(weights_file),
                           "--batch-size", "2", "--workers", workers, "--codec", codec, "--format", fmt,
                           "--zip", str(archive))
            assert r.returncode == 1, r.stderr  # broken.jpg
            assert r.stderr.count("warning: skipping") == 1 and "broken.jpg" in r.stderr
            assert "Traceback" not in r.stderr and not list(out.rglob("*.tmp"))
            with zipfile.ZipFile(archive) as zf:
                outputs[workers] = [(name, zf.read(name)) for name in zf.namelist()]
        assert len(outputs["3"]) == 13  # 14 images, one unreadable
        assert outputs["3"] == outputs["0"], codec
