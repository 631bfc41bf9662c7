"""Painting an image larger than one tile: overlapping tiles, one set of normalisation statistics for the
whole image, blended with a smooth window; memory follows the tile, not the image.

A CycleGAN generator's instance norms normalise each input by its own statistics, so tiles painted apart
differ in colour and contrast ("tiles differ a lot in color", junyanz/CycleGAN#32). As URST does (Chen et
al., AAAI 2022), every norm's statistics are recorded in one pass over a thumbnail of the whole image and
applied in every tile. The thumbnail holds as many pixels as the largest image painted whole (1024²):
statistics change with scale, the more so the finer the texture a generator paints (the CUT generator's
tiles on a 1536x1024 image were 2.1 levels from its whole painting with a thumbnail of 1024 pixels on the
long side, 0.9 with one of 1024² pixels, and 4.8 with one of 768 on the long side). Tiles overlap by ``overlap`` pixels and are blended with raised-cosine ramps, so the
reflect padding at a tile's inner edges never shows. Finished rows leave the float accumulator as soon as no
later tile touches them: it holds one row of tiles, never the image.
"""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
from PIL import Image
from torch import nn

from model.padding import pad_images, padding_for


class SharedInstanceNorm(nn.Module):
    """An InstanceNorm2d that records its statistics (``record``), or applies recorded ones (``apply``)."""

    def __init__(self, norm: nn.InstanceNorm2d):
        super().__init__()
        self.eps, self.weight, self.bias = norm.eps, norm.weight, norm.bias
        self.mode, self.mean, self.var = "record", None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "apply":
            mean, var = self.mean, self.var
        else:
            var, mean = torch.var_mean(x.float(), dim=(2, 3), keepdim=True, unbiased=False)
            self.mean, self.var = mean[:1], var[:1]
        y = (x.float() - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


class SharedStatistics(nn.Module):
    """A copy of ``generator`` whose instance norms share statistics between passes: ``record(thumbnail)``
    once, then every call normalises with what was recorded."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.net = copy.deepcopy(generator).float().eval()
        self.norms = []
        for parent in list(self.net.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.InstanceNorm2d):
                    shared = SharedInstanceNorm(child)
                    setattr(parent, name, shared)
                    self.norms.append(shared)

    def record(self, x: torch.Tensor) -> None:
        for n in self.norms:
            n.mode = "record"
        self.net(x)
        for n in self.norms:
            n.mode = "apply"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PaintingStopped(RuntimeError):
    """A painting's ``stop()`` said its result is no longer wanted; it stopped between two tiles."""


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start positions of tiles of ``tile`` along an axis of ``n`` that overlap by at least ``overlap``."""
    if n <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, n - tile, step))
    return starts + [n - tile]


def ramp(length: int, start: int, n: int, overlap: int) -> np.ndarray:
    """A tile's blending weight along one axis: raised-cosine ramps over ``overlap`` at edges inside the
    image, 1 elsewhere (never 0: every pixel keeps a weight)."""
    w = np.ones(length, np.float32)
    if overlap <= 0:
        return w
    up = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap, dtype=np.float32) + 0.5) / overlap)
    k = min(overlap, length)
    if start > 0:
        w[:k] = np.minimum(w[:k], up[:k])
    if start + length < n:
        w[length - k :] = np.minimum(w[length - k :], up[:k][::-1])
    return w


def _to_input(pixels: np.ndarray, multiple: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """uint8 (H, W, 3) -> float (1, 3, H', W') in [-1, 1], padded as the translator pads its batches
    (``padding_for``); with the (top, left) offset of the image inside the padded input."""
    h, w = pixels.shape[:2]
    top, bottom, left, right, mode = padding_for(h, w, multiple)
    padded = pad_images(pixels[None], top, bottom, left, right, mode)  # indexing copies: writable, contiguous
    x = torch.from_numpy(padded).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, top, left


def thumbnail(image: np.ndarray, pixels: int) -> np.ndarray:
    """The image shrunk (area filter) to at most ``pixels`` pixels, its aspect kept."""
    h, w = image.shape[:2]
    scale = (pixels / (h * w)) ** 0.5
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX), dtype=np.uint8)


@torch.inference_mode()
def paint_tiled(net: SharedStatistics, image: np.ndarray, tile: int, overlap: int, thumb_pixels: int,
                multiple: int, device: torch.device, lock=None, stop=None) -> tuple[np.ndarray, bool]:
    """Paint uint8 (H, W, 3) ``image`` in tiles of ``tile`` pixels that overlap by ``overlap``, with the norm
    statistics of a thumbnail of at most ``thumb_pixels``; (the uint8 painting, whether every output was finite).
    ``lock`` (a context manager) is held for the thumbnail pass and each tile, not for the whole painting.
    ``stop()`` is asked before each tile; True raises PaintingStopped."""
    lock = lock if lock is not None else contextlib.nullcontext()
    h, w = image.shape[:2]
    tile = max(multiple, tile - tile % multiple)
    overlap = min(overlap, tile // 2)
    x, _, _ = _to_input(thumbnail(image, thumb_pixels), multiple, device)
    with lock:
        net.record(x)
    out = np.empty((h, w, 3), np.uint8)
    finite = True
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    base = 0  # first row not written to ``out`` yet; acc holds rows base .. base + len(acc)
    acc = np.zeros((0, w, 3), np.float32)
    weight = np.zeros((0, w, 1), np.float32)
    for r, y0 in enumerate(rows):
        th = min(tile, h - y0)
        need = y0 + th - base
        if need > acc.shape[0]:
            grow = need - acc.shape[0]
            acc = np.concatenate([acc, np.zeros((grow, w, 3), np.float32)])
            weight = np.concatenate([weight, np.zeros((grow, w, 1), np.float32)])
        wy = ramp(th, y0, h, overlap)
        for x0 in cols:
            tw = min(tile, w - x0)
            if stop is not None and stop():
                raise PaintingStopped("the painting is no longer wanted")
            t, top, left = _to_input(image[y0 : y0 + th, x0 : x0 + tw], multiple, device)
            with lock:
                y = net(t)[0, :, top : top + th, left : left + tw].float()
            finite = finite and bool(torch.isfinite(y.sum()))
            painted = ((y.permute(1, 2, 0) + 1.0) * 127.5).cpu().numpy()
            win = (wy[:, None] * ramp(tw, x0, w, overlap)[None, :])[..., None]
            acc[y0 - base : y0 - base + th, x0 : x0 + tw] += painted * win
            weight[y0 - base : y0 - base + th, x0 : x0 + tw] += win
        done = (rows[r + 1] if r + 1 < len(rows) else h) - base  # rows no later tile touches
        out[base : base + done] = np.clip(np.rint(acc[:done] / weight[:done]), 0, 255).astype(np.uint8)
        acc, weight, base = acc[done:], weight[done:], base + done
    return out, finite
