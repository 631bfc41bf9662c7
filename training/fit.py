"""`python -m training.fit`: train a photo<->Monet CycleGAN on two folders of images.

Single process:  python -m training.fit --photos DIR --paintings DIR --out RUN_DIR --preset cyclegan
Several GPUs:    torchrun --nproc-per-node 4 -m training.fit ... (DistributedDataParallel)
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from model.runtime import keep_large_blocks, resolve_device, use_cpu_threads
from model.weights import atomic_write, save_generator
from training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from training.config import ConfigError, TrainConfig, config_from_args
from training.data import CropKeys, DataError, StepSampler, UnpairedDataset, memory_banks, scan_folder
from training.export import export_checkpoint, training_summary
from training.objectives import OBJECTIVES
from training.run import RunLog, RunState, Stopper, all_agree, check_ranks_identical, quiet_worker
from training.validation import Validator, split_validation


def main(argv: list[str] | None = None) -> int:
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    try:
        cfg = config_from_args(argv, __doc__)
        device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        check_cuda_graph(cfg, device, world_size)
        checkpoint = load_checkpoint(latest_checkpoint(Path(cfg.out)), map_location="cpu") if cfg.resume else None
        data = load_data(cfg)
    except (ConfigError, DataError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return train(cfg, device, data, checkpoint, rank, world_size)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def train(cfg: TrainConfig, device: torch.device, data: dict, checkpoint: dict | None, rank: int = 0,
          world_size: int = 1) -> int:
    """Train from ``checkpoint`` (None: from scratch) to the end of the schedule, ``cfg.stop_at_step``, the
    time budget or a signal; checkpoint; export at the end of the schedule. Returns the exit code."""
    main_rank, out = rank == 0, Path(cfg.out)
    set_up_device(device, world_size, cfg.keep_memory)
    torch.manual_seed(cfg.seed)
    photos, paintings = data["photos"], data["paintings"]
    steps_per_epoch = cfg.steps_per_epoch or math.ceil(len(photos.files) / (cfg.batch_size * world_size))
    total = cfg.total_steps(steps_per_epoch)
    objective = OBJECTIVES[cfg.model](cfg, device, total, world_size)
    nets = objective.nets
    if checkpoint is not None:
        objective.load_state_dict(checkpoint)
    state = RunState({"photos": len(photos.files), "paintings": len(paintings.files), "device": device.type,
                      "world_size": world_size, "steps_per_epoch": steps_per_epoch, "total_steps": total}, checkpoint)
    del checkpoint
    start, stop_at = nets.step, min(total, cfg.stop_at_step) if cfg.stop_at_step > 0 else total
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(cfg.to_json()))
        print(f"photos: {len(photos.files)} ({photos.skipped} unreadable skipped), paintings: "
              f"{len(paintings.files)} ({paintings.skipped} unreadable skipped); device {device}"
              f"{f' x{world_size}' if world_size > 1 else ''}, precision {nets.dtype or 'fp32'}; "
              f"steps {start}->{stop_at} of {total} ({steps_per_epoch} per epoch)", flush=True)
        if getattr(nets, "lr_capped", False):
            print(f"lr: {cfg.lr:g} x sqrt(global batch {cfg.batch_size * world_size}) would be "
                  f"{cfg.lr * math.sqrt(cfg.batch_size * world_size):.2g}; capped at "
                  f"{nets.opt_G.param_groups[0]['initial_lr']:.2g} (larger GAN steps diverged at batch 32; "
                  "pass a higher --lr to go past it)", flush=True)
    dataset = UnpairedDataset(photos, paintings, cfg.load_size, cfg.image_size, cfg.flip, cfg.seed)
    sampler = StepSampler(len(dataset), steps_per_epoch, cfg.batch_size, cfg.seed, start, stop_at, rank, world_size)
    batches, where = data_batches(cfg, device, photos, paintings, dataset, sampler)
    if main_rank:
        print(f"data: {where}", flush=True)
    sample_photos = torch.stack([dataset[(0, i)][0] for i in range(min(cfg.samples, len(dataset)))])
    validator = make_validator(cfg, device, data["val_files"], paintings, nets.dtype) if main_rank else None
    log, stopper = RunLog(out, start, stop_at, enabled=main_rank), Stopper()
    budget = cfg.max_minutes * 60 - state.seconds_before if cfg.max_minutes > 0 else float("inf")
    running, t_log, n_log = torch.zeros(len(objective.loss_names), device=device), time.perf_counter(), 0
    d_losses = [objective.loss_names.index(name) for name in objective.d_loss_names]
    out_of_time = interrupted = False

    step_fn = objective.step
    if cfg.cuda_graph:
        from training.graphs import CapturedStep

        step_fn = CapturedStep(objective)
    for photo_u8, monet_u8 in batches:
        running += step_fn(nets.to_input(photo_u8), nets.to_input(monet_u8))
        step, n_log = nets.step, n_log + 1
        out_of_time = state.seconds() >= budget
        stop_now = stopper.requested or out_of_time
        if step % cfg.log_every == 0 or step == stop_at:
            stop_now = all_agree(stop_now, device, world_size)  # where the ranks synchronise anyway
            losses = (running / n_log).tolist()  # the one host sync per logging interval
            rate = n_log * cfg.batch_size * world_size / (time.perf_counter() - t_log)
            record = {"step": step, "epoch": step / steps_per_epoch, "lr": nets.lr, "images_per_s": round(rate, 3)}
            record |= dict(zip(objective.loss_names, (round(v, 5) for v in losses)))
            log.record(record)
            log.tick(G=f"{losses[0]:.3f}", D=f"{sum(losses[i] for i in d_losses):.3f}", ips=f"{rate:.2f}",
                     **({"kid": f"{state.best['kid']:.4f}"} if state.best["step"] else {}))
            state.summary["final_losses"] = record
            running.zero_()
            t_log, n_log = time.perf_counter(), 0
        else:
            log.tick()
            stop_now = stop_now and world_size == 1  # with several ranks, stop only where they agreed
        last = step == stop_at or (stop_now and not stopper.requested)  # a signal means: save and go, quickly
        if validator is not None and (step % cfg.eval_every == 0 or last):
            validate(objective, validator, state, log, out, step)
        if main_rank and (step % steps_per_epoch == 0 or last):
            write_samples(objective, sample_photos, out, step, steps_per_epoch)
        if step % cfg.checkpoint_every == 0 and not stop_now and step != stop_at and main_rank:
            save_checkpoint(out, step, objective.state_dict() | state.checkpoint_keys(), cfg.keep_checkpoints)
        if stop_now and step != stop_at:
            interrupted = True
            break

    log.close()
    if main_rank:
        save_checkpoint(out, nets.step, objective.state_dict() | state.checkpoint_keys(), cfg.keep_checkpoints)
    if world_size > 1:
        check_ranks_identical([nets.gens, nets.discs], device, out if main_rank else None)
    if main_rank:
        finish(cfg, out, nets.step, total, interrupted and out_of_time and not stopper.requested, interrupted)
    return 0


def check_cuda_graph(cfg: TrainConfig, device: torch.device, world_size: int) -> None:
    """Raise ConfigError where ``--cuda-graph`` cannot capture: no CUDA device, several processes, or a precision
    that resolves to fp16 here (its loss scaler reads the device every step)."""
    from model.runtime import autocast_dtype

    if not cfg.cuda_graph:
        return
    if device.type != "cuda":
        raise ConfigError(f"--cuda-graph needs a CUDA device; this run is on {device.type}")
    if world_size > 1:
        raise ConfigError("--cuda-graph captures one process's step; with torchrun leave it off")
    if autocast_dtype(device, cfg.precision) == torch.float16:
        raise ConfigError("--cuda-graph needs --precision bf16 or fp32 (this GPU's auto precision is fp16)")


def data_batches(cfg: TrainConfig, device: torch.device, photos, paintings, dataset: UnpairedDataset,
                 sampler: StepSampler):
    """The run's (photo, painting) uint8 batches in the sampler's order, and where they come from: decoded once
    into the device's memory and cropped there (``cfg.data_in_memory``), else read from disk by loader workers.
    Both give the same batches."""
    banks = memory_banks(photos, paintings, cfg.load_size, device, cfg.data_in_memory)
    if isinstance(banks, tuple):
        keys = CropKeys(*banks, cfg.image_size, cfg.flip, cfg.seed)
        loader = DataLoader(keys, batch_size=cfg.batch_size, sampler=sampler, num_workers=0)
        size = cfg.image_size
        batches = ((banks[0].crop(k[:, 0], size), banks[1].crop(k[:, 1], size)) for k in loader)
        held = sum(b.images.numel() for b in banks) / 2**30
        return batches, f"decoded once into {device.type} memory ({held:.2f} GiB), cropped there"
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=quiet_worker,
                        prefetch_factor=4 if cfg.num_workers else None)
    return loader, f"read from disk by {cfg.num_workers} loader workers (in memory: no, {banks})"


def load_data(cfg: TrainConfig) -> dict:
    """The run's photos, paintings and validation photos (a fixed share of the photos unless
    ``cfg.val_photos`` names a folder). Raises DataError."""
    photos = scan_folder(Path(cfg.photos), "photos", 0 if cfg.load_size else cfg.image_size)
    paintings = scan_folder(Path(cfg.paintings), "paintings", 0 if cfg.load_size else cfg.image_size)
    if cfg.val_photos:
        val_files = scan_folder(Path(cfg.val_photos), "validation photos").files
    else:  # hold out a fixed part of the photos; training never sees them
        photos.files, val_files = split_validation(photos.files, cfg.val_fraction)
    return {"photos": photos, "paintings": paintings, "val_files": val_files}


def set_up_device(device: torch.device, world_size: int, keep_memory: bool = True) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        use_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if keep_memory:
            keep_large_blocks()


def make_validator(cfg: TrainConfig, device, val_files, paintings, dtype) -> Validator | None:
    """The run's validator, or None (with the reason printed once) when validation can't run."""
    from training.metrics import eval_extra_missing

    if cfg.eval_every == 0:
        return None
    if len(val_files) < 2:
        print("validation: off (fewer than 2 validation photos; pass --val-photos or more photos)", flush=True)
        return None
    if (missing := eval_extra_missing()) is not None:
        print(f"validation: off (the eval extra is not installed: {missing})", flush=True)
        return None
    print(f"validation: KID on {len(val_files)} held-out photos every {cfg.eval_every} steps", flush=True)
    return Validator(val_files, paintings.files, device, amp_dtype=dtype)


def validate(objective, validator: Validator, state: RunState, log: RunLog, out: Path, step: int) -> None:
    """Score the generator on the validation photos (its time not counted as training); log it; keep
    RUN_DIR/best.safetensors the best so far, and every scored generator in RUN_DIR/validated/ (a few MB each)
    so that one can be picked afterwards by more than one figure (KID and texture KID)."""
    started = time.perf_counter()
    scores = validator.scores(objective.nets.generator())
    value = scores["kid"]
    record = {"step": step, "val_kid": round(value, 6), "val_texture_kid": round(scores["texture_kid"], 5),
              "train_seconds": round(state.train_seconds(), 1)}
    save_generator(out / "validated" / f"step_{step:08d}.safetensors", objective.nets.generator(),
                   training=training_summary(objective.cfg, {"step": step}) | state.summary
                   | {"val_kid": value, "val_texture_kid": scores["texture_kid"]})
    if state.improved(value, step):
        training = training_summary(objective.cfg, {"step": step}) | state.summary | {"val_kid": value}
        save_generator(out / "best.safetensors", objective.nets.generator(), training=training)
        record["best"] = True
    log.record(record, prefix="val")
    log.say(f"step {step}: validation KID {value:.4f} (best {state.best['kid']:.4f} at step {state.best['step']}), "
            f"texture KID {scores['texture_kid']:.4g}")
    state.paused += time.perf_counter() - started


def write_samples(objective, photos: torch.Tensor, out: Path, step: int, steps_per_epoch: int) -> None:
    from torchvision.utils import save_image

    grid = objective.sample_grid(photos)
    path = out / "samples" / f"epoch_{math.ceil(step / steps_per_epoch):03d}_step_{step:08d}.png"
    atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))


def finish(cfg: TrainConfig, out: Path, step: int, total: int, out_of_time: bool, interrupted: bool) -> None:
    """Say how the run ended; at the end of the schedule, export the generator."""
    if out_of_time:
        print(f"time budget of {cfg.max_minutes:g} minutes reached at step {step}; checkpoint saved. "
              "Continue with --resume.", flush=True)
    elif interrupted:
        print(f"interrupted at step {step}; checkpoint saved. Continue with --resume.", flush=True)
    elif step < total:
        print(f"stopped at step {step} of {total}; checkpoint saved. Continue with --resume.", flush=True)
    elif not cfg.no_export:
        path = export_checkpoint(latest_checkpoint(out), out / "photo2monet.safetensors")
        print(f"done: {step} steps; photo->Monet generator written to {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
