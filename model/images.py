"""Turning whatever image a user has into an upright 8-bit RGB image, and back into bytes."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageCms, ImageOps

try:  # HEIC/HEIF (phones' default format) through libheif; optional so model/ runs where it is not installed
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF = True
except ImportError:
    HEIF = False

# The image formats read (Pillow's format names, with the file extensions the CLI looks for in folders): the one
# registry of inputs; the service accepts exactly these (app/decoding.py). Output formats: model/codecs.FORMATS.
INPUT_FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg"), "MPO": (), "PNG": (".png",), "WEBP": (".webp",), "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"), "GIF": (".gif",), "AVIF": (".avif",), **({"HEIF": (".heic", ".heif")} if HEIF else {}),
}
IMAGE_EXTENSIONS = {ext for extensions in INPUT_FORMATS.values() for ext in extensions}
_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


def has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` has transparency (an alpha channel, or a palette or grey transparency colour)."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa") or (image.mode in ("P", "L", "RGB")
                                                          and "transparency" in image.info)


def to_rgb(image: Image.Image, keep_alpha: bool = False) -> Image.Image:
    """Return ``image`` upright (EXIF orientation applied) as 8-bit RGB.

    Handles 1, L, LA, P (with or without transparency), RGBA, CMYK, YCbCr and 16-bit / 32-bit
    grey modes. Transparent pixels are composited over white. With ``keep_alpha``, an image with
    transparency comes back as RGBA instead: the same composited colours, and its alpha channel.
    """
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not cost the user their picture
        pass
    image = to_srgb(image)
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
    if has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(white, rgba)
        if keep_alpha:
            flat.putalpha(rgba.getchannel("A"))
            return flat
        return flat.convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    return image


def to_srgb(image: Image.Image) -> Image.Image:
    """An RGB or CMYK image with an embedded ICC profile (Display P3 from phones, Adobe RGB from cameras, a
    printer's CMYK) converted to sRGB, the space the generator was trained in; others as they are. A profile
    LittleCMS cannot read leaves the pixels unconverted rather than costing the user their picture."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "CMYK"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if image.mode == "RGB" and ImageCms.getProfileDescription(source).strip().lower().startswith("srgb"):
            return image  # already sRGB: skip the transform
        return ImageCms.profileToProfile(image, source, _SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return image


_SRGB = ImageCms.createProfile("sRGB")


def fitted_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """``size`` scaled down so its longer side is at most ``max_side``, keeping the aspect ratio."""
    if not max_side or max(size) <= max_side:
        return size
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def fit_max_side(image: Image.Image, max_side: int | None) -> Image.Image:
    """Downscale ``image`` so its longer side is at most ``max_side``, keeping the aspect ratio.

    Lanczos after an integer box reduction (``reducing_gap``): the same look as plain Lanczos at a
    fraction of its time for large reductions."""
    size = fitted_size(image.size, max_side)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


# Modes Pillow resizes directly (alpha premultiplied); others are converted to RGB first.
_RESIZABLE = {"RGB", "RGBA", "L", "LA"}


def draft_for(image: Image.Image, max_side: int | None) -> None:
    """Let a JPEG decode straight at 1/2, 1/4 or 1/8 scale when ``max_side`` makes the full size useless
    (libjpeg scales in the DCT: a 6000x6000 photo for a 1024 result decodes 8x fewer pixels). No-op for
    other formats and for images that already fit."""
    if image.format in ("JPEG", "MPO") and max_side:
        target = fitted_size(image.size, max_side)
        if target != image.size:
            image.draft(None, target)


def prepare(image: Image.Image, max_side: int | None, keep_alpha: bool = False) -> Image.Image:
    """An opened image as upright RGB with its longer side at most ``max_side``, using as little memory
    as it can: a JPEG decodes at reduced scale, and RGB/RGBA/grey images shrink before any conversion
    (so a 40-megapixel RGBA PNG never exists in more than one full-size copy). ``keep_alpha``: as
    ``to_rgb``."""
    draft_for(image, max_side)
    if image.mode in _RESIZABLE:
        image = fit_max_side(image, max_side)
        return to_rgb(image, keep_alpha)
    return fit_max_side(to_rgb(image, keep_alpha), max_side)


def split_alpha(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W, 3 or 4) pixels as (the RGB, the alpha or None); an alpha that is opaque everywhere is None."""
    if pixels.shape[2] == 3:
        return pixels, None
    alpha = pixels[..., 3]
    return np.ascontiguousarray(pixels[..., :3]), (None if bool((alpha == 255).all()) else np.ascontiguousarray(alpha))


def alpha_channel(image: Image.Image, size: tuple[int, int]) -> Image.Image | None:
    """The upright alpha channel of ``image`` (EXIF orientation applied) at ``size``, or None when it has no
    transparency: for a painting of a transparent image, which keeps its alpha (PNG and WebP)."""
    if not has_alpha(image):
        return None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:
        pass
    alpha = image.convert("RGBA").getchannel("A")
    return alpha if alpha.size == size else alpha.resize(size, Image.Resampling.LANCZOS)
