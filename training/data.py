"""Unpaired image folders for CycleGAN training, with augmentation that depends only on (seed, epoch, index).

Because every random choice of the data pipeline is a function of the step, a resumed run sees
exactly the batches it would have seen without the interruption, with no loader state to save.
"""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from model.images import IMAGE_EXTENSIONS, to_rgb



class DataError(ValueError):
    """A problem with the training folders that the user must fix; the message says what."""


@dataclass
class ImageSet:
    """The readable images of one folder, and how many files were skipped as unreadable."""

    root: Path
    files: list[Path]
    skipped: int


def _image_size(path: Path) -> tuple[int, int] | None:
    """The image's size, or None when it cannot be decoded. A JPEG is decoded at an eighth of its size (libjpeg's
    DCT scaling still reads every byte of it, so a truncated file fails here, not mid-run): the scan of a folder
    of 12 MP photos 4.2x faster, of 256x256 ones 1.13x (bound by Pillow's header parsing there)."""
    try:
        with Image.open(path) as img:
            size = img.size
            img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))  # no-op for other formats
            img.load()
            return size
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def scan_folder(folder: str | Path, role: str, min_side: int = 0) -> ImageSet:
    """List the readable images under ``folder`` (recursively), decoding each once.

    Raises DataError when the folder is missing, holds no readable image, or (with ``min_side``)
    an image is smaller than the crop.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{role} folder {root} does not exist or is not a folder")
    candidates = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not candidates:
        raise DataError(f"{role} folder {root} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    with ThreadPoolExecutor(max_workers=4) as pool:
        sizes = list(pool.map(_image_size, candidates))
    files = [p for p, s in zip(candidates, sizes) if s is not None]
    if not files:
        raise DataError(f"{role} folder {root}: none of its {len(candidates)} image files could be read")
    if min_side:
        small = [(p, s) for p, s in zip(candidates, sizes) if s is not None and min(s) < min_side]
        if small:
            p, s = small[0]
            raise DataError(
                f"{len(small)} {role} image(s) are smaller than the {min_side}px crop (e.g. {p}, {s[0]}x{s[1]}); "
                f"use a smaller --image-size or set --load-size to resize them"
            )
    return ImageSet(root, files, len(candidates) - len(files))


def decode_image(path: Path, load_size: int) -> np.ndarray:
    """Decode to RGB, resized to ``load_size`` square (0 keeps the size): HWC uint8."""
    with Image.open(path) as img:
        if load_size:  # a JPEG twice load_size or more decodes at 1/2, 1/4 or 1/8 of its size, never below it
            img.draft("RGB", (load_size, load_size))
        img = to_rgb(img)
        if load_size and img.size != (load_size, load_size):
            img = img.resize((load_size, load_size), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)


def draw_crop(rng: random.Random, width: int, height: int, crop: int, flip: bool) -> tuple[int, int, bool]:
    """The random crop's left and top, and whether it is flipped: the draws every data path makes, in this order,
    so the disk and the in-memory paths see the same batches."""
    left, top = rng.randint(0, width - crop), rng.randint(0, height - crop)
    return left, top, bool(flip and rng.random() < 0.5)


def load_image(path: Path, load_size: int, crop: int, flip: bool, rng: random.Random) -> torch.Tensor:
    """Decode, resize to load_size (0 keeps the size), random-crop ``crop``, maybe flip; CHW uint8."""
    arr = decode_image(path, load_size)
    h, w = arr.shape[:2]
    left, top, flipped = draw_crop(rng, w, h, crop, flip)
    arr = arr[top : top + crop, left : left + crop]
    if flipped:
        arr = arr[:, ::-1]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class UnpairedDataset(Dataset):
    """Item ``(epoch, i)`` is photo ``i`` and a painting drawn at random, both augmented.

    Images come back as uint8 CHW tensors; the training step scales them to [-1, 1] on the device.
    """

    def __init__(self, photos: ImageSet, paintings: ImageSet, load_size: int, crop: int, flip: bool, seed: int):
        self.photos, self.paintings = photos.files, paintings.files
        self.load_size, self.crop, self.flip, self.seed = load_size, crop, flip, seed

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = key
        rng = random.Random(f"{self.seed}/{epoch}/{i}")
        painting = self.paintings[rng.randrange(len(self.paintings))]
        photo = load_image(self.photos[i % len(self.photos)], self.load_size, self.crop, self.flip, rng)
        monet = load_image(painting, self.load_size, self.crop, self.flip, rng)
        return photo, monet


class StepSampler(Sampler):
    """Yields ``(epoch, index)`` keys for this rank from ``start_step`` on, ``batch_size`` per step.

    Each epoch is a fresh permutation of the photos (seeded by seed and epoch), repeated as needed to
    fill ``steps_per_epoch`` steps, split between ranks like DistributedSampler does.
    """

    def __init__(self, n: int, steps_per_epoch: int, batch_size: int, seed: int,
                 start_step: int = 0, total_steps: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.steps_per_epoch, self.batch_size = n, steps_per_epoch, batch_size
        self.seed, self.start_step, self.total_steps = seed, start_step, total_steps
        self.rank, self.world_size = rank, world_size

    def _epoch_keys(self, epoch: int) -> list[int]:
        need = self.steps_per_epoch * self.batch_size * self.world_size
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order: list[int] = []
        while len(order) < need:
            order += torch.randperm(self.n, generator=g).tolist()
        return order[:need][self.rank :: self.world_size]

    def __iter__(self):
        remaining, step = len(self), self.start_step
        while remaining > 0:
            epoch, offset = divmod(step, self.steps_per_epoch)
            for i in self._epoch_keys(epoch)[offset * self.batch_size :]:
                if remaining == 0:
                    return
                yield (epoch, i)
                remaining -= 1
            step = (epoch + 1) * self.steps_per_epoch

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.batch_size


# --- the whole data set in memory, cropped on the device (issue 35: data that keeps up with a GPU) ----------

MEMORY_MAX_BYTES = 4 << 30  # "auto" keeps the decoded images on the device up to this size (6,000 of 256^2: 1.2 GB)


class ImageBank:
    """Every image of a folder decoded once (at ``load_size``) into one uint8 NCHW tensor, on the device; a batch
    is then one gather (``crop``), with no decode, no worker process and no host-to-device copy per step."""

    def __init__(self, images: torch.Tensor):
        self.images = images
        self.height, self.width = images.shape[2], images.shape[3]

    @staticmethod
    def size_of(files: list[Path], load_size: int) -> tuple[int, int] | None:
        """The one (width, height) every file has once loaded, or None when they differ."""
        if load_size:
            return load_size, load_size
        sizes = set()
        for f in files:
            with Image.open(f) as img:
                sizes.add(exif_upright_size(img))
            if len(sizes) > 1:
                return None
        return sizes.pop()

    @classmethod
    def build(cls, files: list[Path], load_size: int, device: torch.device) -> "ImageBank":
        with ThreadPoolExecutor(max_workers=4) as pool:
            arrays = list(pool.map(lambda f: decode_image(f, load_size), files))
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return cls(images.to(device))

    def crop(self, keys: torch.Tensor, size: int) -> torch.Tensor:
        """Rows of ``keys`` (index, left, top, flipped) -> a uint8 batch of ``size`` crops, flipped where asked: one
        gather. The same pixels as ``load_image`` with the same draws."""
        keys = keys.to(self.images.device, non_blocking=True)
        index, left, top, flipped = keys.unbind(1)
        step = torch.arange(size, device=keys.device)
        rows = top[:, None] + step
        cols = left[:, None] + torch.where(flipped[:, None].bool(), size - 1 - step, step)
        channel = torch.arange(self.images.shape[1], device=keys.device)
        return self.images[index[:, None, None, None], channel[None, :, None, None], rows[:, None, :, None],
                           cols[:, None, None, :]]


def exif_upright_size(img: Image.Image) -> tuple[int, int]:
    """The size ``to_rgb`` gives: width and height swapped for EXIF orientations 5-8."""
    orientation = img.getexif().get(0x0112, 1)
    return (img.size[1], img.size[0]) if orientation in (5, 6, 7, 8) else img.size


class CropKeys(Dataset):
    """Item ``(epoch, i)``: where UnpairedDataset's item ``(epoch, i)`` comes from, as two rows (index, left, top,
    flipped) for the photo and the painting banks, from the same draws in the same order."""

    def __init__(self, photos: ImageBank, paintings: ImageBank, crop: int, flip: bool, seed: int):
        self.photos, self.paintings = photos, paintings
        self.crop, self.flip, self.seed = crop, flip, seed

    def __len__(self) -> int:
        return len(self.photos.images)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, i = key
        rng = random.Random(f"{self.seed}/{epoch}/{i}")
        painting = rng.randrange(len(self.paintings.images))
        photo = draw_crop(rng, self.photos.width, self.photos.height, self.crop, self.flip)
        monet = draw_crop(rng, self.paintings.width, self.paintings.height, self.crop, self.flip)
        return torch.tensor([[i % len(self), *photo], [painting, *monet]], dtype=torch.long)


def memory_banks(photos: ImageSet, paintings: ImageSet, load_size: int, device: torch.device, mode: str,
                 max_bytes: int = MEMORY_MAX_BYTES) -> tuple[ImageBank, ImageBank] | str:
    """Both folders decoded into device memory (``mode`` "on", or "auto" on CUDA), or the reason they are not
    (a string: off, another device, images of several sizes, too large)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return f"--data-in-memory {mode}" + (f" on {device.type}" if mode == "auto" else "")
    sizes = [ImageBank.size_of(s.files, load_size) for s in (photos, paintings)]
    if None in sizes:
        return "the images are not all one size (set --load-size)"
    total = sum(len(s.files) * 3 * w * h for s, (w, h) in zip((photos, paintings), sizes))
    if total > max_bytes and mode == "auto":
        return f"{total / 2**30:.1f} GiB decoded, over {max_bytes / 2**30:.0f} GiB"
    return (ImageBank.build(photos.files, load_size, device), ImageBank.build(paintings.files, load_size, device))
