"""What every objective's trainer shares: optimisers and their schedule, mixed precision, the input
conversion, DiffAugment, the EMA generator, and the checkpoint state built from those pieces.

An objective (``training.cyclegan.CycleGANTrainer``, ``training.cut.CUTTrainer``) builds ``self.gens``
(a module whose ``G`` is the photo->Monet generator) and ``self.discs``, then calls ``setup``; its
``step`` does one update and returns its losses as one detached tensor (no host sync).
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F_
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from model.runtime import autocast_dtype as _autocast_dtype
from training.augment import DiffAugment
from training.config import TrainConfig
from training.ema import EMA


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``cfg.precision`` on ``device``; None means plain fp32."""
    return _autocast_dtype(device, cfg.precision)


class GANLoss(nn.Module):
    """Least-squares (lsgan) or binary cross-entropy on logits (bce) against a constant target."""

    def __init__(self, kind: str):
        super().__init__()
        if kind not in ("lsgan", "bce"):
            raise ValueError(f"unknown gan_loss {kind!r}; use lsgan or bce")
        self.kind = kind

    def forward(self, logits: torch.Tensor, real: bool) -> torch.Tensor:
        logits = logits.float()
        target = torch.full_like(logits, 1.0 if real else 0.0)
        if self.kind == "lsgan":
            return F_.mse_loss(logits, target)
        return F_.binary_cross_entropy_with_logits(logits, target)


class Trainer:
    """The shared half of a trainer. Subclasses set ``loss_names`` and implement ``step``."""

    loss_names: tuple[str, ...] = ()

    def __init__(self, cfg: TrainConfig, device: torch.device, total_steps: int, world_size: int = 1,
                 local_rank: int | None = None):
        self.cfg, self.device, self.total_steps = cfg, device, total_steps
        self.world_size, self.local_rank = world_size, local_rank
        self.gan_loss = GANLoss(cfg.gan_loss)
        self.augment = DiffAugment(cfg.diffaugment)
        self.amp_dtype = autocast_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.step_count = 0

    def setup(self, gens: nn.Module, discs: nn.Module) -> None:
        """Move the networks, build optimisers, schedules, the EMA copy and the DDP/compile wrappers."""
        cfg, device = self.cfg, self.device
        self.gens, self.discs = gens.to(device), discs.to(device)
        if device.type == "cuda":
            self.gens.to(memory_format=torch.channels_last)
            self.discs.to(memory_format=torch.channels_last)
        # lr for a global batch of 1, scaled by sqrt(global batch) (Adam-friendly rule, README)
        lr = cfg.lr * math.sqrt(cfg.batch_size * self.world_size)
        fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.opt_G = torch.optim.Adam(self.gens.parameters(), lr=lr, betas=(cfg.beta1, cfg.beta2), **fused)
        self.opt_D = torch.optim.Adam(self.discs.parameters(), lr=lr * cfg.lr_d_mult, betas=(cfg.beta1, cfg.beta2),
                                      **fused)
        decay_from = self.total_steps // 2 if cfg.decay == "linear" else self.total_steps
        total = self.total_steps

        def factor(step: int) -> float:
            if step < decay_from:
                return 1.0
            return max(0.0, 1.0 - (step - decay_from) / max(1, total - decay_from))

        self.sched_G = torch.optim.lr_scheduler.LambdaLR(self.opt_G, factor)
        self.sched_D = torch.optim.lr_scheduler.LambdaLR(self.opt_D, factor)
        self.ema = EMA(self.gens.G, cfg.ema) if cfg.ema > 0 else None
        # what runs the forward passes: DDP and/or torch.compile wrappers around the same modules
        self.gens_run, self.discs_run = self.gens, self.discs
        if self.world_size > 1:
            ids = [self.local_rank] if device.type == "cuda" else None
            self.gens_run = DDP(self.gens, device_ids=ids, broadcast_buffers=False)
            self.discs_run = DDP(self.discs, device_ids=ids, broadcast_buffers=False)
        if cfg.compile:
            self.gens_run = torch.compile(self.gens_run)
            self.discs_run = torch.compile(self.discs_run)
            self.discs_plain = torch.compile(self.discs)
        else:
            self.discs_plain = self.discs

    # -- helpers for ``step`` ------------------------------------------------------------------
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

    def finish_step(self) -> None:
        """Scaler, schedules, EMA and the step counter, after both optimisers stepped."""
        self.scaler.update()
        self.sched_G.step()
        self.sched_D.step()
        if self.ema is not None:
            self.ema.update(self.gens.G)
        self.step_count += 1

    def generator(self) -> nn.Module:
        """The photo->Monet generator that validation and export use: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.gens.G

    # -- checkpoint state --------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        state = {
            "step": self.step_count,
            "config": dataclasses.asdict(self.cfg),
            "generators": self.gens.state_dict(),
            "discriminators": self.discs.state_dict(),
            "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
            "sched_G": self.sched_G.state_dict(), "sched_D": self.sched_D.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        } | self.extra_state()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
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
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:  # EMA switched on for a resumed run: start the average from the current weights
                self.ema = EMA(self.gens.G, self.cfg.ema)
        self.load_extra_state(state)
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.step_count = int(state["step"])
