"""The in-memory data path (issue 35): every image decoded once into the device's memory and each batch cropped
and flipped there in one gather. It must give the batches the disk path gives, image for image and pixel for
pixel, so a run may switch between them (and resume across them) without changing what it learns."""
import json

import pytest
import torch

from tests.conftest import photo, run_module
from training.data import CropKeys, ImageBank, StepSampler, UnpairedDataset, memory_banks, scan_folder


@pytest.fixture(scope="module")
def wide_folders(tmp_path_factory):
    """Photos 44x36 (wider than tall, to catch a swapped width and height), paintings 40x40 in PNG."""
    root = tmp_path_factory.mktemp("data")
    (root / "photos").mkdir()
    (root / "paintings").mkdir()
    for i in range(7):
        photo(44, 36, seed=i).save(root / "photos" / f"p{i}.jpg", quality=90)
    for i in range(5):
        photo(40, 40, seed=50 + i).save(root / "paintings" / f"m{i}.png")
    return root


@pytest.mark.parametrize("load_size", [0, 38])
def test_the_device_crops_are_the_disk_paths_batches_pixel_for_pixel(wide_folders, load_size):
    photos = scan_folder(wide_folders / "photos", "photos")
    paintings = scan_folder(wide_folders / "paintings", "paintings")
    crop = 32
    disk = UnpairedDataset(photos, paintings, load_size, crop, True, seed=3)
    banks = memory_banks(photos, paintings, load_size, torch.device("cpu"), "on")
    assert isinstance(banks, tuple), banks
    keys = CropKeys(*banks, crop, True, seed=3)
    sampler = StepSampler(len(disk), steps_per_epoch=3, batch_size=4, seed=3, total_steps=6)
    order = list(sampler)
    flips = 0
    for start in range(0, len(order), 4):
        batch = order[start : start + 4]
        k = torch.stack([keys[key] for key in batch])
        photo_batch, monet_batch = banks[0].crop(k[:, 0], crop), banks[1].crop(k[:, 1], crop)
        expected = [disk[key] for key in batch]
        assert photo_batch.dtype == torch.uint8 and photo_batch.shape == (4, 3, crop, crop)
        assert torch.equal(photo_batch, torch.stack([e[0] for e in expected]))
        assert torch.equal(monet_batch, torch.stack([e[1] for e in expected]))
        flips += int(k[:, :, 3].sum())
    assert 0 < flips < 2 * len(order)  # both flipped and unflipped crops were compared


def test_auto_stays_on_disk_on_cpu_and_images_of_several_sizes_stay_on_disk(wide_folders, tmp_path):
    photos = scan_folder(wide_folders / "photos", "photos")
    paintings = scan_folder(wide_folders / "paintings", "paintings")
    assert "cpu" in memory_banks(photos, paintings, 0, torch.device("cpu"), "auto")
    assert "off" in memory_banks(photos, paintings, 0, torch.device("cpu"), "off")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    photo(40, 40).save(mixed / "a.jpg")
    photo(48, 40).save(mixed / "b.jpg")
    reason = memory_banks(scan_folder(mixed, "photos"), paintings, 0, torch.device("cpu"), "on")
    assert isinstance(reason, str) and "one size" in reason
    assert isinstance(memory_banks(scan_folder(mixed, "photos"), paintings, 40, torch.device("cpu"), "on"), tuple)
    assert ImageBank.size_of(photos.files, 0) == (44, 36)


def test_a_run_in_memory_learns_exactly_what_the_disk_run_learns(wide_folders, tmp_path):
    """The same seed and steps, one run reading from disk, one from memory: the same losses at every logged step."""
    common = ["--photos", str(wide_folders / "photos"), "--paintings", str(wide_folders / "paintings"),
              "--preset", "cpu", "--ngf", "8", "--n-blocks", "1", "--ndf", "8", "--image-size", "32",
              "--batch-size", "2", "--steps", "4", "--log-every", "1", "--eval-every", "0", "--seed", "5",
              "--num-workers", "0", "--compile-norm", "off", "--precision", "fp32", "--no-export"]
    losses = {}
    for mode in ("off", "on"):
        r = run_module("training.fit", *common, "--out", str(tmp_path / mode), "--data-in-memory", mode)
        assert r.returncode == 0, r.stderr
        assert ("decoded once into cpu memory" in r.stdout) == (mode == "on"), r.stdout
        lines = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [{k: v for k, v in m.items() if k not in ("images_per_s",)} for m in lines]
    assert len(losses["on"]) == 4 and losses["on"] == losses["off"]
