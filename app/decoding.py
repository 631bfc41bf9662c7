"""Pixels in: the decoding stage of the service. An upload's header is read and checked once (``open_upload``:
its size, orientation, format and the scale libjpeg will decode it at, recorded in ``Opened``); ``Decoder``
then decodes it under the decode budget, on the thread its size calls for."""
from __future__ import annotations

import asyncio
import functools
import io
import warnings
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from starlette.concurrency import run_in_threadpool

from app.errors import BadImage, Busy, TooLarge, UnsupportedMedia
from model.images import INPUT_FORMATS, draft_for, fitted_size, prepare  # model.images registers the HEIF opener

# The flattest possible JPEG (one grey, progressive, optimised Huffman) still needs about 1 bit per 8x8 block,
# 0.015 bits per pixel; a file with less than 0.01 bits per pixel cannot hold its declared image.
JPEG_MIN_BYTES_PER_PIXEL_INV = 800
ACCEPTED_INPUTS = set(INPUT_FORMATS)
SUPPORTED = ", ".join(name.replace("HEIF", "HEIC/HEIF").replace("WEBP", "WebP") for name in INPUT_FORMATS
                      if name != "MPO")
READABLE = {"HEIC", "HEIF", "AVIF"}  # formats sniff_format names that Pillow (with pillow-heif) does read
# ISO-BMFF brands (bytes 8-12 after "ftyp") of the phone formats, named when a file of theirs does not open
_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"heim": "HEIC", b"heis": "HEIC", b"mif1": "HEIF",
           b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}


def sniff_format(data: bytes) -> str | None:
    """The name of a well-known image format Pillow did not open (HEIC/HEIF, AVIF, SVG, PSD, JPEG XL), from its
    first bytes; None when it is none of them."""
    head = data[:512]
    if head[4:8] == b"ftyp":
        return _BRANDS.get(head[8:12])
    if head.startswith(b"8BPS"):
        return "PSD"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL "):
        return "JPEG XL"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "SVG"
    return None


# Images up to this size are decoded on the codec threads (or the event loop), one hop; larger ones on anyio's
# worker threads, where a decode of seconds cannot hold up the small ones.
SMALL_PIXELS = 512 * 512
SMALL_COST = SMALL_PIXELS * 12  # the decode budget's cost of such an image (open_upload's estimate)


@dataclass
class Opened:
    """An upload whose header passed every check; nothing decoded yet. ``image``: the opened file, set to decode
    at ``image.size`` (a JPEG's reduced DCT scale when ``drafted``); ``orientation``: a JPEG's EXIF orientation
    (1-8; None for other formats, whose EXIF may only be read with the pixels, and for a broken EXIF block,
    which is then ignored as Pillow does); ``cost``: the bytes its decode may hold at its peak, counted against
    the decode budget."""
    image: Image.Image
    cost: int
    jpeg: bytes | None = None  # a JPEG's bytes, for the scan check of finish_decode
    drafted: bool = False

    @functools.cached_property
    def orientation(self) -> int | None:
        """A JPEG's EXIF orientation (read on the decoding thread, once: not on the event loop at admission)."""
        if self.jpeg is None:  # a PNG's EXIF may follow its pixels: Pillow would decode them to find it
            return None
        try:
            return int(self.image.getexif().get(0x0112, 1))
        except Exception:  # a broken EXIF block: the pixels are kept as stored (model.images.to_rgb)
            return None


def jpeg_ends_early(data: bytes) -> bool:
    """True when libjpeg reports that a JPEG's entropy-coded data ends before its declared image does
    (JWRN_HIT_MARKER "premature end of data segment", JWRN_JPEG_EOF "premature end of JPEG file"): Pillow
    would paint the rest grey without a word. The check decodes at libjpeg's smallest scale (1/8: the entropy
    decode, nearly no inverse DCT); other warnings (extraneous bytes, colour conversions it does not do) are
    left to Pillow."""
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", fastdct=True, strict=True, min_height=1, min_width=1)
    except ValueError as exc:
        return "premature end" in str(exc).lower()
    return False


# Peak bytes per decoded pixel: Pillow keeps RGB(A) in 4 bytes, plus a converted copy and resize buffers.
_BYTES_PER_PIXEL = {"1": 6, "L": 6, "P": 10, "LA": 10, "I;16": 14, "I;16B": 14, "I;16L": 14, "I;16N": 14,
                    "I": 18, "F": 18}


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT = {b"tEXt", b"zTXt", b"iTXt"}


def without_png_text(data: bytes) -> bytes:
    """A PNG's bytes without its text chunks (tEXt, zTXt, iTXt), which the painting never uses and which
    Pillow would decompress as it reads the header; other data comes back as it is. One pass over the chunk
    headers, nothing decompressed; a chunk structure that does not add up is left for Pillow to refuse."""
    if not data.startswith(_PNG_SIGNATURE):
        return data
    text, pos = [], 8  # the (start, end) of each text chunk; nothing is copied unless there is one
    while pos + 12 <= len(data):
        kind, end = data[pos + 4 : pos + 8], pos + 12 + int.from_bytes(data[pos : pos + 4], "big")
        if end > len(data):
            return data
        if kind in _PNG_TEXT:
            text.append((pos, end))
        pos = end
        if kind == b"IEND":
            break
    if not text:
        return data
    starts, ends = [0] + [e for _, e in text], [s for s, _ in text] + [len(data)]
    return b"".join(data[a:b] for a, b in zip(starts, ends))


def open_upload(data: bytes, max_pixels: int, max_side: int) -> Opened:
    """Read an upload's header and check it, decoding no pixel: BadImage (unreadable or forged), TooLarge
    (too many pixels: a decompression bomb costs nothing), UnsupportedMedia (a format we recognise but do not
    take). A JPEG is set to decode at the smallest scale (1/2, 1/4, 1/8) that still covers ``max_side``, and
    ``cost`` counts that reduced size."""
    if not data:
        raise BadImage("the body is empty; send the image bytes")
    data = without_png_text(data)  # a valid PNG with a huge compressed comment is still a valid image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if (kind := sniff_format(data)) in READABLE:
            raise BadImage(f"the {kind} image is damaged and cannot be read") from None
        if kind is not None:
            raise UnsupportedMedia(f"{kind} images are not supported; send {SUPPORTED}") from None
        raise BadImage(f"the body is not an image that can be read (send {SUPPORTED})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooLarge(f"the image has more than {max_pixels} pixels") from None
    except Exception:
        raise BadImage("the image header is damaged") from None
    if img.format not in ACCEPTED_INPUTS:
        raise UnsupportedMedia(f"{img.format} images are not supported; send {SUPPORTED}")
    width, height = img.size
    if width * height > max_pixels:
        raise TooLarge(f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    if width < 1 or height < 1:
        raise BadImage("the image has no pixels")
    if img.format in ("JPEG", "MPO") and len(data) * JPEG_MIN_BYTES_PER_PIXEL_INV < width * height:
        # a header whose size was raised without the data: libjpeg would pad it with grey, silently
        raise BadImage(f"the JPEG holds {len(data)} bytes, far too little data for its declared "
                                 f"{width}x{height} pixels: its header is damaged or forged")
    try:
        draft_for(img, max_side)
    except Exception:
        raise BadImage("the image header is damaged") from None
    w, h = img.size
    out_w, out_h = fitted_size((w, h), max_side)
    return Opened(img, w * h * _BYTES_PER_PIXEL.get(img.mode, 10) + out_w * out_h * 8,
                  data if img.format in ("JPEG", "MPO") else None, (w, h) != (width, height))


def plain_jpeg(opened: Opened, max_side: int) -> bool:
    """Whether an opened JPEG decodes the same through libjpeg-turbo directly as through Pillow's path: colour or
    grey, upright (no EXIF rotation), no colour profile to convert, no downscaling. Most uploads from the web and
    from programs are; phone photos (rotated, Display P3, large) take Pillow's path."""
    img = opened.image
    if opened.jpeg is None or img.mode not in ("RGB", "L") or img.info.get("icc_profile"):
        return False
    if opened.drafted or (max_side and max(img.size) > max_side):
        return False  # draft_for set a reduced scale, or the image is resized after decoding
    return opened.orientation == 1


def decode_plain_jpeg(data: bytes) -> np.ndarray | None:
    """One libjpeg-turbo pass (simplejpeg, strict: libjpeg's warnings are errors) for a ``plain_jpeg``: the
    pixels, as Pillow would decode them (the same library, the same slow-integer DCT and fancy upsampling),
    at a quarter of Pillow's cost with its EXIF copy and the separate truncation check. Raises BadImage when the
    data ends early; None on any other warning, for Pillow's more lenient path to decide."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
    except ValueError as exc:
        if "premature end" in str(exc).lower():
            raise BadImage(TRUNCATED_JPEG) from None
        return None


TRUNCATED_JPEG = ("the JPEG's data ends before its declared image does (premature end of data): the file is "
                  "truncated, or its header damaged or forged")


def finish_decode(opened: Opened, max_side: int, keep_alpha: bool = False) -> np.ndarray:
    """Decode an opened upload into an upright RGB uint8 array (H, W, 3), its longer side at most
    ``max_side`` (``keep_alpha``: (H, W, 4) for an image with transparency, its colours composited over white
    and its alpha beside them). Raises BadImage for damaged or truncated data, a JPEG whose data ends early
    included."""
    if plain_jpeg(opened, max_side):
        try:
            pixels = decode_plain_jpeg(opened.jpeg)
        except BadImage:
            opened.image.close()
            raise
        if pixels is not None:
            opened.image.close()
            return pixels
    if opened.jpeg is not None and jpeg_ends_early(opened.jpeg):
        opened.image.close()
        raise BadImage(TRUNCATED_JPEG)
    try:
        return np.asarray(prepare(opened.image, max_side, keep_alpha), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "damaged"
        raise BadImage(f"the image data is {reason} and cannot be decoded") from None
    except Exception:
        raise BadImage("the image cannot be decoded") from None
    finally:
        opened.image.close()


class DecodeBudget:
    """Bytes that decodes (or large paintings) in progress may hold together. A holder waits (in order) until
    its cost fits; one that costs more than the whole budget runs alone. When the budget falls idle after
    holders that took ``trim_after`` bytes or more since the last time, ``on_idle()`` is called (the service's
    ``IdleRelease.after_burst``: in a burst of big decodes, the heap each one freed goes back to the OS before
    the next; small ones add up first, as malloc_trim costs about as much as a 256x256 decode)."""

    def __init__(self, limit: int, on_idle: Callable[[], None] | None = None, trim_after: int = 32 * 1024 * 1024):
        self.limit, self.used, self.on_idle, self.trim_after = limit, 0, on_idle, trim_after
        self.held_since_trim = 0
        self._waiting = 0
        self._turn = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, cost: int, timeout_s: float):
        cost = min(cost, self.limit)
        if self._waiting or self.used + cost > self.limit:  # behind the decodes that wait, in order
            async with self._turn:
                self._waiting += 1
                try:
                    await asyncio.wait_for(self._turn.wait_for(lambda: self.used + cost <= self.limit), timeout_s)
                finally:
                    self._waiting -= 1
                self.used += cost
        else:  # it fits and nobody waits: taken at once (one event loop: no other taker in between)
            self.used += cost
        self.held_since_trim += cost
        try:
            yield
        finally:
            self.used -= cost
            if self._waiting:
                async with self._turn:
                    self._turn.notify_all()
            if self.used == 0 and self.held_since_trim >= self.trim_after and self.on_idle is not None:
                self.held_since_trim = 0
                self.on_idle()


class Decoder:
    """The decoding stage: an upload's header checked (``open``), then its pixels decoded (``decode``) while it
    holds its share of the decode budget, a small image on ``small_thread`` (the codec threads or the event
    loop), a larger one on anyio's worker threads. ``decoded()`` is called once per decode (a metric);
    ``on_idle()`` when the budget falls idle after a burst (``DecodeBudget``)."""

    def __init__(self, budget_bytes: int, max_pixels: int, max_side: int,
                 small_thread: Callable[..., Awaitable], decoded: Callable[[], None] = lambda: None,
                 on_idle: Callable[[], None] | None = None):
        self.budget = DecodeBudget(budget_bytes, on_idle)
        self.max_pixels, self.max_side = max_pixels, max_side
        self.small_thread, self.decoded = small_thread, decoded

    def open(self, data: bytes) -> Opened:
        """``open_upload`` under the service's limits (microseconds: the header only)."""
        return open_upload(data, self.max_pixels, self.max_side)

    async def decode(self, opened: Opened, timeout_s: float, keep_alpha: bool = False) -> np.ndarray:
        """The upright RGB pixels of ``opened``, at most ``max_side`` (``keep_alpha``: as ``finish_decode``).
        Raises BadImage, or Busy when the budget stays taken past ``timeout_s``."""
        try:
            async with self.budget.hold(opened.cost, timeout_s):
                self.decoded()
                if opened.cost <= SMALL_COST:
                    return await self.small_thread(finish_decode, opened, self.max_side, keep_alpha)
                return await run_in_threadpool(finish_decode, opened, self.max_side, keep_alpha)
        except asyncio.TimeoutError:
            opened.image.close()
            raise Busy("the server is busy decoding other large images; retry shortly") from None
