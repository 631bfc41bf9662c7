"""Image codecs shared by the CLI and the service: the output formats, and JPEG decode and encode through
torchvision (nvJPEG on CUDA, one batched call; libjpeg-turbo on CPU), so JPEG in and JPEG out never touch
the host on a GPU.

Pure torch, torchvision and Pillow (no web stack).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn


@dataclass(frozen=True)
class OutputFormat:
    """How a painting is written: Pillow's format name, the media type, the file extension, save options."""

    pil: str
    media_type: str
    extension: str
    options: dict = field(default_factory=dict)


# One table for the CLI and the service. PNG is lossless (the service uses fpng where it is installed, else
# zlib level 1: painterly noise barely compresses, and levels 3-6 cost 1.4-2x the time for 1-2%).
FORMATS = {
    "png": OutputFormat("PNG", "image/png", ".png", {"compress_level": 1}),
    "jpeg": OutputFormat("JPEG", "image/jpeg", ".jpg", {"quality": 92}),
    "webp": OutputFormat("WEBP", "image/webp", ".webp", {"quality": 90}),
}
JPEG_QUALITY = FORMATS["jpeg"].options["quality"]
ALPHA_FORMATS = ("png", "webp")  # the formats whose paintings keep a transparent upload's alpha channel


# EXIF orientation -> the same transposition as PIL's ImageOps.exif_transpose, on a (3, H, W) tensor
_ORIENT = {
    2: lambda t: t.flip(-1),
    3: lambda t: t.flip(-1, -2),
    4: lambda t: t.flip(-2),
    5: lambda t: t.transpose(-1, -2),
    6: lambda t: torch.rot90(t, -1, (-2, -1)),
    7: lambda t: t.transpose(-1, -2).flip(-1, -2),
    8: lambda t: torch.rot90(t, 1, (-2, -1)),
}


def jpeg_orientation(blob: bytes) -> int | None:
    """The EXIF orientation (1-8) of a JPEG file that nvJPEG can decode as it is (baseline or progressive,
    RGB or grey), read from its header only; None if the file is anything else (CMYK, not a JPEG, broken)."""
    try:
        with Image.open(io.BytesIO(blob)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            try:
                return int(img.getexif().get(0x0112, 1))
            except Exception:  # a broken EXIF block: keep the pixels as stored, like to_rgb does
                return 1
    except Exception:
        return None


def decode_jpegs(blobs: list[bytes], device: torch.device | str) -> list[torch.Tensor | None]:
    """JPEG files as upright uint8 (3, H, W) RGB tensors on ``device``: nvJPEG in one batched call on CUDA,
    libjpeg-turbo on CPU. None for a file it cannot decode (the caller falls back to Pillow)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    orientations = [jpeg_orientation(b) for b in blobs]
    usable = [i for i, o in enumerate(orientations) if o is not None]
    out: list[torch.Tensor | None] = [None] * len(blobs)
    if not usable:
        return out
    data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in usable]
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the batch: decode one by one
            decoded = []
            for d in data:
                try:
                    decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
    for i, img in zip(usable, decoded):
        if img is not None:
            turn = _ORIENT.get(orientations[i])
            out[i] = turn(img).contiguous() if turn else img
    return out


def encode_jpegs(images: list[torch.Tensor], quality: int = JPEG_QUALITY) -> list[bytes]:
    """uint8 (H, W, 3) images (on CUDA: nvJPEG, one batched call) as JPEG files."""
    from torchvision.io import encode_jpeg

    if not images:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        chw = [img.permute(2, 0, 1).contiguous() for img in images]
        try:
            encoded = encode_jpeg(chw, quality=quality)
        except RuntimeError:  # torchvision before 0.20 encodes on CPU only
            encoded = encode_jpeg([t.cpu() for t in chw], quality=quality)
    return [bytes(e.cpu().numpy()) for e in encoded]


def fit_tensor(image: torch.Tensor, max_side: int | None) -> torch.Tensor:
    """A (3, H, W) uint8 image scaled down (antialiased bicubic) so its longer side is at most ``max_side``."""
    from model.images import fitted_size

    h, w = image.shape[-2:]
    new_w, new_h = fitted_size((w, h), max_side)
    if (new_w, new_h) == (w, h):
        return image
    small = nn.functional.interpolate(image[None].float(), size=(new_h, new_w), mode="bicubic", antialias=True)
    return small[0].round_().clamp_(0, 255).to(torch.uint8)


def paint_jpegs(translator, blobs: list[bytes], max_side: int | None = None, quality: int = JPEG_QUALITY) -> list[bytes | None]:
    """JPEG files in, JPEG paintings out, the pixels staying on the translator's device from decode to encode.
    None for an input this path cannot take (CMYK, not a JPEG, damaged): paint those through Pillow."""
    decoded = decode_jpegs(blobs, translator.device)
    images = {i: fit_tensor(img, max_side).permute(1, 2, 0) for i, img in enumerate(decoded) if img is not None}
    paintings = dict(zip(images, translator.translate_many(list(images.values()))))
    encoded = dict(zip(paintings, encode_jpegs(list(paintings.values()), quality)))
    return [encoded.get(i) for i in range(len(blobs))]
