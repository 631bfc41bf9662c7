"""The service layer: the styles' lifecycle (app/catalogue.py), and one `paint` call shared by REST and the UI."""
from __future__ import annotations

import asyncio
import gc
import io
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.batcher import ArrivalHold, Batcher, IdleRelease, Large, Reservation, Timing
from app.catalogue import Catalogue
from app.config import Settings
from app.decoding import SMALL_PIXELS, DecodeBudget, Decoder, Opened
from app.encoding import ALPHA_FORMATS, FAST_PNG, FORMATS, encode_blend
from app.errors import Busy, ClientClosed, NotReady
from app.jobs import Jobs
from app.observability import Metrics
from model.images import fitted_size, split_alpha
from model.plan import plan_painting
from model.stroke import enlarge, shrink
from model.runtime import cpu_cores, release_free_memory, resolve_device
from model.translator import FifoLock, Translator

log = logging.getLogger("monet.service")


REPLICA = f"{socket.gethostname()}:{os.getpid()}"  # which process answered, behind a load balancer


@dataclass
class Painting:
    """A painted request, before it is an HTTP answer (the routes build that: app/routes.py)."""
    data: bytes
    media_type: str
    timing: Timing
    source: np.ndarray  # the upright RGB input the painting was made from
    decode_ms: float = 0.0  # header checks, decode, resize (decode budget wait included)
    encode_ms: float = 0.0  # blend and encode
    style: str = ""  # the style and its version (file hash) that painted it
    version: str = ""

    def server_timing(self) -> str:
        """The Server-Timing header: where this request's time went."""
        t = self.timing
        return (f"decode;dur={self.decode_ms:.1f}, queue;dur={t.queue_ms:.1f}, compute;dur={t.compute_ms:.1f}, "
                f"encode;dur={self.encode_ms:.1f}")


CALIBRATION_SIZE = (4000, 3000)  # a phone photo: the large lane's first rate is timed on one (12 MP)


def freeze_heap() -> None:
    """Collect, then move every object alive now (the imports, the model, OpenVINO's conversions) out of the
    garbage collector's sight (``gc.freeze``), so that the collections a burst of requests triggers walk only
    the requests' objects. After the conversions for large paintings, whose front end keeps many objects alive,
    the 503s of a 300-upload burst took twice as long without it (p50 406 against 182 ms in the server)."""
    gc.collect()
    gc.freeze()


class PaintingService:
    """Owns the styles (a Catalogue of translators) and the batcher. Loads the default style in the background
    at start-up; ``reload`` (SIGHUP, POST /admin/reload) reads the styles again."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.model_lock = FifoLock()  # every style's forward passes take turns: one at a time on the cores
        self.catalogue = Catalogue(settings.weights, settings.default_style, settings.max_loaded_styles,
                                   settings.max_styles, self._translator_for, self._styles_changed)
        self.batcher: Batcher | None = None
        self.idle_release = IdleRelease(self.catalogue.translators)  # memory goes back from here alone
        self._painted: dict = {}  # style name -> its monet_paintings_total child
        self.load_error: str | None = None
        self.jobs = Jobs(settings, metrics, lambda: self.translator)  # video clips (app/jobs.py)
        # full-size paintings hold a budget of their own from decode to encode (their decode also takes the decode
        # budget), so that a large painting in progress never keeps small uploads from decoding
        self.large_budget = DecodeBudget(settings.decode_budget_bytes, self.idle_release.after_burst)
        # time.monotonic() of the SIGTERM: finish what arrived before it, take nothing new
        self.drain_started = float("inf")
        self._loading: asyncio.Task | None = None
        # small images' decodes and encodes (libjpeg-turbo, fpng and Pillow release the GIL), off the event loop:
        # on one thread per core where the model runs elsewhere (a GPU). On a CPU, on the loop while the service is
        # calm (the path measured over many sessions; always on the thread, 256^2 throughput was within noise of
        # it) and on one thread during a burst (over twice a batch admitted or arriving), where the decodes on the
        # loop held up the burst's refusals: 300 uploads at once, the 503s' p99 129-138 ms against 87-104 ms
        # (docs/service.md)
        threads = settings.codec_threads
        self._codecs_in_bursts_only = False  # an operator's MONET_CODEC_THREADS: always on its threads
        if threads is None:
            try:
                cuda = resolve_device(settings.device).type == "cuda"
            except ValueError:  # CUDA asked for and absent: loading the model says so (/readyz)
                cuda = False
            threads = cpu_cores() if cuda else 1
            self._codecs_in_bursts_only = not cuda
        self._burst_from = 2 * settings.max_batch_size
        self.codecs = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="codec") if threads else None
        self.decoder = Decoder(settings.decode_budget_bytes, settings.max_pixels, settings.max_side,
                               self._on_codec_thread, metrics.decodes.inc, self.idle_release.after_burst)

    def start_draining(self) -> None:
        self.drain_started = time.monotonic()

    @property
    def draining(self) -> bool:
        return self.drain_started != float("inf")

    def readiness(self, arrived: float | None = None) -> NotReady | Busy | None:
        """None when this replica serves a request that ``arrived`` then (time.monotonic(); None: now); else
        the refusal that /readyz and the request answer with. A request that arrived before SIGTERM is served."""
        if self.draining and (arrived is None or arrived >= self.drain_started):
            return Busy("shutting down")  # retry: another replica (or this one's successor) will answer
        if self.batcher is None:
            if self.load_error:  # permanent until an operator fixes the weights: no Retry-After
                return NotReady(f"the model could not be loaded and this replica cannot serve: {self.load_error}")
            return NotReady("the model is still loading", retry_after=5)
        return None

    def arrival(self) -> tuple[NotReady | Busy | None, ArrivalHold | None]:
        """What a request for a painting gets as it arrives, before its body is read: a refusal when the answer
        is known already (not ready or shutting down, or the queue full), else its place in the queue, held
        until its body is in for at most a second (``ArrivalHold``), so that a burst beyond the queue is refused
        as it arrives while a slow upload holds a place only that long."""
        if (refusal := self.readiness()) is not None:
            return refusal, None
        if (hold := self.batcher.hold()) is None:  # the queue is full
            return self.batcher.full(), None
        return None, hold

    @property
    def ready(self) -> bool:
        return self.readiness() is None

    @property
    def translator(self) -> Translator | None:
        """The default style's translator (None until it is loaded)."""
        style = self.catalogue.loaded.get(self.catalogue.default)
        return style.translator if style is not None else None

    def _translator_for(self, path) -> Translator:
        s = self.settings
        return Translator.from_file(path, device=s.device, precision=s.precision, max_batch=s.max_batch_size,
                                    max_batch_pixels=s.max_batch_pixels, backend=s.backend, lock=self.model_lock)

    def _styles_changed(self) -> None:
        self.metrics.styles_loaded.set(len(self.catalogue.loaded))

    async def start(self) -> None:
        await anyio.sleep(0)  # imports anyio's asyncio backend now: the first request did it (8 ms), in a burst
        self._loading = asyncio.create_task(self._load())
        await self.jobs.start()
        if threading.current_thread() is threading.main_thread():  # the real server (not an in-process client)
            try:
                asyncio.get_running_loop().add_signal_handler(
                    signal.SIGHUP, lambda: asyncio.ensure_future(self.reload("SIGHUP")))
            except (NotImplementedError, RuntimeError, ValueError, AttributeError):  # no SIGHUP (Windows)
                pass

    async def _load(self) -> None:
        s = self.settings
        try:
            style = await self.catalogue.open()
        except Exception as exc:  # surfaced by /readyz and 503s, the process stays up for probes
            self.load_error = str(exc)
            log.error("model not loaded: %s", exc)
            return
        batcher = Batcher(None, s.max_batch_size, s.max_batch_wait_ms / 1000, s.queue_size, self.metrics,
                          translators=self.catalogue.translators, idle_release=self.idle_release)
        batcher.start()
        self.batcher = batcher
        t = style.translator
        log.info("model ready: %s (style %s of %d) on %s (%s, %s)", style.file.path, style.name,
                 len(self.catalogue.files), t.device, t.dtype, t.backend)
        freeze_heap()
        # the default style's stages and tile graphs for large paintings, in the background (other styles convert
        # theirs when their first large painting needs them: each conversion keeps memory in OpenVINO for good,
        # and a catalogue that loads and unloads styles would pay it on every load)
        loop = asyncio.get_running_loop()

        def large_ready() -> None:  # in the background thread that prepared the large paintings' graphs
            self._time_a_large_painting(t, batcher, loop)
            freeze_heap()

        t.prepare_large(then=large_ready)

    def _time_a_large_painting(self, translator: Translator, batcher: Batcher, loop) -> None:
        """The large lane's first estimate, before any real large painting: a synthetic 12 MP photo through the
        large path (decode, shrink, painting by the default plan, upsampling back, encode), the network's share
        timed apart (``LargeCost``). Without it, a burst of large uploads that arrived before the first one was
        painted was admitted by count alone, and the last of them answered 503 only at their deadline (issue 34,
        item 1: 16 uploads of 6000x6000, five 503s after 30 s)."""
        s = self.settings
        try:
            width, height = CALIBRATION_SIZE
            y, x = np.mgrid[0:height, 0:width]
            noise = np.random.default_rng(0).integers(0, 40, (height, width, 1), dtype=np.uint8)
            pixels = ((np.stack([x * 200 // width, y * 200 // height, (x + y) * 100 // (width + height)], -1)
                       + noise).astype(np.uint8))
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "JPEG", quality=90)
            del pixels, x, y, noise
            started = time.perf_counter()
            with Image.open(io.BytesIO(buf.getvalue())) as img:
                image = np.asarray(img.convert("RGB"))
            plan = plan_painting(width, height, None, s.tile, s.max_side)
            small = shrink(image, plan.painted)
            network = time.perf_counter()
            painting = (translator.translate_tiled(small, plan.tile) if plan.tiled
                        else translator.paint_whole(small))
            network = time.perf_counter() - network
            encode_blend(image, enlarge(painting, image, s.upsampler), 1.0, s.default_format)
            seconds = time.perf_counter() - started
            del image, painting, small, buf
            painted = plan.painted[0] * plan.painted[1]
            per_painted_mp, per_mp = network / (painted / 1e6), (seconds - network) / (width * height / 1e6)
            try:
                loop.call_soon_threadsafe(batcher.calibrate_large, per_painted_mp, per_mp, width * height, painted)
            except RuntimeError:  # the loop closed: the server stopped while this ran (its thread is not waited for)
                log.info("the server stopped before the large paintings' first estimate was made")
                return
            log.info("a %dx%d photo took %.2f s to paint, %.2f s of it in the network at %dx%d (the large "
                     "paintings' first estimate)", width, height, seconds, network, *plan.painted)
        except Exception:  # noqa: BLE001 -- an estimate, not a service: without it, the first real painting sets it
            log.exception("timing a large painting failed")
        finally:
            release_free_memory()

    async def reload(self, why: str) -> dict:
        """Read the styles again (app/catalogue.py); what changed and what was refused."""
        if self.batcher is None:
            raise NotReady("the model is still loading; reload once it is ready", retry_after=5)
        report = await self.catalogue.reload(why)
        self.metrics.reloads.labels("refused" if report["refused"] else "ok").inc()
        for name in report["removed"]:
            if self._painted.pop(name, None) is not None:
                self.metrics.paintings.remove(name)
        return report

    async def stop(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        await self.jobs.stop()
        if self.batcher is not None:
            await self.batcher.stop()
        if self.codecs is not None:
            self.codecs.shutdown(wait=False)

    def info(self) -> dict:
        s = self.settings
        t = self.translator
        return {
            "replica": REPLICA,
            "ready": self.ready,
            "load_error": self.load_error,
            # the file by name: no path of this machine (nor, model.weights.without_paths, of the training one)
            "model": t.info.as_dict() | {"path": Path(t.info.path).name} if t is not None and t.info is not None
            else None,
            "default_style": self.catalogue.default or None,
            "styles": {name: f.version for name, f in sorted(self.catalogue.files.items())},
            "loaded_styles": list(self.catalogue.loaded),
            "device": str(t.device) if t is not None else None,
            "dtype": str(t.dtype).removeprefix("torch.") if t is not None else None,
            "backend": t.backend if t is not None else None,
            "batching": {"max_batch_size": s.max_batch_size, "max_batch_wait_ms": s.max_batch_wait_ms,
                         "queue_size": s.queue_size, "request_timeout_s": s.request_timeout_s},
            "painting": {"tile": s.tile, "upsampler": s.upsampler, "default_stroke_scale": "longer side / 1024, "
                         "at least 1",
                         # the default style's stages and tile graphs converted (app start, in the background)
                         "large_ready": t.large_ready if t is not None else False},
            "limits": {"max_upload_bytes": s.max_upload_bytes, "max_pixels": s.max_pixels, "max_side": s.max_side,
                       "decode_budget_bytes": s.decode_budget_bytes, "max_batch_pixels": s.max_batch_pixels},
        }

    async def paint(self, data: bytes, fmt: str, gone=None, strength: float = 1.0,
                    arrived: float | None = None, stroke_scale: float | None = None,
                    style: str | None = None, reserved: Reservation | None = None,
                    hold: ArrivalHold | None = None) -> Painting:
        """Admit the request (which ``arrived`` then: time.monotonic()), then decode ``data``, translate it through
        the batcher in ``style`` (None: the default), blend ``strength`` of the painting with the photo, encode as
        ``fmt``. ``stroke_scale``: paint at 1/s of the size and bring it back (None: the image's default,
        model/stroke.py). ``reserved``: its work, counted from its header (``admit_early``). Raises a Refusal
        (app.errors) or NonFiniteOutput. ``hold``: its place, held since it arrived (``arrival``)."""
        if (refusal := self.readiness(arrived)) is not None:
            raise refusal
        self.catalogue.resolve(style)  # an unknown style: 404 before anything else
        with self.batcher.slot(hold) as slot:  # admitted before any decode: under overload a 503 costs nothing
            async with self.catalogue.use(style, self.settings.request_timeout_s) as chosen:
                painting = await self._paint(data, fmt, gone, strength, stroke_scale, slot, chosen.translator,
                                             reserved)
        painting.style, painting.version = chosen.name, chosen.version
        counter = self._painted.get(chosen.name)
        if counter is None:  # the labelled child, looked up once per style
            counter = self._painted[chosen.name] = self.metrics.paintings.labels(chosen.name)
        counter.inc()
        return painting

    def admit_early(self, head: bytes, stroke_scale: float | None) -> Reservation | None:
        """Admit or refuse a large painting from ``head``, its image's first bytes, while the rest of its upload
        still arrives: WaitTooLong (503, Retry-After) when the large lane's work ahead would keep it past its
        deadline, else its work is counted in the lane now (the ``Reservation``, handed to ``paint``), so the
        next large upload of a burst is judged with this one ahead of it. None, deciding nothing, for an image
        painted in batches, or when the header is not in ``head`` (a long EXIF block, HEIC) or cannot be read:
        the whole body then decides, as for any image."""
        if self.batcher is None or self.draining:  # draining: the answer closes the connection, read it all first
            return None
        s = self.settings
        try:
            opened = self.decoder.open(head)
        except Exception:  # a truncated or unusual header: the whole body answers for itself
            return None
        batched, pixels, painted = self._work(opened.image.size, stroke_scale)
        opened.image.close()
        if batched:
            return None
        return self.batcher.reserve(pixels, painted, s.request_timeout_s)

    def _work(self, size: tuple[int, int], stroke_scale: float | None) -> tuple[bool, int, int]:
        """What admission counts of an image of ``size`` (from its header): painted in batches or not, its pixels
        once fitted to ``max_side``, and the pixels the network paints. Batched or not does not depend on the
        EXIF rotation, which the decode applies."""
        s = self.settings
        plan = plan_painting(*size, stroke_scale, s.tile, s.max_side)
        w, h = fitted_size(size, s.max_side)
        return plan.batched, w * h, plan.painted[0] * plan.painted[1]

    async def _paint(self, data: bytes, fmt: str, gone, strength: float, stroke_scale: float | None, slot,
                     translator: Translator, reserved: Reservation | None = None) -> Painting:
        s = self.settings
        started = time.perf_counter()
        opened = self.decoder.open(data)  # the header only: microseconds
        batched, pixels, painted = self._work(opened.image.size, stroke_scale)
        try:  # refused now, before the decode, if the work ahead would keep it past its deadline
            slot.expect(pixels, not batched, s.request_timeout_s, painted, reserved)
        except Busy:
            opened.image.close()
            raise
        if not batched:
            return await self._paint_large(opened, stroke_scale, slot, fmt, gone, strength, started, translator)
        image, alpha = split_alpha(await self.decoder.decode(opened, s.request_timeout_s, fmt in ALPHA_FORMATS))
        decoded = time.perf_counter()
        result, timing = await slot.submit(image, s.request_timeout_s, gone, translator=translator)
        if gone is not None and await gone():  # left during compute: skip the encode nobody would read
            raise ClientClosed("the client closed the connection before its painting was ready")
        computed = time.perf_counter()
        if image.size <= SMALL_PIXELS * 3 and (fmt == "jpeg" or (fmt == "png" and FAST_PNG)):
            body = await self._on_codec_thread(encode_blend, image, result, strength, fmt, alpha)
        else:
            body = await run_in_threadpool(encode_blend, image, result, strength, fmt, alpha)
        return Painting(body, FORMATS[fmt].media_type, timing, image, (decoded - started) * 1000,
                        (time.perf_counter() - computed) * 1000)

    async def _paint_large(self, opened: Opened, stroke_scale: float | None, slot, fmt: str, gone,
                           strength: float, started: float, translator: Translator) -> Painting:
        """A painting made on its own (``Translator.paint_planned`` beside the batches): its whole life (decode,
        painting, encode) holds its share of the large-painting budget, so that the full-size buffers of only so
        many large images are in memory at once; the decode itself also takes its share of the decode budget."""
        s = self.settings
        w, h = fitted_size(opened.image.size, s.max_side)
        cost = opened.cost + w * h * 8  # + the painting (3 B/px), its encoding, the blend's strips
        try:
            # a large painting keeps the model's memory in use from its decode to its answer (IdleRelease)
            async with self.large_budget.hold(cost, s.request_timeout_s):
                held = time.perf_counter()  # its work starts here: the wait for the budget is queueing, not work
                with self.idle_release.working():
                    image, alpha = split_alpha(await self.decoder.decode(opened, s.request_timeout_s,
                                                                         fmt in ALPHA_FORMATS))
                    decoded = time.perf_counter()
                    plan = plan_painting(image.shape[1], image.shape[0], stroke_scale, s.tile)  # upright, as decoded
                    result, timing = await slot.submit(image, s.request_timeout_s, gone, Large(plan, s.upsampler),
                                                       translator)
                    if gone is not None and await gone():
                        raise ClientClosed("the client closed the connection before its painting was ready")
                    computed = time.perf_counter()
                    body = await run_in_threadpool(encode_blend, image, result, strength, fmt, alpha)
                    # the lane's estimate learns its time in the server from decode to answer, its waits (for the
                    # large budget, for its turn at the network) left out: in a burst the budget's wait, counted
                    # as work, inflated the estimate and the next burst was admitted by too little
                    self.batcher.observe_large(decoded - held + timing.compute_ms / 1000
                                               + time.perf_counter() - computed, w * h,
                                               plan.painted[0] * plan.painted[1])
        except asyncio.TimeoutError:
            opened.image.close()
            raise Busy("the server is busy with other large images; retry shortly") from None
        return Painting(body, FORMATS[fmt].media_type, timing, image, (decoded - started) * 1000,
                        (time.perf_counter() - computed) * 1000)

    async def _on_codec_thread(self, fn, *args):
        """``fn(*args)`` for a small image's decode or encode: on the codec threads when there are any (the
        event loop's own time per request is the ceiling of the process when the model runs on a GPU, and a
        256x256 decode and PNG encode took two thirds of it on the loop; ``run_in_executor`` is one hop, a
        fraction of anyio's ``to_thread``), else on the loop; on a CPU by default only during a burst
        (MONET_CODEC_THREADS, docs/architecture.md)."""
        if self.codecs is None or (self._codecs_in_bursts_only and (
                self.batcher is None or self.batcher.taken <= self._burst_from)):
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.codecs, fn, *args)
