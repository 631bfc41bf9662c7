"""Stroke scale: the network paints a photo shrunk by ``s``, and the painting is brought back to the photo's
size, so that on a 12 MP photo the strokes cover the share of the picture they cover on the photos the
network learnt from, instead of a tenth of it.

Two ways back to full size:
- ``lanczos``: the painting resampled (Pillow's Lanczos), soft at the edges, every stroke kept;
- ``guided``: the fast guided filter (He and Sun, 2015): per pixel, the painting is a local linear function of
  the photo's luminance (``a * I + b``), fitted at the painted size and applied at full size, so that edges
  come from the photo and colours and strokes from the painting. Strip by strip: memory follows the width.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REFERENCE_SIDE = 1024  # the longer side the default stroke scale paints at (the service's old MAX_SIDE)
UPSAMPLERS = ("guided", "lanczos")
STROKE_SCALES = (1.0, 64.0)  # the stroke scales a caller may ask for (the CLI and the service check these bounds)
GUIDED_RADIUS = 2  # box radius of the guided filter, in pixels of the painted (small) image
# its regulariser, on [0, 1] values: where the photo varies by less than about 0.05, the painting wins. Side by
# side at 100% (docs/stroke_scale.jpg): 0.02 looked like the photo, 0.1 and 0.2 let colours bleed over edges
GUIDED_EPS = 0.05 ** 2
STRIP_ROWS = 256  # full-size rows the guided filter writes at a time


def default_stroke_scale(width: int, height: int) -> float:
    """The stroke scale an image of this size gets by default: its longer side over REFERENCE_SIDE, at least 1.
    A photo up to 1024 pixels is painted as it is; a 4032x3024 phone photo at 1/3.9 of its size."""
    return max(1.0, max(width, height) / REFERENCE_SIDE)


def painted_size(width: int, height: int, stroke_scale: float) -> tuple[int, int]:
    """The size the network paints an image of ``width`` x ``height`` at, for ``stroke_scale`` (>= 1)."""
    if stroke_scale <= 1.0:
        return width, height
    return max(1, round(width / stroke_scale)), max(1, round(height / stroke_scale))


def shrink(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> ``size`` (w, h), area-filtered (Pillow's reducing resize)."""
    if (image.shape[1], image.shape[0]) == size:
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0),
                      dtype=np.uint8)


def enlarge(painting: np.ndarray, photo: np.ndarray, method: str = "guided") -> np.ndarray:
    """The small ``painting`` brought to ``photo``'s size (uint8 (H, W, 3) both): ``lanczos`` or ``guided``."""
    if method not in UPSAMPLERS:
        raise ValueError(f"unknown upsampler {method!r}; use one of {', '.join(UPSAMPLERS)}")
    h, w = photo.shape[:2]
    if painting.shape[:2] == (h, w):
        return painting
    if method == "lanczos":
        return np.asarray(Image.fromarray(painting).resize((w, h), Image.Resampling.LANCZOS), dtype=np.uint8)
    return _guided(painting, photo)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] * np.float32(0.299 / 255) + rgb[..., 1] * np.float32(0.587 / 255)
            + rgb[..., 2] * np.float32(0.114 / 255))


def _box(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window (edge-replicated) of an (H, W, ...) float array, by cumulative sums."""
    pad = [(r, r), (r, r)] + [(0, 0)] * (x.ndim - 2)
    c = np.pad(x, pad, mode="edge").cumsum(0, dtype=np.float64).cumsum(1)
    c = np.pad(c, [(1, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))
    k = 2 * r + 1
    s = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
    return (s / (k * k)).astype(np.float32)


def _guided(painting: np.ndarray, photo: np.ndarray) -> np.ndarray:
    h, w = photo.shape[:2]
    sh, sw = painting.shape[:2]
    guide = _luminance(shrink(photo, (sw, sh)).astype(np.float32))
    p = painting.astype(np.float32) / 255.0
    mean_i, mean_p = _box(guide, GUIDED_RADIUS), _box(p, GUIDED_RADIUS)
    cov = _box(guide[..., None] * p, GUIDED_RADIUS) - mean_i[..., None] * mean_p
    var = _box(guide * guide, GUIDED_RADIUS) - mean_i * mean_i
    a = cov / (var[..., None] + GUIDED_EPS)
    b = mean_p - a * mean_i[..., None]
    # a and b, bilinear (half-pixel centres) to full size: along x for the few small rows at once (torch, which
    # keeps rows where the height does not change), then along y a strip of full-size rows at a time
    with torch.inference_mode():
        coefs = [F.interpolate(torch.from_numpy(np.ascontiguousarray(c.transpose(2, 0, 1)))[None], size=(sh, w),
                               mode="bilinear", align_corners=False)[0] for c in (_box(a, GUIDED_RADIUS),
                                                                              _box(b, GUIDED_RADIUS))]
        src = np.clip((np.arange(h, dtype=np.float64) + 0.5) * (sh / h) - 0.5, 0, sh - 1)
        y0s = np.floor(src).astype(np.int64)
        y1s = np.minimum(y0s + 1, sh - 1)
        fys = torch.from_numpy((src - y0s).astype(np.float32))
        y0s, y1s = torch.from_numpy(y0s), torch.from_numpy(y1s)
        weights = torch.tensor([0.299 / 255, 0.587 / 255, 0.114 / 255])
        out = np.empty((h, w, 3), np.uint8)
        for top in range(0, h, STRIP_ROWS):
            rows = slice(top, min(h, top + STRIP_ROWS))
            fy = fys[rows][None, :, None]
            ca, cb = (torch.lerp(c[:, y0s[rows]], c[:, y1s[rows]], fy) for c in coefs)  # (3, rows, w)
            lum = torch.from_numpy(np.array(photo[rows])).float() @ weights  # (rows, w); a copy: photo may be read-only
            q = ca.mul_(lum).add_(cb).mul_(255.0).round_().clamp_(0, 255)
            out[rows] = q.to(torch.uint8).permute(1, 2, 0).numpy()
    return out
