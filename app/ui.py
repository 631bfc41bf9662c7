"""The Gradio UI at /ui: upload, paste or webcam, a before/after slider, a lossless download.

It calls the same PaintingService (and so the same batcher) as the REST route.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from PIL import Image  # noqa: E402

from app.errors import Refusal, detail_of, status_of  # noqa: E402
from app.service import PaintingService  # noqa: E402
from model.translator import NonFiniteOutput  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent / "examples"
OUTPUTS = Path(tempfile.gettempdir()) / "monet-cyclegan-ui"
PREVIEW_SIDE = 2048  # the before/after slider shows larger photos at this longer side
log = logging.getLogger("monet.access")


def prune(folder: Path, max_age_s: float) -> None:
    """Delete the files in ``folder`` older than ``max_age_s`` (Gradio has copied them into its own
    cache, which its ``delete_cache`` empties on the same schedule)."""
    cutoff = time.time() - max_age_s
    for path in folder.glob("monet-*.png"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except FileNotFoundError:  # another request pruned it first
            pass


def log_ui(status: int, detail: str) -> None:
    """One access-log line for a UI request the service refused (Gradio would print a traceback)."""
    log.info(json.dumps({"method": "POST", "path": "/ui/translate", "route": "/ui", "status": status,
                         "detail": detail}))


CSS = """
#download { height: 124px !important; max-height: 124px; overflow: hidden; }
"""


def ui_painter(service: PaintingService):
    """The UI's paint event: the uploaded file through ``service.paint``, the result written for the slider
    and the download; a refusal becomes a toast and one log line."""
    ttl = service.settings.ui_cache_ttl_s

    async def paint(upload: dict | None, strength: float | None = 100, stroke: float | None = 0,
                    style: str | None = None, progress=gr.Progress()):
        # the event runs with preprocess=False: gr.Image would open the file with PIL first and fail with
        # its own message; this way every upload gets the service's limits and messages, as on REST
        path = (upload or {}).get("path")
        if not path:  # a toast only: gr.Error would also mark both output panels as failed
            log_ui(422, "no photo")
            gr.Warning("Upload, paste or take a photo first.")
            return gr.skip(), gr.skip()
        data = Path(path).read_bytes()
        share = min(max(float(100 if strength is None else strength), 0.0), 100.0) / 100.0
        scale = None if not stroke else min(max(float(stroke), 1.0), 8.0)  # 0: the image's default
        progress(0.1, desc="Painting (a large photo takes a few seconds)")
        try:
            painting = await service.paint(data, "png", strength=share, stroke_scale=scale, style=style or None)
        except (Refusal, NonFiniteOutput) as exc:
            log_ui(status_of(exc), detail_of(exc))
            raise gr.Error(detail_of(exc), print_exception=False) from None
        OUTPUTS.mkdir(parents=True, exist_ok=True)
        prune(OUTPUTS, ttl)
        fd, name = tempfile.mkstemp(prefix="monet-", suffix=".png", dir=OUTPUTS)
        with os.fdopen(fd, "wb") as f:
            f.write(painting.data)
        progress(0.9, desc="Preparing the download")
        if max(painting.source.shape[:2]) <= PREVIEW_SIDE:
            # the painting goes to the slider as the file just written: no second decode and re-encode
            return (Image.fromarray(painting.source, "RGB"), name), name
        # a full-size photo: the slider shows both at PREVIEW_SIDE, the download is the full-size painting
        with Image.open(name) as full:
            full.draft("RGB", (PREVIEW_SIDE, PREVIEW_SIDE))
            shown = full.convert("RGB")
            shown.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.BILINEAR)
        source = Image.fromarray(painting.source, "RGB")
        source.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.BILINEAR)
        return (source, shown), name

    return paint


def ui_video_painter(service: PaintingService):
    """The Video tab's event: the clip becomes a job (app/jobs.py), its progress is shown as it runs, and the
    painted clip plays in the page; a refusal or a failed job becomes a toast and one log line."""

    async def paint_clip(upload, progress=gr.Progress()):
        # preprocess=False: gr.Video's payload, {"video": {"path": ...}} (or the file's dict itself)
        upload = upload or {}
        path = (upload.get("video") or upload).get("path") if isinstance(upload, dict) else upload
        if not path:
            log_ui(422, "no clip")
            gr.Warning("Upload a video clip first.")
            return gr.skip(), gr.skip()
        try:
            job = await service.jobs.submit_file(Path(path), Path(path).name)
        except Refusal as exc:
            log_ui(status_of(exc), detail_of(exc))
            raise gr.Error(detail_of(exc), print_exception=False) from None
        while job.state in ("queued", "running"):
            total = max(job.frames_total, 1)
            progress((job.frames_done, total), desc=f"Painting frame {job.frames_done} of {total}", unit="frames")
            await asyncio.sleep(0.5)
        result = service.jobs.result(job)
        if result is None:
            detail = job.error or f"the job was {job.state}"
            log_ui(422, detail)
            raise gr.Error(detail, print_exception=False)
        return str(result), str(result)

    return paint_clip


def style_choices(service: PaintingService) -> tuple[list[tuple[str, str]], str | None]:
    """The style dropdown's (label, name) choices and the default name, as the catalogue has them now."""
    catalogue = service.catalogue
    shown = {name: f.info.name or name for name, f in sorted(catalogue.files.items())}
    labels = list(shown.values())
    choices = [(label if labels.count(label) == 1 else f"{label} ({name})", name) for name, label in shown.items()]
    return choices, catalogue.default or None


def build_ui(service: PaintingService) -> gr.Blocks:
    ttl = service.settings.ui_cache_ttl_s
    paint = ui_painter(service)

    def refresh_styles():  # on each page load: the styles as the last reload left them
        choices, default = style_choices(service)
        return gr.update(choices=choices, value=default, visible=len(choices) > 1)

    # Gradio deletes its copies of uploads and results older than ttl, checking every ttl/2 seconds
    with gr.Blocks(title="Monet-style photos", analytics_enabled=False,
                   delete_cache=(max(1, ttl // 2), ttl)) as demo:
        gr.Markdown("## Paint your photo like Claude Monet\nUpload, paste or take a photo; drag the slider to compare.")
        with gr.Tab("Photo", elem_id="photo-tab"):
            photo, strength, stroke, style, button, slider, download, examples = _photo_tab()
        with gr.Tab("Video", elem_id="video-tab"):
            gr.Markdown("A clip is painted frame by frame with steady colours (no shimmer), its sound kept. It runs "
                        "as a job: the progress shows here, and the painted clip plays below when it is done.")
            with gr.Row(equal_height=False):
                with gr.Column(min_width=360):
                    clip = gr.Video(label="Your clip", sources=["upload"], height=360, elem_id="clip")
                    clip_button = gr.Button("Paint the clip", variant="primary", elem_id="paint-clip")
                with gr.Column(min_width=360):
                    painted = gr.Video(label="Monet", height=360, elem_id="painted-clip", autoplay=True, loop=True)
                    clip_download = gr.File(label="Download the painted clip (MP4)", height=90,
                                            elem_id="clip-download")
            clip_button.click(ui_video_painter(service), inputs=[clip], outputs=[painted, clip_download],
                              api_name="paint_clip", preprocess=False, concurrency_limit=4)
        demo.load(refresh_styles, outputs=style, api_name=False, queue=False)
        button.click(paint, inputs=[photo, strength, stroke, style], outputs=[slider, download],
                     api_name="translate", preprocess=False, concurrency_limit=service.settings.max_batch_size)
        if examples is not None:  # a click on an example paints it, as "Paint it" would
            examples.load_input_event.then(paint, inputs=[photo, strength, stroke, style], outputs=[slider, download],
                                           api_visibility="undocumented", preprocess=False,
                                           concurrency_limit=service.settings.max_batch_size)
    return demo


def _photo_tab():
    """The Photo tab's components (built inside the caller's Blocks)."""
    # two columns of fixed height that wrap (stack) when the window is narrower than both minimum widths
    with gr.Row(equal_height=False):
        with gr.Column(min_width=360):
            photo = gr.Image(label="Your photo", type="filepath", image_mode=None, height=440,
                             sources=["upload", "clipboard", "webcam"], elem_id="photo")
            strength = gr.Slider(0, 100, value=100, step=5, label="Strength (% painting, the rest photo)",
                                 elem_id="strength")
            stroke = gr.Slider(0, 8, value=0, step=0.5, label="Stroke size (0: automatic from the photo's "
                               "size; 1: pixel for pixel; 4: strokes four times larger)", elem_id="stroke")
            style = gr.Dropdown(choices=[], label="Style", elem_id="style", visible=False,
                                allow_custom_value=False, interactive=True)
            button = gr.Button("Paint it", variant="primary", elem_id="paint")
        with gr.Column(min_width=360):
            slider = gr.ImageSlider(label="Photo | Monet", type="filepath", format="png", height=440,
                                    elem_id="result")
            download = gr.File(label="Download the painting (lossless PNG)", height=90, elem_id="download")
    files = sorted(str(p) for p in EXAMPLES.glob("*.jpg"))
    examples = gr.Examples(examples=files, inputs=photo, label="Example photos (a click paints one)",
                           elem_id="examples") if files else None
    return photo, strength, stroke, style, button, slider, download, examples


def mount_ui(app: FastAPI, service: PaintingService) -> FastAPI:
    # the painted clips are served from the jobs' folder (Gradio copies them into its cache)
    return gr.mount_gradio_app(app, build_ui(service), path="/ui", footer_links=["api"], run_history=False,
                               max_file_size=service.settings.max_upload_bytes, ssr_mode=False,
                               allowed_paths=[str(EXAMPLES), str(service.settings.jobs_dir)],
                               css=CSS)  # the app serves /favicon.ico itself
