"""Generator speed at 256x256, end to end (PIL in, PIL out), beside the reference generator, in one run.

    python -m benchmarks.bench_model [--device auto|cpu|cuda] [--seconds 5] [--weights FILE] [--runtimes]

1. End to end, 1 image at a time and 8 at a time: the reference generator (ResNet-9, ngf 64, eager fp32,
   torch's default threads, the first script everyone writes: PIL -> tensor -> forward -> PIL, its 8 images
   stacked in one batch) against the shipped generator through `Translator.translate` on each backend
   (torch; OpenVINO on CPU when installed). Each of ours is also compared with our own fp32 result (mean
   absolute difference in 8-bit levels; the goal is < 1).
2. The Translator on batches of 1, 4, 8 (16, 32, 64 on CUDA), with p50 / p99 per call: its best batch
   size is the ceiling that bench_server compares the server with. On CUDA, the same translator without
   CUDA graphs beside it, and the largest difference between the two.
3. JPEG files in, JPEG files out: Pillow decode/encode around the translator against model/codecs.py's device
   codecs (nvJPEG on CUDA, batched, the pixels never on the host).
4. With --candidates (and nothing else of the above), issue 35's inference candidates at one large batch
   (the largest of --batches, 128 by default), each line printed as it is measured: the shipped Translator
   against PyTorch's own instance norm (before), NHWC norms and pads, tensor-core channel counts at the first
   and last convolutions, two translators on two CUDA streams, and torch.compile (default, then max-autotune)
   inside the CUDA graphs; images/s, the ratio, the difference in levels and the set-up time (compilation).
5. With --runtimes, forward passes alone on every runtime this machine has, to choose the backend:
   torch eager fp32 / bf16 channels-last, torch.compile with freezing (CPU) or max-autotune (CUDA),
   ONNX Runtime, OpenVINO bf16 (our graph and the original) / f32, OpenVINO with one stream per core.
On CUDA it also reports peak GPU memory and the share of wall time the host spends outside the GPU, and for
one call at the largest batch up to 64 where the time goes (benchmarks/profiling.py: the GPU's busy share and
its largest kernels; on CPU the operators).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.profiling import describe, where_time_goes
from model.backends import openvino_available
from model.runtime import cpu_cores
from model.networks import (InferenceGenerator, InstanceNorm2d, PhaseConvTanh, ResnetGenerator, for_inference,
                            init_weights)
from model.runtime import resolve_device
from model.translator import Translator
from model.weights import SHIPPED_WEIGHTS as DEFAULT_WEIGHTS
from model.weights import load_generator


E2E_BATCHES = (1, 8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


LATENCIES: list[float] = []  # seconds per call of the last ``timed`` run


def timed(fn, images_per_call: int, seconds: float, device: torch.device, warmup: int = 2) -> float:
    """Images per second of ``fn`` over at least ``seconds`` (and 3 calls), after ``warmup`` calls; the
    per-call times land in LATENCIES."""
    for _ in range(warmup):
        fn()
    sync(device)
    LATENCIES.clear()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        sync(device)
        LATENCIES.append(time.perf_counter() - t0)
        calls += 1
    return calls * images_per_call / (time.perf_counter() - start)


def percentile_ms(q: float) -> float:
    return float(np.percentile(LATENCIES, q)) * 1000


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

    def fresh(rewrite: bool = True):
        g = load_generator(weights)[0].eval()
        return for_inference(g) if rewrite else g

    g = fresh().to(device)
    xd = x.to(device)
    with torch.inference_mode():
        if device.type == "cpu":
            out["torch eager fp32"] = timed(lambda: g(xd), 1, seconds, device)
            original = fresh(rewrite=False)
            out["torch eager fp32, original graph"] = timed(lambda: original(xd), 1, seconds, device)
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

        xn = x.numpy()
        for name, rewrite, hint in (("OpenVINO bf16", True, "bf16"), ("OpenVINO bf16, original graph", False, "bf16"),
                                    ("OpenVINO f32", True, "f32")):
            request = ov.Core().compile_model(convert(fresh(rewrite), rewrite=rewrite), "CPU", {
                "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
            out[name] = timed(lambda: request.infer({0: xn}), 1, seconds, device)
        streams = cpu_cores()
        if streams > 1:  # the throughput form the Translator uses for batches: one stream per core
            queue = ov.AsyncInferQueue(ov.Core().compile_model(convert(fresh()), "CPU", {
                "INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams}), streams)

            def many():
                for _ in range(streams):
                    queue.start_async({0: xn})
                queue.wait_all()

            out[f"OpenVINO bf16, {streams} streams ({streams} images at a time)"] = timed(many, streams, seconds, device)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--batches", default=None, help="batch sizes for part 2 (default 1,4,8; 1,16,32,64 on CUDA)")
    p.add_argument("--runtimes", action="store_true", help="also time forward passes on every runtime here")
    p.add_argument("--candidates", action="store_true",
                   help="only time issue 35's inference candidates at the largest batch (see above)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    device = resolve_device(args.device)
    if args.candidates:
        candidates(args.weights, device, int((args.batches or "128").split(",")[-1]), args.seconds)
        return
    default_threads = torch.get_num_threads()
    torch.manual_seed(0)
    images = photos(8)
    results: dict = {"device": str(device), "cpu": cpu_name(), "torch_threads_default": default_threads}

    # 1. end to end, 1 image at a time and 8 at a time, the reference and ours
    reference = init_weights(ResnetGenerator(ngf=64, n_blocks=9)).to(device).eval()

    def reference_call(n: int):
        x = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1)
                         for im in images[:n]]).to(device)
        with torch.no_grad():
            y = reference(x).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.clip((a + 1) * 127.5, 0, 255).round().astype(np.uint8)) for a in y]

    base = {n: timed(lambda: reference_call(n), n, args.seconds, device) for n in E2E_BATCHES}
    results["reference_images_per_s"] = base
    fp32 = Translator.from_file(args.weights, device=str(device), precision="fp32", backend="torch")
    truth = fp32.translate(images)
    backends = ["torch"] + (["openvino"] if device.type == "cpu" and openvino_available() else [])
    ours = {}
    for backend in backends:
        t = Translator.from_file(args.weights, device=str(device), backend=backend, max_batch=64)
        ips = {n: timed(lambda: t.translate(images[:n]), n, args.seconds, device) for n in E2E_BATCHES}
        ours[backend] = {"dtype": str(t.dtype)[6:], "images_per_s": ips,
                         "vs_reference": {n: ips[n] / base[n] for n in E2E_BATCHES},
                         "best_vs_best_reference": max(ips.values()) / max(base.values()),
                         "mad_levels_vs_fp32": mad(truth, t.translate(images))}
    # the same torch translator with PyTorch's own instance norm in eval (the layer before the NHWC group norm,
    # model/networks.py), to show what that change is worth on this machine
    generator, info = load_generator(args.weights)
    before = Translator(native_norm(generator), info, device=str(device), backend="torch", max_batch=64)
    ips = {n: timed(lambda: before.translate(images[:n]), n, args.seconds, device) for n in E2E_BATCHES}
    results["torch_native_norm"] = {"images_per_s": ips, "ours_vs_it": {n: ours["torch"]["images_per_s"][n] / ips[n]
                                                                        for n in E2E_BATCHES},
                                    "mad_levels_vs_fp32": mad(truth, before.translate(images))}
    del before
    results["end_to_end"] = ours
    best_backend = max(ours, key=lambda b: max(ours[b]["images_per_s"].values()))
    results["best_backend"] = best_backend

    # 2. the Translator on batches (the server's ceiling)
    batches = [int(b) for b in (args.batches or ("1,16,32,64" if device.type == "cuda" else "1,4,8")).split(",")]
    t = Translator.from_file(args.weights, device=str(device), backend=best_backend, max_batch=max(batches))
    rng = np.random.default_rng(0)
    results["translator_batches"] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    eager = None
    if device.type == "cuda" and best_backend == "torch":  # the same translator without CUDA graphs, to compare
        eager = Translator.from_file(args.weights, device=str(device), backend="torch", max_batch=max(batches),
                                     cuda_graphs=False)
        results["eager_batches"], results["graphs_vs_eager_max_levels"] = {}, 0
    for b in batches:
        batch = rng.integers(0, 256, (b, 256, 256, 3), dtype=np.uint8)
        ips = timed(lambda: t.translate_arrays(batch), b, args.seconds, device)
        results["translator_batches"][b] = {"images_per_s": ips, "p50_ms": percentile_ms(50), "p99_ms": percentile_ms(99)}
        if eager is not None:
            results["eager_batches"][b] = timed(lambda: eager.translate_arrays(batch), b, args.seconds, device)
            diff = np.abs(t.translate_arrays(batch).astype(int) - eager.translate_arrays(batch)).max()
            results["graphs_vs_eager_max_levels"] = max(results["graphs_vs_eager_max_levels"], int(diff))
        if device.type == "cuda":  # host share: wall time not covered by GPU kernels, on a probe batch
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            wall = time.perf_counter()
            start.record()
            t.translate_arrays(batch)
            end.record()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - wall) * 1000
            results.setdefault("host_share", {})[b] = max(0.0, 1 - start.elapsed_time(end) / wall) if wall else 0.0

    # where one call's time goes, at the largest batch up to 64: the GPU's busy share and its largest kernels
    # (on CPU, the operators), so that the next lever is chosen from figures
    probe = max([b for b in batches if b <= 64] or batches[:1])
    try:
        batch = rng.integers(0, 256, (probe, 256, 256, 3), dtype=np.uint8)
        t.translate_arrays(batch)
        results["profile"] = {"batch": probe, **where_time_goes(t.translate_arrays, batch, cuda=device.type == "cuda")}
    except Exception as exc:  # the profiler costs its lines, never the figures
        print(f"profile failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)

    # 3. JPEG files in, JPEG files out: Pillow around the translator, against the device codecs (model/codecs.py:
    # nvJPEG on CUDA, pixels never on the host; torchvision's libjpeg on CPU)
    from model.codecs import paint_jpegs

    n_files = max(batches)
    blobs = []
    for img in photos(n_files):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        blobs.append(buf.getvalue())
    torch_t = t if best_backend == "torch" else Translator.from_file(args.weights, device=str(device),
                                                                     backend=best_backend, max_batch=n_files)

    def with_pillow():
        out = []
        for painting in torch_t.translate([Image.open(io.BytesIO(b)) for b in blobs]):
            buf = io.BytesIO()
            painting.save(buf, "JPEG", quality=95)
            out.append(buf.getvalue())
        return out

    pil_ips = timed(with_pillow, n_files, args.seconds, device)
    pil_p50 = percentile_ms(50)
    dev_ips = timed(lambda: paint_jpegs(torch_t, blobs, quality=95), n_files, args.seconds, device)
    results["jpeg_files"] = {"files_per_call": n_files, "pillow_images_per_s": pil_ips, "pillow_p50_ms": pil_p50,
                             "device_codec_images_per_s": dev_ips, "device_codec_p50_ms": percentile_ms(50),
                             "device_codec_p99_ms": percentile_ms(99)}
    if device.type == "cuda":
        results["gpu_peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if args.runtimes:
        results["runtimes_forward_batch1"] = runtimes(args.weights, device, args.seconds)

    if args.json:
        print(json.dumps(results))
        return
    print(f"{results['cpu']}; device {device}; 256x256; torch {torch.__version__}, {default_threads} threads by default")
    print("| end to end (PIL in, PIL out) | 1 image at a time | vs reference | 8 at a time | vs reference "
          "| MAD vs our fp32 (levels) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| reference: ResNet-9, ngf 64, eager fp32 | {base[1]:.2f} | 1.00x | {base[8]:.2f} | 1.00x | |")
    for backend, r in ours.items():
        ips, vs = r["images_per_s"], r["vs_reference"]
        print(f"| {args.weights.name}, Translator, {backend} {r['dtype']} | {ips[1]:.2f} | **{vs[1]:.2f}x** | "
              f"{ips[8]:.2f} | **{vs[8]:.2f}x** | {r['mad_levels_vs_fp32']:.3f} |")
    nn_ = results["torch_native_norm"]
    print(f"| the torch row with PyTorch's own instance norm (before) | {nn_['images_per_s'][1]:.2f} | "
          f"ours {nn_['ours_vs_it'][1]:.2f}x | {nn_['images_per_s'][8]:.2f} | ours {nn_['ours_vs_it'][8]:.2f}x | "
          f"{nn_['mad_levels_vs_fp32']:.3f} |")
    print(f"best of ours / best of the reference: {ours[best_backend]['best_vs_best_reference']:.2f}x ({best_backend})")
    print(f"translator ({best_backend}) by batch size (images/s, p50 / p99 per batch):",
          ", ".join(f"batch {b}: {v['images_per_s']:.2f} ({v['p50_ms']:.1f} / {v['p99_ms']:.1f} ms)"
                    for b, v in results["translator_batches"].items()))
    if "eager_batches" in results:
        print("same translator without CUDA graphs:", ", ".join(f"batch {b}: {v:.2f} images/s ("
              f"graphs {results['translator_batches'][b]['images_per_s'] / v:.2f}x)" for b, v in results["eager_batches"].items()),
              f"; largest difference {results['graphs_vs_eager_max_levels']} levels")
    jf = results["jpeg_files"]
    print(f"JPEG files in and out, {jf['files_per_call']} per call: Pillow codecs {jf['pillow_images_per_s']:.2f} images/s, "
          f"device codecs (model/codecs.py) {jf['device_codec_images_per_s']:.2f} images/s "
          f"({jf['device_codec_images_per_s'] / jf['pillow_images_per_s']:.2f}x; p50 {jf['device_codec_p50_ms']:.1f} ms, "
          f"p99 {jf['device_codec_p99_ms']:.1f} ms per call)")
    if "profile" in results:
        print(f"one call of the translator at batch {results['profile']['batch']} under the profiler:")
        print(describe(results["profile"], indent="  "))
    if "host_share" in results:
        print("host share of wall time:", ", ".join(f"batch {b}: {v:.0%}" for b, v in results["host_share"].items()),
              f"; peak GPU memory {results['gpu_peak_memory_mib']:.0f} MiB")
    if args.runtimes:
        rt = results["runtimes_forward_batch1"]
        best_torch = max(v for k, v in rt.items() if k.startswith("torch"))
        print("| runtime, forward only, batch 1 | images/s | vs best torch path |\n| --- | --- | --- |")
        for name, v in rt.items():
            print(f"| {name} | {v:.2f} | {v / best_torch:.2f}x |")


def candidates(weights: Path, device: torch.device, batch: int, seconds: float) -> None:
    """Issue 35's inference candidates against the shipped Translator at ``batch`` 256x256 images a call, one
    table row printed (and flushed) as each is measured, so that a call cut short keeps what it measured: the
    cheap forms first, the shipped path timed again after them (the card's drift), torch.compile last. A
    candidate that fails prints its error and the next one runs."""
    import contextlib
    import gc
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8)
    cuda = device.type == "cuda"

    def translator(form=None, max_batch: int = batch, **kwargs) -> Translator:
        generator, info = load_generator(weights)
        return Translator(form(generator) if form else generator, info, device=str(device), backend="torch",
                          max_batch=max_batch, **kwargs)

    def warm(t: Translator, images: np.ndarray):  # the compilation, cuDNN's choice, the graph's capture
        for _ in range(3):
            y = t.translate_arrays(images)
        return y

    def two_streams():
        cut = batch - batch // 2

        def halves(images):
            return images[:cut], images[cut:]

        ts = [translator(max_batch=len(part)) for part in halves(x)]
        for t, part in zip(ts, halves(x)):  # captured one after the other: a capture must not overlap other work
            warm(t, part)
        streams = [torch.cuda.Stream(device) if cuda else None for _ in ts]
        pool = ThreadPoolExecutor(2)

        def one(t, stream, part):
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                return t.translate_arrays(part)

        def run(images):
            futures = [pool.submit(one, t, st, part) for t, st, part in zip(ts, streams, halves(images))]
            return np.concatenate([f.result() for f in futures])
        return run

    def form(f=None, **kwargs):  # a Translator of the generator in form ``f``, warmed at the timed batch
        def build():
            t = translator(f, **kwargs)
            warm(t, x)
            return t.translate_arrays
        return build

    def compiled(mode: str):
        return form(compile_mode=mode, warmup=False)

    rows = [("PyTorch's instance norm (before)", form(native_norm))]
    if cuda:  # PyTorch's CUDA group norm and reflection pad may copy NHWC to NCHW and back; on CPU they do not
        rows += [("an NHWC norm in elementwise ops", form(elementwise_norm)), ("NHWC reflection pads", form(nhwc_pads)),
                 ("both", form(lambda g: nhwc_pads(elementwise_norm(g))))]
    rows += [("tensor-core channels: the first convolution's input 8, the last's output 16",
              form(tensor_core_channels)),
             (f"two translators of batch {batch // 2} on two CUDA streams, two threads", two_streams),
             ("the shipped path again", None),
             ("torch.compile, default mode, in the CUDA graphs", compiled("default"))]
    if cuda:  # on CPU max-autotune times C++ kernels for minutes and the path is not the GPU's
        rows.append(("torch.compile, max-autotune-no-cudagraphs, in the CUDA graphs",
                     compiled("max-autotune-no-cudagraphs")))

    ours = translator()
    reference = warm(ours, x)
    base = timed(lambda: ours.translate_arrays(x), batch, seconds, device)
    print(f"inference candidates, {batch} images of 256x256 a call, {device} ({describe_device(device)}), "
          f"{str(ours.dtype)[6:]}, torch {torch.__version__}: the shipped Translator {base:.1f} images/s "
          f"(p50 {percentile_ms(50):.1f} ms a call)", flush=True)
    print("| candidate | images/s | vs the shipped path | mean / max levels from it | set-up s |\n"
          "| --- | --- | --- | --- | --- |", flush=True)
    for name, build in rows:
        run = None
        try:
            if build is None:
                ips, diff, setup = timed(lambda: ours.translate_arrays(x), batch, seconds, device), np.zeros(1, int), 0.0
            else:
                t0 = time.perf_counter()
                run = build()
                y = run(x)
                sync(device)
                setup = time.perf_counter() - t0
                ips = timed(lambda: run(x), batch, seconds, device)
                diff = np.abs(y.astype(int) - reference)
            print(f"| {name} | {ips:.1f} | {ips / base:.2f}x | {diff.mean():.3f} / {diff.max()} | {setup:.1f} |",
                  flush=True)
        except Exception as exc:  # one candidate's failure (a compiler's, an API's) costs only its row
            print(f"| {name} | failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]} | | | |", flush=True)
        del run
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def describe_device(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


class _PadChannels(torch.nn.Module):
    """Zero channels appended up to ``channels`` (the memory format kept)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x):
        return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1]))


class _WideOutputPhaseConvTanh(torch.nn.Module):
    """model.networks.PhaseConvTanh with zero output channels appended up to ``channels``, dropped before tanh."""

    def __init__(self, phase, channels: int):
        super().__init__()
        self.stride, self.used = phase.stride, phase.weight.shape[0]
        extra = channels - self.used
        self.weight = torch.nn.Parameter(torch.cat([phase.weight, phase.weight.new_zeros(extra, *phase.weight.shape[1:])]),
                                         requires_grad=False)
        self.bias = torch.nn.Parameter(torch.cat([phase.bias, phase.bias.new_zeros(extra)]), requires_grad=False)

    def forward(self, x):
        s = self.stride
        x = torch.nn.functional.pad(x, (0, s - 1, 0, s - 1))
        y = torch.nn.functional.conv2d(x, self.weight, self.bias, stride=s)[:, :self.used]
        return torch.nn.functional.pixel_shuffle(torch.tanh(y), s)


def tensor_core_channels(generator: torch.nn.Module, multiple: int = 8) -> torch.nn.Module:
    """``for_inference(generator)`` with the channel counts that tensor cores (and cuDNN's NHWC kernels) want at
    the two ends: the photo's 3 channels padded with zeros to 8 before the first convolution (whose weights get
    zero input channels) and the last convolution's 12 phase outputs computed as 16. The same sums with extra
    zero terms; a candidate for the GPU (issue 35), where the 3-channel ends may run on slow kernels."""
    g = for_inference(generator)
    if not isinstance(g, InferenceGenerator):  # not the ResNet generator: nothing to widen
        return g
    layers = list(g.children())
    first = next(i for i, m in enumerate(layers) if isinstance(m, torch.nn.Conv2d))
    conv = layers[first]
    wide = -(-conv.in_channels // multiple) * multiple
    if wide != conv.in_channels:
        new = torch.nn.Conv2d(wide, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              bias=conv.bias is not None)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, :conv.in_channels] = conv.weight
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        layers[first] = new
        layers.insert(0, _PadChannels(wide))  # before the reflection pad: fewer pixels to widen
    if isinstance(layers[-1], PhaseConvTanh):
        out = layers[-1].weight.shape[0]
        layers[-1] = _WideOutputPhaseConvTanh(layers[-1], -(-out // (2 * multiple)) * 2 * multiple)
    return InferenceGenerator(g.spec, *layers).train(g.training)


def native_norm(generator: torch.nn.Module) -> torch.nn.Module:
    """``generator`` with each of its instance norms running PyTorch's own layer (``nn.InstanceNorm2d.forward``)
    instead of the NHWC group norm that model/networks.py's layer uses on a channels-last input: the baseline."""
    for m in generator.modules():
        if isinstance(m, InstanceNorm2d):
            m.forward = types.MethodType(torch.nn.InstanceNorm2d.forward, m)
    return generator


def elementwise_norm(generator: torch.nn.Module) -> torch.nn.Module:
    """``generator`` with each instance norm on a channels-last input written as one fp32 reduction for the mean
    and the mean square (no fp32 copy of the input) and one multiply-add in the input's dtype: every pass stays
    NHWC whatever the device's group-norm kernel does. Timed on CUDA only: on a 2-core AMD EPYC a form like it
    (var_mean of an fp32 copy, then one multiply-add) lost to the group norm, 944 against 585 ms a batch-8
    forward pass in bf16."""
    def forward(self, x):
        if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return torch.nn.InstanceNorm2d.forward(self, x)
        hw = x.shape[2] * x.shape[3]
        mean = x.sum(dim=(2, 3), keepdim=True, dtype=torch.float32) / hw
        meansq = torch.linalg.vector_norm(x, 2, dim=(2, 3), keepdim=True, dtype=torch.float32).square() / hw
        scale = torch.rsqrt((meansq - mean.square()).clamp_min(0) + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.float().view(1, -1, 1, 1)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.float().view(1, -1, 1, 1)
        return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))

    for m in generator.modules():
        if isinstance(m, InstanceNorm2d):
            m.forward = types.MethodType(forward, m)
    return generator


def nhwc_pads(generator: torch.nn.Module) -> torch.nn.Module:
    """``generator`` with each reflection pad on a channels-last input written as a constant pad (which keeps the
    input's memory format) whose borders are then copied from the reflected rows and columns. PyTorch's CUDA
    reflection pad makes its input contiguous (NCHW) and returns NCHW, so the next channels-last convolution
    copies it back: two full copies a pad. Inference only (writes into its output); timed on CUDA only (on CPU
    PyTorch's pad keeps NHWC itself)."""
    def forward(self, x):
        if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return torch.nn.ReflectionPad2d.forward(self, x)
        left, right, top, bottom = self.padding
        h, w = x.shape[2], x.shape[3]
        out = torch.nn.functional.pad(x, (left, right, top, bottom))
        for i in range(1, top + 1):
            out[:, :, top - i, left:left + w] = x[:, :, i]
        for i in range(1, bottom + 1):
            out[:, :, top + h - 1 + i, left:left + w] = x[:, :, h - 1 - i]
        for j in range(1, left + 1):
            out[:, :, :, left - j] = out[:, :, :, left + j]
        for j in range(1, right + 1):
            out[:, :, :, left + w - 1 + j] = out[:, :, :, left + w - 1 - j]
        return out

    for m in generator.modules():
        if isinstance(m, torch.nn.ReflectionPad2d):
            m.forward = types.MethodType(forward, m)
    return generator


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
