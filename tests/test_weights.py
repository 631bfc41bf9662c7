import json
import time

import pytest
import torch
from safetensors.torch import save_file

from model.weights import WeightsError, load_generator, read_info, save_generator
from tests.conftest import small_generator


def test_round_trip_gives_the_same_outputs(tmp_path):
    g = small_generator(seed=3)
    path = tmp_path / "g.safetensors"
    save_generator(path, g, training={"steps": 12})
    loaded, info = load_generator(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(g(x), loaded(x))
    assert info.architecture == "resnet"
    assert info.settings["ngf"] == 8 and info.settings["n_blocks"] == 1
    assert info.direction == "photo->monet"
    assert info.training == {"steps": 12}


def test_fp16_storage_is_cast_back(tmp_path):
    g = small_generator(seed=4)
    path = tmp_path / "g16.safetensors"
    save_generator(path, g, dtype=torch.float16)
    loaded, info = load_generator(path)
    assert info.stored_dtype == "float16"
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(g(x), loaded(x), atol=2e-2)


def one_line_error(path) -> str:
    with pytest.raises(WeightsError) as exc:
        load_generator(path)
    message = str(exc.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file(tmp_path):
    assert "not found" in one_line_error(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path, weights_file):
    data = weights_file.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors file" in one_line_error(bad)


def test_garbage_and_pickle_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a weight file at all" * 10)
    assert "not a readable safetensors file" in one_line_error(garbage)
    pickled = tmp_path / "model.pt"
    torch.save(small_generator().state_dict(), pickled)
    assert "not a readable safetensors file" in one_line_error(pickled)
    assert "PyTorch pickle checkpoint" in one_line_error(pickled) and "training.export" in one_line_error(pickled)


def test_safetensors_without_our_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(small_generator().state_dict(), path)
    assert "no monet-cyclegan generator metadata" in one_line_error(path)


def _with_metadata(tmp_path, name, **changes):
    g = small_generator()
    path = tmp_path / name
    meta = {"format": "monet-cyclegan-generator", "version": "1", "architecture": "resnet",
            "settings": json.dumps(g.settings), "direction": "photo->monet", "training": "{}"} | changes
    save_file({k: v.contiguous() for k, v in g.state_dict().items()}, path, metadata=meta)
    return path


def test_unknown_architecture(tmp_path):
    path = _with_metadata(tmp_path, "arch.safetensors", architecture="vit")
    assert "unknown generator architecture" in one_line_error(path)


def test_tensors_that_do_not_match_the_described_network(tmp_path):
    path = _with_metadata(tmp_path, "mismatch.safetensors", settings=json.dumps({"ngf": 16, "n_blocks": 1}))
    message = one_line_error(path)
    assert "don't match" in message and "wrong shape" in message
    fewer = _with_metadata(tmp_path, "blocks.safetensors", settings=json.dumps({"ngf": 8, "n_blocks": 2}))
    assert "missing" in one_line_error(fewer)


def test_read_info_without_building(weights_file):
    info, tensors = read_info(weights_file)
    assert info.as_dict()["architecture"] == "resnet"
    assert len(tensors) > 0


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "g.safetensors"
    save_generator(path, small_generator())
    save_generator(path, small_generator(seed=1))  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["g.safetensors"]
    assert path.stat().st_mode & 0o044, "written with the usual permissions, not mkstemp's 0600"


def test_a_pickle_given_as_weights_gets_the_same_message_from_the_cli_and_the_service(tmp_path):
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.main import create_app
    from tests.conftest import run_module

    pickled = tmp_path / "latest_net_G.pth"
    torch.save(small_generator().state_dict(), pickled)
    (tmp_path / "in").mkdir()
    small = tmp_path / "in" / "p.png"
    from tests.conftest import photo

    photo(16, 16).save(small)
    cli = run_module("model.translate", str(small), "--out", str(tmp_path / "out"), "--weights", str(pickled))
    lines = cli.stderr.strip().splitlines()
    assert cli.returncode == 2 and len(lines) == 1 and "Traceback" not in cli.stderr, cli.stderr
    assert "PyTorch pickle checkpoint" in lines[0] and "training.export" in lines[0]
    app = create_app(Settings(weights=pickled, device="cpu", ui=False))
    with TestClient(app) as client:
        deadline = time.time() + 30
        while (answer := client.get("/readyz")).headers.get("retry-after") == "5":  # still loading
            assert time.time() < deadline
            time.sleep(0.05)
        assert answer.status_code == 503 and "retry-after" not in answer.headers  # permanent
        assert lines[0].removeprefix("error: ") in answer.json()["detail"]  # the same words
