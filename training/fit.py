"""`python -m training.fit`: train a photo<->Monet CycleGAN on two folders of images.

Single process:  python -m training.fit --photos DIR --paintings DIR --out RUN_DIR --preset cyclegan
Several GPUs:    torchrun --nproc-per-node 4 -m training.fit ... (DistributedDataParallel)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from model.weights import atomic_write, save_generator
from training.augment import parse_policy
from training.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from training.config import PRESETS, TrainConfig, preset_config
from training.cut import CUTTrainer
from training.cyclegan import CycleGANTrainer
from training.data import DataError, StepSampler, UnpairedDataset, scan_folder
from training.export import export_checkpoint, training_summary
from training.trainer import Trainer
from training.validation import Validator, split_validation

TRAINERS = {"cyclegan": CycleGANTrainer, "cut": CUTTrainer, "fastcut": CUTTrainer}


class RunError(ValueError):
    """A problem with the run folder or the options; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# hardware


def _quiet_worker(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, which saves a checkpoint and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Stopper:
    """Turns SIGINT/SIGTERM into a request to save a checkpoint and leave the loop."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


# ---------------------------------------------------------------------------------------------
# command line

LENGTH_FIELDS = ("epochs", "steps", "steps_per_epoch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.fit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every preset value can be overridden by its flag; the resolved configuration is written to "
        "RUN_DIR/config.json and stored in every checkpoint.")
    p.add_argument("--photos", type=Path, default=None, help="folder of photos (domain A); --resume reads it from the run")
    p.add_argument("--paintings", type=Path, default=None,
                   help="folder of paintings (domain B); --resume reads it from the run")
    p.add_argument("--out", type=Path, required=True, help="run folder for config, checkpoints, samples, metrics")
    p.add_argument("--preset", default="cyclegan", choices=list(PRESETS),
                   help="starting recipe: cyclegan (paper), kaggle (tutorial U-Net), cpu (FastCUT for 2 cores, "
                        "9,000 steps, about an hour)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--resume-if-present", action="store_true",
                   help="continue the run in --out if it has a checkpoint, else start it (for Jobs that may be "
                        "rescheduled: the same command line starts and resumes)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (torchrun: each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--stop-at-step", type=int, default=0,
                   help="save a checkpoint and stop after this step (continue later with --resume)")
    p.add_argument("--max-minutes", type=float, default=0,
                   help="stop (validate, checkpoint, exit) after this many minutes of training, validation time "
                        "not counted; for comparing recipes at equal wall-clock time (continue with --resume)")
    p.add_argument("--no-export", action="store_true", help="don't write RUN_DIR/photo2monet.safetensors at the end")
    g = p.add_argument_group("hyperparameters (default: the preset's)")
    helps = {
        "generator": "resnet | unet", "ngf": "generator width", "n_blocks": "residual blocks (resnet)",
        "upsample": "resnet upsampling: transpose (paper) | resize (no checkerboard)",
        "ndf": "discriminator width", "gan_loss": "lsgan | bce", "pool_size": "image pool size (0: off)",
        "lambda_cycle": "cycle-consistency weight", "lambda_identity": "identity weight (x lambda_cycle)",
        "lr": "Adam learning rate for a global batch of 1", "beta1": "Adam beta1", "beta2": "Adam beta2",
        "decay": "linear (second half to zero) | none", "load_size": "resize to this before cropping (0: keep)",
        "image_size": "crop size fed to the networks", "flip": "random horizontal flips (true/false)",
        "batch_size": "images per step per process", "num_workers": "data loading processes",
        "epochs": "number of epochs", "steps_per_epoch": "steps per epoch (0: one pass over the photos)",
        "steps": "total steps (overrides epochs)", "seed": "random seed",
        "precision": "auto | fp32 | bf16 | fp16", "compile": "torch.compile the networks (true/false)",
        "log_every": "steps between log lines", "checkpoint_every": "steps between checkpoints",
        "keep_checkpoints": "checkpoints to keep", "samples": "photos in the per-epoch sample grid",
        "model": "objective: cyclegan (two generators, cycle loss) | cut | fastcut (one generator, PatchNCE; "
                 "roughly a third of CycleGAN's compute per step)",
        "lambda_nce": "PatchNCE weight (0: the paper's, 1 for cut, 10 for fastcut)",
        "num_patches": "patches per layer in PatchNCE", "nce_t": "PatchNCE temperature",
        "diffaugment": "DiffAugment policy on everything D sees, real and fake, in D and G steps: any of "
                       "color,translation,cutout (empty: off)",
        "ema": "keep an exponential moving average of G with this decay (e.g. 0.999; 0: off); "
               "validation, samples and export use it",
        "lr_d_mult": "discriminator learning rate = lr x this",
        "eval_every": "steps between validations: KID of G(validation photos) vs the paintings, logged and "
                      "used to keep RUN_DIR/best.safetensors (0: off; needs the eval extra)",
        "val_photos": "folder of validation photos (default: hold out --val-fraction of --photos)",
        "val_fraction": "share of --photos held out for validation (0: min(200 photos, 10%%))",
    }
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset":
            continue
        kind = {bool: _bool, int: int, float: float, str: str}[type(f.default)]
        g.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                       metavar=f.name.upper(), help=helps.get(f.name, ""))
    return p


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, dict]:
    """The run's configuration, and the folders a resumed run's config.json names ({} for a new run)."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "preset"}
    if args.resume_if_present:  # a run that never checkpointed has nothing to lose: start it again
        args.resume = bool(list_checkpoints(args.out))
    if args.resume:
        config_file = args.out / "config.json"
        if not config_file.is_file():
            raise RunError(f"nothing to resume: {args.out} holds no run (no config.json)")
        try:
            saved = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunError(f"{config_file} is damaged; restore it or start a new run with another --out") from None
        folders = saved.get("folders", {})
        saved |= {k: v for k, v in overrides.items() if v is not None}
        return TrainConfig.from_dict(saved), folders
    if not args.resume_if_present and ((args.out / "config.json").exists() or (args.out / "checkpoints").exists()):
        raise RunError(f"{args.out} already holds a run; pass --resume to continue it or choose another --out")
    return preset_config(args.preset, **overrides), {}


def resolve_folders(args: argparse.Namespace, saved: dict) -> tuple[Path, Path]:
    """--photos and --paintings: required for a new run; a resumed run reads them from its config.json
    (``saved``), and a folder given on the command line wins (with a note when it differs)."""
    folders = []
    for name in ("photos", "paintings"):
        given, before = getattr(args, name), saved.get(name)
        if given is None and before is None:
            raise RunError(f"--{name} is required" + (" (the run folder does not name it)" if args.resume else ""))
        if given is not None and before is not None and Path(given).resolve() != Path(before):
            print(f"note: --{name} {given} differs from the run's {before}; using {given}", flush=True)
        folders.append(Path(given if given is not None else before))
    return folders[0], folders[1]


def check_config(cfg: TrainConfig) -> None:
    if cfg.model not in TRAINERS:
        raise RunError(f"--model must be one of {', '.join(TRAINERS)}, not {cfg.model!r}")
    if cfg.model != "cyclegan" and cfg.generator != "resnet":
        raise RunError(f"--model {cfg.model} takes its features from the resnet generator; use --generator resnet")
    try:
        parse_policy(cfg.diffaugment)
    except ValueError as exc:
        raise RunError(f"--diffaugment: {exc}") from None
    if not 0.0 <= cfg.ema < 1.0 or cfg.lr_d_mult <= 0 or cfg.nce_t <= 0 or cfg.lambda_nce < 0:
        raise RunError("--ema must be in [0, 1); --lr-d-mult and --nce-t positive; --lambda-nce not negative")
    if cfg.eval_every < 0 or not 0.0 <= cfg.val_fraction <= 0.5 or cfg.num_patches < 1:
        raise RunError("--eval-every must not be negative, --val-fraction in [0, 0.5], --num-patches at least 1")
    if cfg.generator not in ("resnet", "unet"):
        raise RunError(f"--generator must be resnet or unet, not {cfg.generator!r}")
    if cfg.upsample not in ("transpose", "resize"):
        raise RunError(f"--upsample must be transpose or resize, not {cfg.upsample!r}")
    if cfg.generator == "unet" and cfg.image_size % 256:
        raise RunError(f"the unet generator needs --image-size a multiple of 256, not {cfg.image_size}")
    if cfg.generator == "resnet" and cfg.image_size % 4:
        raise RunError(f"the resnet generator needs --image-size a multiple of 4, not {cfg.image_size}")
    if cfg.image_size < 16:
        raise RunError(f"--image-size must be at least 16, not {cfg.image_size}")
    if cfg.lr <= 0 or cfg.lambda_cycle < 0 or cfg.lambda_identity < 0 or cfg.pool_size < 0 or cfg.steps < 0:
        raise RunError("--lr must be positive; --lambda-*, --pool-size and --steps must not be negative")
    if cfg.load_size and cfg.load_size < cfg.image_size:
        raise RunError(f"--load-size {cfg.load_size} is smaller than --image-size {cfg.image_size}")
    if cfg.decay not in ("linear", "none") or cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise RunError("--decay must be linear|none and --precision auto|fp32|bf16|fp16")
    for name in ("batch_size", "log_every", "checkpoint_every", "ngf", "ndf", "n_blocks", "epochs"):
        if getattr(cfg, name) < 1:
            raise RunError(f"--{name.replace('_', '-')} must be at least 1")


def total_steps_of(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return cfg.steps if cfg.steps > 0 else cfg.epochs * steps_per_epoch


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    try:
        cfg, saved_folders = resolve_config(args)
        check_config(cfg)
        args.photos, args.paintings = resolve_folders(args, saved_folders)
        if args.device == "auto":
            device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        elif args.device == "cuda":
            if not torch.cuda.is_available():
                raise RunError("--device cuda asked for, but CUDA is not available here")
            device = torch.device(f"cuda:{local_rank}")
        elif args.device == "cpu":
            device = torch.device("cpu")
        else:
            raise RunError(f"--device must be auto, cpu or cuda, not {args.device!r}")
        photos = scan_folder(args.photos, "photos", 0 if cfg.load_size else cfg.image_size)
        paintings = scan_folder(args.paintings, "paintings", 0 if cfg.load_size else cfg.image_size)
        if cfg.val_photos:
            val_files = scan_folder(cfg.val_photos, "validation photos").files
        else:  # hold out a fixed part of the photos; training never sees them
            photos.files, val_files = split_validation(photos.files, cfg.val_fraction)
        resume_state = None
        if args.resume:
            resume_state = load_checkpoint(latest_checkpoint(args.out), map_location="cpu")
    except (RunError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return train(cfg, args, device, photos, paintings, val_files, resume_state, rank, world_size, local_rank)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def make_validator(cfg: TrainConfig, device, val_files, paintings, amp_dtype) -> Validator | None:
    """The run's validator, or None (with the reason printed once) when validation can't run."""
    from training.evaluate import eval_extra_missing

    if cfg.eval_every == 0:
        return None
    if len(val_files) < 2:
        print("validation: off (fewer than 2 validation photos; pass --val-photos or more photos)", flush=True)
        return None
    if (missing := eval_extra_missing()) is not None:
        print(f"validation: off (the eval extra is not installed: {missing})", flush=True)
        return None
    print(f"validation: KID on {len(val_files)} held-out photos every {cfg.eval_every} steps", flush=True)
    return Validator(val_files, paintings.files, device, amp_dtype=amp_dtype)


def train(cfg, args, device, photos, paintings, val_files, resume_state, rank, world_size, local_rank) -> int:
    main_rank = rank == 0
    out: Path = args.out
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        cores = len(os.sched_getaffinity(0))
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.manual_seed(cfg.seed)
    steps_per_epoch = cfg.steps_per_epoch or math.ceil(len(photos.files) / (cfg.batch_size * world_size))
    total = total_steps_of(cfg, steps_per_epoch)
    trainer: Trainer = TRAINERS[cfg.model](cfg, device, total, world_size, local_rank)
    best = {"kid": float("inf"), "step": 0}
    seconds_before = 0.0
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
        best = resume_state.get("best", best)
        seconds_before = float(resume_state.get("summary", {}).get("train_seconds", 0.0))
        del resume_state
    start = trainer.step_count
    stop_at = min(total, args.stop_at_step) if args.stop_at_step > 0 else total

    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        folders = {"photos": str(args.photos.resolve()), "paintings": str(args.paintings.resolve())}
        saved = json.loads(cfg.to_json()) | {"folders": folders}
        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(saved, indent=2, sort_keys=True)))
        print(f"photos: {len(photos.files)} ({photos.skipped} unreadable skipped), paintings: "
              f"{len(paintings.files)} ({paintings.skipped} unreadable skipped); device {device}"
              f"{f' x{world_size}' if world_size > 1 else ''}, precision {trainer.amp_dtype or 'fp32'}; "
              f"steps {start}->{stop_at} of {total} ({steps_per_epoch} per epoch)", flush=True)

    dataset = UnpairedDataset(photos, paintings, cfg.load_size, cfg.image_size, cfg.flip, cfg.seed)
    sampler = StepSampler(len(dataset), steps_per_epoch, cfg.batch_size, cfg.seed, start, stop_at, rank, world_size)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False, worker_init_fn=_quiet_worker,
                        prefetch_factor=4 if cfg.num_workers else None)
    sample_photos = torch.stack([dataset[(0, i)][0] for i in range(min(cfg.samples, len(dataset)))])
    validator = make_validator(cfg, device, val_files, paintings, trainer.amp_dtype) if main_rank else None

    stopper = Stopper()
    summary = {"photos": len(photos.files), "paintings": len(paintings.files), "device": str(device.type),
               "world_size": world_size, "steps_per_epoch": steps_per_epoch, "total_steps": total}
    metrics = open(out / "metrics.jsonl", "a") if main_rank else None
    board = tensorboard_writer(out) if main_rank else None
    bar = None
    if main_rank:
        from tqdm import tqdm
        bar = tqdm(total=stop_at, initial=start, unit="step", dynamic_ncols=True, disable=None)
    running = torch.zeros(len(trainer.loss_names), device=device)
    t_log, n_log = time.perf_counter(), 0
    t_start, val_seconds = time.perf_counter(), [0.0]

    def train_seconds() -> float:  # this run's training time over all its invocations, validation excluded
        return seconds_before + time.perf_counter() - t_start - val_seconds[0]

    def checkpoint():
        if main_rank:
            state = trainer.state_dict()
            state["summary"] = summary | {"train_seconds": round(train_seconds(), 1)}
            state["best"] = best
            save_checkpoint(out, trainer.step_count, state, cfg.keep_checkpoints)

    interrupted = out_of_time = False
    budget = args.max_minutes * 60 - seconds_before if args.max_minutes > 0 else float("inf")
    for photo_u8, monet_u8 in loader:
        running += trainer.step(trainer.to_input(photo_u8), trainer.to_input(monet_u8))
        step, n_log = trainer.step_count, n_log + 1
        if bar is not None:
            bar.update(1)
        out_of_time = time.perf_counter() - t_start - val_seconds[0] >= budget
        stop_now = stopper.requested or out_of_time
        if step % cfg.log_every == 0 or step == stop_at:
            if world_size > 1:  # ranks agree on stopping here, where they synchronise anyway
                flag = torch.tensor([float(stop_now)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop_now = bool(flag.item())
            losses = (running / n_log).tolist()  # the one host sync per logging interval
            rate = n_log * cfg.batch_size * world_size / (time.perf_counter() - t_log)
            record = {"step": step, "epoch": step / steps_per_epoch, "lr": trainer.sched_G.get_last_lr()[0],
                      "images_per_s": round(rate, 3)}
            record |= dict(zip(trainer.loss_names, (round(v, 5) for v in losses)))
            if main_rank:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if board is not None:
                    for key, value in record.items():
                        if key != "step":
                            board.add_scalar(f"train/{key}", value, step)
                bar.set_postfix(G=f"{losses[0]:.3f}", D=f"{sum(losses[len(losses) // 2 + 1:]):.3f}",
                                ips=f"{rate:.2f}", **({"kid": f"{best['kid']:.4f}"} if best["step"] else {}))
            summary["final_losses"] = record
            running.zero_()
            t_log, n_log = time.perf_counter(), 0
        elif world_size > 1:
            stop_now = False  # only stop where all ranks agreed
        last = step == stop_at or (stop_now and not stopper.requested)  # a signal means: save and go, quickly
        if validator is not None and (step % cfg.eval_every == 0 or last):
            t_val = time.perf_counter()
            validate(trainer, validator, out, step, best, summary, metrics, board, train_seconds())
            val_seconds[0] += time.perf_counter() - t_val
        if main_rank and (step % steps_per_epoch == 0 or last):
            grid = trainer.sample_grid(sample_photos)
            path = out / "samples" / f"epoch_{math.ceil(step / steps_per_epoch):03d}_step_{step:08d}.png"
            from torchvision.utils import save_image
            atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))
        if step % cfg.checkpoint_every == 0 and not stop_now and step != stop_at:
            checkpoint()
        if stop_now and step != stop_at:
            interrupted = True
            break
    if bar is not None:
        bar.close()
    checkpoint()
    if world_size > 1:
        check_ranks_identical(trainer, out if main_rank else None)
    if metrics is not None:
        metrics.close()
    if board is not None:
        board.close()
    if not main_rank:
        return 0
    step = trainer.step_count
    if interrupted and out_of_time and not stopper.requested:
        print(f"time budget of {args.max_minutes:g} minutes reached at step {step}; checkpoint saved. "
              "Continue with --resume.", flush=True)
        return 0
    if interrupted:
        print(f"interrupted at step {step}; checkpoint saved. Continue with --resume.", flush=True)
        return 0
    if step < total:
        print(f"stopped at step {step} of {total}; checkpoint saved. Continue with --resume.", flush=True)
        return 0
    if not args.no_export:
        path = export_checkpoint(latest_checkpoint(out), out / "photo2monet.safetensors")
        print(f"done: {step} steps; photo->Monet generator written to {path}", flush=True)
    return 0


def validate(trainer: Trainer, validator: Validator, out: Path, step: int, best: dict, summary: dict, metrics,
             board, seconds: float) -> None:
    """Score the generator on the validation photos; log it; keep RUN_DIR/best.safetensors the best so far."""
    value = validator.kid(trainer.generator())
    record = {"step": step, "val_kid": round(value, 6), "train_seconds": round(seconds, 1)}
    if value < best["kid"]:
        best.update(kid=value, step=step)
        training = training_summary(trainer.cfg, {"step": step}) | summary | {"val_kid": value}
        save_generator(out / "best.safetensors", trainer.generator(), training=training)
        record["best"] = True
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()
    if board is not None:
        board.add_scalar("val/kid", value, step)
    from tqdm import tqdm

    tqdm.write(f"step {step}: validation KID {value:.4f} (best {best['kid']:.4f} at step {best['step']})")


def tensorboard_writer(out: Path):
    """A TensorBoard writer for RUN_DIR/tensorboard when the optional `tensorboard` package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def check_ranks_identical(trainer: Trainer, out: Path | None) -> None:
    """Compare a checksum of every rank's weights; record the verdict in RUN_DIR/ddp_check.json."""
    params = [p.detach().double().sum() for m in (trainer.gens, trainer.discs) for p in m.parameters()]
    mine = torch.stack(params).to(trainer.device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    identical = all(torch.equal(everyone[0], other) for other in everyone[1:])
    if out is not None:
        report = {"world_size": len(everyone), "ranks_identical": identical,
                  "checksums": [float(t.sum()) for t in everyone]}
        atomic_write(out / "ddp_check.json", lambda tmp: Path(tmp).write_text(json.dumps(report)))


if __name__ == "__main__":
    sys.exit(main())
