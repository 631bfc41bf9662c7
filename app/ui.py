"""The Gradio UI at /ui: upload, paste or webcam, a before/after slider, a lossless download.

It calls the same PaintingService (and so the same batcher) as the REST route.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from PIL import Image  # noqa: E402

from app.service import PaintingService, ServiceError  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent / "examples"
OUTPUTS = Path(tempfile.gettempdir()) / "monet-cyclegan-ui"


def build_ui(service: PaintingService) -> gr.Blocks:
    async def paint(upload: dict | None, strength: float | None = 100):
        # the event runs with preprocess=False: gr.Image would open the file with PIL first and fail with
        # its own message; this way every upload gets the service's limits and messages, as on REST
        path = (upload or {}).get("path")
        if not path:
            raise gr.Error("Upload, paste or take a photo first.")
        data = Path(path).read_bytes()
        try:
            painting = await service.paint(data, "png", strength=min(max(float(100 if strength is None else strength), 0.0), 100.0) / 100.0)
        except ServiceError as exc:
            raise gr.Error(exc.detail) from None
        OUTPUTS.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="monet-", suffix=".png", dir=OUTPUTS)
        with os.fdopen(fd, "wb") as f:
            f.write(painting.data)
        # the painting goes to the slider as the file just written: no second decode and re-encode
        return (Image.fromarray(painting.source, "RGB"), name), name

    with gr.Blocks(title="Monet-style photos", analytics_enabled=False) as demo:
        gr.Markdown("## Paint your photo like Claude Monet\nUpload, paste or take a photo; drag the slider to compare.")
        with gr.Row():
            photo = gr.Image(label="Your photo", type="filepath", image_mode=None,
                             sources=["upload", "clipboard", "webcam"], elem_id="photo")
            slider = gr.ImageSlider(label="Photo | Monet", type="filepath", format="png", elem_id="result")
        with gr.Row():
            strength = gr.Slider(0, 100, value=100, step=5, label="Strength (% painting, the rest photo)",
                                 elem_id="strength")
            button = gr.Button("Paint it", variant="primary", elem_id="paint")
            download = gr.File(label="Download the painting (lossless PNG)", elem_id="download")
        examples = sorted(str(p) for p in EXAMPLES.glob("*.jpg"))
        if examples:
            gr.Examples(examples=examples, inputs=photo, label="Example photos (see app/examples/CREDITS.md)")
        button.click(paint, inputs=[photo, strength], outputs=[slider, download], api_name="translate", preprocess=False,
                     concurrency_limit=service.settings.max_batch_size)
    return demo


def mount_ui(app: FastAPI, service: PaintingService) -> FastAPI:
    return gr.mount_gradio_app(app, build_ui(service), path="/ui", footer_links=["api"], run_history=False,
                               max_file_size=service.settings.max_upload_bytes, ssr_mode=False,
                               allowed_paths=[str(EXAMPLES)])
