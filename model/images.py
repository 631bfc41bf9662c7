"""Turning whatever image a user has into an upright 8-bit RGB image, and back into bytes."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` upright (EXIF orientation applied) as 8-bit RGB.

    Handles 1, L, LA, P (with or without transparency), RGBA, CMYK, YCbCr and 16-bit / 32-bit
    grey modes. Transparent pixels are composited over white.
    """
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not cost the user their picture
        pass
    mode = image.mode
    if mode in _HIGH_DEPTH_MODES:
        arr = np.asarray(image, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr[..., 0]
        peak = float(arr.max()) if arr.size else 0.0
        if mode == "F" and peak <= 1.0:
            arr = arr * 255.0
        elif peak > 255.0 or mode.startswith("I;16"):
            arr = arr / 257.0
        grey = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L")
        return grey.convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info) or mode == "RGBa":
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    return image


def fit_max_side(image: Image.Image, max_side: int | None) -> Image.Image:
    """Downscale ``image`` so its longer side is at most ``max_side``, keeping the aspect ratio."""
    if not max_side or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)
