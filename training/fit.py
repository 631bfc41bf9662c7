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
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torchvision.utils import make_grid

from model.translator import native_bf16
from model.weights import atomic_write
from training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from training.config import PRESETS, TrainConfig, preset_config
from training.cyclegan import Discriminators, GANLoss, Generators, ImagePool
from training.data import DataError, StepSampler, UnpairedDataset, scan_folder
from training.export import export_checkpoint


class RunError(ValueError):
    """A problem with the run folder or the options; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# hardware


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``cfg.precision`` on ``device``; None means plain fp32."""
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    if cfg.precision == "fp16":
        return torch.float16
    return torch.bfloat16 if native_bf16(device) else None


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
# the training state and one step


class CycleGANTrainer:
    """Networks, optimisers, schedules and pools of one run; ``step`` does one CycleGAN update."""

    def __init__(self, cfg: TrainConfig, device: torch.device, total_steps: int, world_size: int = 1,
                 local_rank: int | None = None):
        self.cfg, self.device, self.total_steps = cfg, device, total_steps
        self.gens = Generators(cfg).to(device)
        self.discs = Discriminators(cfg).to(device)
        if device.type == "cuda":
            self.gens.to(memory_format=torch.channels_last)
            self.discs.to(memory_format=torch.channels_last)
        # lr for a global batch of 1, scaled by sqrt(global batch) (Adam-friendly rule, README)
        lr = cfg.lr * math.sqrt(cfg.batch_size * world_size)
        adam = dict(lr=lr, betas=(cfg.beta1, cfg.beta2))
        adam |= {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.opt_G = torch.optim.Adam(self.gens.parameters(), **adam)
        self.opt_D = torch.optim.Adam(self.discs.parameters(), **adam)
        decay_from = total_steps // 2 if cfg.decay == "linear" else total_steps

        def factor(step: int) -> float:
            if step < decay_from:
                return 1.0
            return max(0.0, 1.0 - (step - decay_from) / max(1, total_steps - decay_from))

        self.sched_G = torch.optim.lr_scheduler.LambdaLR(self.opt_G, factor)
        self.sched_D = torch.optim.lr_scheduler.LambdaLR(self.opt_D, factor)
        self.pool_photo = ImagePool(cfg.pool_size, seed=cfg.seed * 2 + 1)
        self.pool_monet = ImagePool(cfg.pool_size, seed=cfg.seed * 2 + 2)
        self.gan_loss = GANLoss(cfg.gan_loss)
        self.amp_dtype = autocast_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.step_count = 0
        # what runs the forward passes: DDP and/or torch.compile wrappers around the same modules
        self.gens_run, self.discs_run = self.gens, self.discs
        if world_size > 1:
            ids = [local_rank] if device.type == "cuda" else None
            self.gens_run = DDP(self.gens, device_ids=ids, broadcast_buffers=False)
            self.discs_run = DDP(self.discs, device_ids=ids, broadcast_buffers=False)
        if cfg.compile:
            self.gens_run = torch.compile(self.gens_run)
            self.discs_run = torch.compile(self.discs_run)
            self.discs_plain = torch.compile(self.discs)
        else:
            self.discs_plain = self.discs

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW from the loader -> float in [-1, 1] on the device."""
        return self.to_input_float(images.to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0))

    def to_input_float(self, images: torch.Tensor) -> torch.Tensor:
        """Float images already in [-1, 1] -> the device and memory layout the step wants."""
        x = images.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x

    def step(self, photo: torch.Tensor, monet: torch.Tensor) -> torch.Tensor:
        """One update of both generators, then both discriminators. Returns the detached losses
        [G_gan, cycle, identity, D_photo, D_monet] as one tensor on the device (no host sync)."""
        cfg, gan, l1 = self.cfg, self.gan_loss, torch.nn.functional.l1_loss
        n = photo.shape[0]
        # generators: D's parameters are frozen so its weight gradients are never computed
        self.discs.requires_grad_(False)
        self.opt_G.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.gens_run(photo, monet)
            d_photo, d_monet = self.discs_plain(out["fake_photo"], out["fake_monet"])
            loss_gan = gan(d_monet, True) + gan(d_photo, True)
            loss_cycle = (l1(out["rec_photo"].float(), photo) + l1(out["rec_monet"].float(), monet)) * cfg.lambda_cycle
            if out["idt_monet"] is not None:
                loss_idt = (l1(out["idt_monet"].float(), monet) + l1(out["idt_photo"].float(), photo)) * (
                    cfg.lambda_cycle * cfg.lambda_identity)
            else:
                loss_idt = torch.zeros((), device=self.device)
            loss_G = loss_gan + loss_cycle + loss_idt
        self.scaler.scale(loss_G).backward()
        self.scaler.step(self.opt_G)
        # discriminators: real against (pooled) fake, one batched forward for both
        self.discs.requires_grad_(True)
        fake_photo = self.pool_photo.query(out["fake_photo"].detach())
        fake_monet = self.pool_monet.query(out["fake_monet"].detach())
        self.opt_D.zero_grad(set_to_none=True)
        with self.autocast():
            d_photo, d_monet = self.discs_run(torch.cat([photo, fake_photo.to(photo.dtype)]),
                                              torch.cat([monet, fake_monet.to(monet.dtype)]))
            loss_D_photo = 0.5 * (gan(d_photo[:n], True) + gan(d_photo[n:], False))
            loss_D_monet = 0.5 * (gan(d_monet[:n], True) + gan(d_monet[n:], False))
        self.scaler.scale(loss_D_photo + loss_D_monet).backward()
        self.scaler.step(self.opt_D)
        self.scaler.update()
        self.sched_G.step()
        self.sched_D.step()
        self.step_count += 1
        return torch.stack([loss_gan, loss_cycle, loss_idt, loss_D_photo, loss_D_monet]).detach().float()

    # -- checkpoint state --------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "step": self.step_count,
            "config": dataclasses.asdict(self.cfg),
            "generators": self.gens.state_dict(),
            "discriminators": self.discs.state_dict(),
            "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
            "sched_G": self.sched_G.state_dict(), "sched_D": self.sched_D.state_dict(),
            "scaler": self.scaler.state_dict(),
            "pool_photo": self.pool_photo.state_dict(), "pool_monet": self.pool_monet.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.gens.load_state_dict(state["generators"])
        self.discs.load_state_dict(state["discriminators"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        self.sched_G.load_state_dict(state["sched_G"])
        self.sched_D.load_state_dict(state["sched_D"])
        self.scaler.load_state_dict(state["scaler"])
        self.pool_photo.load_state_dict(state["pool_photo"], self.device)
        self.pool_monet.load_state_dict(state["pool_monet"], self.device)
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.step_count = int(state["step"])

    @torch.no_grad()
    def sample_grid(self, photos: torch.Tensor) -> torch.Tensor:
        """Rows of photo | Monet-fied | reconstructed photo, as a [0, 1] image tensor."""
        self.gens.eval()
        x = self.to_input(photos)
        fake = self.gens.G(x)
        rec = self.gens.F(fake)
        self.gens.train()
        rows = torch.stack([x, fake.float(), rec.float()], dim=1).flatten(0, 1)
        return make_grid(rows.cpu(), nrow=3, normalize=True, value_range=(-1, 1), padding=2)


# ---------------------------------------------------------------------------------------------
# command line

LENGTH_FIELDS = ("epochs", "steps", "steps_per_epoch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.fit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every preset value can be overridden by its flag; the resolved configuration is written to "
        "RUN_DIR/config.json and stored in every checkpoint.")
    p.add_argument("--photos", type=Path, required=True, help="folder of photos (domain A)")
    p.add_argument("--paintings", type=Path, required=True, help="folder of paintings (domain B)")
    p.add_argument("--out", type=Path, required=True, help="run folder for config, checkpoints, samples, metrics")
    p.add_argument("--preset", default="cyclegan", choices=list(PRESETS),
                   help="starting recipe: cyclegan (paper), kaggle (tutorial U-Net), cpu (2 cores, ~2.5 h)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (torchrun: each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--stop-at-step", type=int, default=0,
                   help="save a checkpoint and stop after this step (continue later with --resume)")
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


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "preset"}
    if args.resume:
        config_file = args.out / "config.json"
        if not config_file.is_file():
            raise RunError(f"nothing to resume: {args.out} holds no run (no config.json)")
        try:
            saved = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunError(f"{config_file} is damaged; restore it or start a new run with another --out") from None
        saved |= {k: v for k, v in overrides.items() if v is not None}
        return TrainConfig.from_dict(saved)
    if (args.out / "config.json").exists() or (args.out / "checkpoints").exists():
        raise RunError(f"{args.out} already holds a run; pass --resume to continue it or choose another --out")
    return preset_config(args.preset, **overrides)


def check_config(cfg: TrainConfig) -> None:
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
        cfg = resolve_config(args)
        check_config(cfg)
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
        resume_state = None
        if args.resume:
            resume_state = load_checkpoint(latest_checkpoint(args.out), map_location="cpu")
    except (RunError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return train(cfg, args, device, photos, paintings, resume_state, rank, world_size, local_rank)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def train(cfg, args, device, photos, paintings, resume_state, rank, world_size, local_rank) -> int:
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
    trainer = CycleGANTrainer(cfg, device, total, world_size, local_rank)
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
        del resume_state
    start = trainer.step_count
    stop_at = min(total, args.stop_at_step) if args.stop_at_step > 0 else total

    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(cfg.to_json()))
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

    stopper = Stopper()
    summary = {"photos": len(photos.files), "paintings": len(paintings.files), "device": str(device.type),
               "world_size": world_size, "steps_per_epoch": steps_per_epoch, "total_steps": total}
    metrics = open(out / "metrics.jsonl", "a") if main_rank else None
    board = tensorboard_writer(out) if main_rank else None
    bar = None
    if main_rank:
        from tqdm import tqdm
        bar = tqdm(total=stop_at, initial=start, unit="step", dynamic_ncols=True, disable=None)
    running = torch.zeros(5, device=device)
    t_log, n_log = time.perf_counter(), 0
    t_start = time.perf_counter()

    def checkpoint():
        if main_rank:
            state = trainer.state_dict()
            state["summary"] = summary | {"train_seconds": round(time.perf_counter() - t_start, 1)}
            save_checkpoint(out, trainer.step_count, state, cfg.keep_checkpoints)

    interrupted = False
    for photo_u8, monet_u8 in loader:
        running += trainer.step(trainer.to_input(photo_u8), trainer.to_input(monet_u8))
        step, n_log = trainer.step_count, n_log + 1
        if bar is not None:
            bar.update(1)
        stop_now = stopper.requested
        if step % cfg.log_every == 0 or step == stop_at:
            if world_size > 1:  # ranks agree on stopping here, where they synchronise anyway
                flag = torch.tensor([float(stopper.requested)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop_now = bool(flag.item())
            losses = (running / n_log).tolist()  # the one host sync per logging interval
            rate = n_log * cfg.batch_size * world_size / (time.perf_counter() - t_log)
            record = {"step": step, "epoch": step / steps_per_epoch, "lr": trainer.sched_G.get_last_lr()[0],
                      "images_per_s": round(rate, 3)}
            record |= dict(zip(("G_gan", "cycle", "identity", "D_photo", "D_monet"), (round(v, 5) for v in losses)))
            if main_rank:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if board is not None:
                    for key, value in record.items():
                        if key != "step":
                            board.add_scalar(f"train/{key}", value, step)
                bar.set_postfix(G=f"{losses[0]:.3f}", cyc=f"{losses[1]:.3f}", D=f"{losses[3] + losses[4]:.3f}",
                                ips=f"{rate:.2f}")
            summary["final_losses"] = record
            running.zero_()
            t_log, n_log = time.perf_counter(), 0
        elif world_size > 1:
            stop_now = False  # only stop where all ranks agreed
        if main_rank and (step % steps_per_epoch == 0 or step == stop_at):
            grid = trainer.sample_grid(sample_photos)
            path = out / "samples" / f"epoch_{math.ceil(step / steps_per_epoch):03d}_step_{step:08d}.png"
            from torchvision.utils import save_image
            atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))
        if step % cfg.checkpoint_every == 0 and step != stop_at:
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


def tensorboard_writer(out: Path):
    """A TensorBoard writer for RUN_DIR/tensorboard when the optional `tensorboard` package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def check_ranks_identical(trainer: CycleGANTrainer, out: Path | None) -> None:
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
