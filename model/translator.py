"""Run a photo->Monet generator on batches of images, on CUDA or CPU.

The Translator groups images by size, splits batches by ``max_batch`` and ``max_batch_pixels``, pads to the
generator's size multiple and crops back, and turns a NaN flag into ``NonFiniteOutput``. What runs the
network is a backend (model/backends.py), chosen once here.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import defaultdict

import numpy as np
import torch
from PIL import Image
from torch import nn

from model.backends import make_backend, resolve_backend
from model.images import prepare
from model.padding import pad_images, padding_for
from model.runtime import pick_dtype, resolve_device, use_cpu_threads
from model.plan import PaintPlan, plan_painting
from model.stroke import enlarge, shrink
from model.tiling import PaintingStopped, SharedStatistics, paint_tiled  # noqa: F401 (PaintingStopped: API)
from model.weights import GeneratorInfo, load_generator


log = logging.getLogger("monet.translator")
TILE_OVERLAP = 64  # pixels two neighbouring tiles share, blended with raised-cosine ramps
THUMB_PIXELS = 1024 * 1024  # the thumbnail whose statistics every tile uses: as large as the largest whole painting
# an image painted on its own with more pixels than this runs stage by stage, letting waiting batches in between
# (a 1024x768 painting's one forward pass held 256² requests up for all of it: p99 3.1x; issue 34)
STAGE_ABOVE_PIXELS = 512 * 512


class NonFiniteOutput(RuntimeError):
    """The generator produced NaN or Inf for a batch: a fault of the weights, never of the input image."""


_NON_FINITE = "the generator produced non-finite values (NaN or Inf); its weights are unusable"


class Translator:
    """Turns photos into Monet-style paintings with one generator. Safe to call from many threads.

    Images of the same size are run together in batches of at most ``max_batch`` images and
    ``max_batch_pixels`` pixels (at least one image). The pixel cap is for 16-bit compute (bf16, fp16); in fp32
    a pass takes half as many pixels, since every activation holds twice the bytes and the cap is there to
    bound memory.
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
        compile_mode: str | None = None,
        lock: "FifoLock | None" = None,
    ):
        self.device = resolve_device(device)
        self.dtype = pick_dtype(self.device, precision)
        self.info = info
        self.spec = generator.spec
        self.size_multiple = self.spec.size_multiple
        self.max_batch = max(1, int(max_batch))
        # activations grow with pixels, not images: a batch of eight 1024x1024 images would hold gigabytes
        self.max_batch_pixels = max(1, int(max_batch_pixels) // (2 if self.dtype == torch.float32 else 1))
        if self.device.type == "cpu":
            use_cpu_threads()
        self.backend = resolve_backend(backend, self.device)  # its name: "torch" or "openvino"
        self._run = make_backend(self.backend, generator, self.device, self.dtype, cuda_graphs=cuda_graphs,
                                 compile_mode=compile_mode)
        # one forward at a time (concurrent ones only fight over the cores), taken in the order asked: between
        # two tiles of a large painting, a batch that waits goes first; translators given one ``lock`` (a
        # server's styles) take turns with each other the same way
        self._lock = lock if lock is not None else FifoLock()
        self._generator, self._shared = generator, None  # the tiled path's copy is built on first use
        self._large_prepared = False  # prepare_large: large paintings run in stages
        if warmup:
            self.translate_arrays(np.zeros((1, 256, 256, 3), dtype=np.uint8))

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str = "auto", **kwargs) -> "Translator":
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
    def translate(self, images: list[Image.Image], max_side: int | None = None, tile: int | None = None,
                  stroke_scale: float | None = 1.0, upsampler: str = "guided") -> list[Image.Image]:
        """Translate each image; returns one RGB image per input, in order, each upright and the
        same size as its (EXIF-rotated, ``max_side``-capped) input. ``stroke_scale`` > 1 (None: each image's
        default) paints an image shrunk that much and brings it back to size (``paint``); images with a side
        over ``tile`` are painted in tiles (``translate_tiled``); the rest together in batches."""
        arrays = [np.asarray(prepare(img, max_side), dtype=np.uint8) for img in images]
        plans = [plan_painting(a.shape[1], a.shape[0], stroke_scale, tile or 0) for a in arrays]
        out: list = [None] * len(arrays)
        batched = [i for i, p in enumerate(plans) if p.batched]
        for i, painting in zip(batched, self.translate_many([arrays[i] for i in batched])):
            out[i] = painting
        for i, p in enumerate(plans):
            if not p.batched:
                out[i] = self.paint_planned(arrays[i], p, upsampler)
        return [Image.fromarray(p, "RGB") for p in out]

    def paint(self, image: np.ndarray, stroke_scale: float | None = None, tile: int = 1024,
              upsampler: str = "guided", stop=None) -> np.ndarray:
        """Paint one uint8 (H, W, 3) image of any size at full size: the network paints it shrunk by
        ``stroke_scale`` (None: ``default_stroke_scale`` of its size; 1: pixel for pixel), in tiles of ``tile``
        when that is still larger (0: whole), and the painting is brought back to the image's size with
        ``upsampler`` (model/stroke.py). Memory follows the tile and the width, not the image. ``stop()``,
        asked before each tile, True: raise PaintingStopped."""
        h, w = image.shape[:2]
        return self.paint_planned(image, plan_painting(w, h, stroke_scale, tile), upsampler, stop)

    def paint_planned(self, image: np.ndarray, plan: PaintPlan, upsampler: str = "guided", stop=None) -> np.ndarray:
        """Paint one uint8 (H, W, 3) image by ``plan`` (model/plan.py; its size is the image's): shrunk to
        ``plan.painted``, in tiles when ``plan.tiled``, brought back with ``upsampler``. ``stop`` as in ``paint``."""
        small = shrink(image, plan.painted)
        painting = self.translate_tiled(small, plan.tile, stop=stop) if plan.tiled else self.paint_whole(small, stop)
        if stop is not None and stop():
            raise PaintingStopped("the painting is no longer wanted")
        return enlarge(painting, image, upsampler)

    def translate_tiled(self, image: np.ndarray, tile: int = 1024, overlap: int = TILE_OVERLAP,
                        thumb_pixels: int = THUMB_PIXELS, stop=None) -> np.ndarray:
        """Paint one uint8 (H, W, 3) image of any size in overlapping ``tile`` x ``tile`` tiles, every tile
        normalised with the statistics of one thumbnail pass (model/tiling.py); memory follows the tile, not
        the image. An image that fits one tile is painted whole, exactly as ``translate_many`` paints it.
        The tiles run on this translator's backend: OpenVINO compiles the generator with the statistics as a
        graph input (model/backends.py ``OpenVINOShared``); torch runs ``SharedStatistics`` in fp32."""
        if max(image.shape[:2]) <= tile:
            return self.translate_many([image])[0]
        if self._shared is None:
            shared = getattr(self._run, "shared", None)  # a compiled backend's own (OpenVINO)
            self._shared = shared() if shared is not None else SharedStatistics(self._generator).to(self.device)
        painting, finite = paint_tiled(self._shared, image, tile, overlap, thumb_pixels, self.size_multiple,
                                       self.device, self._lock, stop)
        if not finite:
            raise NonFiniteOutput(_NON_FINITE)
        return painting

    def paint_whole(self, image: np.ndarray, stop=None) -> np.ndarray:
        """Paint one uint8 (H, W, 3) image whole, as ``translate_many`` paints it. One over
        ``STAGE_ABOVE_PIXELS`` runs stage by stage (model/backends.py ``generator_stages``): between two stages
        whoever waits for the model (a batch of small requests) goes first, so it waits for one stage, not the
        whole image; ``stop()``, asked between stages, True: raise PaintingStopped. Only once ``prepare_large``
        was called (the service does; a CLI alone on the model gains nothing from stages)."""
        h, w = image.shape[:2]
        staged = getattr(self._run, "staged", None) if self._large_prepared else None
        if h * w <= STAGE_ABOVE_PIXELS or staged is None:
            return self.translate_many([image])[0]
        top, bottom, left, right, mode = padding_for(h, w, self.size_multiple)
        part = pad_images(image[None], top, bottom, left, right, mode)

        def between():
            if stop is not None and stop():
                raise PaintingStopped("the painting is no longer wanted")
            self._lock.take_turns()

        with self._lock:
            y, finite = staged(part, between)
        if not finite:
            raise NonFiniteOutput(_NON_FINITE)
        return _contiguous(y[0, top : top + h, left : left + w])

    def prepare_large(self, wait: bool = False, then=None) -> None:
        """Get the forms of the network that large paintings use ready before the first one needs them: the
        stages (``paint_whole``) and the shared-statistics graphs of tiles (``translate_tiled``). OpenVINO converts
        them, about 10 s on 2 cores, in a background thread; until then large paintings run in one piece
        and the first tiled one converts its graphs itself. ``wait``: return once they are ready; ``then()``
        is called once they are, in the same thread (the service times a large painting and freezes its heap
        then); ``large_ready`` is true once both are done."""
        self._large_prepared = True  # from now on large paintings take turns (a CLI, alone on the model, never asks)
        convert = getattr(self._run, "prepare_stages", None)
        if convert is None and then is None:
            return

        def prepare():
            if convert is not None:
                convert()
            if then is not None:  # in the background too where nothing converts (the service times a painting)
                then()

        if wait:
            prepare()
        else:
            # not a daemon: the interpreter waits for it at exit (OpenVINO's threads, cut off mid-conversion,
            # abort the process: "terminate called without an active exception")
            self._preparing = threading.Thread(target=prepare, name="prepare-large")
            self._preparing.start()

    @property
    def large_ready(self) -> bool:
        """Whether no conversion for large paintings (``prepare_large``) is still running."""
        preparing = getattr(self, "_preparing", None)
        return preparing is None or not preparing.is_alive()

    def translate_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Translate a uint8 array of shape (N, H, W, 3) of same-size RGB images; returns the same shape."""
        return self._paint(batch)

    def translate_many(self, images: list) -> list:
        """Translate uint8 (H, W, 3) images (numpy arrays, or tensors on this translator's device) of any sizes,
        same-size ones together in batches of at most ``max_batch``; one painting per image, in order, of the
        same kind as its image."""
        out: list = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            groups[tuple(img.shape[:2])].append(i)
        stack = torch.stack if images and isinstance(images[0], torch.Tensor) else np.stack
        for indices in groups.values():
            for start in range(0, len(indices), self.max_batch):
                chunk = indices[start : start + self.max_batch]
                for i, y in zip(chunk, self._paint(stack([images[i] for i in chunk]))):
                    out[i] = y
        return out

    def release_memory(self) -> None:
        """Drop what large batches left behind (OpenVINO's buffers); call it when idle."""
        with self._lock:
            self._run.release()
            if self._shared is not None and self.backend != "torch":  # a compiled graph's tile buffers
                self._shared = None

    # -- internals --------------------------------------------------------------------------
    def _paint(self, batch):
        """Same-size uint8 (N, H, W, 3) images (numpy or tensor) in passes of at most ``max_batch_pixels``,
        padded to the size multiple and cropped back; the paintings, of the same kind."""
        h, w = batch.shape[1:3]
        top, bottom, left, right, mode = padding_for(h, w, self.size_multiple)
        padded = bool(top or bottom or left or right)
        per_pass = max(1, self.max_batch_pixels // (h * w))
        parts = []
        for start in range(0, batch.shape[0], per_pass):
            part = batch[start : start + per_pass]
            if padded:
                part = pad_images(part, top, bottom, left, right, mode)
            with self._lock:
                y, finite = self._run(part)
            if not finite:
                raise NonFiniteOutput(_NON_FINITE)
            parts.append(y[:, top : top + h, left : left + w] if padded else y)
        if len(parts) == 1:
            return parts[0] if not padded else _contiguous(parts[0])
        return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)


class FifoLock:
    """A lock granted in the order it was asked for (threading.Lock lets the releasing thread take it straight
    back, so a long tiled painting would starve the batches waiting between its tiles)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._next = self._serving = 0

    def __enter__(self):
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def take_turns(self) -> None:
        """For the holder, between two steps of a long computation: if others are waiting, they go first and
        the holder takes the lock back after them; otherwise nothing happens."""
        with self._cond:
            if self._next - self._serving <= 1:
                return
        self.__exit__()
        self.__enter__()


def _contiguous(images):
    return images.contiguous() if isinstance(images, torch.Tensor) else np.ascontiguousarray(images)
