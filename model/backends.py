"""Inference runtimes for the generator: torch everywhere, OpenVINO on CPU (the `openvino` extra).

    python -m model.backends export WEIGHTS OUT.xml     # the generator as OpenVINO IR (OUT.xml + OUT.bin)

On CPU, OpenVINO runs the shipped generator about 1.6-1.8x faster than torch's best path (eager bf16
channels-last, or torch.compile with freezing) on the same machine: benchmarks/bench_model.py measures all
of them in one run. The Translator converts the checked safetensors weights in memory at load time (about
1.5 s), so the safetensors file stays the one artefact that is loaded, checked and shipped; `export` writes
the same graph to disk for other OpenVINO deployments.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

BACKENDS = ("auto", "torch", "openvino")


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


class _UInt8Images(nn.Module):
    """uint8 (N, H, W, 3) images in; uint8 (N, H, W, 3) paintings out, with the sum of the generator's raw
    output beside them, which is NaN exactly when some output value is (tanh never gives Inf). Scaling,
    layout changes, rounding (half to even, like numpy's rint) and clamping all run inside OpenVINO's
    graph, so no float copy of the images reaches Python."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.generator(x.permute(0, 3, 1, 2).float() / 127.5 - 1.0).permute(0, 2, 3, 1)
        return torch.round((y + 1.0) * 127.5).clamp(0, 255).to(torch.uint8), y.sum()


def convert(generator: nn.Module, uint8_images: bool = False, rewrite: bool = True):
    """The generator as an OpenVINO model for any batch and image size: (N, 3, H, W) float32 in [-1, 1]
    (the network as it is), or with ``uint8_images`` (N, H, W, 3) uint8 in, (N, H, W, 3) uint8 and the
    output's sum out (see _UInt8Images). The graph is ``for_inference``'s form of the generator (the
    network as trained with ``rewrite=False``, for comparison)."""
    import openvino as ov

    from model.networks import for_inference

    module = copy.deepcopy(generator).float().eval()
    if rewrite:
        module = for_inference(module)
    side = max(64, int(getattr(generator, "size_multiple", 4)))  # a U-Net traces at 256 at least
    if uint8_images:
        module, example = _UInt8Images(module).eval(), torch.zeros(1, side, side, 3, dtype=torch.uint8)
        shape = [([-1, -1, -1, 3], ov.Type.u8)]
    else:
        example, shape = torch.zeros(1, 3, side, side), [(-1, 3, -1, -1)]
    with warnings.catch_warnings():  # the tracer's deprecation notices are not the user's concern
        warnings.simplefilter("ignore")
        return ov.convert_model(module, example_input=example, input=shape)


def cpu_cores(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's
    `cpus:` or a Kubernetes CPU limit, which leave the affinity at the whole machine)."""
    cores = max(1, len(os.sched_getaffinity(0)))
    try:
        quota, period = open(cgroup_cpu_max).read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


class OpenVINORunner:
    """The generator compiled by OpenVINO: uint8 (N, H, W, 3) images in, uint8 paintings out.

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
        threads = int(os.environ.get("OMP_NUM_THREADS") or cpu_cores())
        self.streams = max(1, min(threads, streams if streams is not None else threads))
        self.config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        self.throughput_config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "THROUGHPUT",
                                  "NUM_STREAMS": self.streams, "INFERENCE_NUM_THREADS": threads}
        self.model = convert(generator, uint8_images=True)
        self.request = self.queue = None
        self.peak_pixels = 0
        self._compile(many=False)
        if self.streams > 1:
            self._compile(many=True)

    def _compile(self, many: bool) -> None:
        import openvino as ov

        if many:
            compiled = ov.Core().compile_model(self.model, "CPU", self.throughput_config)
            self.queue = ov.AsyncInferQueue(compiled, self.streams)
        else:
            self.request = ov.Core().compile_model(self.model, "CPU", self.config).create_infer_request()

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, bool]:
        """(paintings, finite): ``finite`` is False if the generator gave NaN anywhere."""
        images = np.ascontiguousarray(images)
        if images.shape[0] < self.streams or self.streams == 1 or images.shape[1] * images.shape[2] > self.THROUGHPUT_MAX_PIXELS:
            return self._latency(images)
        # whole rounds of one image per stream; a remainder would leave cores idle, so it takes the latency form
        even = images.shape[0] - images.shape[0] % self.streams
        results: list = [None] * even

        def done(request, i):  # copy out: the request's buffers are reused by its next job
            results[i] = (request.get_output_tensor(0).data.copy(), float(request.get_output_tensor(1).data))

        self.queue.set_callback(done)
        for i in range(even):  # one image per job: each stream takes the next when it is free
            self.queue.start_async({0: images[i : i + 1]}, i)
        self.queue.wait_all()
        if even < images.shape[0]:
            results.append(self._latency(images[even:]))
        return np.concatenate([r[0] for r in results]), all(np.isfinite(r[1]) for r in results)

    def _latency(self, images: np.ndarray) -> tuple[np.ndarray, bool]:
        self.peak_pixels = max(self.peak_pixels, images.shape[0] * images.shape[1] * images.shape[2])
        if self.request is None:
            self._compile(many=False)
        out = self.request.infer({0: images})
        return out[0], bool(np.isfinite(out[1]))

    def release(self) -> bool:
        """Free the buffers of large batches (True if there were any)."""
        if self.peak_pixels <= self.RELEASE_ABOVE_PIXELS:
            return False
        self.request = None  # the throughput form never sees large images
        self.peak_pixels = 0
        return True


def export(weights: Path, out: Path) -> None:
    """Write the generator in ``weights`` as OpenVINO IR (``out`` .xml, weights beside it in .bin)."""
    import openvino as ov

    from model.weights import load_generator

    generator, _ = load_generator(weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.xml")
    ov.save_model(convert(generator), tmp, compress_to_fp16=False)
    tmp.with_suffix(".bin").replace(out.with_suffix(".bin"))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.backends", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a generator as OpenVINO IR")
    ex.add_argument("weights", type=Path)
    ex.add_argument("out", type=Path, help="the .xml file to write (its .bin goes beside it)")
    args = parser.parse_args(argv)
    if not openvino_available():
        print("error: the openvino package is not installed: pip install 'monet-cyclegan[openvino]'", file=sys.stderr)
        return 2
    if args.out.suffix != ".xml":
        print(f"error: {args.out} should end in .xml (OpenVINO IR)", file=sys.stderr)
        return 2
    from model.weights import WeightsError

    try:
        export(args.weights, args.out)
    except (WeightsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} and {args.out.with_suffix('.bin')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
