"""Generator throughput at 256x256: the Translator at batch 1, 4, 8 beside a plain eager-fp32 batch-1 baseline.

    python benchmarks/bench_model.py [--device auto|cpu|cuda] [--seconds 5] [--ngf 64 --n-blocks 9]

The baseline is what a first script does: the same ResnetGenerator, fp32, NCHW, torch.no_grad(), one
image at a time, torch's default threads. Both run in this process, one after the other.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from model.networks import ResnetGenerator, init_weights
from model.translator import Translator, resolve_device


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="auto")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--n-blocks", type=int, default=9)
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    device = resolve_device(args.device)
    default_threads = torch.get_num_threads()
    torch.manual_seed(0)
    generator = init_weights(ResnetGenerator(ngf=args.ngf, n_blocks=args.n_blocks)).eval()
    rng = np.random.default_rng(0)

    # plain baseline: eager fp32, batch 1, no tuning
    baseline_net = ResnetGenerator(ngf=args.ngf, n_blocks=args.n_blocks).to(device).eval()
    baseline_net.load_state_dict(generator.state_dict())
    x1 = torch.rand(1, 3, 256, 256, device=device) * 2 - 1

    def baseline():
        with torch.no_grad():
            return baseline_net(x1).cpu()

    base = timed(baseline, 1, args.seconds, device)

    translator = Translator(generator, device=str(device), max_batch=max(int(b) for b in args.batches.split(",")))
    results = {"device": str(device), "dtype": str(translator.dtype).removeprefix("torch."),
               "generator": f"resnet ngf={args.ngf} n_blocks={args.n_blocks}", "torch_threads_default": default_threads,
               "torch_threads_used": torch.get_num_threads(), "baseline_images_per_s": base, "translator": {}}
    for b in (int(v) for v in args.batches.split(",")):
        batch = rng.integers(0, 256, (b, 256, 256, 3), dtype=np.uint8)
        results["translator"][b] = timed(lambda: translator.translate_arrays(batch), b, args.seconds, device)
    best_b = max(results["translator"], key=results["translator"].get)
    results["best_batch"] = best_b
    results["best_speedup"] = results["translator"][best_b] / base
    if args.json:
        print(json.dumps(results))
        return
    print(f"device {results['device']}, translator dtype {results['dtype']}, {results['generator']}, 256x256")
    print(f"baseline (eager fp32, batch 1, {default_threads} threads): {base:8.2f} images/s   1.00x")
    for b, ips in results["translator"].items():
        print(f"translator batch {b:<3}                          : {ips:8.2f} images/s   {ips / base:.2f}x")
    print(f"best: batch {best_b}, {results['best_speedup']:.2f}x the baseline")


if __name__ == "__main__":
    main()
