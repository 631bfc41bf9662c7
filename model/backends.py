"""The runtimes that run a generator, behind one interface: ``backend(uint8 (N, H, W, 3) images)`` returns
``(uint8 paintings of the same shape, finite)``, where ``finite`` is False when the generator produced NaN or
Inf anywhere. Height and width are already multiples of the generator's ``size_multiple`` (the Translator
pads and crops, groups and splits around the call).

- ``TorchBackend``: eager torch on CPU or CUDA; on CUDA replayed from CUDA graphs, one per batch bucket.
- ``OpenVINOBackend``: OpenVINO on CPU (the `openvino` extra), about 1.5x torch's best CPU path.

Every backend runs the same module, ``UInt8Generator``: the generator in ``for_inference`` form between uint8
scaling and rounding, with one finite flag (the sum of its raw output is NaN exactly when some output is; tanh
never gives Inf). A new runtime is one more class here with the same ``__call__`` and ``release``.

    python -m model.backends export WEIGHTS OUT.xml     # the generator as OpenVINO IR (OUT.xml + OUT.bin)
    python -m model.backends export WEIGHTS OUT.onnx    # as ONNX (the `onnx` extra), for onnxruntime, TensorRT...

The OpenVINO backend converts the checked safetensors weights in memory at load time (about 1.5 s), so the
safetensors file stays the one artefact that is loaded, checked and shipped; `export` writes the same graph
to disk for other OpenVINO deployments. benchmarks/bench_model.py measures every runtime in one run.
"""
from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import sys
import threading
import warnings
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.networks import InferenceGenerator, ResnetBlock, ResnetGenerator, for_inference
from model.runtime import compute_threads, release_free_memory

BACKENDS = ("auto", "torch", "openvino")
_CONVERT_LOCK = threading.Lock()
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@functools.lru_cache(maxsize=1)
def ov_core():
    """One OpenVINO Core for the process (compiling from it needs no new plugin load)."""
    return _openvino().Core()


def _openvino():
    """The openvino module, its usage statistics turned off for this process first. OpenVINO's converter sends
    them (openvino-telemetry, without asking where no consent file exists) from a forked copy of the process
    per event, waiting up to 3 s for each: conversions waited for it, and in the server every fork held a copy of
    the listening socket, so connections were still accepted by the kernel after the drain closed it, then
    reset (issue 34, item 3). Nothing is sent from a machine without network anyway."""
    try:
        from openvino_telemetry.backend import backend_ga4
    except ImportError:  # not installed: OpenVINO uses its own stub
        pass
    else:
        backend_ga4.GA4Backend.send = lambda self, message: None
    import openvino

    return openvino


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto": OpenVINO on CPU when it is installed, else torch. Raises ValueError for an unusable choice."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use {', '.join(BACKENDS)}")
    if backend == "auto":
        return "openvino" if device.type == "cpu" and openvino_available() else "torch"
    if backend == "openvino":
        if device.type != "cpu":
            raise ValueError("the openvino backend runs on CPU only; use --device cpu or the torch backend")
        if not openvino_available():
            raise ValueError("the openvino backend needs the openvino package: pip install 'monet-cyclegan[openvino]'")
    return backend


def make_backend(name: str, generator: nn.Module, device: torch.device, dtype: torch.dtype, cuda_graphs: bool = True,
                 compile_mode: str | None = None):
    """The backend ``name`` ("torch" or "openvino", as ``resolve_backend`` gives) for ``generator``."""
    if name == "openvino":
        return OpenVINOBackend(generator, dtype)
    return TorchBackend(generator, device, dtype, cuda_graphs=cuda_graphs, compile_mode=compile_mode)


class UInt8Generator(nn.Module):
    """uint8 (N, H, W, 3) images in; uint8 (N, H, W, 3) paintings out, with one boolean beside them: whether
    every raw output was finite (checked on their sum, which is NaN exactly when some output is). Scaling, layout, rounding (half to even, like numpy's rint) and
    clamping are part of the module, so a backend that compiles it (OpenVINO, CUDA graphs) never hands a
    float image to Python."""

    def __init__(self, generator: nn.Module, dtype: torch.dtype = torch.float32, channels_last: bool = False):
        super().__init__()
        self.generator, self.dtype, self.channels_last = generator, dtype, channels_last

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if self.dtype != torch.float32:
            y = y.to(self.dtype)
        if self.channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        y = self.generator(y).float()
        images = torch.round((y + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        return images, torch.isfinite(y.sum())


def generator_stages(generator: nn.Module) -> list[nn.Sequential] | None:
    """The ResNet generator's layers cut into stages that each take a similar share of its time: the stem and
    downsampling, each residual block, the upsampling and the head (the blocks hold most of the arithmetic).
    None for a generator that is not one sequence of layers (the U-Net)."""
    if isinstance(generator, ResnetGenerator):
        layers = list(generator.model)
    elif isinstance(generator, InferenceGenerator):
        layers = list(generator)
    else:
        return None
    stages, current = [], []
    for layer in layers:
        if isinstance(layer, ResnetBlock) or (current and isinstance(current[-1], ResnetBlock)):
            if current:
                stages.append(current)
            current = []
        current.append(layer)
    stages.append(current)
    return [nn.Sequential(*stage) for stage in stages]


class FirstStage(nn.Module):
    """uint8 (N, H, W, 3) images -> the first stage's float features (UInt8Generator's scaling, then ``layers``)."""

    def __init__(self, layers: nn.Module, dtype: torch.dtype = torch.float32, channels_last: bool = False):
        super().__init__()
        self.layers, self.dtype, self.channels_last = layers, dtype, channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if self.dtype != torch.float32:
            y = y.to(self.dtype)
        if self.channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        return self.layers(y)


class LastStage(nn.Module):
    """The last stage's features -> (uint8 (N, H, W, 3) paintings, all-finite flag), as UInt8Generator ends.
    A NaN anywhere earlier reaches the output, so the flag covers every stage."""

    def __init__(self, layers: nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.layers(x).float()
        images = torch.round((y + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        return images, torch.isfinite(y.sum())


def stage_modules(generator: nn.Module, dtype: torch.dtype = torch.float32, channels_last: bool = False
                  ) -> list[nn.Module] | None:
    """``generator_stages`` wrapped so the first takes uint8 images and the last gives UInt8Generator's
    (paintings, finite); run in order they paint exactly what UInt8Generator paints. None as there."""
    stages = generator_stages(generator)
    if stages is None or len(stages) < 2:
        return None
    return [FirstStage(stages[0], dtype, channels_last), *stages[1:-1], LastStage(stages[-1])]


class TorchBackend:
    """The generator in eager torch on ``device`` in ``dtype`` (channels-last); on CUDA replayed from CUDA
    graphs (``CudaGraphs``) unless ``cuda_graphs`` is False. A CUDA out-of-memory error splits the batch.

    ``compile_mode`` (None: off) runs the whole uint8-to-uint8 module through ``torch.compile`` with that mode
    ("default", or "max-autotune-no-cudagraphs": the CUDA graphs stay this class's own), static shapes: each
    new (batch bucket, height, width) compiles once, the first time it is seen; past dynamo's recompile limit
    (8) a shape runs eagerly. A candidate of issue 35 for the GPU's throughput (bench_model --candidates), off
    everywhere until a GPU shows it wins."""

    def __init__(self, generator: nn.Module, device: torch.device, dtype: torch.dtype, cuda_graphs: bool = True,
                 compile_mode: str | None = None):
        self.device, self.dtype = device, dtype
        fast = for_inference(generator.eval()).to(device, dtype, memory_format=torch.channels_last)
        self.module = UInt8Generator(fast, dtype, channels_last=True)
        if compile_mode:
            self.module = torch.compile(self.module, mode=None if compile_mode == "default" else compile_mode,
                                        dynamic=False)
        self.graphs = None
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # sizes repeat; each new one is timed once
            if cuda_graphs:
                self.graphs = CudaGraphs(self.module)

    def __call__(self, images):
        """(paintings, finite) for uint8 (N, H, W, 3) ``images``: a tensor (the paintings stay on this
        backend's device) or a numpy array (the paintings come back as one)."""
        as_numpy = isinstance(images, np.ndarray)
        if as_numpy:  # torch wants writable arrays
            images = torch.from_numpy(np.ascontiguousarray(images) if images.flags.writeable else images.copy())
        with torch.inference_mode():
            y, finite = self._forward(images.to(self.device, non_blocking=True))
        return (y.cpu().numpy() if as_numpy else y), bool(finite)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return (self.graphs or self.module)(x)
        except _OOM:
            if x.shape[0] == 1:
                raise
            torch.cuda.empty_cache()
            half = x.shape[0] // 2
            (a, fa), (b, fb) = self._forward(x[:half]), self._forward(x[half:])
            return torch.cat([a, b]), fa & fb

    def staged(self, images, between) -> tuple:
        """As ``__call__``, the network run stage by stage (``stage_modules``) with ``between()`` called between
        two stages, so others can use the cores mid-image. On CUDA (fast enough not to need it) one call."""
        stages = self.stages()
        if stages is None or self.device.type == "cuda":
            return self(images)
        as_numpy = isinstance(images, np.ndarray)
        if as_numpy:
            images = torch.from_numpy(np.ascontiguousarray(images) if images.flags.writeable else images.copy())
        with torch.inference_mode():
            y = images.to(self.device)
            for i, stage in enumerate(stages):
                if i:
                    between()
                y = stage(y)
        y, finite = y
        return (y.cpu().numpy() if as_numpy else y), bool(finite)

    def stages(self) -> list[nn.Module] | None:
        if not hasattr(self, "_stages"):
            self._stages = stage_modules(self.module.generator, self.dtype, channels_last=True)
        return self._stages

    def release(self) -> bool:
        return False


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


def convert(generator: nn.Module, uint8_images: bool = False, rewrite: bool = True):
    """The generator as an OpenVINO model for any batch and image size: (N, 3, H, W) float32 in [-1, 1]
    (the network as it is), or with ``uint8_images`` (N, H, W, 3) uint8 in, (N, H, W, 3) uint8 and the
    finite flag out (see UInt8Generator). The graph is ``for_inference``'s form of the generator (the
    network as trained with ``rewrite=False``, for comparison)."""
    ov = _openvino()

    module = copy.deepcopy(generator).float().eval()
    if rewrite:
        module = for_inference(module)
    side = max(64, generator.spec.size_multiple)  # a U-Net traces at 256 at least
    if uint8_images:
        module, example = UInt8Generator(module).eval(), torch.zeros(1, side, side, 3, dtype=torch.uint8)
        shape = [([-1, -1, -1, 3], ov.Type.u8)]
    else:
        example, shape = torch.zeros(1, 3, side, side), [(-1, 3, -1, -1)]
    with warnings.catch_warnings():  # the tracer's deprecation notices are not the user's concern
        warnings.simplefilter("ignore")
        return ov.convert_model(module, example_input=example, input=shape)


_CONVERTED: OrderedDict = OrderedDict()  # content key -> the uint8 OpenVINO model, most recently used last
CONVERTED_KEEP = 8


def _weights_key(generator: nn.Module) -> tuple[str, str]:
    """(architecture, a hash of the settings and the tensors' bytes): the same for generators with equal weights."""
    import hashlib

    digest = hashlib.sha256(repr(sorted(generator.spec.settings.items())).encode())
    for name, tensor in generator.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return generator.spec.architecture, digest.hexdigest()


def converted(generator: nn.Module):
    """``convert(generator, uint8_images=True)``, reusing the model of a generator with the same weights when
    one was converted lately. OpenVINO's PyTorch front end keeps about 11 MB per conversion for good (measured
    with the shipped-size generator, torch 2.14, OpenVINO 2025), so a server that unloads and reloads styles
    (app/catalogue.py) would grow with every reload; with the cache a style's version is converted once. The
    key is a hash of the tensors' bytes (about 10 ms for the shipped generator)."""
    key = _weights_key(generator)
    with _CONVERT_LOCK:
        model = _CONVERTED.get(key)
        if model is None:
            model = convert(generator, uint8_images=True)
            _CONVERTED[key] = model
        _CONVERTED.move_to_end(key)
        while len(_CONVERTED) > CONVERTED_KEEP:
            _CONVERTED.popitem(last=False)
        return model


class _Boundary(nn.Module):
    """A stage for OpenVINO whose float input and output between stages are of ``dtype`` (bf16 halves the
    bytes each boundary moves; the network computes in bf16 inside anyway, so the painting is unchanged)."""

    def __init__(self, stage: nn.Module, dtype: torch.dtype, first: bool, last: bool):
        super().__init__()
        self.stage, self.dtype, self.first, self.last = stage, dtype, first, last

    def forward(self, x):
        y = self.stage(x if self.first else x.float())
        return y if self.last else y.to(self.dtype)


def converted_stages(generator: nn.Module, bf16: bool = False) -> list | None:
    """``stage_modules`` of ``generator`` as OpenVINO models for any batch and image size (the first takes
    uint8 (N, H, W, 3), the others (N, C, H, W) features in bf16 with ``bf16``, else float32; the last gives
    the uint8 paintings and the finite flag), cached as ``converted`` caches the whole model. None where the
    generator has no stages. Converting takes several seconds (about 1.5 s a stage on 2 cores)."""
    ov = _openvino()

    stages = stage_modules(for_inference(copy.deepcopy(generator).float().eval()))
    if stages is None:
        return None
    key = ("stages", bf16, *_weights_key(generator))
    with _CONVERT_LOCK:  # one conversion at a time: torch's tracer is not safe across threads
        models = _CONVERTED.get(key)
        if models is None:
            models = _convert_stages(stages, generator.spec.size_multiple, bf16)
        _CONVERTED[key] = models
        _CONVERTED.move_to_end(key)
        while len(_CONVERTED) > CONVERTED_KEEP:
            _CONVERTED.popitem(last=False)
    return models


def _convert_stages(stages: list[nn.Module], size_multiple: int, bf16: bool) -> list:
    ov = _openvino()

    dtype, ov_type = (torch.bfloat16, ov.Type.bf16) if bf16 else (torch.float32, ov.Type.f32)
    side = max(64, size_multiple)
    x = torch.zeros(1, side, side, 3, dtype=torch.uint8)
    models = []
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for i, stage in enumerate(stages):
            module = _Boundary(stage, dtype, i == 0, i == len(stages) - 1).eval()
            shape = [([-1, -1, -1, 3], ov.Type.u8)] if i == 0 else [([-1, x.shape[1], -1, -1], ov_type)]
            models.append(ov.convert_model(module, example_input=x, input=shape))
            x = module(x)
    return models


class _GivenStatsNorm(nn.Module):
    """An instance norm for ``StatsGenerator``: in "record" mode it normalises by its input's own statistics and
    hands them (mean, then variance, per channel) to its owner for its offset; in "apply" mode it takes them from
    the owner's given vector at its offset."""

    def __init__(self, norm: nn.InstanceNorm2d, owner: "StatsGenerator", offset: int):
        super().__init__()
        self.eps, self.weight, self.bias = norm.eps, norm.weight, norm.bias
        self.channels, self.offset = norm.num_features, offset
        self.__dict__["owner"] = owner  # not a submodule (the owner holds this one)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, owner = self.channels, self.owner
        if owner.mode == "record":
            var, mean = torch.var_mean(x.float(), dim=(2, 3), keepdim=True, unbiased=False)
            owner.recorded.append((self.offset, torch.cat([mean[0].flatten(), var[0].flatten()])))
        else:
            mean = owner.given[self.offset : self.offset + c].view(1, c, 1, 1)
            var = owner.given[self.offset + c : self.offset + 2 * c].view(1, c, 1, 1)
        y = (x.float() - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


class StatsGenerator(nn.Module):
    """The generator (``for_inference`` form) with its instance norms' statistics as a graph input or output,
    for a runtime that compiles graphs (OpenVINO): ``mode="record"``: x -> (painting, stats), the statistics
    of every norm in one vector; ``mode="apply"``: (x, stats) -> the painting normalised with those. What
    model/tiling.py's SharedStatistics does in eager torch, as two static graphs."""

    def __init__(self, generator: nn.Module, mode: str):
        super().__init__()
        self.net, self.mode = for_inference(copy.deepcopy(generator).float().eval()), mode
        self.recorded, self.given, self.size = [], None, 0
        for parent in list(self.net.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.InstanceNorm2d):
                    setattr(parent, name, _GivenStatsNorm(child, self, self.size))
                    self.size += 2 * child.num_features

    def forward(self, x: torch.Tensor, stats: torch.Tensor | None = None):
        if self.mode == "record":
            self.recorded = []
            y = self.net(x)
            return y, torch.cat([stats for _, stats in sorted(self.recorded, key=lambda r: r[0])])
        self.given = stats
        return self.net(x)


def converted_shared(generator: nn.Module) -> tuple:
    """(record, apply): ``StatsGenerator`` in both modes as OpenVINO models, (1, 3, H, W) float32 in [-1, 1]
    for any H and W (multiples of the size multiple); cached as ``converted`` caches the whole model."""
    ov = _openvino()

    key = ("shared", *_weights_key(generator))
    with _CONVERT_LOCK:
        models = _CONVERTED.get(key)
        if models is None:
            side = max(64, generator.spec.size_multiple)
            x = torch.zeros(1, 3, side, side)
            record, apply = StatsGenerator(generator, "record").eval(), StatsGenerator(generator, "apply").eval()
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                stats = record(x)[1]
                models = (ov.convert_model(record, example_input=x, input=[(1, 3, -1, -1)]),
                          ov.convert_model(apply, example_input=(x, stats),
                                           input=[((1, 3, -1, -1), ov.Type.f32), ((stats.numel(),), ov.Type.f32)]))
        _CONVERTED[key] = models
        _CONVERTED.move_to_end(key)
        while len(_CONVERTED) > CONVERTED_KEEP:
            _CONVERTED.popitem(last=False)
        return models


class OpenVINOShared:
    """SharedStatistics's interface (model/tiling.py: ``record(thumbnail)`` once, then each call paints a tile
    with the recorded statistics) on OpenVINO's compiled graphs, in the backend's precision: tiled paintings
    run on the same fast backend as whole ones. Takes and returns float32 (1, 3, H, W) tensors in [-1, 1]."""

    def __init__(self, generator: nn.Module, config: dict):
        self._record_model, apply = converted_shared(generator)
        self.config = config
        self._apply = ov_core().compile_model(apply, "CPU", config).create_infer_request()
        self.stats = None

    def to(self, device):  # SharedStatistics's interface; OpenVINO runs on the CPU
        return self

    def record(self, x: torch.Tensor) -> None:
        """The thumbnail pass, compiled for it and dropped after it (its buffers, for a thumbnail of 1024²
        pixels, would otherwise stay beside the tiles': 470 MB more at the peak of a 12 MP painting)."""
        request = ov_core().compile_model(self._record_model, "CPU", self.config).create_infer_request()
        self.stats = np.ascontiguousarray(request.infer({0: x.cpu().numpy()})[1])
        del request
        release_free_memory()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._apply.infer({0: x.cpu().numpy(), 1: self.stats})[0].copy())


class OpenVINOBackend:
    """The generator compiled by OpenVINO on CPU: uint8 (N, H, W, 3) images in (numpy or torch), uint8
    paintings of the same kind out, with an all-finite flag.

    It is compiled twice. One image, or a batch of large ones, runs on the latency form (one stream using
    every core). A batch of several small ones (up to 512x512) goes through the throughput form: one stream
    per core, each image on one core, no cross-core sync per layer (bench_model: a few percent more
    images/s on 2 cores).

    The compiled models keep the buffers of the largest batch they ran; ``release`` drops them after
    large images (recompiling takes about 0.1 s, on the next call)."""

    RELEASE_ABOVE_PIXELS = 700_000  # a batch this large (a 1024x768 photo) leaves hundreds of MB behind
    # larger images always take the latency form: one core per image gains little there, and each stream
    # would keep a large image's buffers of its own (16 concurrent 1024x1024 uploads: 2.06 GB, not 1.8)
    THROUGHPUT_MAX_PIXELS = 512 * 512

    def __init__(self, generator: nn.Module, dtype: torch.dtype, streams: int | None = None):
        hint = "bf16" if dtype == torch.bfloat16 else "f32"  # fp32 where the CPU has no bf16 units
        threads = compute_threads()
        self.streams = max(1, min(threads, streams if streams is not None else threads))
        self.config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        self.throughput_config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "THROUGHPUT",
                                  "NUM_STREAMS": self.streams, "INFERENCE_NUM_THREADS": threads}
        self.generator = generator
        self.model = converted(generator)
        self.request = self.queue = self.stage_models = None
        self._stage_lock, self._thread_lock, self._stage_thread = threading.Lock(), threading.Lock(), None
        self.peak_pixels = 0
        self._compile(many=False)
        if self.streams > 1:
            self._compile(many=True)

    def _compile(self, many: bool) -> None:
        ov = _openvino()

        if many:
            compiled = ov.Core().compile_model(self.model, "CPU", self.throughput_config)
            self.queue = ov.AsyncInferQueue(compiled, self.streams)
        else:
            self.request = ov.Core().compile_model(self.model, "CPU", self.config).create_infer_request()

    def __call__(self, images):
        """(paintings, finite) for uint8 (N, H, W, 3) ``images``, a numpy array or a CPU tensor (the paintings
        are of the same kind); ``finite`` is False if the generator gave NaN anywhere."""
        if isinstance(images, torch.Tensor):
            y, finite = self(images.cpu().numpy())
            return torch.from_numpy(y), finite
        images = np.ascontiguousarray(images)
        if images.shape[0] < self.streams or self.streams == 1 or images.shape[1] * images.shape[2] > self.THROUGHPUT_MAX_PIXELS:
            return self._latency(images)
        # whole rounds of one image per stream; a remainder would leave cores idle, so it takes the latency form
        even = images.shape[0] - images.shape[0] % self.streams
        results: list = [None] * even

        def done(request, i):  # copy out: the request's buffers are reused by its next job
            results[i] = (request.get_output_tensor(0).data.copy(), bool(request.get_output_tensor(1).data))

        self.queue.set_callback(done)
        for i in range(even):  # one image per job: each stream takes the next when it is free
            self.queue.start_async({0: images[i : i + 1]}, i)
        self.queue.wait_all()
        if even < images.shape[0]:
            results.append(self._latency(images[even:]))
        return np.concatenate([r[0] for r in results]), all(r[1] for r in results)

    def _latency(self, images: np.ndarray) -> tuple[np.ndarray, bool]:
        self.peak_pixels = max(self.peak_pixels, images.shape[0] * images.shape[1] * images.shape[2])
        if self.request is None:
            self._compile(many=False)
        out = self.request.infer({0: images})
        return out[0], bool(out[1])

    def staged(self, images, between) -> tuple:
        """As ``__call__``, the network run stage by stage (``stage_modules``) with ``between()`` called between
        two stages, so batches can use the cores mid-image; the painting is the whole network's. The stages
        are converted in a background thread on the first call (several seconds), which paints in one piece
        meanwhile; ``prepare_stages()`` converts them at once."""
        if isinstance(images, torch.Tensor):
            y, finite = self.staged(images.cpu().numpy(), between)
            return torch.from_numpy(y), finite
        if self.stage_models is None:
            with self._thread_lock:
                if self._stage_thread is None:
                    self._stage_thread = threading.Thread(target=self.prepare_stages, name="openvino-stages")
                    self._stage_thread.start()
            return self(images)
        if not self.stage_models:  # a generator without stages
            return self(images)
        # each stage compiled for this painting and dropped after it: a compiled model keeps the buffers of the
        # largest image it ran, and eight kept at once held 700 MB more than the whole network's one at
        # 1024x696 (compiling a stage takes about 40 ms; only one stage's buffers are alive at a time)
        core, y = ov_core(), np.ascontiguousarray(images)
        for i, model in enumerate(self.stage_models):
            if i:
                between()
            request = core.compile_model(model, "CPU", self.config).create_infer_request()
            y = request.infer({0: y})
            y = y[0].copy() if i + 1 < len(self.stage_models) else (y[0].copy(), bool(y[1]))
            del request
        release_free_memory()
        return y

    def shared(self) -> OpenVINOShared:
        """The generator with shared statistics for tiled paintings (``OpenVINOShared``), in this backend's
        precision and threads."""
        return OpenVINOShared(self.generator, self.config)

    def prepare_stages(self) -> None:
        """Convert the generator's stages for ``staged`` and its shared-statistics form for ``shared`` now
        (idempotent; the conversions are cached)."""
        with self._stage_lock:
            if self.stage_models is None:
                bf16 = self.config["INFERENCE_PRECISION_HINT"] == "bf16"
                self.stage_models = converted_stages(self.generator, bf16=bf16) or []
        converted_shared(self.generator)

    def release(self) -> bool:  # noqa: D102 (see the class docstring)
        """Free the buffers of large batches (True if there were any)."""
        if self.peak_pixels <= self.RELEASE_ABOVE_PIXELS:
            return False
        self.request = None  # the throughput form never sees large images
        self.peak_pixels = 0
        return True


EXPORT_FORMATS = {".xml": "OpenVINO IR", ".onnx": "ONNX"}


def export(weights: Path, out: Path) -> None:
    """Write the generator in ``weights`` in the format ``out``'s suffix names: ``.xml`` OpenVINO IR (weights
    beside it in .bin), ``.onnx`` ONNX. Both take and return float32 NCHW in [-1, 1], any batch, height and
    width multiples of the generator's size multiple (4 for the ResNet generator). The write is atomic."""
    from model.weights import atomic_write, load_generator

    generator, _ = load_generator(weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".onnx":
        atomic_write(out, lambda tmp: export_onnx(generator, Path(tmp)))
        return
    ov = _openvino()

    tmp = out.with_name(f".{out.stem}.tmp.xml")
    ov.save_model(convert(generator), tmp, compress_to_fp16=False)
    tmp.with_suffix(".bin").replace(out.with_suffix(".bin"))
    tmp.replace(out)


def export_onnx(generator: nn.Module, path: Path) -> None:
    """The generator as an ONNX model (opset 18) through torch's exporter (``torch.export``, onnxscript): input
    ``image`` (N, 3, H, W) float32 in [-1, 1], output ``painting`` the same shape; N is dynamic, H and W are
    dynamic multiples of the size multiple. The network as trained (no inference rewrite): plain
    convolutions, instance norms and reflection pads that every ONNX runtime takes."""
    import contextlib
    import io

    module = copy.deepcopy(generator).float().eval()
    m = generator.spec.size_multiple
    side = max(64, m)
    batch, rows, cols = torch.export.Dim("batch", max=1024), torch.export.Dim("rows", max=16384 // m), \
        torch.export.Dim("cols", max=16384 // m)
    chatter = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 3, side, side),), str(path), dynamo=True, opset_version=18,
                          input_names=["image"], output_names=["painting"], verbose=False, external_data=False,
                          dynamic_shapes={"x": {0: batch, 2: m * rows, 3: m * cols}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.backends", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a generator as OpenVINO IR (.xml) or ONNX (.onnx)")
    ex.add_argument("weights", type=Path)
    ex.add_argument("out", type=Path, help="the file to write: OUT.xml (OpenVINO IR, its .bin goes beside it) "
                    "or OUT.onnx")
    args = parser.parse_args(argv)
    if args.out.suffix not in EXPORT_FORMATS:
        print(f"error: {args.out} should end in .xml (OpenVINO IR) or .onnx (ONNX)", file=sys.stderr)
        return 2
    if args.out.suffix == ".xml" and not openvino_available():
        print("error: the openvino package is not installed: pip install 'monet-cyclegan[openvino]'", file=sys.stderr)
        return 2
    if args.out.suffix == ".onnx" and not all(importlib.util.find_spec(p) for p in ("onnx", "onnxscript")):
        print("error: ONNX export needs the onnx and onnxscript packages: pip install 'monet-cyclegan[onnx]'",
              file=sys.stderr)
        return 2
    from model.weights import WeightsError

    try:
        export(args.weights, args.out)
    except (WeightsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    extra = f" and {args.out.with_suffix('.bin')}" if args.out.suffix == ".xml" else ""
    print(f"wrote {args.out}{extra} ({EXPORT_FORMATS[args.out.suffix]}: float32 NCHW in [-1, 1], dynamic batch, "
          f"height and width)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
