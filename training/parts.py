"""What the objectives share, as parts they compose (no base class): the GAN loss, and ``Networks``, which
holds a generator module and a discriminator module with their optimisers, schedules, mixed precision,
EMA copy, DDP/compile wrappers and step counter, and writes and reads them as checkpoint state.

An objective (training.cyclegan.CycleGAN, training.cut.CUT) builds its two modules, hands them to
``Networks``, and does its update in its own ``step``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F_
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from model.networks import InstanceNorm2d, instance_norm_nhwc
from model.runtime import autocast_dtype
from training.config import TrainConfig
from training.ema import EMA


MAX_SCALED_LR = 3e-4  # the largest lr the sqrt(batch) rule gives that trained well (batch 8 on the H200 screen)


def scaled_lr(base: float, global_batch: int) -> tuple[float, bool]:
    """(Adam's lr, whether the cap bound): ``base`` is the lr for a global batch of 1, scaled by sqrt(global
    batch) (Adam-friendly rule, README), but never past ``MAX_SCALED_LR`` (or ``base`` where that is higher):
    at batch 32 the rule gave 5.7e-4 and the CUT run diverged (issue 35: hidden KID x1000 319 against 14-17 at
    batch 8, 2.8e-4), without a word to the user."""
    lr = base * math.sqrt(global_batch)
    cap = max(MAX_SCALED_LR, base)
    return (cap, True) if lr > cap else (lr, False)


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


def lr_factor(total_steps: int, decay: str):
    """The schedule: constant, then (``decay="linear"``) linearly to zero over the second half."""
    decay_from = total_steps // 2 if decay == "linear" else total_steps

    def factor(step: int) -> float:
        if step < decay_from:
            return 1.0
        return max(0.0, 1.0 - (step - decay_from) / max(1, total_steps - decay_from))

    return factor


COMPILE_NORM_STEPS = 1000  # compile_norm "auto": schedules this long pay back the compilation many times over


@functools.cache
def compiled_norm_kernel(dtype: torch.dtype):
    """``instance_norm_nhwc`` through ``torch.compile`` (shapes dynamic, so one compilation serves every layer),
    or None where it cannot compile here (no C++ compiler, say), with a one-line notice. One forward and
    backward on a small NHWC tensor of ``dtype`` decides, so that a failure shows here and not mid-step."""
    kernel = torch.compile(instance_norm_nhwc, dynamic=True)
    try:
        x = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(0))  # the run's RNG stays untouched
        x = x.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        kernel(x, None, None, 1e-5).float().sum().backward()
    except Exception as exc:  # noqa: BLE001 -- any failure to compile means PyTorch's own kernel
        first_line = (str(exc).splitlines() or [""])[0][:160]
        print(f"compile_norm: off, torch.compile failed here ({type(exc).__name__}: {first_line}); the instance "
              "norms use PyTorch's kernel", file=sys.stderr, flush=True)
        return None
    return kernel


class Networks:
    """``gens`` (a module whose ``G`` is the photo->Monet generator) and ``discs``, ready to train.

    ``gens_run`` and ``discs_run`` are what the update calls (DDP wrappers when world_size > 1, the modules
    themselves otherwise); with ``cfg.compile`` the modules are compiled in place. A generator update uses
    ``discs`` itself, frozen, so DDP never waits for gradients that are not computed.
    """

    def __init__(self, gens: nn.Module, discs: nn.Module, cfg: TrainConfig, device: torch.device, total_steps: int,
                 world_size: int = 1):
        self.cfg, self.device = cfg, device
        self.gens, self.discs = gens.to(device), discs.to(device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.gens.to(memory_format=self.memory_format)
        self.discs.to(memory_format=self.memory_format)
        lr, self.lr_capped = scaled_lr(cfg.lr, cfg.batch_size * world_size)
        # fused Adam on CUDA and CPU (one kernel over all parameters): on a 2-core AMX Xeon, G's and D's updates
        # took 12 ms a step against 20 ms for foreach, which on CPU still loops over the tensors
        fused = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
        betas = (cfg.beta1, cfg.beta2)
        # graph_safe (--cuda-graph): the step's kernels read every number that changes between steps from the
        # device (the lr, Adam's step count, the EMA weight), so one captured step can be replayed for all
        self.graph_safe = bool(cfg.cuda_graph)
        self.opt_G = torch.optim.Adam(self.gens.parameters(), lr=self._lr(lr), betas=betas, **fused,
                                      **self._capturable())
        trainable = [p for p in self.discs.parameters() if p.requires_grad]  # not a frozen feature network
        self.opt_D = torch.optim.Adam(trainable, lr=self._lr(lr * cfg.lr_d_mult), betas=betas, **fused,
                                      **self._capturable())
        # the schedules start from numbers (a tensor's would be read back from the device every step) and, when
        # graph_safe, fill the lr tensors the captured kernels read (tie_lr)
        self._lr_tensors = [g["lr"] for g in self._groups()] if self.graph_safe else []
        for group in self._groups():
            group["initial_lr"] = float(group["lr"])
        factor = lr_factor(total_steps, cfg.decay)
        self.sched_G = torch.optim.lr_scheduler.LambdaLR(self.opt_G, factor)
        self.sched_D = torch.optim.lr_scheduler.LambdaLR(self.opt_D, factor)
        if cfg.init_generator and not cfg.resume:  # fine-tune: G starts from a weight file (checked by config)
            from model.weights import load_generator

            self.gens.G.load_state_dict(load_generator(cfg.init_generator)[0].state_dict())
        self.dtype = autocast_dtype(device, cfg.precision)  # None: plain fp32
        compile_norm = cfg.compile_norm == "on" or (cfg.compile_norm == "auto" and total_steps >= COMPILE_NORM_STEPS)
        if compile_norm and cfg.channels_last and not cfg.compile and device.type == "cpu":
            kernel = compiled_norm_kernel(self.dtype or torch.float32)
            for m in (*self.gens.modules(), *self.discs.modules()):
                if isinstance(m, InstanceNorm2d):
                    m.nhwc_kernel = kernel
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.ema = EMA(self.gens.G, cfg.ema, device_weight=self.graph_safe) if cfg.ema > 0 else None
        if cfg.compile:
            import torch._inductor.config as inductor

            # the compiled networks draw PatchNCE's patches from PyTorch's generator, as the eager ones do (Inductor's
            # own random numbers would give another run from the same seed)
            inductor.fallback_random = True
            self.gens.compile()
            self.discs.compile()
        self.gens_run, self.discs_run = self.gens, self.discs
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None  # cuda:LOCAL_RANK (runtime.resolve_device)
            self.gens_run = DDP(self.gens, device_ids=ids, broadcast_buffers=False)
            self.discs_run = DDP(self.discs, device_ids=ids, broadcast_buffers=False)
        self.step = 0

    def _lr(self, lr: float) -> float | torch.Tensor:
        """An optimiser's lr: a number, or with ``graph_safe`` a tensor on the device that the schedule fills."""
        return torch.tensor(lr, dtype=torch.float32, device=self.device) if self.graph_safe else lr

    def _capturable(self) -> dict:
        return {"capturable": True} if self.graph_safe and self.device.type == "cuda" else {}

    def _groups(self) -> list[dict]:
        return [*self.opt_G.param_groups, *self.opt_D.param_groups]

    @property
    def lr(self) -> float:
        return float(self.sched_G.get_last_lr()[0])

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        # a captured step recasts the weights each replay: autocast's cache of casts must not outlive the capture
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=not self.graph_safe)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW from the loader -> float in [-1, 1] on the device, in the layout the update wants."""
        x = images.to(self.device, non_blocking=True)
        if not x.is_floating_point():
            x = x.float().div_(127.5).sub_(1.0)
        return x.contiguous(memory_format=self.memory_format)

    def update(self, loss: torch.Tensor, optimiser: torch.optim.Optimizer) -> None:
        """Backward ``loss`` (scaled in fp16) and step ``optimiser``."""
        self.scaler.scale(loss).backward()
        self.scaler.step(optimiser)

    def finish_step(self) -> None:
        """Scaler, schedules, EMA and the step counter, after both optimisers stepped."""
        self.begin_step()
        self.device_finish()
        self.end_step()

    def begin_step(self) -> None:
        """The host's part before a step's kernels: the EMA weight of this step's update."""
        if self.ema is not None:
            self.ema.advance()

    def device_finish(self) -> None:
        """The device's part after both optimisers stepped: the EMA update (kernels only)."""
        if self.ema is not None:
            self.ema.apply(self.gens.G)

    def end_step(self) -> None:
        """The host's part after a step: the scaler, the schedules (which fill the lr tensors when graph_safe)
        and the step counter."""
        self.scaler.update()
        self.sched_G.step()
        self.sched_D.step()
        self.tie_lr()
        self.step += 1

    def tie_lr(self) -> None:
        """With graph_safe, each optimiser's lr is the tensor its captured kernels read, holding the schedule's
        value (a PyTorch whose schedules assign a number in place of filling the tensor is caught here)."""
        for group, tensor in zip(self._groups(), self._lr_tensors):
            if group["lr"] is not tensor:
                tensor.fill_(float(group["lr"]))
                group["lr"] = tensor

    def generator(self) -> nn.Module:
        """The photo->Monet generator that validation and export use: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.gens.G

    def state_dict(self) -> dict:
        state = {
            "step": self.step,
            "config": dataclasses.asdict(self.cfg),
            "generators": self.gens.state_dict(),
            "discriminators": self.discs.state_dict(),
            "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
            "sched_G": self.sched_G.state_dict(), "sched_D": self.sched_D.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }
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
        for group in self._groups():  # numbers, whichever way it was saved; tie_lr puts graph_safe's tensors back
            group["lr"], group["initial_lr"] = float(group["lr"]), float(group.get("initial_lr", group["lr"]))
        self.sched_G.load_state_dict(state["sched_G"])
        self.sched_D.load_state_dict(state["sched_D"])
        self.tie_lr()
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:  # EMA switched on for a resumed run: start the average from the current weights
                self.ema = EMA(self.gens.G, self.cfg.ema, device_weight=self.graph_safe)
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.step = int(state["step"])


@torch.no_grad()
def sample_grid(columns: list[torch.Tensor]) -> torch.Tensor:
    """Rows of images side by side (e.g. photo | painting), each column a [-1, 1] NCHW batch, as one
    [0, 1] image tensor."""
    from torchvision.utils import make_grid

    rows = torch.stack([c.float() for c in columns], dim=1).flatten(0, 1)
    return make_grid(rows.cpu(), nrow=len(columns), normalize=True, value_range=(-1, 1), padding=2)
