"""The dynamic batcher between the routes (REST and UI) and the translator.

Requests wait in one bounded queue. A worker takes the first waiting request, then gathers more
until it has ``max_batch`` or ``max_wait`` has passed, drops those whose deadline passed or whose
client went away, and runs same-size images as one forward pass in a worker thread, so the event
loop keeps accepting requests meanwhile. Results go back to their own requests.
"""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np

from app.imaging import release_free_memory
from model.translator import Translator

IDLE_TRIM_S = 1.0  # after this long with an empty queue, freed memory goes back to the OS (once per idle spell)


class QueueFull(RuntimeError):
    """The queue holds ``queue_size`` requests already; try again shortly."""


class ClientGone(RuntimeError):
    """The client closed its connection while its job was queued; the job was dropped before compute."""


class DeadlineExceeded(RuntimeError):
    """The request's deadline passed before its turn came."""


@dataclass
class Timing:
    queue_ms: float
    compute_ms: float
    batch_size: int


@dataclass
class _Job:
    image: np.ndarray
    deadline: float
    gone: Callable[[], Awaitable[bool]] | None
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Gathers concurrent requests into batches for one Translator. Start and stop it in the app's lifespan."""

    def __init__(self, translator: Translator, max_batch: int, max_wait_s: float, queue_size: int, metrics=None):
        self.translator, self.max_batch, self.max_wait_s = translator, max_batch, max_wait_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_size)
        self.metrics = metrics
        self._worker: asyncio.Task | None = None
        self._dirty = False  # work ran since the last trim

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        while not self.queue.empty():
            job = self.queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(QueueFull("the service is shutting down"))

    async def submit(self, image: np.ndarray, timeout_s: float,
                     gone: Callable[[], Awaitable[bool]] | None = None) -> tuple[np.ndarray, Timing]:
        """Queue one RGB uint8 image; returns the painting and its timings.

        Raises QueueFull at once when the queue is full, DeadlineExceeded after ``timeout_s``.
        """
        loop = asyncio.get_running_loop()
        job = _Job(image, time.perf_counter() + timeout_s, gone, loop.create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull(f"{self.queue.maxsize} requests are already waiting") from None
        self._depth()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except asyncio.TimeoutError:
            job.future.cancel()
            raise DeadlineExceeded(f"no result within {timeout_s:g} s") from None
        except asyncio.CancelledError:
            job.future.cancel()  # the caller went away: the worker will skip this job
            raise

    def _depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queue.qsize())

    async def _first(self) -> _Job:
        """The next job. Once per idle spell, hand the heap that large images' activations and buffers
        left behind back to the OS (glibc would keep it)."""
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), IDLE_TRIM_S if self._dirty else None)
            except asyncio.TimeoutError:
                await asyncio.to_thread(self._release)
                self._dirty = False

    def _release(self) -> None:
        self.translator.release_memory()
        release_free_memory()

    async def _gather(self) -> list[_Job]:
        batch = [await self._first()]
        self._dirty = True
        until = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            left = until - time.perf_counter()
            if left <= 0:
                while len(batch) < self.max_batch and not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        self._depth()
        return batch

    async def _live(self, jobs: list[_Job]) -> list[_Job]:
        """Drop jobs that nobody waits for any more, before spending compute on them."""
        now, keep = time.perf_counter(), []
        for job in jobs:
            if job.future.done():
                continue
            if now > job.deadline:
                job.future.set_exception(DeadlineExceeded("the deadline passed while queued"))
                continue
            if job.gone is not None and await job.gone():
                job.future.set_exception(ClientGone("the client closed the connection while its request was queued"))
                continue
            keep.append(job)
        return keep

    async def _run(self) -> None:
        """Gather, check, compute, deliver. A finished batch's results are handed out just after the next
        batch has started computing (at once when nothing is waiting): their encoding and sending then
        overlap the forward pass instead of leaving the cores idle between two batches."""
        loop = asyncio.get_running_loop()
        finished: list[tuple[list[_Job], np.ndarray | Exception, float, float]] = []
        try:
            await self._loop(loop, finished)
        finally:  # stopped: what was computed still goes out
            self._deliver(finished)

    async def _loop(self, loop: asyncio.AbstractEventLoop, finished: list) -> None:
        while True:
            if finished and self.queue.empty():
                self._deliver(finished)
            jobs = await self._live(await self._gather())
            groups: dict[tuple, list[_Job]] = defaultdict(list)
            for job in jobs:
                groups[job.image.shape].append(job)
            for group in groups.values():
                started = time.perf_counter()
                computing = loop.run_in_executor(None, self.translator.translate_arrays,
                                                 np.stack([j.image for j in group]))
                self._deliver(finished)
                try:
                    out: np.ndarray | Exception = await computing
                except Exception as exc:  # keep serving: this batch fails, the next one runs
                    out = exc
                finished.append((group, out, started, (time.perf_counter() - started) * 1000))

    def _deliver(self, finished: list) -> None:
        for group, out, started, compute_ms in finished:
            if isinstance(out, Exception):
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(out)
                continue
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(group))
                self.metrics.compute_seconds.observe(compute_ms / 1000)
            for job, result in zip(group, out):
                queue_ms = (started - job.enqueued) * 1000
                if self.metrics is not None:
                    self.metrics.queue_seconds.observe(queue_ms / 1000)
                if not job.future.done():
                    job.future.set_result((result, Timing(queue_ms, compute_ms, len(group))))
        finished.clear()
