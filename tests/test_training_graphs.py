"""The CUT step in the form a CUDA graph replays (--cuda-graph, issue 35): what can be shown without a GPU.

The captured graph itself needs CUDA (the last test, skipped here; tools/gpu_run.sh runs bench_train's
--graph-check there). On any machine: the graph-safe step (its lr, Adam step counts and EMA weight read from
tensors the host fills between steps) learns exactly what the plain step learns; the step makes no host sync
and no tensor on the host;
CapturedStep's bookkeeping (warm-up, static inputs, the host's work between replays, another batch shape) with a
CPU stand-in for the graph; a checkpoint moves between the two forms; and the options it cannot take are refused.
"""
from __future__ import annotations

import copy

import pytest
import torch

from training.config import preset_config
from training.graphs import CapturedStep, dispatch_counts
from training.objectives import OBJECTIVES

SIDE = 32
CLOSE = dict(rtol=1e-4, atol=1e-5)  # float32 against double lr; a different step would differ by far more


def objective(cuda_graph: bool, steps: int, discriminator: str = "projected", device: str = "cpu", **overrides):
    torch.manual_seed(0)
    settings = dict(photos="x", paintings="y", out="unused", discriminator=discriminator, image_size=SIDE,
                    batch_size=2, ngf=8, n_blocks=1, ndf=8, compile_norm="off", precision="fp32", decay="linear",
                    cuda_graph=cuda_graph) | overrides
    cfg = preset_config("cut-gpu", **settings)
    return OBJECTIVES[cfg.model](cfg, torch.device(device), steps)


def batches(n: int, sizes: list[int] | None = None, seed: int = 1):
    data = torch.Generator().manual_seed(seed)
    for i in range(n):
        b = sizes[i] if sizes else 2
        yield tuple(torch.randint(0, 256, (b, 3, SIDE, SIDE), dtype=torch.uint8, generator=data) for _ in "pm")


def train(obj, step_fn, n: int, sizes: list[int] | None = None) -> tuple[torch.Tensor, list[float]]:
    losses, lrs = [], []
    torch.manual_seed(2)  # the step's own draws (DiffAugment, patch sampling) from here
    for photo, monet in batches(n, sizes):
        losses.append(step_fn(obj.nets.to_input(photo), obj.nets.to_input(monet)).cpu())
        lrs.append(obj.nets.lr)
    return torch.stack(losses), lrs


def test_the_graph_safe_step_learns_exactly_what_the_plain_step_learns():
    """Six steps of a schedule that decays over them: the same losses, lr and EMA weights, while the graph-safe
    optimisers read their lr from a tensor the schedule fills and the EMA its weight. (The tensor holds the lr in
    float32 where the plain step passes a double, so an lr's last bits may round apart: CLOSE.)"""
    plain, safe = objective(False, 6), objective(True, 6)
    expected, lrs = train(plain, plain.step, 6)
    got, safe_lrs = train(safe, safe.step, 6)
    torch.testing.assert_close(got, expected, **CLOSE)
    assert torch.isfinite(got).all()
    assert lrs == pytest.approx(safe_lrs) and lrs[2] > lrs[4] > lrs[5] == 0.0  # the lr moved during the test
    for group, tensor in zip(safe.nets._groups(), safe.nets._lr_tensors):
        assert isinstance(tensor, torch.Tensor) and group["lr"] is tensor  # the tensor a graph would read
    assert isinstance(safe.nets.ema.weight, torch.Tensor) and not isinstance(plain.nets.ema.weight, torch.Tensor)
    for a, b in zip(plain.nets.ema.module.parameters(), safe.nets.ema.module.parameters()):
        torch.testing.assert_close(a, b, **CLOSE)


@pytest.mark.parametrize("discriminator,tools", [
    ("projected", {}), ("both", {"photo_negatives": 0.5, "lambda_texture": 1.0})])
def test_a_cut_step_makes_no_host_sync(discriminator, tools):
    """A GPU step is a queue of kernels only while nothing reads a device value back on the host (.item(),
    bool(tensor), a data-dependent shape): each such read drains the queue, and none can be captured. The
    profiler counts them on CPU (dispatch_counts, which bench_train --graph-check prints too). Fused Adam's CPU
    kernel reads its step count on the host (on CUDA that is one kernel reading it on the device), so reads inside
    it are not the step's."""
    obj = objective(True, 100, discriminator=discriminator, **tools)
    data = list(batches(3))
    for photo, monet in data[:2]:  # Adam's state and the lazy parts exist before the profiled step
        obj.step(obj.nets.to_input(photo), obj.nets.to_input(monet))
    photo, monet = (obj.nets.to_input(t) for t in data[2])
    counts = dispatch_counts(obj.device_step, photo, monet)
    assert counts["ops"] > 500  # the step was profiled
    assert not counts["syncs"], f"host syncs in the step: {dict(counts['syncs'])}"


@pytest.mark.parametrize("discriminator,tools", [
    ("projected", {}), ("both", {"photo_negatives": 0.5, "lambda_texture": 1.0})])
def test_a_cut_step_makes_every_tensor_on_the_batchs_device(discriminator, tools):
    """A tensor the step makes on the host (``torch.tensor(...)``, a factory without ``device=``) is a copy to the
    GPU in every step, which a capture refuses, or a host number frozen into the graph. Under a default device of
    "meta" every such tensor lands there, and PyTorch refuses to mix it with the step's CPU tensors: the step runs
    through only if it makes each tensor on its inputs' or its parameters' device."""
    obj = objective(True, 100, discriminator=discriminator, **tools)
    data = list(batches(3))
    for photo, monet in data[:2]:
        obj.step(obj.nets.to_input(photo), obj.nets.to_input(monet))
    photo, monet = (obj.nets.to_input(t) for t in data[2])
    obj.nets.begin_step()
    with torch.device("meta"):
        losses = obj.device_step(photo, monet)
    assert losses.device.type == "cpu" and torch.isfinite(losses).all()
    with torch.device("meta"), pytest.raises(RuntimeError, match="meta"):  # what the check catches
        photo * torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1)


class _ReplayOnCPU:
    """Stands in for torch.cuda.CUDAGraph where there is no GPU: recording runs nothing, and replay() runs the
    recorded step on the static inputs into the static losses, as a replay does."""

    def __init__(self, run, out):
        self.run, self.out, self.replays = run, out, 0

    def replay(self):
        self.out.copy_(self.run())
        self.replays += 1


class CapturedOnCPU(CapturedStep):
    def _eager(self, photo, monet):
        self.eager_steps += 1
        return self.objective.device_step(photo, monet)

    def _record(self, photo, monet):
        out = torch.full((len(self.objective.loss_names),), float("nan"))
        self.recorded = _ReplayOnCPU(lambda: self.objective.device_step(photo, monet), out)
        return self.recorded, out


def test_captured_step_warms_up_captures_once_and_replays_with_the_hosts_work_between():
    """Two eager warm-up steps, a capture on the third batch (run by one replay), replays after; a batch of another
    shape runs eagerly and the replays go on. The losses and the lr are the plain step's, step for step: each batch
    is copied into the static inputs and the schedule and EMA weight move between replays."""
    sizes = [2, 2, 2, 2, 2, 1, 2, 2]
    plain, safe = objective(False, len(sizes)), objective(True, len(sizes))
    expected, lrs = train(plain, plain.step, len(sizes), sizes)
    captured = CapturedOnCPU(safe, warmup=2)
    got, safe_lrs = train(safe, captured, len(sizes), sizes)
    torch.testing.assert_close(got, expected, **CLOSE)
    assert lrs == pytest.approx(safe_lrs)
    assert captured.eager_steps == 3 and captured.replays == 5 and captured.recorded.replays == 5
    assert safe.nets.step == len(sizes) and safe.nets.ema.updates == len(sizes)


def test_a_capture_that_fails_leaves_the_run_learning_eagerly_with_one_warning(capsys):
    """An operator the card cannot capture must not end a run the user started with --cuda-graph: the failing
    capture is reported in one line and every step, that one included, runs eagerly: the plain step's losses."""
    class FailsToCapture(CapturedOnCPU):
        def _record(self, photo, monet):  # as a capture that meets an operator it cannot record: nothing ran
            raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors ...")

    sizes = [2] * 6
    plain, safe = objective(False, len(sizes)), objective(True, len(sizes))
    expected, _ = train(plain, plain.step, len(sizes), sizes)
    captured = FailsToCapture(safe, warmup=2)
    got, _ = train(safe, captured, len(sizes), sizes)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "could not be captured" in err and "stream is capturing" in err, err
    assert captured.graph is None and captured.failed and captured.eager_steps == 6 and captured.replays == 0
    assert safe.nets.step == len(sizes)
    torch.testing.assert_close(got, expected, **CLOSE)


def test_a_checkpoint_moves_between_the_graph_safe_and_the_plain_step():
    """Three graph-safe steps, a checkpoint, three more after loading it into a graph-safe or a plain objective:
    the same as six uninterrupted; the loaded lr is back in the tensor a captured graph reads."""
    whole, _ = train(first := objective(True, 6), first.step, 6)
    start = objective(True, 6)
    losses = list(batches(6))
    torch.manual_seed(2)
    for photo, monet in losses[:3]:
        start.step(start.nets.to_input(photo), start.nets.to_input(monet))
    state = start.state_dict()
    for cuda_graph in (True, False):
        again = objective(cuda_graph, 6)
        again.load_state_dict(copy.deepcopy(state))  # as from disk: the optimiser would share state's tensors
        out = [again.step(again.nets.to_input(p), again.nets.to_input(m)) for p, m in losses[3:]]
        torch.testing.assert_close(torch.stack(out), whole[3:], **CLOSE)
        if cuda_graph:
            assert all(g["lr"] is t for g, t in zip(again.nets._groups(), again.nets._lr_tensors))


def test_the_options_a_capture_cannot_take_are_refused_in_one_line(capsys):
    from training.fit import main

    common = ["--photos", "p", "--paintings", "m", "--out", "unused-run"]
    cases = [
        (["--preset", "cut-gpu", "--cuda-graph", "true", "--device", "cpu"], "needs a CUDA device"),
        (["--preset", "cut-gpu", "--cuda-graph", "true", "--precision", "fp16"], "--precision fp16"),
        (["--preset", "cut-gpu", "--cuda-graph", "true", "--compile", "true"], "--compile"),
        (["--preset", "cyclegan", "--cuda-graph", "true"], "--cuda-graph work with --model cut or fastcut"),
    ]
    if not torch.cuda.is_available():  # auto resolves to this CPU
        cases.append((["--preset", "cut-gpu", "--cuda-graph", "true"], "needs a CUDA device; this run is on cpu"))
    for args, message in cases:
        assert main(common + args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_on_a_gpu_the_captured_step_learns_what_the_eager_step_learns():
    plain, safe = objective(False, 8, device="cuda"), objective(True, 8, device="cuda")
    expected, _ = train(plain, plain.step, 8)
    captured = CapturedStep(safe, warmup=2)
    got, _ = train(safe, captured, 8)
    assert captured.replays == 6
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
