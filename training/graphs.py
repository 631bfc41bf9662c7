"""The whole training step as one CUDA graph (``--cuda-graph``, issue 35).

On a GPU the CUT step is bound by launches, not arithmetic: a few thousand small kernels (the two networks
forward and backward, DiffAugment, PatchNCE's sampling, fused Adam, the EMA) each cost the host more than the
card. ``CapturedStep`` runs the objective's ``device_step`` eagerly for a few warm-up steps (cuDNN's autotuning,
Adam's state and the allocator settle), captures it once into a CUDA graph with static input tensors, and then,
for every batch, copies the batch in and replays the graph: one graph launch a step, beside a few small
copies and fills (the batch in, the losses out, the lr and EMA weight). What changes between steps lives
on the device and is filled between replays by the host's bookkeeping (``Networks.begin_step`` and
``end_step``: the schedules' lr tensors, the EMA weight); random draws come from PyTorch's graph-safe generator,
so every replay draws afresh. The step makes no host sync (a test counts them on CPU).

What a capture needs: CUDA, one process (no DDP), no fp16 loss scaler, no ``--compile``; config and
``training.fit`` refuse the rest with a message. A batch of another shape than the captured one (none with the
step sampler's full batches) runs eagerly, and so does every step after a capture that fails (one warning).
"""
from __future__ import annotations

import collections
import sys

import torch

# operators that read a device value back on the host (.item(), bool(tensor), a data-dependent shape): each drains
# the GPU's queue, and none can be captured
HOST_SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::masked_select", "aten::unique")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch", "cudaMemcpyAsync",
            "cudaMemsetAsync")


def dispatch_counts(fn, *args) -> dict:
    """``fn(*args)`` under PyTorch's profiler: ``ops``, the operators the host dispatched (top level: each one or
    more kernels on a GPU); ``syncs``, the host syncs by name (a Counter), those inside fused Adam left out (its CPU
    kernel reads its step count on the host; on CUDA that is one kernel reading it on the device); ``launches``,
    on CUDA, the kernels, graphs and copies launched."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    ops, launches, syncs = 0, 0, collections.Counter()
    for event in prof.events():
        chain, parent = [], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        ops += event.name.startswith("aten::") and not any(name.startswith("aten::") for name in chain)
        launches += event.name in LAUNCHES
        if event.name in HOST_SYNCS and "aten::_fused_adam_" not in chain:
            syncs[event.name] += 1
    return {"ops": ops, "syncs": syncs, "launches": launches}


class CapturedStep:
    """``step(photo, monet)`` as ``objective.step`` does it, replayed from one CUDA graph after ``warmup`` eager
    steps. ``objective`` has ``nets`` (training/parts.py, built with ``cfg.cuda_graph``) and ``device_step``."""

    def __init__(self, objective, warmup: int = 3):
        self.objective, self.nets, self.warmup = objective, objective.nets, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # set with the graph
        self.eager_steps = self.replays = 0
        self.failed: str | None = None  # why the capture failed, if it did: the steps then run eagerly

    def __call__(self, photo: torch.Tensor, monet: torch.Tensor) -> torch.Tensor:
        self.nets.begin_step()
        if self.graph is not None and photo.shape == self.static[0].shape and monet.shape == self.static[1].shape:
            self.static[0].copy_(photo, non_blocking=True)
            self.static[1].copy_(monet, non_blocking=True)
            self.graph.replay()
            self.replays += 1
            losses = self.static[2].clone()
        elif self.graph is None and self.failed is None and self.eager_steps >= self.warmup:
            losses = self._capture(photo, monet)
        else:
            losses = self._eager(photo, monet)
        self.nets.end_step()
        return losses

    def _eager(self, photo: torch.Tensor, monet: torch.Tensor) -> torch.Tensor:
        """One step eagerly on a side stream (as PyTorch's whole-network capture warms up)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            losses = self.objective.device_step(photo, monet)
        torch.cuda.current_stream().wait_stream(side)
        self.eager_steps += 1
        return losses

    def _record(self, photo: torch.Tensor, monet: torch.Tensor):
        """The step on these static inputs captured (recorded, not run): (the graph, its static losses)."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: a loader's pin-memory thread may allocate while this thread captures (the global mode
        # would fail the capture for it)
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            losses = self.objective.device_step(photo, monet)
        return graph, losses

    def _capture(self, photo: torch.Tensor, monet: torch.Tensor) -> torch.Tensor:
        """Capture the step on this batch, then replay it once: a capture records kernels without running them."""
        static_photo, static_monet = photo.clone(), monet.clone()
        for optimiser in (self.nets.opt_G, self.nets.opt_D):
            optimiser.zero_grad(set_to_none=True)  # the captured backward writes the gradients, never adds to them
        try:
            graph, static_losses = self._record(static_photo, static_monet)
        except RuntimeError as exc:  # an operator PyTorch cannot capture here: the run goes on, eagerly
            self.failed = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            print(f"warning: --cuda-graph: the step could not be captured ({self.failed}); it runs eagerly",
                  file=sys.stderr, flush=True)
            return self._eager(photo, monet)  # a capture records without running: this batch is still to learn
        graph.replay()
        self.graph, self.static = graph, (static_photo, static_monet, static_losses)
        self.replays += 1
        return static_losses.clone()
