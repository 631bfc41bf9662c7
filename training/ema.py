"""An exponential moving average of the generator's weights (Polyak averaging), used for validation
and export: it removes most of the step-to-step jitter a GAN generator's raw weights carry."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``module`` holds the average. ``update(live)`` after every step moves it towards ``live``.

    The effective decay ramps up as min(decay, (1 + t) / (10 + t)) so that early averages are not
    dominated by the random initial weights.

    With ``device_weight`` the step's weight lives in a tensor on the parameters' device, filled by ``advance``
    (host side, between steps) and read by ``apply`` (device side only, no Python number in its kernels): the form
    a captured CUDA graph replays (training/graphs.py). ``update`` is the two together.
    """

    def __init__(self, live: nn.Module, decay: float, device_weight: bool = False):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, not {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(live).eval().requires_grad_(False)
        self.weight: float | torch.Tensor = 0.0
        if device_weight:
            self.weight = torch.zeros((), device=next(self.module.parameters()).device)

    def advance(self) -> None:
        """Count the coming update and set its weight, 1 - min(decay, (1 + t) / (10 + t))."""
        self.updates += 1
        w = 1.0 - min(self.decay, (1 + self.updates) / (10 + self.updates))
        if isinstance(self.weight, torch.Tensor):
            self.weight.fill_(w)
        else:
            self.weight = w

    @torch.no_grad()
    def apply(self, live: nn.Module) -> None:
        """Move the average towards ``live`` by the weight ``advance`` set; copy its buffers."""
        ema_params = list(self.module.parameters())
        live_params = [p.detach() for p in live.parameters()]
        if isinstance(self.weight, torch.Tensor):
            torch._foreach_lerp_(ema_params, live_params, [self.weight] * len(ema_params))
        else:
            torch._foreach_lerp_(ema_params, live_params, self.weight)
        for mine, theirs in zip(self.module.buffers(), live.buffers()):
            mine.copy_(theirs)

    def update(self, live: nn.Module) -> None:
        self.advance()
        self.apply(live)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
