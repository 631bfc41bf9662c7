"""Where a call's time goes, from one run under torch.profiler (issue 35: the next lever is chosen from this).

On CUDA, the GPU's kernels and copies by name with their GPU time, against the call's wall time: a GPU busy for
a small share of the wall time waits on the host (launches, Python), one busy nearly all of it is bound by its
kernels, and the top rows say which. On CPU, the top-level operators by their CPU time. The profiler slows the
host a little, so the busy share is a lower bound.
"""
from __future__ import annotations

import collections
import time

import torch


def _on_gpu(event) -> bool:
    return str(getattr(event, "device_type", "")).endswith("CUDA")


def where_time_goes(fn, *args, cuda: bool | None = None, top: int = 8) -> dict:
    """``fn(*args)`` once under the profiler: ``wall_ms``, ``busy_ms`` (GPU kernel time on CUDA, top-level operator
    time on CPU), ``count`` (kernels or operators) and ``top``, the largest names as (name, ms, count)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() if cuda is None else cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn(*args)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if cuda:
            chosen = _on_gpu(event)
        else:
            parent, chosen = event.cpu_parent, event.name.startswith("aten::")
            while chosen and parent is not None:  # top level: no aten:: operator above it
                chosen, parent = not parent.name.startswith("aten::"), parent.cpu_parent
        if chosen:
            row = by_name[event.name]
            row[0] += event.time_range.elapsed_us() / 1000
            row[1] += 1
    rows = sorted(((name, ms, int(n)) for name, (ms, n) in by_name.items()), key=lambda r: -r[1])
    return {"device": "cuda" if cuda else "cpu", "wall_ms": wall * 1000, "busy_ms": sum(r[1] for r in rows),
            "count": sum(r[2] for r in rows), "top": rows[:top]}


def describe(profile: dict, indent: str = "    ") -> str:
    """A few lines for a benchmark's report."""
    what = "GPU kernel time" if profile["device"] == "cuda" else "operator time"
    wall, busy = profile["wall_ms"], profile["busy_ms"]
    if not profile["count"]:
        return f"{indent}where the time goes: no torch {what} recorded (another runtime ran the call)"
    lines = [f"{indent}where the time goes: {what} {busy:.2f} ms of {wall:.2f} ms wall "
             f"({busy / wall:.0%} busy), {profile['count']} {'kernels' if profile['device'] == 'cuda' else 'operators'}"]
    for name, ms, n in profile["top"]:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"{indent}  {ms:8.2f} ms {ms / busy if busy else 0:5.1%}  x{n:<5} {short}")
    return "\n".join(lines)
