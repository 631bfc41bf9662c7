"""A run's bookkeeping beside the loop: its log (metrics.jsonl, TensorBoard, the progress bar), its state
(best validation score, summary, training time) with the checkpoint keys that state owns, and the signals
that stop it."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model.weights import atomic_write


class RunLog:
    """Where a run reports: RUN_DIR/metrics.jsonl (one JSON object per line), TensorBoard when installed,
    and a tqdm bar. Only the main rank writes (``enabled``)."""

    def __init__(self, out: Path, start: int, stop_at: int, enabled: bool = True):
        self.enabled = enabled
        self.metrics = self.board = self.bar = None
        if not enabled:
            return
        from tqdm import tqdm

        self.metrics = open(out / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            pass
        self.bar = tqdm(total=stop_at, initial=start, unit="step", dynamic_ncols=True, disable=None)

    def record(self, record: dict, prefix: str = "train") -> None:
        """One line in metrics.jsonl and one TensorBoard scalar per value (its ``step`` is the x axis)."""
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    name = key.removeprefix(f"{prefix}_")  # val_kid -> val/kid
                    self.board.add_scalar(f"{prefix}/{name}", value, record["step"])

    def tick(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix(**postfix)

    def say(self, text: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(text)

    def close(self) -> None:
        for thing in (self.bar, self.metrics, self.board):
            if thing is not None:
                thing.close()


class RunState:
    """The best validation KID so far, the run's summary and its training time over every invocation
    (validation excluded). It owns the checkpoint keys ``best`` and ``summary``."""

    def __init__(self, summary: dict, checkpoint: dict | None = None):
        checkpoint = checkpoint or {}
        self.best = checkpoint.get("best", {"kid": float("inf"), "step": 0})
        self.seconds_before = float(checkpoint.get("summary", {}).get("train_seconds", 0.0))
        self.summary = summary
        self.started, self.paused = time.perf_counter(), 0.0

    def seconds(self) -> float:
        """This invocation's training time so far (validation excluded)."""
        return time.perf_counter() - self.started - self.paused

    def train_seconds(self) -> float:
        """The run's training time over all its invocations."""
        return self.seconds_before + self.seconds()

    def improved(self, kid: float, step: int) -> bool:
        if kid < self.best["kid"]:
            self.best = {"kid": kid, "step": step}
            return True
        return False

    def checkpoint_keys(self) -> dict:
        return {"summary": self.summary | {"train_seconds": round(self.train_seconds(), 1)}, "best": self.best}


class Stopper:
    """Turns SIGINT/SIGTERM into a request to save a checkpoint and leave the loop."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def quiet_worker(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, which saves a checkpoint and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def all_agree(flag: bool, device: torch.device, world_size: int) -> bool:
    """True on every rank if it is True on any (the ranks stop together)."""
    if world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def check_ranks_identical(modules: list[torch.nn.Module], device: torch.device, out: Path | None) -> None:
    """Compare a checksum of every rank's weights; record the verdict in RUN_DIR/ddp_check.json."""
    params = [p.detach().double().sum() for m in modules for p in m.parameters()]
    mine = torch.stack(params).to(device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    identical = all(torch.equal(everyone[0], other) for other in everyone[1:])
    if out is not None:
        report = {"world_size": len(everyone), "ranks_identical": identical,
                  "checksums": [float(t.sum()) for t in everyone]}
        atomic_write(out / "ddp_check.json", lambda tmp: Path(tmp).write_text(json.dumps(report)))
