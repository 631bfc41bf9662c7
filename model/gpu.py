"""The GPU path: JPEG files decoded by nvJPEG in one batched call, the generator replayed from CUDA graphs,
paintings encoded by nvJPEG, with no host copy of the pixels in between.

Pure torch and torchvision (no web stack): `python -m model.translate` uses it on CUDA for JPEG in and JPEG
out (`--codec auto`), and `benchmarks/bench_model.py` times it. The same functions run on CPU with
torchvision's libjpeg, which is how the tests check them on machines without a GPU; only ``CudaGraphs``
needs CUDA.
"""
from __future__ import annotations

import io
import warnings
from collections import Counter, OrderedDict

import torch
from PIL import Image
from torch import nn

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class CudaGraphs:
    """Replays ``module`` (uint8 (N, H, W, 3) in, (uint8 paintings, all-finite flag) out) from CUDA graphs.

    One graph per (batch bucket, height, width): a batch of N images runs in the graph of the next bucket in
    ``BATCH_BUCKETS`` (the spare slots hold zeros; instance norm is per image, so they change nothing), so a
    server's varying batch sizes need at most 8 graphs per image size. Spatial sizes are not padded up to a
    bucket: instance norm would see the padding and the painting would change. A shape is captured the second
    time it is seen (a one-off size runs eagerly), and the ``max_graphs`` most recently used are kept.
    Callers serialise calls (the Translator holds its lock).
    """

    def __init__(self, module: nn.Module, max_graphs: int = 8, capture_after: int = 2):
        self.module = module
        self.max_graphs = max_graphs
        self.capture_after = capture_after
        self.graphs: OrderedDict[tuple[int, int, int], tuple] = OrderedDict()
        self.seen: Counter = Counter()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, h, w = x.shape[:3]
        bucket = next((b for b in BATCH_BUCKETS if b >= n), None)
        if bucket is None:
            return self.module(x)
        key = (bucket, h, w)
        entry = self.graphs.get(key)
        if entry is None:
            self.seen[key] += 1
            if self.seen[key] < self.capture_after:
                return self.module(x)
            entry = self._capture(key, x.device)
            self.graphs[key] = entry
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        static_in, graph, out, finite = entry
        static_in[:n].copy_(x)
        if bucket > n:
            static_in[n:].zero_()
        graph.replay()
        return out[:n].clone(), finite.clone()

    def _capture(self, key: tuple[int, int, int], device: torch.device) -> tuple:
        bucket, h, w = key
        static_in = torch.zeros((bucket, h, w, 3), dtype=torch.uint8, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the default stream (cuDNN picks its algorithms here)
            for _ in range(2):
                self.module(static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, finite = self.module(static_in)
        return static_in, graph, out, finite


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


def encode_jpegs(images: list[torch.Tensor], quality: int = 95) -> list[bytes]:
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


def paint_jpegs(translator, blobs: list[bytes], max_side: int | None = None, quality: int = 95) -> list[bytes | None]:
    """JPEG files in, JPEG paintings out, the pixels staying on the translator's device from decode to encode.
    None for an input this path cannot take (CMYK, not a JPEG, damaged): paint those through Pillow."""
    decoded = decode_jpegs(blobs, translator.device)
    images = {i: fit_tensor(img, max_side).permute(1, 2, 0) for i, img in enumerate(decoded) if img is not None}
    paintings = dict(zip(images, translator.translate_tensors(list(images.values()))))
    encoded = dict(zip(paintings, encode_jpegs(list(paintings.values()), quality)))
    return [encoded.get(i) for i in range(len(blobs))]
