"""HTTP routes: parse, call the service, encode. Nothing else lives here."""
from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.config import OutputFormat
from app.encoding import FORMATS, negotiate
from app.errors import NotAcceptable, NotFinished, Unauthorized, UnknownJob, documented
from app.jobs import Job, suffix_for
from app.service import Painting, PaintingService
from model.stroke import STROKE_SCALES
from app.uploads import image_bytes, save_video

router = APIRouter()

IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                               "properties": {"image": {"type": "string", "format": "binary"}}}},
            **{media: {"schema": {"type": "string", "format": "binary"}} for media in ("image/jpeg", "image/png",
                                                                                      "image/webp")},
        },
    }
}
# the documented refusals, from the one status map (app/errors.py)
ERRORS = {code: {"description": text, "content": {"application/json": {"example": {"detail": text}}}}
          for code, text in documented().items()}


def service_of(request: Request) -> PaintingService:
    return request.app.state.service


@router.post("/translate", response_class=Response, openapi_extra=IMAGE_BODY,
             responses={200: {"content": {f.media_type: {} for f in FORMATS.values()},
                              "description": "the Monet-style painting, same size and orientation as the upload"},
                        **{code: e for code, e in ERRORS.items() if code != 401}})
async def translate(request: Request, format: OutputFormat | None = Query(
        None, description="output format; otherwise chosen from the Accept header (default png)"),
        strength: float = Query(1.0, ge=0.0, le=1.0, description="how much painting: 1 the painting, 0 the photo, "
                                "in between a blend of the two"),
        stroke_scale: float | None = Query(None, ge=STROKE_SCALES[0], le=STROKE_SCALES[1], description="paint at 1/stroke_scale of the "
                                           "size and bring the painting back to full size, for strokes that many "
                                           "times larger; default: the longer side / 1024, at least 1"),
        style: str | None = Query(None, max_length=64, description="the style to paint in (GET /styles lists "
                                  "them); default: the server's default style")) -> Response:
    """Paint the uploaded photo in Monet's style (multipart field `image`, or a raw image/* body)."""
    return await paint_request(request, format, strength, stroke_scale, style)


async def paint_request(request: Request, format: str | None, strength: float, stroke_scale: float | None,
                        style: str | None) -> Response:
    """POST /translate's work once its query is read, by this route or by app/fastpath.py: negotiate the format,
    read the body under the upload limits, paint, answer. Raises a Refusal (app.errors)."""
    service = service_of(request)
    arrived = getattr(request.state, "arrived", None)  # stamped by the middleware as the request came in
    fmt = negotiate(format, request.headers.get("accept"), service.settings.default_format)
    if fmt is None:
        raise NotAcceptable("none of the Accept header's types can be produced; accept "
                            + ", ".join(f.media_type for f in FORMATS.values()))
    s = service.settings
    # A large photo is admitted (its work counted) or refused from its header while its body still arrives;
    # after a refusal the server discards the rest (app/connections.py), also when the answer closes the
    # connection.
    reserved = []

    def peek(head: bytes) -> None:
        if not reserved and (held := service.admit_early(head, stroke_scale)) is not None:
            reserved.append(held)

    try:
        data = await image_bytes(request, s.max_upload_bytes, s.upload_timeout_s, request.app.state.upload_budget,
                                 peek=peek)
        painting = await service.paint(data, fmt, gone=request.is_disconnected, strength=strength, arrived=arrived,
                                       stroke_scale=stroke_scale, style=style,
                                       reserved=reserved[0] if reserved else None,
                                       hold=getattr(request.state, "hold", None))
    finally:
        for held in reserved:  # counted by its slot already, unless the request ended before
            held.release()
    request.state.style = painting.style  # for the access log
    return painting_response(painting)


def painting_response(painting: Painting) -> Response:
    """The HTTP answer: the image, and headers that say where its time went and which style made it."""
    t = painting.timing
    return Response(painting.data, media_type=painting.media_type, headers={
        "X-Queue-Ms": f"{t.queue_ms:.1f}", "X-Compute-Ms": f"{t.compute_ms:.1f}", "X-Batch-Size": str(t.batch_size),
        "Server-Timing": painting.server_timing(), "X-Style": painting.style, "X-Model-Version": painting.version})


VIDEO_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                               "properties": {"file": {"type": "string", "format": "binary"}}}},
            **{media: {"schema": {"type": "string", "format": "binary"}} for media in ("video/mp4",
                                                                                      "video/quicktime",
                                                                                      "application/zip")},
        },
    }
}
JOB_ERRORS = {code: ERRORS[code] for code in (400, 404, 408, 409, 413, 415, 422, 503) if code in ERRORS}


@router.post("/jobs", status_code=202, openapi_extra=VIDEO_BODY, responses=JOB_ERRORS)
async def submit_job(request: Request) -> JSONResponse:
    """Paint a video clip, or a zip of photos, as an asynchronous job (multipart field `file`, or a raw video/*
    or application/zip body): 202 with the job's id and URL; poll `GET /jobs/{id}`, download
    `GET /jobs/{id}/result`."""
    jobs = service_of(request).jobs
    declared = request.headers.get("content-length", "")
    jobs.admit(int(declared) if declared.isdigit() else None)
    job_id, folder = jobs.new_folder()
    s = service_of(request).settings
    try:
        name = await save_video(request, folder / "upload", s.jobs_max_upload_bytes, s.jobs_upload_timeout_s)
    except BaseException:
        jobs.discard_folder(folder)
        raise
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    name = name or f"clip{suffix_for(None, content_type)}"
    job = await jobs.submit(job_id, folder, folder / "upload", Path(name).name[:200])
    return JSONResponse(job.describe(), status_code=202, headers={"Location": f"/jobs/{job.id}"})


def job_of(request: Request, job_id: str) -> Job:
    job = service_of(request).jobs.get(job_id)
    if job is None:
        raise UnknownJob(f"no job {job_id!r}: never made, deleted, or expired after "
                         f"{service_of(request).settings.jobs_ttl_s:g} s")
    return job


@router.get("/jobs/{job_id}", responses={404: ERRORS[404]})
async def job_status(request: Request, job_id: str) -> dict:
    """A job's state (queued, running, done, failed, cancelled), frames done of total, ETA, and the error."""
    return job_of(request, job_id).describe()


@router.get("/jobs/{job_id}/result", response_class=FileResponse,
            responses={200: {"content": {"video/mp4": {}, "application/zip": {}},
                             "description": "the painted clip, or the zip of paintings"},
                       404: ERRORS[404], 409: ERRORS[409]})
async def job_result(request: Request, job_id: str) -> FileResponse:
    """The painted clip (H.264 in MP4), or a zip of the paintings, once the job is done."""
    job = job_of(request, job_id)
    path = service_of(request).jobs.result(job)
    if path is None:
        raise NotFinished(f"job {job_id} is {job.state}" + (f": {job.error}" if job.error else "")
                          + "; the result is there once it is done")
    stem = Path(job.name).stem or "clip"
    if job.kind == "photos":
        return FileResponse(path, media_type="application/zip", filename=f"{stem}-monet.zip")
    return FileResponse(path, media_type="video/mp4", filename=f"{stem}-monet.mp4")


@router.delete("/jobs/{job_id}", responses={404: ERRORS[404]})
async def job_delete(request: Request, job_id: str) -> dict:
    """Cancel a job (a running one stops before its next frame) and delete its files."""
    job = job_of(request, job_id)
    service_of(request).jobs.delete(job)
    return {"id": job_id, "state": "cancelled" if job.state == "cancelled" else "deleted"}


@router.get("/styles")
async def styles(request: Request) -> dict:
    """The styles this server paints in: name, display name, direction, architecture, version (the weight
    file's SHA-256, first 16 hex digits), scores, whether it is loaded; the default; files refused."""
    return service_of(request).catalogue.describe()


admin = APIRouter()  # included only when MONET_ADMIN_TOKEN is set (app/main.py): else the path is a 404


@admin.post("/admin/reload", responses={401: ERRORS[401]})
async def admin_reload(request: Request) -> dict:
    """Read the styles again (as SIGHUP does): new files are added, changed ones replace their old version once
    checked and warmed up, removed ones go; a bad file is refused and its old version keeps serving. Needs
    `Authorization: Bearer MONET_ADMIN_TOKEN`."""
    service = service_of(request)
    token = service.settings.admin_token
    given = request.headers.get("authorization", "")
    expected = "Bearer " + token.get_secret_value()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("a valid admin token is needed: Authorization: Bearer MONET_ADMIN_TOKEN")
    return await service.reload("admin")


@router.get("/healthz")
async def healthz() -> dict:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "weights not loaded or not warmed up yet"}})
async def readyz(request: Request):
    """The weights are loaded and warmed up."""
    if (refusal := service_of(request).readiness()) is not None:
        raise refusal  # 503, the same answer a request would get now
    return {"status": "ready"}


@router.get("/info")
async def info(request: Request) -> dict:
    """Model metadata, device and batching settings."""
    return service_of(request).info()


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


STATIC = Path(__file__).resolve().parent / "static"


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    return FileResponse(STATIC / "favicon.png", media_type="image/png", headers={"Cache-Control": "max-age=86400"})


@router.get("/manifest.json", include_in_schema=False)
async def manifest() -> JSONResponse:
    """The web app manifest browsers ask for with the UI."""
    return JSONResponse({"name": "Monet-style photos", "short_name": "Monet", "start_url": "/ui/",
                         "display": "standalone", "icons": [{"src": "/favicon.ico", "sizes": "64x64",
                                                             "type": "image/png"}]})


@router.get("/gradio_api/file={path:path}", include_in_schema=False)
async def ui_file_without_prefix(path: str, request: Request) -> RedirectResponse:
    """Gradio's front end asks for example thumbnails without the /ui mount prefix (gradio-app/gradio#11848);
    send it to where the UI serves them (the UI's own checks on which files it may serve still apply)."""
    query = f"?{request.url.query}" if request.url.query else ""
    return RedirectResponse(f"/ui/gradio_api/file={path}{query}", status_code=307)


@router.get("/", include_in_schema=False)
async def root(request: Request) -> RedirectResponse:
    return RedirectResponse("/ui/" if service_of(request).settings.ui else "/docs")
