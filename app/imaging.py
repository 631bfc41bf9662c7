"""Bytes in, bytes out: decoding uploads under the service's limits, and encoding results."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from model.images import fit_max_side, to_rgb

FORMATS = {  # name -> (PIL format, media type, save options)
    "png": ("PNG", "image/png", {"compress_level": 3}),
    "jpeg": ("JPEG", "image/jpeg", {"quality": 92}),
    "webp": ("WEBP", "image/webp", {"quality": 90}),
}
# The flattest possible JPEG (one grey, progressive, optimised Huffman) still needs about 1 bit per 8x8 block,
# 0.015 bits per pixel; a file with less than 0.01 bits per pixel cannot hold its declared image.
JPEG_MIN_BYTES_PER_PIXEL_INV = 800
ACCEPTED_INPUTS = {"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF"}


class ImageRejected(ValueError):
    """An upload the service won't process; ``status`` is the HTTP status that fits."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def decode_upload(data: bytes, max_pixels: int, max_side: int) -> np.ndarray:
    """Decode an uploaded image into an upright RGB uint8 array (H, W, 3), capped at ``max_side``.

    The pixel count is checked from the header before any pixel is decoded, so a decompression
    bomb costs nothing. Raises ImageRejected (400 unreadable, 413 too many pixels, 415 format).
    """
    if not data:
        raise ImageRejected(400, "the body is empty; send the image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected(400, "the body is not an image that can be read (send JPEG, PNG, WebP, BMP, TIFF or GIF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(413, f"the image has more than {max_pixels} pixels") from None
    except Exception:
        raise ImageRejected(400, "the image header is damaged") from None
    if img.format not in ACCEPTED_INPUTS:
        raise ImageRejected(415, f"{img.format} images are not supported; send JPEG, PNG, WebP, BMP, TIFF or GIF")
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(413, f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    if width < 1 or height < 1:
        raise ImageRejected(400, "the image has no pixels")
    if img.format in ("JPEG", "MPO") and len(data) * JPEG_MIN_BYTES_PER_PIXEL_INV < width * height:
        # a header whose size was raised without the data: libjpeg would pad it with grey, silently
        raise ImageRejected(400, f"the JPEG holds {len(data)} bytes, far too little data for its declared "
                                 f"{width}x{height} pixels: its header is damaged or forged")
    try:
        img.load()
        rgb = fit_max_side(to_rgb(img), max_side)
        return np.asarray(rgb, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "damaged"
        raise ImageRejected(400, f"the image data is {reason} and cannot be decoded") from None
    except Exception:
        raise ImageRejected(400, "the image cannot be decoded") from None


def blend(photo: np.ndarray, painting: np.ndarray, strength: float) -> np.ndarray:
    """``strength`` 1 gives the painting, 0 the photo, in between a linear mix (after the network, so it
    costs no second pass)."""
    if strength >= 1.0:
        return painting
    if strength <= 0.0:
        return photo
    mixed = photo.astype(np.float32) * (1.0 - strength) + painting.astype(np.float32) * strength
    return np.rint(mixed).astype(np.uint8)


def encode(array: np.ndarray, fmt: str) -> bytes:
    """Encode an RGB uint8 array as ``fmt`` (png, jpeg or webp)."""
    pil_format, _, options = FORMATS[fmt]
    buf = io.BytesIO()
    Image.fromarray(array, "RGB").save(buf, pil_format, **options)
    return buf.getvalue()


def negotiate(format_param: str | None, accept: str | None, default: str) -> str | None:
    """The output format: ``?format=`` wins, else the best match of the Accept header; None if
    nothing acceptable can be produced (406)."""
    if format_param:
        return format_param
    if not accept or not accept.strip():
        return default
    by_type = {media: name for name, (_, media, _) in FORMATS.items()}
    best, best_q = None, 0.0
    for order, part in enumerate(accept.split(",")):
        fields = [f.strip() for f in part.split(";")]
        media, q = fields[0].lower(), 1.0
        for f in fields[1:]:
            if f.startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        if q <= 0:
            continue
        if media in ("*/*", "image/*"):
            name = default
        else:
            name = by_type.get(media)
        if name and q > best_q:
            best, best_q = name, q
    return best
