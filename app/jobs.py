"""Jobs: a clip (or a zip of photos) takes longer than a request should, so it is painted as an asynchronous job.

``POST /jobs`` streams the upload to the job's folder (its own byte limit and deadline), checks the clip's
header against the limits (duration, frames x pixels) before a frame is decoded, and answers 202. The jobs run
``MONET_JOBS_CONCURRENCY`` at a time (default 1) in worker threads beside the batcher; each frame takes the
model's first-come lock once (model/video.py), so small requests painted meanwhile wait at most about one
frame. A job's state is written to ``job.json`` in its folder (write, then rename); results are written the
same way. Finished jobs are deleted ``MONET_JOBS_TTL_S`` after they end, and the folder's total is capped
(``MONET_JOBS_STORAGE_BYTES``: a new job is refused with 503 while it is full). A restart marks the jobs it
interrupted as failed, with a message saying so.

A zip of photos is a job too: each photo is read under the photo limits of ``POST /translate``
(``MONET_MAX_UPLOAD_BYTES``, ``MONET_MAX_PIXELS``; at most ``MONET_JOBS_MAX_PHOTOS`` of them), painted as the
service paints a photo of its size, and written to a zip of paintings (the default output format); a photo
that can't be read is skipped and named in the job's ``skipped`` list.
"""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
import uuid
import zipfile
from zlib import error as zlib_error
from dataclasses import asdict, dataclass, field
from pathlib import Path

from app.decoding import finish_decode, open_upload
from app.encoding import ALPHA_FORMATS, FORMATS, encode_blend
from app.errors import Busy, NotReady, Refusal, TooLarge, UnsupportedMedia
from app.uploads import ZIP_TYPES
from model.images import IMAGE_EXTENSIONS, split_alpha
from model.plan import plan_painting
from model.tiling import PaintingStopped
from model.translator import NonFiniteOutput
from model.video import VIDEO_EXTENSIONS, ClipInfo, VideoError, paint_clip, probe
from model.weights import atomic_write

log = logging.getLogger("monet.jobs")

STATES = ("queued", "running", "done", "failed", "cancelled")
FORMATS_NAMED = "MP4, MOV, M4V, MKV, WebM or AVI (H.264, H.265, VP8/9, AV1, MPEG-4 and the other codecs FFmpeg reads)"


@dataclass
class Job:
    id: str
    name: str
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    frames_done: int = 0
    frames_total: int = 0
    error: str | None = None
    clip: dict | None = None
    kind: str = "video"  # or "photos": a zip of photos
    skipped: list = field(default_factory=list)  # photos of a zip that could not be painted: "name: why"

    def describe(self, base: str = "") -> dict:
        """What GET /jobs/{id} answers: the state, progress, ETA and, when failed, why."""
        eta = None
        if self.state == "running" and self.frames_done and self.started is not None:
            rate = self.frames_done / max(time.time() - self.started, 1e-6)
            eta = round(max(self.frames_total - self.frames_done, 0) / rate, 1)
        out = {"id": self.id, "name": self.name, "state": self.state, "frames_done": self.frames_done,
               "frames_total": self.frames_total, "eta_s": eta, "error": self.error, "created": self.created,
               "started": self.started, "finished": self.finished, "url": f"{base}/jobs/{self.id}", "clip": self.clip,
               "kind": self.kind, "skipped": self.skipped}
        if self.state == "done":
            out["result_url"] = f"{base}/jobs/{self.id}/result"
        return out


class Jobs:
    """The job folder, the queue and its workers. ``translator()`` gives the default style's translator
    (None while loading)."""

    def __init__(self, settings, metrics, translator):
        self.settings, self.metrics, self.translator = settings, metrics, translator
        self.root = Path(settings.jobs_dir)
        self.jobs: dict[str, Job] = {}
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self._cancelled: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover()
        for _ in range(self.settings.jobs_concurrency):
            self.tasks.append(asyncio.create_task(self._work()))
        self.tasks.append(asyncio.create_task(self._sweep_forever()))
        self._count()

    async def stop(self) -> None:
        self._cancelled.update(j.id for j in self.jobs.values() if j.state in ("queued", "running"))
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def _recover(self) -> None:
        """Read the jobs a previous process left: the ones it was painting or had queued failed; half-written
        files (``.*.tmp``) go."""
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                job = Job(**json.loads((folder / "job.json").read_text()))
            except (OSError, ValueError, TypeError):
                shutil.rmtree(folder, ignore_errors=True)  # no state: an upload cut off by the restart
                continue
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
            if job.state in ("queued", "running"):
                job.state, job.finished = "failed", time.time()
                job.error = "interrupted by a server restart; submit the clip again"
                self._save(job)
                log.info("job %s failed: %s", job.id, job.error)
            self.jobs[job.id] = job

    # -- submitting -----------------------------------------------------------------------------------
    def storage_used(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    def admit(self, expected_bytes: int | None) -> None:
        """Refuse a new job before its upload is read: not ready, storage full or body over the limit."""
        if self.translator() is None:
            raise NotReady("the model is still loading; try again shortly", retry_after=5)
        limit = self.settings.jobs_max_upload_bytes
        if expected_bytes is not None and expected_bytes > limit:
            raise TooLarge(f"the clip is {expected_bytes} bytes; the limit is {limit} (MONET_JOBS_MAX_UPLOAD_BYTES)")
        if self.storage_used() + (expected_bytes or 0) > self.settings.jobs_storage_bytes:
            raise Busy("job storage is full; try again once finished jobs have expired or been deleted",
                       retry_after=60)

    def new_folder(self) -> tuple[str, Path]:
        job_id = uuid.uuid4().hex[:16]
        folder = self.root / job_id
        folder.mkdir(parents=True)
        return job_id, folder

    async def submit_file(self, source: Path, name: str) -> Job:
        """A job for a clip already on this machine (the UI's upload): copied into a job folder, then as
        ``submit``."""
        self.admit(source.stat().st_size)
        if source.stat().st_size > self.settings.jobs_max_upload_bytes:
            raise TooLarge("the clip is over MONET_JOBS_MAX_UPLOAD_BYTES")
        job_id, folder = self.new_folder()
        try:
            await asyncio.to_thread(shutil.copyfile, source, folder / "upload")
        except BaseException:
            self.discard_folder(folder)
            raise
        return await self.submit(job_id, folder, folder / "upload", name)

    @staticmethod
    def discard_folder(folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    async def submit(self, job_id: str, folder: Path, upload: Path, name: str) -> Job:
        """Check the uploaded clip's header (415 not a video, 413 over the limits), or the zip's directory, and
        queue it."""
        try:
            if await asyncio.to_thread(is_zip, upload):
                photos = await asyncio.to_thread(photo_entries, upload, self.settings)
                job = Job(job_id, name, frames_total=len(photos), kind="photos")
                described = f"a zip of {len(photos)} photos"
            else:
                info = await asyncio.to_thread(probe, upload)
                self._check(info)
                job = Job(job_id, name, frames_total=info.frames, clip=info.as_dict())
                described = f"{info.width}x{info.height}, {info.frames} frames, {info.duration_s:.1f} s"
        except VideoError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise UnsupportedMedia(f"{exc}; send a video: {FORMATS_NAMED}, or a zip of photos") from None
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.jobs[job_id] = job
        self._save(job)
        await self.queue.put(job_id)
        self._count()
        log.info("job %s queued: %s, %s", job_id, name, described)
        return job

    def _check(self, info: ClipInfo) -> None:
        s = self.settings
        if info.duration_s > s.jobs_max_duration_s:
            raise TooLarge(f"the clip lasts {info.duration_s:.0f} s; the limit is {s.jobs_max_duration_s:.0f} s "
                           "(MONET_JOBS_MAX_DURATION_S)")
        work = info.frames * info.width * info.height
        if work > s.jobs_max_frame_pixels:
            raise TooLarge(f"the clip has {info.frames} frames of {info.width}x{info.height} ({work} pixels in "
                           f"all); the limit is {s.jobs_max_frame_pixels} (MONET_JOBS_MAX_FRAME_PIXELS)")

    # -- asking ---------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def result(self, job: Job) -> Path | None:
        path = self.root / job.id / result_name(job)
        return path if job.state == "done" and path.is_file() else None

    def delete(self, job: Job) -> None:
        """Cancel a job (a running one stops before its next frame) and remove its files."""
        if job.state in ("queued", "running"):
            self._cancelled.add(job.id)
            job.state, job.finished = "cancelled", time.time()
            log.info("job %s cancelled", job.id)
        self.jobs.pop(job.id, None)
        if job.state != "running":
            shutil.rmtree(self.root / job.id, ignore_errors=True)
        self._count()

    # -- working --------------------------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            job_id = await self.queue.get()
            job = self.jobs.get(job_id)
            if job is None or job.state != "queued" or job_id in self._cancelled:
                self._finish_cancelled(job_id)
                continue
            translator = self.translator()
            job.state, job.started = "running", time.time()
            self._save(job)
            self._count()
            log.info("job %s running", job_id)
            folder = self.root / job_id

            def progress(done: int, total: int) -> None:
                job.frames_done, job.frames_total = done, total
                if self.metrics is not None and job.kind == "video":
                    self.metrics.frames_painted.inc()

            try:
                stop = lambda: job_id in self._cancelled  # noqa: E731
                if job.kind == "photos":
                    job.skipped = await asyncio.to_thread(
                        paint_photos, translator, folder / "upload", folder / result_name(job), self.settings,
                        progress, stop)
                else:
                    result = await asyncio.to_thread(
                        paint_clip, translator, folder / "upload", folder / result_name(job),
                        stroke_scale=None, upsampler=self.settings.upsampler, progress=progress, stop=stop)
                    job.frames_total = result.frames
                job.state = "done"
                (folder / "upload").unlink(missing_ok=True)  # the result is what is kept
            except PaintingStopped:
                self._finish_cancelled(job_id)
                continue
            except (VideoError, NonFiniteOutput) as exc:
                job.state, job.error = "failed", str(exc)
            except Exception as exc:  # a fault of ours: the job fails, the service keeps serving
                log.exception("job %s: unexpected error", job_id)
                job.state, job.error = "failed", f"server fault: {type(exc).__name__}"
            job.finished = time.time()
            if job_id in self.jobs:
                self._save(job)
            self._count()
            log.info("job %s %s%s (%d frames, %.1f s)", job_id, job.state, f": {job.error}" if job.error else "",
                     job.frames_done, job.finished - job.started)

    def _finish_cancelled(self, job_id: str) -> None:
        self._cancelled.discard(job_id)
        if job_id not in self.jobs:
            shutil.rmtree(self.root / job_id, ignore_errors=True)
        self._count()

    def _save(self, job: Job) -> None:
        path = self.root / job.id / "job.json"
        if path.parent.is_dir():
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(asdict(job))))

    def _count(self) -> None:
        if self.metrics is None:
            return
        counts = dict.fromkeys(STATES, 0)
        for job in self.jobs.values():
            counts[job.state] += 1
        for state, n in counts.items():
            self.metrics.jobs.labels(state).set(n)

    # -- expiry ---------------------------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> list[str]:
        """Delete the jobs that ended more than the TTL ago; their ids."""
        now = time.time() if now is None else now
        gone = [j.id for j in self.jobs.values()
                if j.finished is not None and j.state in ("done", "failed", "cancelled")
                and now - j.finished > self.settings.jobs_ttl_s]
        for job_id in gone:
            self.jobs.pop(job_id, None)
            shutil.rmtree(self.root / job_id, ignore_errors=True)
            log.info("job %s expired", job_id)
        if gone:
            self._count()
        return gone

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, max(self.settings.jobs_ttl_s / 4, 0.5)))
            self.sweep()


def result_name(job: Job) -> str:
    return "result.zip" if job.kind == "photos" else "result.mp4"


def is_zip(path: Path) -> bool:
    """A zip by its first bytes (a local file header) or its directory at the end (a self-extracting one); a
    zip cut short still starts with its magic, and is then refused as a damaged zip, not read as a video."""
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            return True
    return zipfile.is_zipfile(path)


def photo_entries(path: Path, settings) -> list[zipfile.ZipInfo]:
    """The photos in a zip (files with a photo's suffix; folders, hidden files and macOS's ``__MACOSX``
    copies left out), from its directory alone. Raises VideoError (415) for a damaged zip or one with no
    photo, TooLarge (413) for too many photos or one over MONET_MAX_UPLOAD_BYTES."""
    try:
        with zipfile.ZipFile(path) as z:
            entries = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise VideoError(f"not a readable zip ({exc})") from None
    photos = [e for e in entries if not e.is_dir() and Path(e.filename).suffix.lower() in IMAGE_EXTENSIONS
              and not Path(e.filename).name.startswith(".") and not e.filename.startswith("__MACOSX/")]
    if not photos:
        raise VideoError("the zip holds no photo (" + ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS)) + ")")
    if len(photos) > settings.jobs_max_photos:
        raise TooLarge(f"the zip holds {len(photos)} photos; the limit is {settings.jobs_max_photos} "
                       "(MONET_JOBS_MAX_PHOTOS)")
    big = next((e for e in photos if e.file_size > settings.max_upload_bytes), None)
    if big is not None:
        raise TooLarge(f"{big.filename} is {big.file_size} bytes; a photo's limit is {settings.max_upload_bytes} "
                       "(MONET_MAX_UPLOAD_BYTES)")
    return photos


def paint_photos(translator, upload: Path, target: Path, settings, progress, stop) -> list[str]:
    """Paint every photo of the zip ``upload`` into the zip ``target`` (written whole or not at all), each as
    ``POST /translate`` paints one (decoded upright, colour-managed, capped at MONET_MAX_SIDE; the default
    stroke scale and tiling). Returns the skipped photos as "name: why"; raises VideoError if none was painted."""
    photos = photo_entries(upload, settings)
    fmt = settings.default_format
    suffix = FORMATS[fmt].extension
    skipped: list[str] = []
    used: set[str] = set()

    def write(tmp: str) -> None:
        with zipfile.ZipFile(upload) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as out:
            for done, entry in enumerate(photos, 1):
                if stop():
                    raise PaintingStopped("the job was cancelled")
                try:
                    with src.open(entry) as f:
                        data = f.read(settings.max_upload_bytes + 1)  # the directory's sizes may lie
                    if len(data) > settings.max_upload_bytes:
                        raise TooLarge(f"over {settings.max_upload_bytes} bytes (MONET_MAX_UPLOAD_BYTES)")
                    image, alpha = split_alpha(finish_decode(
                        open_upload(data, settings.max_pixels, settings.max_side), settings.max_side,
                        fmt in ALPHA_FORMATS))
                    plan = plan_painting(image.shape[1], image.shape[0], None, settings.tile)
                    painting = translator.paint_planned(image, plan, settings.upsampler, stop=stop)
                except (Refusal, zipfile.BadZipFile, zlib_error, OSError, EOFError) as exc:
                    skipped.append(f"{entry.filename}: {getattr(exc, 'detail', None) or exc}")
                else:
                    stem = Path(entry.filename).stem or "photo"
                    name, n = f"{stem}{suffix}", 1
                    while name in used:
                        n += 1
                        name = f"{stem}-{n}{suffix}"
                    used.add(name)
                    out.writestr(name, encode_blend(image, painting, 1.0, fmt, alpha))
                progress(done, len(photos))
            if not used:
                raise VideoError("no photo in the zip could be painted: " + "; ".join(skipped[:3]))

    atomic_write(target, write)
    return skipped


def suffix_for(name: str | None, content_type: str) -> str:
    """A file suffix for an upload (its name's, or one from its content type), for the job's record."""
    suffix = Path(name or "").suffix.lower()
    if suffix in VIDEO_EXTENSIONS or suffix == ".zip":
        return suffix
    if content_type in ZIP_TYPES:
        return ".zip"
    return {"video/mp4": ".mp4", "video/quicktime": ".mov", "video/webm": ".webm",
            "video/x-matroska": ".mkv", "video/x-msvideo": ".avi"}.get(content_type, ".mp4")


