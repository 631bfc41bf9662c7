"""Weights in and out: a reference-CycleGAN checkpoint imported (round trip), the generator exported to ONNX
(parity through onnxruntime), and the console scripts on the PATH."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model.translator import Translator
from model.weights import WeightsError, file_version, load_generator, read_info
from tests.conftest import photo, run_module


# -- the reference layout: junyanz/pytorch-CycleGAN-and-pix2pix models/networks.py, ResnetGenerator ------------
class RefResnetBlock(nn.Module):
    def __init__(self, dim, use_dropout):
        super().__init__()
        layers = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True), nn.InstanceNorm2d(dim), nn.ReLU(True)]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True), nn.InstanceNorm2d(dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv_block(x)


class RefResnetGenerator(nn.Module):
    """As the reference builds it with norm='instance' (affine=False, no running statistics, use_bias=True)."""

    def __init__(self, ngf=64, n_blocks=9, use_dropout=False):
        super().__init__()
        model = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7, bias=True), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
        for i in range(2):
            mult = 2 ** i
            model += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=True),
                      nn.InstanceNorm2d(ngf * mult * 2), nn.ReLU(True)]
        model += [RefResnetBlock(ngf * 4, use_dropout) for _ in range(n_blocks)]
        for i in range(2):
            mult = 2 ** (2 - i)
            model += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1,
                                         bias=True), nn.InstanceNorm2d(ngf * mult // 2), nn.ReLU(True)]
        model += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
        self.model = nn.Sequential(*model)

    def forward(self, x):
        return self.model(x)


def reference_checkpoint(path: Path, ngf=16, n_blocks=3, use_dropout=False, legacy_norm_stats=False, seed=0):
    torch.manual_seed(seed)
    net = RefResnetGenerator(ngf, n_blocks, use_dropout)
    for m in net.modules():  # as the reference's init_weights('normal', 0.02)
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.normal_(m.bias, 0.0, 0.02)
    state = net.state_dict()
    if legacy_norm_stats:  # what PyTorch < 0.4 saved for instance norms, which the reference loader deletes
        for name, m in net.named_modules():
            if isinstance(m, nn.InstanceNorm2d):
                state[f"{name}.running_mean"] = torch.zeros(m.num_features)
                state[f"{name}.running_var"] = torch.ones(m.num_features)
    torch.save(state, path)
    return net.eval()


@pytest.mark.parametrize("use_dropout, legacy", [(False, False), (True, True)])
def test_a_reference_cyclegan_checkpoint_imports_and_paints_as_the_reference_does(tmp_path, use_dropout, legacy):
    ckpt = tmp_path / "latest_net_G.pth"
    ref = reference_checkpoint(ckpt, ngf=16, n_blocks=3, use_dropout=use_dropout, legacy_norm_stats=legacy)
    out = tmp_path / "vangogh.safetensors"
    r = run_module("model.weights", "import", str(ckpt), "--out", str(out), "--name", "Van Gogh")
    assert r.returncode == 0, r.stderr
    assert "ngf 16, 3 blocks" in r.stdout and file_version(out) in r.stdout
    info, _ = read_info(out)
    assert info.settings == {"input_nc": 3, "output_nc": 3, "ngf": 16, "n_blocks": 3, "upsample": "transpose"}
    assert info.name == "Van Gogh" and info.training["imported_from"] == "latest_net_G.pth"
    g, _ = load_generator(out)
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(g(x), ref(x), atol=1e-6)
    # and through the translator, as the service and the CLI run it: uint8 in, uint8 out, within one level
    img = np.array(photo(64, 48, seed=2))
    with torch.no_grad():
        expected = ((ref(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1)[0].permute(1, 2, 0)
                     + 1) * 127.5).round().clamp(0, 255).numpy()
    got = Translator(g, device="cpu", precision="fp32", backend="torch").translate_many([img])[0]
    assert np.abs(got.astype(float) - expected).max() <= 1


def test_the_importer_refuses_what_is_not_a_reference_generator(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned > " + str(tmp_path / "owned"),))

    torch.save({"model.1.weight": torch.zeros(8, 3, 7, 7), "x": Evil()}, tmp_path / "evil.pth")
    r = run_module("model.weights", "import", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "e.safetensors"))
    assert r.returncode == 2 and "without unpickling objects" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "owned").exists() and not (tmp_path / "e.safetensors").exists()

    torch.save({"conv.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "other.pth")
    r = run_module("model.weights", "import", str(tmp_path / "other.pth"), "--out", str(tmp_path / "o.safetensors"))
    assert r.returncode == 2 and "not a reference CycleGAN ResnetGenerator" in r.stderr

    ckpt = tmp_path / "nan.pth"
    state = RefResnetGenerator(8, 2).state_dict()
    state["model.1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, ckpt)
    with pytest.raises(WeightsError, match="non-finite"):
        from model.weights import import_reference

        import_reference(ckpt, tmp_path / "n.safetensors")


def test_onnx_export_matches_torch_through_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    ckpt = tmp_path / "ref.pth"
    reference_checkpoint(ckpt, ngf=8, n_blocks=2)
    weights = tmp_path / "g.safetensors"
    from model.weights import import_reference, save_generator
    from tests.conftest import small_generator

    save_generator(weights, small_generator(seed=3, ngf=8, n_blocks=2))  # the project's resize upsampling
    r = run_module("model.backends", "export", str(weights), str(tmp_path / "g.onnx"))
    assert r.returncode == 0, r.stderr
    assert "ONNX" in r.stdout and r.stdout.count("\n") == 1
    import_reference(ckpt, tmp_path / "ref.safetensors")  # and the reference's transposed convolutions
    assert run_module("model.backends", "export", str(tmp_path / "ref.safetensors"),
                      str(tmp_path / "ref.onnx")).returncode == 0
    for name in ("g", "ref"):
        g, _ = load_generator(tmp_path / f"{name}.safetensors")
        session = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        (inp,) = session.get_inputs()
        assert inp.name == "image" and inp.shape[1] == 3 and all(isinstance(d, str) for d in (inp.shape[0],
                                                                                           *inp.shape[2:]))
        for shape in ((1, 3, 64, 64), (2, 3, 96, 132)):  # dynamic batch, height and width (multiples of 4)
            x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
            (y,) = session.run(None, {"image": x})
            with torch.no_grad():
                expected = g(torch.from_numpy(x)).numpy()
            assert y.shape == shape
            levels = np.abs((y - expected) * 127.5)
            assert levels.mean() < 1 and levels.max() < 2, (name, shape, levels.mean(), levels.max())


def test_export_names_the_formats_it_writes(tmp_path, weights_file):
    r = run_module("model.backends", "export", str(weights_file), str(tmp_path / "g.pt"))
    assert r.returncode == 2 and ".onnx" in r.stderr and ".xml" in r.stderr


SCRIPTS = {"monet-serve": "app", "monet-translate": "model.translate", "monet-train": "training.fit",
           "monet-evaluate": "training.evaluate"}


def script(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not on the PATH: install the project with `pip install -e .`"
    return found


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_scripts_are_installed_and_answer_help(name):
    r = subprocess.run([script(name), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout.lower()


def test_monet_translate_paints_a_folder_as_the_module_does(tmp_path, weights_file):
    (tmp_path / "in").mkdir()
    photo(40, 32).save(tmp_path / "in" / "a.jpg")
    r = subprocess.run([script("monet-translate"), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--weights",
                        str(weights_file), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(next((tmp_path / "out").iterdir())).size == (40, 32)
    r = subprocess.run([script("monet-translate"), str(tmp_path / "missing"), "--out", str(tmp_path / "o2")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_weights_info_prints_the_description_and_version(weights_file):
    r = run_module("model.weights", "info", str(weights_file))
    assert r.returncode == 0, r.stderr
    described = json.loads(r.stdout)
    assert described["architecture"] == "resnet" and described["version"] == file_version(weights_file)
    assert described["settings"]["ngf"] == 8


def test_the_model_card_has_hugging_face_front_matter_that_matches_the_file():
    import yaml

    from model.weights import SHIPPED_WEIGHTS

    card = (SHIPPED_WEIGHTS.parent / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n", 2)[1])
    assert meta["license"] == "mit" and meta["library_name"] and meta["pipeline_tag"] == "image-to-image"
    (result,) = meta["model-index"][0]["results"]
    kid = {m["name"]: m["value"] for m in result["metrics"] if m["type"] == "kid"}
    info, _ = read_info(SHIPPED_WEIGHTS)
    assert info.name == "Claude Monet"
    assert kid["KID (Inception-v3, 100 subsets)"] == info.scores["heldout_kid"]
    assert kid["KID of the raw photos (baseline)"] == info.scores["raw_photos_kid"]
    assert f"**{info.scores['heldout_kid']}" in card  # the card's own table says the same
