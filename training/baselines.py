"""Zero-training baselines a generator must beat: Reinhard et al.'s (2001) colour transfer, which
matches each photo's per-channel mean and standard deviation in CIE Lab to the paintings'."""
from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from model.images import to_rgb

_M = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
               [0.0193339, 0.1191920, 0.9503041]])
_WHITE = np.array([0.95047, 1.0, 1.08883])  # D65


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 (..., 3) -> CIE Lab (D65) float64."""
    c = rgb.astype(np.float64) / 255.0
    lin = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = lin @ _M.T / _WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIE Lab (D65) -> sRGB uint8, clipped to the gamut."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _WHITE
    lin = np.clip(xyz @ np.linalg.inv(_M).T, 0, 1)
    c = np.where(lin > 0.0031308, 1.055 * lin ** (1 / 2.4) - 0.055, 12.92 * lin)
    return np.clip(np.round(c * 255), 0, 255).astype(np.uint8)


def lab_statistics(images) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel Lab mean and standard deviation over all pixels of an iterable of PIL images."""
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for img in images:
        lab = rgb_to_lab(np.asarray(to_rgb(img))).reshape(-1, 3)
        total += lab.sum(0)
        total_sq += (lab**2).sum(0)
        count += len(lab)
    mean = total / count
    return mean, np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))


def colour_transfer(image: Image.Image, target_mean: np.ndarray, target_std: np.ndarray) -> Image.Image:
    """``image`` with its Lab mean and standard deviation per channel moved to the target's."""
    lab = rgb_to_lab(np.asarray(to_rgb(image)))
    mean = lab.reshape(-1, 3).mean(0)
    std = lab.reshape(-1, 3).std(0)
    out = (lab - mean) / np.maximum(std, 1e-6) * target_std + target_mean
    return Image.fromarray(lab_to_rgb(out), "RGB")


@functools.cache
def _matrix(kind: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The sRGB <-> XYZ matrix (white-normalised) on ``device``, made once: a training step that copied it from
    the host every time could not be captured in a CUDA graph."""
    m = _M / _WHITE[:, None] if kind == "to_xyz" else np.linalg.inv(_M) * _WHITE[None, :]
    return torch.as_tensor(m, dtype=dtype, device=device)


def _rgb_to_lab_t(x: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (N, 3, H, W) -> CIE Lab (D65), as ``rgb_to_lab``, in torch."""
    m = _matrix("to_xyz", x.dtype, x.device)
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = torch.einsum("ij,njhw->nihw", m, lin)
    f = torch.where(xyz > (6 / 29) ** 3, xyz.clamp_min(1e-12) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def _lab_to_rgb_t(lab: torch.Tensor) -> torch.Tensor:
    """CIE Lab (D65) -> sRGB in [0, 1], clipped to the gamut, as ``lab_to_rgb`` (unrounded), in torch."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], 1)
    xyz = torch.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29))
    m = _matrix("from_xyz", lab.dtype, lab.device)
    lin = torch.einsum("ij,njhw->nihw", m, xyz).clamp(0, 1)
    return torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(1e-12) ** (1 / 2.4) - 0.055, 12.92 * lin)


@torch.no_grad()
def colour_transfer_batch(photos: torch.Tensor, paintings: torch.Tensor) -> torch.Tensor:
    """Each photo's Lab mean and standard deviation per channel moved to its paired painting's (Reinhard et al.,
    as ``colour_transfer``, batched on the device): images in [-1, 1], (N, 3, H, W) both; returns the photos'
    colour transfer in [-1, 1], in the photos' dtype."""
    to01 = lambda t: (t.float() + 1) / 2  # noqa: E731
    src, dst = _rgb_to_lab_t(to01(photos)), _rgb_to_lab_t(to01(paintings))
    s_mean, s_std = src.mean((2, 3), keepdim=True), src.std((2, 3), correction=0, keepdim=True).clamp_min(1e-6)
    d_mean, d_std = dst.mean((2, 3), keepdim=True), dst.std((2, 3), correction=0, keepdim=True)
    out = _lab_to_rgb_t((src - s_mean) / s_std * d_std + d_mean)
    return (out * 2 - 1).to(photos.dtype).contiguous(memory_format=torch.channels_last
                                                     if photos.is_contiguous(memory_format=torch.channels_last)
                                                     else torch.contiguous_format)
