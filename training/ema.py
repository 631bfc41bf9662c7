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
    """

    def __init__(self, live: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, not {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(live).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, live: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_params = list(self.module.parameters())
        live_params = [p.detach() for p in live.parameters()]
        torch._foreach_lerp_(ema_params, live_params, 1.0 - d)
        for mine, theirs in zip(self.module.buffers(), live.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
