"""Training throughput (images/s) of training.fit's step beside a plain baseline step, per preset.

    python -m benchmarks.bench_train [--presets cyclegan,kaggle] [--device auto] [--steps 3] [--batch-sizes 1,4]

The baseline is the reference implementation's shape: the same networks and losses, eager fp32,
batch 1, the six generator calls and four discriminator calls made one by one, no tuning.
Both run in this process at 256x256 (--image-size) on random images.

    python -m benchmarks.bench_train --end-to-end --photos DIR --paintings DIR [--against REV] [--steps 60]

End to end: times ``python -m training.fit`` itself on real folders (data loading, logging and the final
checkpoint included, validation off) with the recipe fixed by RECIPE, so the figure holds whatever the
presets say. With ``--against REV`` the same command also runs from a git worktree of REV (e.g. the previous
main), alternating with ours, and the ratio is printed. Two figures per run: the steady rate (the logged
images/s after the first interval, which holds the start-up) and the whole process's steps per wall second.

    python -m benchmarks.bench_train --scan DIR

The folder scan that ``training.fit`` and ``training.evaluate`` start with (every image decoded once, so that a
damaged file is skipped there and not mid-run) beside the plain scan it replaced (a full decode of each
file), alternating, best of 3; then the data loader's decode of one image at ``--load-size 286`` against a
full decode and resize (the first 200 files).

    python -m benchmarks.bench_train --augment [--image-size 256] [--batch-sizes 8] [--device auto]

DiffAugment (color, translation, cutout) forward and backward as training does it (training/augment.py: a few
large kernels) against the reference port it replaced (one operator per part, as data-efficient-gans writes
it), alternating, in fp32 and bf16 (fp16 on a GPU without bf16): the median time and the ratio.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F_

from training.config import preset_config
from training.cut import CUT
from training.cyclegan import CycleGAN, Discriminators, GANLoss, Generators, ImagePool


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def baseline_step_fn(cfg, device):
    gens, discs = Generators(cfg).to(device), Discriminators(cfg).to(device)
    G, F, D_photo, D_monet = gens.G, gens.F, discs.D_photo, discs.D_monet
    opt_G = torch.optim.Adam(gens.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_D = torch.optim.Adam(discs.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    gan = GANLoss(cfg.gan_loss)
    pool_photo, pool_monet = ImagePool(cfg.pool_size), ImagePool(cfg.pool_size)
    lc, li = cfg.lambda_cycle, cfg.lambda_cycle * cfg.lambda_identity

    def step(photo, monet):
        fake_monet, fake_photo = G(photo), F(monet)
        rec_photo, rec_monet = F(fake_monet), G(fake_photo)
        idt_monet, idt_photo = G(monet), F(photo)
        for p in discs.parameters():
            p.requires_grad = False
        opt_G.zero_grad()
        loss = (gan(D_monet(fake_monet), True) + gan(D_photo(fake_photo), True)
                + lc * (F_.l1_loss(rec_photo, photo) + F_.l1_loss(rec_monet, monet))
                + li * (F_.l1_loss(idt_monet, monet) + F_.l1_loss(idt_photo, photo)))
        loss.backward()
        opt_G.step()
        for p in discs.parameters():
            p.requires_grad = True
        opt_D.zero_grad()
        fp, fm = pool_photo.query(fake_photo), pool_monet.query(fake_monet)
        loss_d = 0.5 * (gan(D_photo(photo), True) + gan(D_photo(fp.detach()), False)) + 0.5 * (
            gan(D_monet(monet), True) + gan(D_monet(fm.detach()), False))
        loss_d.backward()
        opt_D.step()
        return loss.item()  # the reference reads losses every step

    return step


def measure(step, batch, device, steps, size=256, warmup=2):
    photo = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    monet = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    for _ in range(warmup):
        step(photo, monet)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(photo, monet)
    sync(device)
    return steps * batch / (time.perf_counter() - start)


RECIPE = ("--preset cpu --model fastcut --ngf 32 --n-blocks 6 --ndf 64 --image-size 128 --batch-size 4 "
          "--diffaugment color,translation,cutout --ema 0.999").split()


def fit_run(root: Path, photos: str, paintings: str, steps: int, extra: list[str]) -> dict:
    """One ``training.fit`` run of RECIPE from the checkout at ``root``, in a fresh run folder."""
    with tempfile.TemporaryDirectory(prefix="bench_train_") as out:
        cmd = [sys.executable, "-m", "training.fit", "--photos", str(Path(photos).resolve()),
               "--paintings", str(Path(paintings).resolve()), "--out", out,
               *RECIPE, "--eval-every", "0", "--log-every", str(max(1, steps // 4)), "--stop-at-step", str(steps),
               "--no-export", *extra]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(f"training.fit in {root} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        wall = time.perf_counter() - started
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r][1:]
    flags = RECIPE + extra
    batch = int(flags[len(flags) - 1 - flags[::-1].index("--batch-size") + 1])  # the last --batch-size wins
    return {"steady_steps_per_s": statistics.mean(rates) / batch, "wall_steps_per_s": steps / wall,
            "steady_images_per_s": statistics.mean(rates)}


def end_to_end(args) -> None:
    here = Path(__file__).resolve().parents[1]
    roots = {"ours": here}
    worktree = None
    if args.against:
        worktree = Path(tempfile.mkdtemp(prefix="bench_train_rev_"))
        subprocess.run(["git", "-C", str(here), "worktree", "add", "--detach", str(worktree), args.against],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        roots = {f"main ({args.against})": worktree, "ours": here}
    extra = args.fit_args.split() if args.fit_args else []
    results: dict[str, list[dict]] = {name: [] for name in roots}
    try:
        for _ in range(args.repeats):  # alternate, so that drift in the machine's speed hits both alike
            for name, root in roots.items():
                results[name].append(fit_run(root, args.photos, args.paintings, args.steps, extra))
                print(f"{name:<24} steady {results[name][-1]['steady_steps_per_s']:.3f} steps/s, "
                      f"whole process {results[name][-1]['wall_steps_per_s']:.3f} steps/s", flush=True)
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(here), "worktree", "remove", "--force", str(worktree)], check=False)
    best = {name: {k: max(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    print(f"\nend to end, {args.steps} steps, best of {args.repeats}; {' '.join(RECIPE + extra)}")
    first = next(iter(best))
    for name, figures in best.items():
        ratio = "" if name == first else (f"  {figures['steady_steps_per_s'] / best[first]['steady_steps_per_s']:.2f}x"
                                          f" steady, {figures['wall_steps_per_s'] / best[first]['wall_steps_per_s']:.2f}x whole")
        print(f"{name:<24} {figures['steady_steps_per_s']:.3f} steps/s steady "
              f"({figures['steady_images_per_s']:.1f} images/s), {figures['wall_steps_per_s']:.3f} whole "
              f"process{ratio}")


def scan(folder: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from training.data import scan_folder

    def full_decode(path):  # the scan before: PIL's full decode of each file
        try:
            with Image.open(path) as img:
                img.load()
                return img.size
        except Exception:  # noqa: BLE001
            return None

    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())

    def plain():
        with ThreadPoolExecutor(max_workers=4) as pool:
            return sum(s is not None for s in pool.map(full_decode, files))

    best = {"full decode (before)": 1e9, "scan_folder (ours)": 1e9}
    for _ in range(3):
        for name, fn in [("full decode (before)", plain), ("scan_folder (ours)", lambda: len(scan_folder(folder, "x").files))]:
            t = time.perf_counter()
            n = fn()
            best[name] = min(best[name], time.perf_counter() - t)
    base = best["full decode (before)"]
    for name, t in best.items():
        print(f"scan: {name:<22} {n} images in {t:.2f} s  {base / t:.2f}x")

    import random

    import numpy as np

    from training.data import load_image

    def plain_load(path):  # the loader before: full decode, then the resize to --load-size 286 and a 256 crop
        with Image.open(path) as img:
            img = img.convert("RGB").resize((286, 286), Image.Resampling.BICUBIC).crop((0, 0, 256, 256))
            return np.asarray(img)

    some = files[:200]
    best = {"full decode (before)": 1e9, "load_image (ours)": 1e9}
    for _ in range(3):
        for name, fn in [("full decode (before)", plain_load),
                         ("load_image (ours)", lambda f: load_image(f, 286, 256, True, random.Random(0)))]:
            t = time.perf_counter()
            for f in some:
                fn(f)
            best[name] = min(best[name], time.perf_counter() - t)
    base = best["full decode (before)"]
    for name, t in best.items():
        print(f"loader, --load-size 286: {name:<22} {1000 * t / len(some):.1f} ms an image  {base / t:.2f}x")


def augment_check(args, device) -> None:
    """DiffAugment as training does it against the reference port, forward and backward, alternating."""
    from training.augment import DiffAugment
    from training.augment import reference as reference_port

    policy = "color,translation,cutout"
    ours = DiffAugment(policy)

    def reference(x):
        return reference_port(policy, x).contiguous()

    b = int((args.batch_sizes or "8").split(",")[0])
    half = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    print(f"DiffAugment ({policy}) forward and backward, {b} images of {args.image_size}^2, channels-last, "
          f"device {device}, median of {max(args.steps, 3) * 4} calls each, alternating:", flush=True)
    for dtype in (torch.float32, half):
        x = (torch.rand(b, 3, args.image_size, args.image_size, device=device) * 2 - 1).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        grad = torch.randn_like(x)
        times = {"reference": [], "ours": []}
        for i in range(max(args.steps, 3) * 4 + 2):
            for name, fn in (("reference", reference), ("ours", ours)):
                sync(device)
                t = time.perf_counter()
                fn(x).backward(grad)
                sync(device)
                if i >= 2:  # two warm-up rounds
                    times[name].append(time.perf_counter() - t)
        ref, new = (statistics.median(times[k]) * 1000 for k in ("reference", "ours"))
        print(f"  {str(dtype)[6:]:<9} reference {ref:8.2f} ms   ours {new:8.2f} ms   {ref / new:5.2f}x", flush=True)


def graph_check(args, device) -> None:
    """Issue 35: the CUT recipe's step (cut-gpu: projected D, DiffAugment, EMA) eager against captured in one CUDA
    graph (--cuda-graph), from one seed on the same random batches: images/s, what one step dispatches, and the
    largest difference of their losses over the first steps (the capture is taken at step 4). Without CUDA the
    graph-safe step runs uncaptured, so that the script itself is checked."""
    from benchmarks.profiling import describe, where_time_goes
    from training.graphs import CapturedStep, dispatch_counts

    small = dict(ngf=8, ndf=8, n_blocks=1) if args.small else {}
    b = int((args.batch_sizes or "8").split(",")[0])
    shape = (b, 3, args.image_size, args.image_size)
    losses, base = {}, None
    print(f"CUT step, {args.image_size}^2, batch {b}, --discriminator {args.discriminator}, device {device}:",
          flush=True)
    for captured in (False, True):  # each row printed as it is measured: a capture that fails keeps the eager row
        torch.manual_seed(0)
        cfg = preset_config("cut-gpu", photos="x", paintings="y", out="unused", image_size=args.image_size,
                            batch_size=b, discriminator=args.discriminator, cuda_graph=captured, **small)
        trainer = CUT(cfg, device, total_steps=100_000)
        capture = captured and device.type == "cuda"
        step = CapturedStep(trainer) if capture else trainer.step
        data = torch.Generator().manual_seed(1)
        batches = [tuple(trainer.nets.to_input(torch.randint(0, 256, shape, dtype=torch.uint8, generator=data))
                         for _ in "pm") for _ in range(8)]
        torch.manual_seed(2)
        losses[captured] = torch.stack([step(*batches[i]).float().cpu() for i in range(8)])
        counts = dispatch_counts(step, *batches[0])
        sync(device)
        t = time.perf_counter()
        for i in range(args.steps):
            step(*batches[i % 8])
        sync(device)
        rate = args.steps * b / (time.perf_counter() - t)
        label = "captured (--cuda-graph)" if capture else (
            "graph-safe, not captured (no CUDA)" if captured else "eager")
        if capture and step.failed:
            label = "capture failed: eager"
            print(f"  the capture failed: {step.failed}", flush=True)
        base = base or rate
        print(f"  {label:<36} {rate:8.1f} images/s  {rate / base:5.2f}x   per step: {counts['ops']} operators, "
              f"{counts['launches']} launches, {sum(counts['syncs'].values())} host syncs ({trainer.nets.dtype or 'fp32'})",
              flush=True)
        try:  # one more step under the profiler: the GPU's busy share and its largest kernels (CPU: operators)
            print(describe(where_time_goes(step, *batches[1], cuda=device.type == "cuda")), flush=True)
        except Exception as exc:  # a profiler that fails on the card costs its lines, not the figures above
            print(f"    profile failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    gap = (losses[True] - losses[False]).abs()
    print(f"  losses over 8 steps, captured - eager: largest {gap.max():.4g} (relative "
          f"{(gap / losses[False].abs().clamp_min(1e-3)).max():.3g}); eager's last {losses[False][-1].tolist()}")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scan", metavar="DIR", help="time the folder scan of DIR against a full decode of each file")
    p.add_argument("--end-to-end", action="store_true", help="time python -m training.fit on real folders")
    p.add_argument("--photos", help="--end-to-end: photo folder")
    p.add_argument("--paintings", help="--end-to-end: painting folder")
    p.add_argument("--against", help="--end-to-end: also time this git revision (a worktree), alternating")
    p.add_argument("--repeats", type=int, default=2, help="--end-to-end: runs of each")
    p.add_argument("--fit-args", default="", help="--end-to-end: more training.fit flags, e.g. '--discriminator "
                   "projected'")
    p.add_argument("--presets", default="cyclegan,kaggle")
    p.add_argument("--models", default="cyclegan,fastcut",
                   help="objectives to time as ours (cyclegan, cut, fastcut; CUT needs a resnet preset)")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-sizes", default=None, help="ours; default 1,4 on CPU and 1,8 on CUDA")
    p.add_argument("--compile", action="store_true", help="also measure ours with torch.compile")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--small", action="store_true", help="tiny networks, for a smoke test of this script")
    p.add_argument("--graph-check", action="store_true", help="the CUT recipe's step eager against captured in a "
                   "CUDA graph: images/s, launches and host syncs per step, the losses' largest difference "
                   "(--image-size, first of --batch-sizes, --discriminator, --steps timed)")
    p.add_argument("--discriminator", default="projected", help="--graph-check: patch, projected or both")
    p.add_argument("--augment", action="store_true", help="DiffAugment as training does it against the reference "
                   "port, forward and backward (--image-size, first of --batch-sizes)")
    args = p.parse_args()
    if args.scan:
        return scan(args.scan)
    if args.end_to_end:
        if not (args.photos and args.paintings):
            p.error("--end-to-end needs --photos and --paintings")
        args.steps = args.steps if args.steps != 3 else 60
        return end_to_end(args)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    sizes = [int(b) for b in (args.batch_sizes or ("1,8" if device.type == "cuda" else "1,4")).split(",")]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.graph_check:
        return graph_check(args, device)
    if args.augment:
        return augment_check(args, device)
    for preset in args.presets.split(","):
        small = dict(ngf=8, ndf=8, n_blocks=1) if args.small else {}
        cfg = preset_config(preset, image_size=args.image_size, load_size=0, **small)
        torch.manual_seed(0)
        base = measure(baseline_step_fn(cfg, device), 1, device, args.steps, args.image_size)
        print(f"[{preset}] device {device}: baseline (eager fp32, batch 1): {base:7.2f} images/s  1.00x", flush=True)
        models = [m for m in args.models.split(",") if m == "cyclegan" or cfg.generator == "resnet"]
        for model, compiled, b in itertools.product(models, [False, True] if args.compile else [False], sizes):
            cfg_b = preset_config(preset, image_size=args.image_size, load_size=0, batch_size=b, compile=compiled,
                                  model=model, **small)
            trainer = (CycleGAN if model == "cyclegan" else CUT)(cfg_b, device, total_steps=10_000)
            ours = measure(lambda x, y: trainer.step(trainer.nets.to_input(x), trainer.nets.to_input(y)),
                           b, device, args.steps, args.image_size)
            label = (f"{model} step ({str(trainer.nets.dtype or 'fp32').replace('torch.', '')}, batch {b}"
                     f"{', compiled' if compiled else ''})")
            print(f"[{preset}] {label:<48}: {ours:7.2f} images/s  {ours / base:.2f}x", flush=True)


if __name__ == "__main__":
    main()
