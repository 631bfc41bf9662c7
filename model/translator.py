"""Run a photo->Monet generator on batches of PIL images, on CUDA or CPU."""
from __future__ import annotations

import os
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model.backends import OpenVINORunner, cpu_cores, resolve_backend
from model.images import prepare
from model.networks import for_inference
from model.weights import GeneratorInfo, load_generator

# The shipped generator; MONET_WEIGHTS names another (the container image sets it too).
DEFAULT_WEIGHTS = Path(
    os.environ.get("MONET_WEIGHTS") or Path(__file__).resolve().parent.parent / "weights" / "photo2monet.safetensors"
)

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" picks CUDA when available, else CPU. Raises ValueError for an unusable device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda") from None


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` does bf16 arithmetic natively (Ampere+ GPUs; CPUs with AMX or AVX512-BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pick_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """"auto": bf16 on CUDA where supported (else fp16); on CPU bf16 where the CPU does it natively
    (several times faster there, see benchmarks/bench_model.py), else fp32."""
    named = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision in named:
        return named[precision]
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")
    if native_bf16(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.float32


class NonFiniteOutput(RuntimeError):
    """The generator produced NaN or Inf for a batch: a fault of the weights, never of the input image."""


_NON_FINITE = "the generator produced non-finite values (NaN or Inf); its weights are unusable"


def padding_for(h: int, w: int, multiple: int) -> tuple[int, int, int, int, str]:
    """(top, bottom, left, right, mode) that bring an h x w image to a multiple of ``multiple``."""
    least = -(-16 // multiple) * multiple  # instance norm needs more than one pixel at the bottleneck
    ph, pw = max((-h) % multiple, least - h), max((-w) % multiple, least - w)
    return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2, "reflect" if ph < h and pw < w else "replicate"


class _Painter(nn.Module):
    """The whole torch path in one module, so CUDA graphs can capture it: uint8 (N, H, W, 3) images in;
    uint8 paintings of the same shape and an all-finite flag out, on the generator's device and dtype."""

    def __init__(self, generator: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.generator, self.dtype = generator, dtype
        self.size_multiple = int(getattr(generator, "size_multiple", 4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[1:3]
        top, bottom, left, right, mode = padding_for(h, w, self.size_multiple)
        y = x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        if top or bottom or left or right:
            y = F.pad(y, (left, right, top, bottom), mode=mode)
        y = self.generator(y.to(self.dtype).contiguous(memory_format=torch.channels_last))
        y = y[..., top : top + h, left : left + w].float()
        finite = torch.isfinite(y).all()
        return y.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous(), finite


class Translator:
    """Turns photos into Monet-style paintings with one generator. Safe to call from many threads.

    Images of the same size are run together in batches of at most ``max_batch`` images and
    ``max_batch_pixels`` pixels (at least one image).
    """

    def __init__(
        self,
        generator: nn.Module,
        info: GeneratorInfo | None = None,
        device: str = "auto",
        precision: str = "auto",
        max_batch: int = 8,
        warmup: bool = True,
        max_batch_pixels: int = 2 * 1024 * 1024,
        backend: str = "auto",
        cuda_graphs: bool = True,
    ):
        self.device = resolve_device(device)
        self.dtype = pick_dtype(self.device, precision)
        self.info = info
        self.max_batch = max(1, int(max_batch))
        # activations grow with pixels, not images: a batch of eight 1024x1024 images would hold gigabytes
        self.max_batch_pixels = max(1, int(max_batch_pixels))
        self.size_multiple = int(getattr(generator, "size_multiple", 4))
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # torch's default can exceed the cores this process may use (containers, taskset)
            torch.set_num_threads(cpu_cores())
        self.backend = resolve_backend(backend, self.device)
        # OpenVINO on CPU (model/backends.py); None: the torch module itself
        self._runner = OpenVINORunner(generator, self.dtype) if self.backend == "openvino" else None
        generator = for_inference(generator.eval())  # the same function, faster (model/networks.py)
        self.generator = generator.to(self.device, self.dtype, memory_format=torch.channels_last)
        self._painter = _Painter(self.generator, self.dtype)
        self._graphs = None
        if self.device.type == "cuda" and self._runner is None:
            torch.backends.cudnn.benchmark = True  # sizes repeat; each new one is timed once
            if cuda_graphs:
                from model.gpu import CudaGraphs

                self._graphs = CudaGraphs(self._painter)
        self._lock = threading.Lock()
        if warmup:
            self.translate_arrays(np.zeros((1, 256, 256, 3), dtype=np.uint8))

    @classmethod
    def from_file(cls, path: str | os.PathLike = DEFAULT_WEIGHTS, device: str = "auto", **kwargs) -> "Translator":
        """Load a weight file (see model.weights) and prepare it on ``device``.

        Raises WeightsError for an unusable file, ValueError for an unusable device, NonFiniteOutput
        when the warm-up pass gives NaN or Inf.
        """
        generator, info = load_generator(path)
        try:
            return cls(generator, info, device=device, **kwargs)
        except NonFiniteOutput as exc:  # the warm-up pass caught it: name the file
            raise NonFiniteOutput(f"{path}: {exc}") from None

    # -- public API -------------------------------------------------------------------------
    def translate(self, images: list[Image.Image], max_side: int | None = None) -> list[Image.Image]:
        """Translate each image; returns one RGB image per input, in order, each upright and the
        same size as its (EXIF-rotated, ``max_side``-capped) input."""
        arrays = [np.asarray(prepare(img, max_side), dtype=np.uint8) for img in images]
        outputs = self._in_batches(arrays, lambda chunk: self.translate_arrays(np.stack(chunk)))
        return [Image.fromarray(out, "RGB") for out in outputs]

    def translate_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Translate a uint8 array of shape (N, H, W, 3) of same-size RGB images; returns the same shape."""
        if self._runner is None:
            batch = np.ascontiguousarray(batch) if batch.flags.writeable else batch.copy()  # torch wants writable arrays
            return self.translate_tensor(torch.from_numpy(batch).to(self.device, non_blocking=True)).cpu().numpy()
        parts = [self._translate_openvino(batch[s]) for s in self._passes(batch)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def translate_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """Translate a uint8 tensor of shape (N, H, W, 3) of same-size RGB images on this translator's device;
        returns the paintings in the same shape, on the same device (no host copy on CUDA)."""
        if self._runner is not None:
            return torch.from_numpy(self.translate_arrays(batch.cpu().numpy()))
        parts = []
        for s in self._passes(batch):
            y, finite = self._forward(batch[s])
            if not bool(finite):
                raise NonFiniteOutput(_NON_FINITE)
            parts.append(y)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def translate_tensors(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Translate uint8 (H, W, 3) images of any sizes on this translator's device, same-size ones together in
        batches of at most ``max_batch``; returns one painting per image, in order, on the same device."""
        return self._in_batches(images, lambda chunk: self.translate_tensor(torch.stack(chunk)))

    def release_memory(self) -> None:
        """Drop what large batches left behind (OpenVINO's buffers); call it when idle."""
        if self._runner is not None:
            with self._lock:
                self._runner.release()

    # -- internals --------------------------------------------------------------------------
    def _in_batches(self, images: list, run) -> list:
        """``run`` on same-size images in chunks of at most ``max_batch``; one result per image, in order."""
        out: list = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            groups[tuple(img.shape[:2])].append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.max_batch):
                chunk = indices[start : start + self.max_batch]
                for i, y in zip(chunk, run([images[i] for i in chunk])):
                    out[i] = y
        return out

    def _passes(self, batch) -> list[slice]:
        """Slices of ``batch`` (N, H, W, 3) with at most ``max_batch_pixels`` pixels each (at least one image)."""
        per_pass = max(1, self.max_batch_pixels // (batch.shape[1] * batch.shape[2]))
        return [slice(i, i + per_pass) for i in range(0, batch.shape[0], per_pass)]

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Paint a uint8 batch on the device; split the batch on CUDA OOM."""
        try:
            return self._run(x)
        except _OOM:
            if x.shape[0] == 1:
                raise
            torch.cuda.empty_cache()
            half = x.shape[0] // 2
            (a, fa), (b, fb) = self._forward(x[:half]), self._forward(x[half:])
            return torch.cat([a, b]), fa & fb

    def _translate_openvino(self, batch: np.ndarray) -> np.ndarray:
        """The OpenVINO path: uint8 images straight into the compiled graph (it scales and transposes)."""
        h, w = batch.shape[1:3]
        top, bottom, left, right, mode = padding_for(h, w, self.size_multiple)
        if top or bottom or left or right:
            batch = np.pad(batch, ((0, 0), (top, bottom), (left, right), (0, 0)),
                           mode="reflect" if mode == "reflect" else "edge")
        with self._lock:
            y, finite = self._runner(batch)
        if not finite:
            raise NonFiniteOutput(_NON_FINITE)
        return np.ascontiguousarray(y[:, top : top + h, left : left + w]) if top or bottom or left or right else y

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock, torch.inference_mode():  # one forward at a time: concurrent ones only fight over the cores
            return (self._graphs or self._painter)(x)
