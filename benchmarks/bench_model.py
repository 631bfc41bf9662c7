"""Generator speed at 256x256, end to end (PIL in, PIL out), beside the reference generator, in one run.

    python benchmarks/bench_model.py [--device auto|cpu|cuda] [--seconds 5] [--weights FILE] [--runtimes]

1. End to end, batch 1: the reference generator (ResNet-9, ngf 64, eager fp32, torch's default threads,
   the first script everyone writes: PIL -> tensor -> forward -> PIL) against the shipped generator through
   `Translator.translate` on each backend (torch; OpenVINO on CPU when installed). Each of ours is also
   compared with our own fp32 result (mean absolute difference in 8-bit levels; the goal is < 1).
2. The Translator on batches of 1, 4, 8 (16, 32, 64 on CUDA): its best batch size is the ceiling that
   bench_server compares the server with.
3. With --runtimes, forward passes alone on every runtime this machine has, to choose the backend:
   torch eager fp32 / bf16 channels-last, torch.compile with freezing (CPU) or max-autotune (CUDA),
   ONNX Runtime, OpenVINO bf16 / f32.
On CUDA it also reports peak GPU memory and the share of wall time the host spends outside the GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.backends import openvino_available  # noqa: E402
from model.networks import ResnetGenerator, init_weights  # noqa: E402
from model.translator import DEFAULT_WEIGHTS, Translator, resolve_device  # noqa: E402
from model.weights import load_generator  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, images_per_call: int, seconds: float, device: torch.device, warmup: int = 2) -> float:
    """Images per second of ``fn`` over at least ``seconds`` (and 3 calls), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    sync(device)
    return calls * images_per_call / (time.perf_counter() - start)


def photos(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:256, 0:256]
    out = []
    for _ in range(n):
        base = np.stack([x, y, (x + y) / 2], -1) * rng.uniform(0.3, 0.9, 3) + rng.normal(0, 15, (256, 256, 3))
        out.append(Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB"))
    return out


def mad(a: list[Image.Image], b: list[Image.Image]) -> float:
    return float(np.mean([np.abs(np.asarray(x, float) - np.asarray(y, float)).mean() for x, y in zip(a, b)]))


def runtimes(weights: Path, device: torch.device, seconds: float) -> dict[str, float]:
    """Forward-only images/s at batch 1, 256x256, of the shipped generator on every runtime available."""
    out = {}
    x = torch.rand(1, 3, 256, 256) * 2 - 1

    def fresh():
        return load_generator(weights)[0].eval()

    g = fresh().to(device)
    xd = x.to(device)
    with torch.inference_mode():
        if device.type == "cpu":
            out["torch eager fp32"] = timed(lambda: g(xd), 1, seconds, device)
        half = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
        gb = fresh().to(device, half, memory_format=torch.channels_last)
        xb = xd.to(half).contiguous(memory_format=torch.channels_last)
        out[f"torch eager {str(half)[6:]} channels-last"] = timed(lambda: gb(xb), 1, seconds, device)
        try:
            if device.type == "cpu":
                import torch._inductor.config as inductor

                inductor.freezing = True
                compiled, name = torch.compile(gb), "torch.compile freezing"
            else:
                compiled, name = torch.compile(gb, mode="max-autotune"), "torch.compile max-autotune"
            out[f"{name} {str(half)[6:]}"] = timed(lambda: compiled(xb), 1, seconds, device)
        except Exception as exc:  # no compiler, or an inductor limitation on this machine
            print(f"torch.compile skipped: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
    if device.type != "cpu":
        return out
    try:
        import onnxruntime as ort

        path = Path(os.environ.get("TMPDIR", "/tmp")) / "monet-bench.onnx"
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(fresh(), (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = len(os.sched_getaffinity(0))
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        xn = x.numpy()
        out["ONNX Runtime fp32"] = timed(lambda: session.run(None, {"x": xn}), 1, seconds, device)
    except ImportError:
        pass
    if openvino_available():
        import openvino as ov

        from model.backends import convert

        model = convert(fresh())
        for hint in ("bf16", "f32"):
            request = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                            "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
            xn = x.numpy()
            out[f"OpenVINO {hint}"] = timed(lambda: request.infer({0: xn}), 1, seconds, device)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--batches", default=None, help="batch sizes for part 2 (default 1,4,8; 1,16,32,64 on CUDA)")
    p.add_argument("--runtimes", action="store_true", help="also time forward passes on every runtime here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    device = resolve_device(args.device)
    default_threads = torch.get_num_threads()
    torch.manual_seed(0)
    images = photos(8)
    results: dict = {"device": str(device), "cpu": cpu_name(), "torch_threads_default": default_threads}

    # 1. reference, end to end
    reference = init_weights(ResnetGenerator(ngf=64, n_blocks=9)).to(device).eval()

    def reference_call():
        x = torch.from_numpy(np.asarray(images[0], np.float32) / 127.5 - 1).permute(2, 0, 1)[None].to(device)
        with torch.no_grad():
            y = reference(x)[0].permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(np.clip((y + 1) * 127.5, 0, 255).round().astype(np.uint8))

    base = timed(reference_call, 1, args.seconds, device)
    results["reference_images_per_s"] = base
    fp32 = Translator.from_file(args.weights, device=str(device), precision="fp32", backend="torch")
    truth = fp32.translate(images)
    backends = ["torch"] + (["openvino"] if device.type == "cpu" and openvino_available() else [])
    ours = {}
    for backend in backends:
        t = Translator.from_file(args.weights, device=str(device), backend=backend, max_batch=64)
        ips = timed(lambda: t.translate(images[:1]), 1, args.seconds, device)
        ours[backend] = {"dtype": str(t.dtype)[6:], "images_per_s": ips, "vs_reference": ips / base,
                         "mad_levels_vs_fp32": mad(truth, t.translate(images))}
    results["end_to_end"] = ours
    best_backend = max(ours, key=lambda b: ours[b]["images_per_s"])
    results["best_backend"] = best_backend

    # 2. the Translator on batches (the server's ceiling)
    batches = [int(b) for b in (args.batches or ("1,16,32,64" if device.type == "cuda" else "1,4,8")).split(",")]
    t = Translator.from_file(args.weights, device=str(device), backend=best_backend, max_batch=max(batches))
    rng = np.random.default_rng(0)
    results["translator_batches"] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for b in batches:
        batch = rng.integers(0, 256, (b, 256, 256, 3), dtype=np.uint8)
        ips = timed(lambda: t.translate_arrays(batch), b, args.seconds, device)
        results["translator_batches"][b] = ips
        if device.type == "cuda":  # host share: wall time not covered by GPU kernels, on a probe batch
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            wall = time.perf_counter()
            start.record()
            t.translate_arrays(batch)
            end.record()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - wall) * 1000
            results.setdefault("host_share", {})[b] = max(0.0, 1 - start.elapsed_time(end) / wall) if wall else 0.0
    if device.type == "cuda":
        results["gpu_peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if args.runtimes:
        results["runtimes_forward_batch1"] = runtimes(args.weights, device, args.seconds)

    if args.json:
        print(json.dumps(results))
        return
    print(f"{results['cpu']}; device {device}; 256x256; torch {torch.__version__}, {default_threads} threads by default")
    print("| end to end, batch 1 (PIL in, PIL out) | images/s | vs reference | MAD vs our fp32 (levels) |")
    print("| --- | --- | --- | --- |")
    print(f"| reference: ResNet-9, ngf 64, eager fp32 | {base:.2f} | 1.00x | |")
    for backend, r in ours.items():
        print(f"| {args.weights.name}, Translator, {backend} {r['dtype']} | {r['images_per_s']:.2f} | "
              f"**{r['vs_reference']:.2f}x** | {r['mad_levels_vs_fp32']:.3f} |")
    print(f"translator ({best_backend}) by batch size:",
          ", ".join(f"batch {b}: {v:.2f} images/s" for b, v in results["translator_batches"].items()))
    if "host_share" in results:
        print("host share of wall time:", ", ".join(f"batch {b}: {v:.0%}" for b, v in results["host_share"].items()),
              f"; peak GPU memory {results['gpu_peak_memory_mib']:.0f} MiB")
    if args.runtimes:
        rt = results["runtimes_forward_batch1"]
        best_torch = max(v for k, v in rt.items() if k.startswith("torch"))
        print("| runtime, forward only, batch 1 | images/s | vs best torch path |\n| --- | --- | --- |")
        for name, v in rt.items():
            print(f"| {name} | {v:.2f} | {v / best_torch:.2f}x |")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        flags = open("/proc/cpuinfo").read()
        extra = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
        return f"{name} ({len(os.sched_getaffinity(0))} cores{', ' + ', '.join(extra) if extra else ''})"
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    main()
