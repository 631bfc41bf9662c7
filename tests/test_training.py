"""training.fit, training.export and training.evaluate on tiny images, as a user runs them."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.torch import load_file

from model.translator import Translator
from tests.conftest import ROOT, photo, run_module, unpaired_folders

SMALL = ["--ngf", "8", "--n-blocks", "1", "--ndf", "8", "--num-workers", "0", "--log-every", "2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return unpaired_folders(tmp_path_factory.mktemp("data"))


def fit(folders, out, *extra, timeout=300):
    return run_module("training.fit", "--photos", str(folders / "photos"), "--paintings", str(folders / "paintings"),
                      "--out", str(out), *extra, timeout=timeout)


def test_cyclegan_preset_trains_checkpoints_and_exports(folders, tmp_path):
    out = tmp_path / "run"
    r = fit(folders, out, "--preset", "cyclegan", *SMALL, "--load-size", "36", "--image-size", "32",
            "--steps", "4", "--checkpoint-every", "2", "--keep-checkpoints", "1")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preset"] == "cyclegan" and cfg["gan_loss"] == "lsgan" and cfg["pool_size"] == 50
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000004.pt"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4] and all(m["images_per_s"] > 0 for m in lines)
    assert list((out / "samples").glob("*.png"))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # tensorboard is in the dev extra
    translator = Translator.from_file(out / "photo2monet.safetensors", device="cpu")
    assert translator.info.training["preset"] == "cyclegan" and translator.info.training["step"] == 4
    (painting,) = translator.translate([photo(50, 30)])
    assert painting.size == (50, 30)


def test_kaggle_preset_uses_the_unet_and_bce(folders, tmp_path):
    big = tmp_path / "big"
    for sub in ("photos", "paintings"):
        (big / sub).mkdir(parents=True)
        for i in range(2):
            photo(256, 256, seed=i).save(big / sub / f"{i}.jpg")
    out = tmp_path / "run"
    r = fit(big, out, "--preset", "kaggle", "--ngf", "4", "--ndf", "4", "--num-workers", "0", "--steps", "2")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["generator"] == "unet" and cfg["gan_loss"] == "bce" and cfg["pool_size"] == 0
    assert Translator.from_file(out / "photo2monet.safetensors", device="cpu").info.architecture == "unet"


def test_cpu_preset_runs(folders, tmp_path):
    r = fit(folders, tmp_path / "run", "--preset", "cpu", *SMALL, "--image-size", "32", "--steps", "2")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["preset"] == "cpu" and cfg["batch_size"] == 4


def test_without_a_cpp_compiler_the_norms_fall_back_to_pytorchs_kernel_with_one_line(folders, tmp_path):
    """compile_norm needs a C++ compiler the first time it compiles (an empty kernel cache here); without one the
    run trains on PyTorch's kernel and says so once."""
    r = run_module("training.fit", "--photos", str(folders / "photos"), "--paintings", str(folders / "paintings"),
                   "--out", str(tmp_path / "run"), "--preset", "cpu", *SMALL, "--image-size", "32", "--steps", "2",
                   "--compile-norm", "on", env={"CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    notices = [line for line in r.stderr.splitlines() if line.startswith("compile_norm: off")]
    assert len(notices) == 1 and "PyTorch's kernel" in notices[0], r.stderr
    assert (tmp_path / "run" / "photo2monet.safetensors").exists()


def test_resume_gives_the_same_weights_as_a_straight_run(folders, tmp_path):
    args = ["--preset", "cyclegan", *SMALL, "--load-size", "36", "--image-size", "32", "--steps", "6",
            "--batch-size", "2", "--seed", "7"]
    assert fit(folders, tmp_path / "straight", *args).returncode == 0
    r = fit(folders, tmp_path / "split", *args, "--stop-at-step", "3")
    assert r.returncode == 0 and "--resume" in r.stdout
    assert not (tmp_path / "split" / "photo2monet.safetensors").exists()
    r = fit(folders, tmp_path / "split", "--resume")
    assert r.returncode == 0, r.stderr
    a = load_file(tmp_path / "straight" / "photo2monet.safetensors")
    b = load_file(tmp_path / "split" / "photo2monet.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), "resumed run differs from the straight run"


def test_resume_if_present_starts_a_run_then_continues_it_with_the_same_command(folders, tmp_path):
    """The command line of a Kubernetes Job: the first pod starts the run, a rescheduled one resumes it."""
    out = tmp_path / "job"
    args = ["--preset", "cyclegan", *SMALL, "--load-size", "36", "--image-size", "32", "--steps", "6",
            "--batch-size", "2", "--seed", "7", "--resume-if-present"]
    assert fit(folders, out, *args, "--stop-at-step", "3").returncode == 0  # "preempted" at step 3
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003.pt"]
    r = fit(folders, out, *args)
    assert r.returncode == 0, r.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "step" in json.loads(line)]
    assert min(s for s in steps if s > 3) > 3 and max(steps) == 6 and (out / "photo2monet.safetensors").exists()
    # a folder whose run never reached its first checkpoint is started again rather than refused
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "config.json").write_text("{}")
    assert fit(folders, tmp_path / "early", *args, "--stop-at-step", "1").returncode == 0


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(folders, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.fit", "--photos", str(folders / "photos"), "--paintings",
           str(folders / "paintings"), "--out", str(out), "--preset", "cyclegan", *SMALL, "--load-size", "36",
           "--image-size", "32", "--steps", "100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "interrupted at step" in stdout and "Traceback" not in stderr
    step = int(stdout.split("interrupted at step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step_{step:08d}.pt").exists()


def test_torchrun_ddp_on_two_cpu_processes_keeps_ranks_identical(folders, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "training.fit", "--photos", str(folders / "photos"), "--paintings", str(folders / "paintings"),
           "--out", str(out), "--device", "cpu", "--preset", "cyclegan", *SMALL, "--load-size", "36",
           "--image-size", "32", "--steps", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "ddp_check.json").read_text())
    assert report["world_size"] == 2 and report["ranks_identical"] is True
    assert (out / "photo2monet.safetensors").exists()
    assert r.stdout.count("done:") == 1  # rank 0 alone reports and writes


def test_export_command(folders, tmp_path):
    out = tmp_path / "run"
    assert fit(folders, out, "--preset", "cpu", *SMALL, "--image-size", "32", "--steps", "2", "--no-export").returncode == 0
    assert not (out / "photo2monet.safetensors").exists()
    r = run_module("training.export", str(out), str(tmp_path / "g.safetensors"), "--fp16")
    assert r.returncode == 0, r.stderr
    t = Translator.from_file(tmp_path / "g.safetensors", device="cpu")
    assert t.info.stored_dtype == "float16"
    r = run_module("training.export", str(tmp_path / "nothing"), str(tmp_path / "x.safetensors"))
    assert r.returncode == 1 and "not found" in r.stderr


# -- bad input: one line, non-zero exit, nothing destroyed ---------------------------------------


def one_line_failure(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    return r.stderr


def test_missing_empty_and_imageless_folders(folders, tmp_path):
    r = run_module("training.fit", "--photos", str(tmp_path / "nope"), "--paintings", str(folders / "paintings"),
                   "--out", str(tmp_path / "o"))
    assert "does not exist" in one_line_failure(r)
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hi")
    for name in ("empty", "text"):
        r = run_module("training.fit", "--photos", str(folders / "photos"), "--paintings", str(tmp_path / name),
                       "--out", str(tmp_path / "o"))
        assert "holds no image files" in one_line_failure(r)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
    r = run_module("training.fit", "--photos", str(tmp_path / "broken"), "--paintings", str(folders / "paintings"),
                   "--out", str(tmp_path / "o"))
    assert "could be read" in one_line_failure(r)


def test_unreadable_and_truncated_files_are_skipped_with_a_count(folders, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i in range(3):
        photo(40, 40, seed=i).save(mixed / f"{i}.jpg")
    data = (mixed / "0.jpg").read_bytes()
    (mixed / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (mixed / "garbage.png").write_bytes(b"not a png")
    r = run_module("training.fit", "--photos", str(mixed), "--paintings", str(folders / "paintings"),
                   "--out", str(tmp_path / "run"), "--preset", "cpu", *SMALL, "--image-size", "32", "--steps", "1")
    assert r.returncode == 0, r.stderr
    assert "photos: 3 (2 unreadable skipped)" in r.stdout


@pytest.mark.parametrize("progressive", [False, True])
def test_the_scan_skips_a_large_jpeg_cut_short_and_keeps_a_whole_ones_full_size(tmp_path, progressive):
    """The folder scan decodes JPEGs at an eighth of their size; a file cut short still fails there, and the
    size that the crop check sees is the image's own."""
    from training.data import scan_folder

    folder = tmp_path / "large"
    folder.mkdir()
    photo(1600, 1200, seed=3).save(folder / "whole.jpg", quality=90, progressive=progressive)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: int(len(data) * 0.9)])
    found = scan_folder(folder, "photos", min_side=1200)
    assert [p.name for p in found.files] == ["whole.jpg"] and found.skipped == 1
    with pytest.raises(Exception, match="smaller than the 1201px crop"):
        scan_folder(folder, "photos", min_side=1201)


def test_a_large_jpeg_is_loaded_at_load_size_from_a_reduced_decode_close_to_the_full_one(tmp_path):
    import random

    from PIL import Image

    from training.data import load_image

    photo(1600, 1200, seed=4).save(tmp_path / "large.jpg", quality=92)
    small = load_image(tmp_path / "large.jpg", 286, 256, False, random.Random(0))
    with Image.open(tmp_path / "large.jpg") as img:  # the full decode, resized the same way
        full = np.asarray(img.convert("RGB").resize((286, 286), Image.Resampling.BICUBIC))
    rng = random.Random(0)
    left, top = rng.randint(0, 30), rng.randint(0, 30)
    full = torch_from(full[top:top + 256, left:left + 256])
    assert small.shape == full.shape == (3, 256, 256) and small.dtype == full.dtype
    assert (small.float() - full.float()).abs().mean() < 3  # 1.5 measured; 4.8 for the crop 8 px lower


def torch_from(arr):
    import torch

    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def test_images_smaller_than_the_crop(folders, tmp_path):
    r = fit(folders, tmp_path / "o", "--preset", "cpu", "--image-size", "64")
    assert "smaller than the 64px crop" in one_line_failure(r)


def test_out_holding_another_run_is_not_touched(folders, tmp_path):
    out = tmp_path / "run"
    assert fit(folders, out, "--preset", "cpu", *SMALL, "--image-size", "32", "--steps", "2").returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    r = fit(folders, out, "--preset", "cpu", *SMALL, "--image-size", "32", "--steps", "2")
    assert "already holds a run" in one_line_failure(r)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_corrupt_checkpoint_on_resume(folders, tmp_path):
    out = tmp_path / "run"
    assert fit(folders, out, "--preset", "cpu", *SMALL, "--image-size", "32", "--steps", "4",
               "--stop-at-step", "2").returncode == 0
    (ckpt,) = (out / "checkpoints").iterdir()
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    r = fit(folders, out, "--resume")
    assert "corrupt" in one_line_failure(r)
    assert ckpt.exists() and (out / "config.json").exists()
    r = fit(folders, tmp_path / "fresh", "--resume")
    assert "nothing to resume" in one_line_failure(r)


def test_evaluate_scores_a_set_against_itself_as_zero(folders, tmp_path, weights_file):
    r = run_module("training.evaluate", "--photos", str(folders / "photos"), "--paintings", str(folders / "photos"),
                   "--json", "--kid-subsets", "10")
    assert r.returncode == 0, r.stderr
    same = json.loads(r.stdout)
    # FID is ~0; unbiased KID of a set against itself is slightly negative for tiny sets (self-pairs)
    assert abs(same["fid"]) < 1e-2 and same["kid_mean"] < 1e-3
    assert same["memorization_distance"] < 1e-4  # every image is its own nearest painting
    r = run_module("training.evaluate", "--weights", str(weights_file), "--photos", str(folders / "photos"),
                   "--paintings", str(folders / "paintings"), "--json", "--kid-subsets", "10")
    assert r.returncode == 0, r.stderr
    other = json.loads(r.stdout)
    assert other["fid"] > 1.0 and other["kid_mean"] > same["kid_mean"] and other["n_generated"] == 6 and other["weights"].endswith("small.safetensors")
    # the figure no pretrained network computes: ~0 for a set against itself, larger for another set
    assert same["texture_kid_mean"] < 1e-3 and other["texture_kid_mean"] > same["texture_kid_mean"] + 1e-3
    r = run_module("training.evaluate", "--photos", str(tmp_path / "none"), "--paintings", str(folders / "photos"))
    assert "does not exist" in one_line_failure(r)


def test_texture_statistics_come_from_a_fixed_random_network_and_see_colour_and_texture():
    import torch

    from training.metrics import RandomTextureNet, texture_features_u8, texture_kid

    a, b = RandomTextureNet(), RandomTextureNet()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # same seed
    rng = np.random.default_rng(0)
    smooth = torch.from_numpy(rng.integers(100, 140, (24, 3, 64, 64), dtype=np.uint8))
    noisy = torch.from_numpy(rng.integers(0, 256, (24, 3, 64, 64), dtype=np.uint8))  # same mean, other texture
    red = smooth.clone()
    red[:, 0] = 230  # same texture, other colour
    fa, fb = texture_features_u8(smooth[:12]), texture_features_u8(smooth[12:])
    assert fa.shape == (12, 966)
    same = texture_kid(fa, fb, subsets=10)[0]
    assert texture_kid(texture_features_u8(noisy[:12]), fb, subsets=10)[0] > same + 1.0
    assert texture_kid(texture_features_u8(red[:12]), fb, subsets=10)[0] > same + 1.0


def test_bad_hyperparameters_and_damaged_config(folders, tmp_path):
    assert "at least 1" in one_line_failure(fit(folders, tmp_path / "a", "--ngf", "0"))
    assert "multiple of 4" in one_line_failure(fit(folders, tmp_path / "b", "--preset", "cpu", "--image-size", "30"))
    assert "multiple of 256" in one_line_failure(fit(folders, tmp_path / "c", "--preset", "kaggle", "--image-size", "128"))
    assert "positive" in one_line_failure(fit(folders, tmp_path / "d", "--lr", "-1"))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text("{not json")
    assert "damaged" in one_line_failure(fit(folders, tmp_path / "e", "--resume"))


def test_keep_large_blocks_keeps_a_freed_large_block_in_the_process():
    """training.fit on CPU (--keep-memory, the default) keeps freed large blocks for the next step: without it
    glibc unmaps a 64 MB block when it is freed and the next step faults it in again."""
    import subprocess
    import sys

    probe = (
        "import sys, torch\n"
        "from model.runtime import keep_large_blocks\n"
        "kept = sys.argv[1] == 'keep' and keep_large_blocks()\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
        "x = torch.ones(64 << 18)\n"  # 64 MB, every page touched
        "before = rss(); del x; after = rss()\n"
        "print(kept, before - after)\n"
    )
    out = {}
    for mode in ("keep", "default"):
        run = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        kept, released = run.stdout.split()
        out[mode] = (kept == "True", int(released))
    assert out["keep"][0], "glibc's mallopt was not found"
    assert out["default"][1] >= 60  # the default: the block goes back to the OS when freed
    assert out["keep"][1] < 8  # kept: still in the process for the next allocation
