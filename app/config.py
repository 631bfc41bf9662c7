"""The service's one settings object: every field also comes from a MONET_* environment variable."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.backends import BACKENDS
from model.codecs import FORMATS
from model.runtime import DEVICES, PRECISIONS
from model.stroke import UPSAMPLERS
from model.weights import SHIPPED_WEIGHTS

# The choices below come from the registries that define them (a new backend or format is one entry there).
Device = Literal[DEVICES]  # type: ignore[valid-type]
Precision = Literal[PRECISIONS]  # type: ignore[valid-type]
Backend = Literal[BACKENDS]  # type: ignore[valid-type]
Upsampler = Literal[UPSAMPLERS]  # type: ignore[valid-type]
OutputFormat = Literal[tuple(FORMATS)]  # type: ignore[valid-type]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MONET_", extra="ignore")

    host: str = Field("127.0.0.1", description="the address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="the port to listen on")
    weights: Path = Field(SHIPPED_WEIGHTS, description="a generator weight file, or a folder of them: each "
                          "*.safetensors is a style named by its file stem (POST /translate?style=NAME)")
    default_style: str | None = Field(None, description="the style a request gets when it names none (default: "
                                      "the shipped photo2monet when present, else the first name)")
    max_loaded_styles: int = Field(4, ge=1, description="styles loaded at once; the least recently used one is "
                                   "unloaded to make room (each costs its generator's weights and runtime buffers)")
    max_styles: int = Field(32, ge=1, le=1000, description="style files read from the folder (the rest are refused)"
                            ": bounds /styles and the metrics' style label")
    admin_token: SecretStr | None = Field(None, description="enables POST /admin/reload (Authorization: Bearer "
                                          "TOKEN), which reads the styles again, as SIGHUP does; unset: 404")
    device: Device = Field("auto", description="auto (CUDA if present), cpu or cuda")
    precision: Precision = Field("auto", description="auto (bf16 on CUDA and on CPUs with bf16 units, else fp32), "
                                 "fp32, bf16 or fp16")
    backend: Backend = Field(
        "auto", description="runtime: auto = OpenVINO on CPU when installed (the openvino extra), else torch")
    max_batch_size: int = Field(8, ge=1, le=256, description="images per forward pass (1 turns batching off)")
    max_batch_wait_ms: float = Field(0.0, ge=0, le=1000, description="how long a batch waits to fill up (0: it "
                                     "takes what queued during the previous batch, which is enough on CPU)")
    queue_size: int = Field(64, ge=1, description="requests waiting for the model before 503s")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of a request, queueing included (504 after)")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, description="body limit, counted while streaming (413)")
    upload_timeout_s: float = Field(30.0, gt=0, description="a body must arrive within this time (408 after)")
    upload_buffer_bytes: int = Field(256 * 1024 * 1024, ge=1,
                                     description="bytes all unfinished uploads may hold together (503 past it)")
    max_pixels: int = Field(50_000_000, ge=1, description="width x height limit, checked before decoding (50 MP: a "
                            "48 MP phone photo)")
    decode_budget_bytes: int = Field(512 * 1024 * 1024, ge=1,
                                     description="memory that image decodes in progress may hold together; "
                                                 "decodes past it wait their turn")
    max_batch_pixels: int = Field(2 * 1024 * 1024, ge=1, description="pixels per forward pass at 16-bit "
                                  "precision, half that in fp32 (at least one image): bounds activation memory "
                                  "for large images")
    max_side: int = Field(0, ge=0, description="an operator's cap: larger uploads are downscaled to this longer side "
                          "before painting (0: none, the painting has the upload's full size)")
    tile: int = Field(1024, ge=64, description="a painting with a side over this is made in overlapping tiles of "
                      "this side that share one set of normalisation statistics: memory follows the tile")
    upsampler: Upsampler = Field("guided", description="how a painting made at a stroke scale "
                                                    "over 1 comes back to full size")
    codec_threads: int | None = Field(None, ge=0, le=64, description="threads that decode and encode uploads up "
                                      "to 512x512, off the event loop (0: on the loop). Default: one per core when "
                                      "the model runs on a GPU; on a CPU one, used only during a burst (over twice "
                                      "max_batch_size admitted), when decodes on the loop would delay its refusals")
    default_format: OutputFormat = Field("png", description="output format when neither ?format= nor the Accept "
                                         "header chooses")
    ui: bool = Field(True, description="mount the Gradio UI at /ui")
    ui_cache_ttl_s: int = Field(900, ge=1, description="the UI's uploads and results are deleted after this age")
    max_connections: int = Field(1000, ge=1, description="open connections; past it a new one evicts the oldest "
                                 "not in a request, or gets 503 when all are")
    header_timeout_s: float = Field(10.0, gt=0, description="a request line and headers must arrive within this "
                                    "time from the connection's (or the request's) first byte (408 after)")
    drain_s: float = Field(2.0, ge=0, description="on SIGTERM: seconds of /readyz 503 before new connections stop")
    shutdown_grace_s: int = Field(10, ge=0, description="then: seconds the accepted requests have to finish")
    jobs_dir: Path = Field(Path("/tmp/monet-jobs"), description="video jobs' folder (POST /jobs): uploads, results "
                           "and each job's state; a restart marks the jobs it interrupted as failed")
    jobs_concurrency: int = Field(1, ge=1, le=16, description="video jobs painted at once (each frame takes its turn "
                                  "with the requests' batches)")
    jobs_max_upload_bytes: int = Field(500 * 1024 * 1024, ge=1, description="a clip's byte limit, counted while "
                                       "it streams to disk (413)")
    jobs_upload_timeout_s: float = Field(600.0, gt=0, description="a clip must arrive within this time (408 after)")
    jobs_max_duration_s: float = Field(600.0, gt=0, description="a clip's duration limit, read from its header (413)")
    jobs_max_frame_pixels: int = Field(2_000_000_000, ge=1, description="frames x width x height limit, read from "
                                       "the header (413): 2e9 is about 36 min of 640x360 or 90 s of 1920x1080 at 25 "
                                       "frames/s")
    jobs_max_photos: int = Field(1000, ge=1, description="a zip of photos sent to POST /jobs holds at most this "
                                 "many photos (413); each is held to MONET_MAX_UPLOAD_BYTES and MONET_MAX_PIXELS")
    jobs_storage_bytes: int = Field(5 * 1024 ** 3, ge=1, description="the jobs' folder cap: new jobs get 503 "
                                    "while uploads and results hold more")
    jobs_ttl_s: float = Field(3600.0, gt=0, description="a finished job and its result are deleted after this "
                              "time")
