"""Where a network runs: the device, the dtype and the CPU cores, and handing freed memory back to the OS. Every
caller (the translator, training, evaluation, the service, the benchmarks) asks here, so each of these is
decided in one place.

Reads no MONET_* variable; OMP_NUM_THREADS, the standard one, wins over our own core count.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import torch

DEVICES = ("auto", "cpu", "cuda")  # the choices every command and the service offer (cuda:N is taken too)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str = "auto", local_rank: int | None = None) -> torch.device:
    """"auto" picks CUDA when available, else CPU; ``local_rank`` (torchrun) picks the GPU of a rank.
    Raises ValueError for an unusable device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    if device == "cuda" and local_rank is not None:
        device = f"cuda:{local_rank}"
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda") from None


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes in bf16 in hardware (AVX512-BF16 or AMX). oneDNN also accepts plain
    AVX-512 for bf16, but emulates it there: on a 2-core Xeon without these units a bf16 training step
    took twice as long as fp32 (docs/experiments.md)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: trust oneDNN's own answer
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` does bf16 arithmetic natively (Ampere+ GPUs; CPUs with AMX or AVX512-BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16_units() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pick_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The compute dtype for ``precision``. "auto": bf16 where the device does it natively, else fp16 on
    CUDA and fp32 on CPU. Raises ValueError for an unknown precision."""
    named = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision in named:
        return named[precision]
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if native_bf16(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.float32


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for training at ``precision``; None means plain fp32 (no autocast)."""
    dtype = pick_dtype(device, precision)
    return None if dtype == torch.float32 else dtype


def cpu_cores(cgroup_cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's
    `cpus:` or a Kubernetes CPU limit, which leave the affinity at the whole machine)."""
    cores = max(1, len(os.sched_getaffinity(0)))
    try:
        quota, period = open(cgroup_cpu_max).read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def compute_threads(processes_per_machine: int = 1) -> int:
    """Threads for one process's compute: OMP_NUM_THREADS when set, else this process's share of the cores."""
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, cpu_cores() // max(1, processes_per_machine))


def use_cpu_threads(processes_per_machine: int = 1) -> int:
    """Set torch's intra-op threads to ``compute_threads`` (torch's default can exceed the cores a container
    or taskset allows) and return the count."""
    threads = compute_threads(processes_per_machine)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)
    return threads


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise: a burst of big decodes would
    leave the process hundreds of MB larger for good). A no-op where malloc_trim doesn't exist."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def keep_large_blocks() -> bool:
    """Have glibc's malloc serve large blocks from its heap and keep freed ones for reuse, for this process's
    life. By default it maps each block over its mmap threshold (at most 32 MB) fresh from the OS and unmaps it
    when freed, so a training step on CPU, which allocates and frees the same large activations every step,
    paid a page fault for every 4 KiB of them on first touch. With this, bench_train's CUT step ran 1.03-1.18x
    faster on a 2-core AMD EPYC for 8-14% more peak memory (docs/training.md). False where malloc is not glibc's."""
    if _mallopt is None:
        return False
    return bool(_mallopt(_M_MMAP_MAX, 0)) and bool(_mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def _libc_function(name: str):
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


_malloc_trim = _libc_function("malloc_trim")
_mallopt = _libc_function("mallopt")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's malloc.h
