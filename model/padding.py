"""Padding uint8 images to the generator's size multiple (the translator's batches and the tiler's tiles)."""
from __future__ import annotations

import numpy as np
import torch


def padding_for(h: int, w: int, multiple: int) -> tuple[int, int, int, int, str]:
    """(top, bottom, left, right, mode) that bring an h x w image to a multiple of ``multiple``."""
    least = -(-16 // multiple) * multiple  # instance norm needs more than one pixel at the bottleneck
    ph, pw = max((-h) % multiple, least - h), max((-w) % multiple, least - w)
    return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2, "reflect" if ph < h and pw < w else "replicate"


def _pad_index(n: int, before: int, after: int, mode: str) -> np.ndarray:
    """Source indices along one axis that pad ``n`` positions by ``before`` and ``after`` (reflect without
    repeating the edge, as numpy and torch do; or replicate the edge)."""
    i = np.arange(-before, n + after)
    if mode == "reflect":
        i = np.abs(i)
        return np.where(i > n - 1, 2 * (n - 1) - i, i)
    return np.clip(i, 0, n - 1)


def pad_images(batch, top: int, bottom: int, left: int, right: int, mode: str):
    """A uint8 (N, H, W, 3) numpy array or tensor padded in height and width (the same kind back)."""
    h, w = batch.shape[1:3]
    rows, cols = _pad_index(h, top, bottom, mode), _pad_index(w, left, right, mode)
    if isinstance(batch, torch.Tensor):
        rows, cols = torch.from_numpy(rows).to(batch.device), torch.from_numpy(cols).to(batch.device)
    return batch[:, rows][:, :, cols]
