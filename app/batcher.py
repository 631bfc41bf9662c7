"""The dynamic batcher between the routes (REST and UI) and the translator.

Admission comes first: a request takes one of ``queue_size`` slots (``slot()``) before it decodes its
upload, so under overload a refusal costs nothing. Admitted requests queue their images, each for its
style's translator; a worker takes the first waiting one, then gathers more of the same style until it has
``max_batch`` or ``max_wait`` has passed, drops those whose deadline passed or whose client went away, and
hands the batch to the translator in a worker thread (the translator groups same-size images into forward
passes), so the event loop keeps accepting requests meanwhile. Results go back to their own requests. A slot
is freed when the worker takes its job.

Admission also counts time: once the image's size is known from its header, ``Slot.expect`` adds its
megapixels to the work waiting in its lane (batches, or large paintings) and refuses it at once, with a
``Retry-After`` from the estimate, when that work at the measured seconds per megapixel (``WorkRate``, kept
up to date from every batch and large painting) would not be done by the request's deadline: a request the
server admits is one it expects to answer, not a 504 thirty seconds later.

A batch never mixes styles (nor two versions of one). The styles with waiting requests take turns, one batch
each (``FairQueue``), so one style's heavy traffic delays another style's request by at most one batch.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np

from app.errors import Busy, ClientClosed, TimedOut
from model.plan import PaintPlan
from model.runtime import release_free_memory
from model.translator import PaintingStopped, Translator

IDLE_TRIM_S = 1.0  # after this long with no request in the service, freed memory goes back to the OS


class QueueFull(Busy):
    """``queue_size`` requests are admitted and waiting already; try again shortly."""


class WaitTooLong(Busy):
    """The work already waiting would keep this request past its deadline; try again after ``retry_after``."""


ADMIT_SHARE = 0.8  # admitted while the expected wait is under this share of the deadline (the estimate's margin)


class WorkRate:
    """Seconds of painting per megapixel, an exponential moving average over the batches (or large paintings)
    measured so far; None until the first."""

    def __init__(self, smoothing: float = 0.7):
        self.smoothing, self.s_per_mp = smoothing, None

    def observe(self, seconds: float, megapixels: float) -> None:
        if megapixels <= 0 or seconds <= 0:
            return
        rate = seconds / megapixels
        self.s_per_mp = rate if self.s_per_mp is None else self.smoothing * self.s_per_mp + (1 - self.smoothing) * rate


class LargeCost:
    """The seconds a large painting takes in the server, decode to answer: ``per_painted_mp`` x the megapixels
    the network paints (at the stroke scale: about one at the default, whatever the photo) + ``per_mp`` x the
    photo's megapixels (decode, shrink, the upsampling back, encode). The two rates are timed once at start
    (the service paints a synthetic 12 MP photo); each real painting then scales both by the moving average of
    its time against their estimate. One rate per photo megapixel alone (the batches' rule), timed on 12 MP,
    overestimated 36 MP photos 2x and admitted 4 of a burst of 16."""

    def __init__(self, smoothing: float = 0.7):
        self.smoothing = smoothing
        self.per_painted_mp: float | None = None
        self.per_mp: float | None = None
        self.factor = 1.0

    def calibrate(self, per_painted_mp: float, per_mp: float) -> None:
        self.per_painted_mp, self.per_mp = max(0.0, per_painted_mp), max(0.0, per_mp)

    def estimate(self, pixels: int, painted: int) -> float | None:
        """Seconds for a photo of ``pixels`` painted at ``painted`` pixels; None before any timing."""
        if self.per_mp is None:
            return None
        return self.factor * (self.per_painted_mp * painted + self.per_mp * pixels) / 1e6

    def observe(self, seconds: float, pixels: int, painted: int) -> None:
        if seconds <= 0 or pixels <= 0:
            return
        if self.per_mp is None:  # no timing at start (it failed, or has not finished): one rate from this one
            self.calibrate(0.0, seconds / (pixels / 1e6))
            return
        ratio = seconds / max(1e-9, self.estimate(pixels, painted) / self.factor)
        self.factor = self.smoothing * self.factor + (1 - self.smoothing) * ratio


RESERVATION_S = 5.0  # how long an upload's header holds its work in the large lane before its body is in
ARRIVAL_HOLD_S = 1.0  # how long a request's headers hold its place in the queue before its body is in


class Reservation:
    """A large image's work counted in the large lane's waiting work from its header, while its body still
    arrives (``Batcher.reserve``): a burst of large uploads is admitted, or refused, as each header comes, not
    once each body is in. Released when its slot counts the work (``Slot.expect``), when the request ends, or
    after ``hold_s``: a slow upload (or one that sent a header and trickles) holds no place for long, and is
    judged again, as any upload, once its body is in."""

    def __init__(self, batcher: "Batcher", seconds: float, hold_s: float | None = RESERVATION_S):
        self.batcher, self.seconds = batcher, seconds
        batcher.waiting_s["large"] += seconds
        self._timer = None
        if hold_s is not None:
            try:
                self._timer = asyncio.get_running_loop().call_later(hold_s, self.release)
            except RuntimeError:  # no event loop (a unit test): held until released
                pass

    def release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.seconds:
            self.batcher.waiting_s["large"] = max(0.0, self.batcher.waiting_s["large"] - self.seconds)
            self.seconds = 0.0


class ClientGone(ClientClosed):
    """The client closed its connection while its job was queued; the job was dropped before compute."""


class DeadlineExceeded(TimedOut):
    """The request's deadline passed before its turn came."""


@dataclass
class Timing:
    queue_ms: float
    compute_ms: float
    batch_size: int


@dataclass
class Large:
    """How an image painted on its own is painted (``Translator.paint_planned``): by ``plan`` (model/plan.py),
    brought back to full size with ``upsampler``."""
    plan: PaintPlan
    upsampler: str


class IdleRelease:
    """The one place the service gives memory back, on three triggers: every loaded translator's runtime buffers
    (``Translator.release_memory``) and the freed heap (``release_free_memory``) once both of the model's
    queues have been idle for ``idle_s`` (no batch job waiting or computing, no large painting between its
    decode and its answer: each holds ``working()``), once per idle spell; the
    freed heap alone whenever the decode budget or the large paintings' budget falls idle after a burst
    (``after_burst``, called by ``DecodeBudget``: between two large decodes or paintings of a burst; 16
    concurrent 24 MP uploads peaked at 2.8 GB without it, 1.75 GB with it);
    and the previous style's buffers when a batch of another style starts (``style_changed``). A burst of large
    decodes or paintings would otherwise leave the process hundreds of MB larger for good."""

    def __init__(self, translators: Callable[[], list[Translator]], idle_s: float = IDLE_TRIM_S):
        self.translators, self.idle_s = translators, idle_s
        self.busy, self._dirty = 0, False
        self._timer: asyncio.TimerHandle | None = None

    @contextmanager
    def working(self):
        """Held by each job from its queueing to its answer, and by a large painting from its decode to its
        answer (the service)."""
        self.busy += 1
        self._dirty = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            yield
        finally:
            self.busy -= 1
            if self.busy == 0:
                self._timer = asyncio.get_running_loop().call_later(self.idle_s, self._idle)

    def _idle(self) -> None:
        self._timer = None
        if self.busy == 0 and self._dirty:
            self._dirty = False
            asyncio.get_running_loop().create_task(asyncio.to_thread(self.release))

    @staticmethod
    def after_burst() -> None:
        release_free_memory()

    @staticmethod
    def style_changed(previous: Translator | None, translator: Translator) -> None:
        """Before a batch of another style than the last: the previous style's runtime drops the buffers large
        batches left it (a cheap no-op otherwise), so only the style painting holds large activations."""
        if previous is not None and previous is not translator:
            previous.release_memory()

    def release(self) -> None:
        for translator in self.translators():
            translator.release_memory()
        release_free_memory()


@dataclass
class _Job:
    image: np.ndarray
    deadline: float
    gone: Callable[[], Awaitable[bool]] | None
    future: asyncio.Future
    slot: "Slot"
    large: Large | None = None  # None: painted pixel for pixel in a batch
    translator: Translator | None = None  # the style (and version) that paints it
    enqueued: float = field(default_factory=time.perf_counter)


class FairQueue:
    """The waiting jobs, one first-in-first-out queue per translator (a style's version). The styles with
    waiting jobs take turns: ``take()`` starts a batch with the style whose turn it is and sends that style to
    the back; ``take(translator)`` continues the batch with the same style."""

    def __init__(self):
        self._queues: OrderedDict[Translator, deque[_Job]] = OrderedDict()  # whose turn comes first, first
        self._size = 0
        self._put = asyncio.Event()
        self._last: Translator | None = None  # the style whose batch was started last

    def qsize(self) -> int:
        return self._size

    def empty(self) -> bool:
        return self._size == 0

    def put_nowait(self, job: _Job) -> None:
        self._queues.setdefault(job.translator, deque()).append(job)
        self._size += 1
        self._put.set()

    def take(self, translator: Translator | None = None) -> _Job | None:
        if translator is None:
            if not self._queues:
                return None
            if self._last in self._queues:  # its turn is over: behind every style that waited meanwhile
                self._queues.move_to_end(self._last)
            translator = self._last = next(iter(self._queues))
        queue = self._queues.get(translator)
        if not queue:
            return None
        job = queue.popleft()
        self._size -= 1
        if not queue:
            del self._queues[translator]
        return job

    async def wait(self, timeout_s: float | None) -> bool:
        """Wait until a job is put (True) or ``timeout_s`` passes (False; None: no limit)."""
        self._put.clear()
        try:
            await asyncio.wait_for(self._put.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    def drain(self) -> list[_Job]:
        jobs = [job for queue in self._queues.values() for job in queue]
        self._queues.clear()
        self._size = 0
        return jobs


class Slot:
    """One admitted request's place: held from admission until the worker takes its job (or it leaves); and
    the work it expects (``expect``), counted in its lane until its painting starts."""

    def __init__(self, batcher: "Batcher"):
        self.batcher, self.held = batcher, True
        self.lane: str | None = None
        self.seconds = 0.0

    def expect(self, pixels: int, large: bool, deadline_s: float, painted: int | None = None,
               reserved: "Reservation | None" = None) -> None:
        """Count this request's work in its lane's waiting work, or raise WaitTooLong (503, Retry-After) when that
        work would not be done within ``ADMIT_SHARE`` of ``deadline_s``: for a batch, ``pixels`` at the measured
        seconds per megapixel; for a large painting, its ``LargeCost`` estimate (``painted``: the pixels the
        network paints, default ``pixels``). A large image admitted from its header (``reserved`` holds its
        work) is admitted: its reservation becomes this count."""
        b = self.batcher
        lane = "large" if large else "batch"
        seconds = b.expected_seconds(pixels, large, painted)
        if reserved is not None and reserved.seconds > 0:
            reserved.release()
        else:
            b.check_wait(lane, seconds, deadline_s)
        self.lane, self.seconds = lane, seconds or 0.0
        b.waiting_s[lane] += self.seconds

    def started(self) -> None:
        """Its painting started: its work no longer waits."""
        if self.lane is not None:
            self.batcher.waiting_s[self.lane] = max(0.0, self.batcher.waiting_s[self.lane] - self.seconds)
            self.lane = None

    def release(self) -> None:
        if self.held:
            self.held = False
            self.batcher.admitted -= 1
        if self.lane == "batch":  # taken for a batch (or gone): large paintings count until they start
            self.started()

    def close(self) -> None:
        self.release()
        self.started()

    async def submit(self, image: np.ndarray, timeout_s: float,
                     gone: Callable[[], Awaitable[bool]] | None = None,
                     large: Large | None = None, translator: Translator | None = None) -> tuple[np.ndarray, "Timing"]:
        """Queue one RGB uint8 image for ``translator`` (None: the batcher's); returns the painting and its
        timings. Raises DeadlineExceeded after ``timeout_s``, ClientGone when ``gone()`` says the client left
        while queued. With ``large``, the image is painted on its own (``Translator.paint``), beside the
        batches: between two of its tiles the model serves the batch waiting, so small requests never wait for
        a whole large painting."""
        loop = asyncio.get_running_loop()
        job = _Job(image, time.perf_counter() + timeout_s, gone, loop.create_future(), self, large,
                   translator or self.batcher.translator)
        self.batcher.queue.put_nowait(job)
        self.batcher._depth()
        try:
            with self.batcher.idle_release.working():  # the model's queues are busy until this job is answered
                return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except asyncio.TimeoutError:
            job.future.cancel()
            raise DeadlineExceeded(f"the request timed out before its turn (no result within {timeout_s:g} s)") from None
        except asyncio.CancelledError:
            job.future.cancel()  # the caller went away: the worker will skip this job
            raise


class ArrivalHold:
    """A place in the queue held for a request from its headers until its body is in, at most ``hold_s``: a
    burst beyond the queue is refused as it arrives instead of after all of its uploads were read, and a slow
    upload holds a place no longer than ``hold_s`` (then its body, once in, takes a place if one is free, as
    any request's). ``Batcher.slot`` takes it over; ``release`` lets it go (idempotent)."""

    def __init__(self, batcher: "Batcher", hold_s: float = ARRIVAL_HOLD_S):
        self.batcher, self.held = batcher, True
        batcher.arriving += 1
        self._expiry = asyncio.get_running_loop().call_later(hold_s, self.release)

    def release(self) -> None:
        if self.held:
            self.held = False
            self.batcher.arriving -= 1
            self._expiry.cancel()

    def take(self) -> bool:
        """True when the place was still held (it passes to the slot taking it)."""
        held = self.held
        self.release()
        return held


class Batcher:
    """Gathers concurrent requests into batches, each for one translator (one style): ``translator`` unless a
    request names another. ``translators()`` lists every translator in use, whose memory ``idle_release``
    gives back when no request is in the service. Start and stop it in the app's lifespan."""

    def __init__(self, translator: Translator | None, max_batch: int, max_wait_s: float, queue_size: int,
                 metrics=None, translators: Callable[[], list[Translator]] | None = None,
                 idle_release: IdleRelease | None = None):
        self.translator, self.max_batch, self.max_wait_s = translator, max_batch, max_wait_s
        self.translators = translators or (lambda: [translator] if translator is not None else [])
        self.queue_size, self.admitted = queue_size, 0
        self.arriving = 0  # places held by requests whose body is still arriving (``ArrivalHold``)
        self.rates = {"batch": WorkRate()}  # the batches' measured seconds per megapixel (large: ``large_cost``)
        self.large_cost = LargeCost()  # a large painting's seconds, from its size and painted size
        self.waiting_s = {"batch": 0.0, "large": 0.0}  # admitted work whose painting has not started, in seconds
        self.queue = FairQueue()  # bounded by admission
        self.metrics = metrics
        self._worker: asyncio.Task | None = None
        self._large_worker: asyncio.Task | None = None
        self.large: asyncio.Queue[_Job] = asyncio.Queue()  # taken from the queue, painted one at a time
        self.idle_release = idle_release or IdleRelease(self.translators)  # the service passes its own
        self._previous: Translator | None = None  # the translator of the last batch

    def expected_seconds(self, pixels: int, large: bool, painted: int | None = None) -> float | None:
        """The seconds an image of ``pixels`` takes in its lane: for a batch, at the measured seconds per
        megapixel; for a large painting, its ``LargeCost`` estimate (``painted``: the pixels the network paints,
        default ``pixels``). None before anything was timed."""
        if large:
            return self.large_cost.estimate(pixels, pixels if painted is None else painted)
        rate = self.rates["batch"].s_per_mp
        return None if rate is None else pixels / 1e6 * rate

    def reserve(self, pixels: int, painted: int, deadline_s: float) -> Reservation | None:
        """Admit a large image from its header: count its work in the large lane (a ``Reservation``), or raise
        WaitTooLong as ``Slot.expect`` would. None before the lane's work was timed."""
        seconds = self.expected_seconds(pixels, True, painted)
        if seconds is None:
            return None
        self.check_wait("large", seconds, deadline_s)
        return Reservation(self, seconds)

    def check_wait(self, lane: str, seconds: float | None, deadline_s: float) -> None:
        """Raise WaitTooLong (503, Retry-After; counted) when ``seconds`` of work behind the ``lane``'s waiting
        work would not be done within ``ADMIT_SHARE`` of ``deadline_s``. A lone request is always tried."""
        if seconds is None:
            return
        expected = self.waiting_s[lane] + seconds
        budget = deadline_s * ADMIT_SHARE
        if expected > budget and self.waiting_s[lane] > 0:
            if self.metrics is not None:
                self.metrics.refused_by_wait.labels(lane).inc()
            raise WaitTooLong(f"the server is busy: the work ahead of this {'large ' if lane == 'large' else ''}"
                              f"image would take about {expected:.0f} s, past its {deadline_s:g} s deadline; "
                              "retry shortly", retry_after=max(1, math.ceil(expected - budget)))

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="batcher")
        self._large_worker = asyncio.create_task(self._run_large(), name="large-paintings")

    async def stop(self) -> None:
        for worker in (self._worker, self._large_worker):
            if worker is not None:
                worker.cancel()
                try:
                    await worker
                except asyncio.CancelledError:
                    pass
        jobs = self.queue.drain()
        while not self.large.empty():
            jobs.append(self.large.get_nowait())
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(QueueFull("the service is shutting down"))

    @property
    def taken(self) -> int:
        """Places taken in the queue: requests admitted, and requests whose body is still arriving."""
        return self.admitted + self.arriving

    def full(self) -> QueueFull | None:
        """The refusal a request gets now, when ``queue_size`` are admitted or arriving; else None."""
        if self.taken >= self.queue_size:
            return QueueFull(f"the service is busy ({self.queue_size} requests are already waiting); retry shortly")
        return None

    def hold(self, hold_s: float = ARRIVAL_HOLD_S) -> ArrivalHold | None:
        """A place for a request whose body is still arriving (``ArrivalHold``), or None when the queue is full."""
        return None if self.full() is not None else ArrivalHold(self, hold_s)

    @contextmanager
    def slot(self, hold: ArrivalHold | None = None):
        """Admit one request (a ``Slot``), or raise QueueFull at once when ``queue_size`` are admitted or
        arriving. A request whose place was held since it arrived (``hold``, still held) takes that place."""
        if not (hold is not None and hold.take()) and (refusal := self.full()) is not None:
            raise refusal
        self.admitted += 1
        slot = Slot(self)
        try:
            yield slot
        finally:
            slot.close()

    async def submit(self, image: np.ndarray, timeout_s: float,
                     gone: Callable[[], Awaitable[bool]] | None = None,
                     translator: Translator | None = None) -> tuple[np.ndarray, Timing]:
        """Admit and queue one image in one call (``slot`` then ``Slot.submit``)."""
        with self.slot() as slot:
            return await slot.submit(image, timeout_s, gone, translator=translator)

    def _depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queue.qsize())

    async def _first(self) -> _Job:
        """The next job."""
        while (job := self.queue.take()) is None:
            await self.queue.wait(None)
        return self._take(job)

    @staticmethod
    def _take(job: _Job) -> _Job:
        job.slot.release()  # out of the queue: its place goes to the next request
        return job

    async def _gather(self) -> list[_Job]:
        batch = [await self._first()]
        translator = batch[0].translator  # the batch's style: never mixed
        until = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            if (job := self.queue.take(translator)) is not None:
                batch.append(self._take(job))
                continue
            left = until - time.perf_counter()
            if left <= 0 or not await self.queue.wait(left):
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
        finished: list[tuple[list[_Job], list | Exception, float, float]] = []
        try:
            await self._loop(loop, finished)
        finally:  # stopped: what was computed still goes out
            self._deliver(finished)

    async def _loop(self, loop: asyncio.AbstractEventLoop, finished: list) -> None:
        while True:
            if finished and self.queue.empty():
                self._deliver(finished)
            jobs = await self._live(await self._gather())
            for job in jobs:
                if job.large is not None:
                    self.large.put_nowait(job)
            jobs = [job for job in jobs if job.large is None]
            if not jobs:
                continue
            started = time.perf_counter()  # the translator groups same-size images into forward passes
            translator, previous = jobs[0].translator, self._previous
            self._previous = translator
            computing = loop.run_in_executor(None, self._compute, translator, previous, [j.image for j in jobs])
            self._deliver(finished)
            try:
                out: list | Exception = await computing
            except Exception as exc:  # keep serving: this batch fails, the next one runs
                out = exc
            seconds = time.perf_counter() - started
            if not isinstance(out, Exception):
                self._observe("batch", seconds, sum(j.image.shape[0] * j.image.shape[1] for j in jobs))
            finished.append((jobs, out, started, seconds * 1000))

    def calibrate_large(self, per_painted_mp: float, per_mp: float, pixels: int, painted: int) -> None:
        """The large lane's first estimate (``LargeCost.calibrate``), from a timed painting of ``pixels`` painted
        at ``painted``."""
        self.large_cost.calibrate(per_painted_mp, per_mp)
        self._show_large_rate(pixels, painted)

    def observe_large(self, seconds: float, pixels: int, painted: int) -> None:
        """A large painting's whole time in the server, decode to encoded answer (its queue wait left out)."""
        self.large_cost.observe(seconds, pixels, painted)
        self._show_large_rate(pixels, painted)

    def _show_large_rate(self, pixels: int, painted: int) -> None:
        """monet_seconds_per_megapixel{lane="large"}: the estimate for a photo like the last one timed."""
        if self.metrics is not None and (estimate := self.large_cost.estimate(pixels, painted)) is not None:
            self.metrics.seconds_per_megapixel.labels("large").set(estimate / (pixels / 1e6))

    def _observe(self, lane: str, seconds: float, pixels: int) -> None:
        rate = self.rates[lane]
        rate.observe(seconds, pixels / 1e6)
        if self.metrics is not None and rate.s_per_mp is not None:
            self.metrics.seconds_per_megapixel.labels(lane).set(rate.s_per_mp)

    @staticmethod
    def _compute(translator: Translator, previous: Translator | None, images: list) -> list:
        """One batch. When the style changes, the previous style's runtime first drops the buffers that large
        batches left it (a cheap no-op otherwise): only the style painting holds large activations, however
        many styles are loaded."""
        IdleRelease.style_changed(previous, translator)
        return translator.translate_many(images)

    async def _run_large(self) -> None:
        """Paint the large jobs one at a time (one full-size image's buffers in memory at once), each in a
        worker thread that takes the model's (first-come) lock per tile; a job whose request gave up (deadline,
        client gone) stops at its next tile."""
        while True:
            job = await self.large.get()
            job.slot.started()
            if not (await self._live([job])):
                continue
            large, started = job.large, time.perf_counter()
            try:
                painting = await asyncio.to_thread(job.translator.paint_planned, job.image, large.plan,
                                                   large.upsampler, job.future.done)
                out: list | Exception = [painting]  # the service times it whole (observe_large): decode to answer
            except PaintingStopped:
                continue
            except Exception as exc:
                out = exc
            self._deliver([([job], out, started, (time.perf_counter() - started) * 1000)])

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
