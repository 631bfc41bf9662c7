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
    """uint8 (N, H, W, 3) images in, float (N, H, W, 3) pixel values out (0-255, not yet rounded or
    clipped, so NaN stays visible): the scaling and layout changes run inside OpenVINO's graph."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.generator(x.permute(0, 3, 1, 2).float() / 127.5 - 1.0)
        return (y.permute(0, 2, 3, 1) + 1.0) * 127.5


def convert(generator: nn.Module, uint8_images: bool = False):
    """The generator as an OpenVINO model for any batch and image size: (N, 3, H, W) float32 in [-1, 1]
    (the network as it is), or with ``uint8_images`` (N, H, W, 3) uint8 in, (N, H, W, 3) 0-255 float out."""
    import openvino as ov

    module = copy.deepcopy(generator).float().eval()
    side = max(64, int(getattr(generator, "size_multiple", 4)))  # a U-Net traces at 256 at least
    if uint8_images:
        module, example = _UInt8Images(module).eval(), torch.zeros(1, side, side, 3, dtype=torch.uint8)
        shape = [([-1, -1, -1, 3], ov.Type.u8)]
    else:
        example, shape = torch.zeros(1, 3, side, side), [(-1, 3, -1, -1)]
    with warnings.catch_warnings():  # the tracer's deprecation notices are not the user's concern
        warnings.simplefilter("ignore")
        return ov.convert_model(module, example_input=example, input=shape)


class OpenVINORunner:
    """The generator compiled by OpenVINO: uint8 (N, H, W, 3) images in, 0-255 float pixel values out.

    The compiled model keeps the buffers of the largest batch it ran; ``release`` drops them after large
    images (recompiling takes about 0.1 s, on the next call)."""

    RELEASE_ABOVE_PIXELS = 700_000  # a batch this large (a 1024x768 photo) leaves hundreds of MB behind

    def __init__(self, generator: nn.Module, dtype: torch.dtype):
        hint = "bf16" if dtype == torch.bfloat16 else "f32"  # fp32 where the CPU has no bf16 units
        self.config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        if "OMP_NUM_THREADS" in os.environ:
            self.config["INFERENCE_NUM_THREADS"] = int(os.environ["OMP_NUM_THREADS"])
        self.model = convert(generator, uint8_images=True)
        self.request = None
        self.peak_pixels = 0
        self._compile()

    def _compile(self) -> None:
        import openvino as ov

        self.compiled = ov.Core().compile_model(self.model, "CPU", self.config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.request is None:
            self._compile()
        self.peak_pixels = max(self.peak_pixels, images.shape[0] * images.shape[1] * images.shape[2])
        return self.request.infer({0: np.ascontiguousarray(images)})[0]

    def release(self) -> bool:
        """Free the buffers of large batches (True if there were any)."""
        if self.peak_pixels <= self.RELEASE_ABOVE_PIXELS:
            return False
        self.request = self.compiled = None
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
