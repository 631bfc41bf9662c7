"""Painting a video clip with steady colours (PyAV: its wheels carry FFmpeg's libraries; no system FFmpeg).

Painted frame by frame, a clip flickers: every frame's instance norms normalise it by its own mean and
variance, so its colours and contrast jump with noise and small changes of content. As the tiled path shares
one set of statistics between tiles (model/tiling.py), the steady mode shares them between the frames of a
shot: every norm's statistics are a running average over the shot's frames so far (``smoothing``, an
exponential moving average; 0 is per-frame painting), and start afresh where the picture changes abruptly (a
cut, found from the frames' colour histograms). Each frame is painted as ``plan_painting`` plans a photo of its
size (the default stroke scale paints 1280x720 at 1024x576 and brings it back with the guided upsampler), whole,
at most ``MAX_FRAME_PIXELS`` pixels.

The output keeps the frame count, the frames' timestamps (so the rate, variable or not), the size, the rotation
(display matrix) and the audio stream (copied unchanged where MP4 takes its codec, else re-encoded to AAC);
the video is H.264 in MP4, written to a temporary file and renamed into place.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from model.networks import ResnetGenerator
from model.plan import plan_painting
from model.stroke import enlarge, shrink
from model.tiling import PaintingStopped
from model.weights import atomic_write

VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")
VIDEO_MODES = ("steady", "per-frame")
DEFAULT_SMOOTHING = 0.9  # weight of the running statistics against the new frame's (about a 10-frame window)
CUT_THRESHOLD = 0.5  # L1 distance of two consecutive frames' colour histograms (0..2) that starts a new shot
MAX_FRAME_PIXELS = 1024 * 1024  # a frame is painted whole: its stroke scale is raised to keep it under this
_MP4_AUDIO = {"aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"}  # audio codecs MP4 takes as they are


class VideoError(ValueError):
    """A clip that can't be read or painted; the message is one line for the user."""


@dataclass(frozen=True)
class ClipInfo:
    """What a clip's header says. ``frames`` is the stream's count where the container records it, else an
    estimate from the duration and the rate; ``rotation`` is the display rotation in degrees (counter-clockwise; ``probe(rotation=True)`` reads it)."""
    width: int
    height: int
    frames: int
    fps: float
    duration_s: float
    rotation: int
    audio: str | None  # the audio codec's name, or None
    codec: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def _av():
    import av  # noqa: PLC0415 (heavy: only where a clip is read)

    av.logging.set_level(av.logging.PANIC)  # FFmpeg's own console messages; our errors say what went wrong
    return av


def _open(path: str | os.PathLike):
    av = _av()
    try:
        container = av.open(str(path), "r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"not a readable video ({_reason(exc)})") from None
    still = container.format.name == "image2" or container.format.name.endswith("_pipe")
    if still or not container.streams.video:
        container.close()
        raise VideoError("a still image, not a video" if still else "the file has no video stream")
    return container


def _reason(exc: Exception) -> str:
    """FFmpeg's reason in a few words ("Invalid data found when processing input")."""
    text = getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].split(": '")[0][:160]


def probe(path: str | os.PathLike, rotation: bool = False) -> ClipInfo:
    """The clip's header; with ``rotation``, also the display rotation, which FFmpeg gives with the first
    decoded frame (only that frame is decoded). Raises VideoError when it is not a readable video."""
    with _open(path) as container:
        info = _info(container)
        if not rotation:
            return info
        try:
            frame = next(container.decode(video=0), None)
        except _av().FFmpegError as exc:
            raise VideoError(f"damaged video ({_reason(exc)})") from None
        turn = int(round(getattr(frame, "rotation", 0) or 0)) % 360 if frame is not None else 0
        return ClipInfo(**(info.as_dict() | {"rotation": turn}))


def _info(container) -> ClipInfo:
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    else:
        duration = 0.0
    frames = stream.frames or int(round(duration * float(rate)))
    width, height = stream.codec_context.width, stream.codec_context.height
    if not width or not height:
        raise VideoError("the video stream has no picture size")
    audio = container.streams.audio[0].codec_context.name if container.streams.audio else None
    return ClipInfo(width, height, int(frames), float(rate), duration, 0, audio, stream.codec_context.name)


# -- steady statistics ----------------------------------------------------------------------------------

class SteadyInstanceNorm(nn.Module):
    """An InstanceNorm2d whose statistics are a running average over the frames it has seen since ``reset``
    (``smoothing`` 0: each frame its own, as InstanceNorm2d)."""

    def __init__(self, norm: nn.InstanceNorm2d, smoothing: float):
        super().__init__()
        self.eps, self.weight, self.bias, self.smoothing = norm.eps, norm.weight, norm.bias, smoothing
        self.mean = self.var = None

    def reset(self) -> None:
        self.mean = self.var = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x.float(), dim=(2, 3), keepdim=True, unbiased=False)
        if self.smoothing > 0:  # frames of a batch in order: each one's statistics carry the ones before
            means, variances = [], []
            for i in range(x.shape[0]):
                if self.mean is None:
                    self.mean, self.var = mean[i : i + 1], var[i : i + 1]
                else:
                    a = self.smoothing
                    self.mean = a * self.mean + (1 - a) * mean[i : i + 1]
                    self.var = a * self.var + (1 - a) * var[i : i + 1]
                means.append(self.mean)
                variances.append(self.var)
            mean, var = torch.cat(means), torch.cat(variances)
        y = (x.float() - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


class SteadyGenerator(nn.Module):
    """A copy of a generator whose instance norms keep running statistics over a shot (``reset`` at a cut)."""

    def __init__(self, generator: nn.Module, smoothing: float):
        super().__init__()
        self.net = copy.deepcopy(generator).float().eval()
        self.norms = []
        for parent in list(self.net.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.InstanceNorm2d):
                    steady = SteadyInstanceNorm(child, smoothing)
                    setattr(parent, name, steady)
                    self.norms.append(steady)

    def reset(self) -> None:
        for n in self.norms:
            n.reset()

    def forward(self, x: torch.Tensor, between: Callable[[], None] | None = None) -> torch.Tensor:
        """The painting of ``x``; ``between()`` is called between the generator's layers (where it is one
        sequence of layers: the ResNet generator), so others may use the cores mid-frame."""
        if between is None or not isinstance(self.net, ResnetGenerator):  # its forward is self.model(x)
            return self.net(x)
        for i, layer in enumerate(self.net.model):
            if i:
                between()
            x = layer(x)
        return x


class ShotDetector:
    """Says whether a frame starts a new shot: the L1 distance between its colour histogram (8 bins per
    channel, on a subsample) and the previous frame's exceeds ``threshold``."""

    def __init__(self, threshold: float = CUT_THRESHOLD):
        self.threshold, self.previous = threshold, None

    @staticmethod
    def histogram(frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        step = max(1, int(math.sqrt(h * w / 16384)))  # about 16k pixels whatever the size
        sample = frame[::step, ::step].reshape(-1, 3) >> 5
        counts = [np.bincount(sample[:, c], minlength=8) for c in range(3)]
        return np.concatenate(counts).astype(np.float64) / sample.shape[0] / 3

    def cut(self, frame: np.ndarray) -> bool:
        hist = self.histogram(frame)
        previous, self.previous = self.previous, hist
        return previous is None or float(np.abs(hist - previous).sum()) * 3 > self.threshold


class FramePainter:
    """Paints the frames of one clip in order with a translator's generator: steady statistics within a shot
    (``smoothing`` > 0) or each frame on its own (``mode`` "per-frame"). ``lock`` (the translator's) is held per
    frame, so requests painted beside a clip take turns with its frames."""

    def __init__(self, translator, size: tuple[int, int], mode: str = "steady", smoothing: float = DEFAULT_SMOOTHING,
                 stroke_scale: float | None = None, upsampler: str = "guided"):
        if mode not in VIDEO_MODES:
            raise ValueError(f"unknown video mode {mode!r}; choose one of {', '.join(VIDEO_MODES)}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError("smoothing must be from 0 to below 1")
        self.translator, self.upsampler = translator, upsampler
        plan = plan_painting(size[0], size[1], stroke_scale)
        w, h = plan.painted
        if w * h > MAX_FRAME_PIXELS:
            plan = plan_painting(size[0], size[1], plan.stroke_scale * math.sqrt(w * h / MAX_FRAME_PIXELS))
        self.plan = plan
        self.net = SteadyGenerator(translator._generator, smoothing if mode == "steady" else 0.0).to(translator.device)
        self.detector = ShotDetector()
        self.shots = 0  # shots begun (the first frame begins one)
        self.steady = mode == "steady"
        self.previous: tuple[np.ndarray, np.ndarray] | None = None  # (the last frame's grey, its painting)

    @torch.inference_mode()
    def paint(self, frame: np.ndarray) -> np.ndarray:
        """One uint8 (H, W, 3) frame, the next of the clip; its painting at the frame's size."""
        from model.tiling import _to_input  # noqa: PLC0415

        if self.detector.cut(frame):
            self.shots += 1
            self.net.reset()
            self.previous = None
        small = shrink(frame, self.plan.painted)
        x, top, left = _to_input(small, self.translator.size_multiple, self.translator.device)
        lock = self.translator._lock
        with lock:  # taking turns between layers: a small request waits about one layer of a frame, not all of it
            y = self.net(x, between=getattr(lock, "take_turns", None))[0, :, top : top + small.shape[0], left : left + small.shape[1]].float()
        if not bool(torch.isfinite(y.sum())):
            raise VideoError("the generator's output is not finite for this clip")
        painting = np.clip(np.rint(((y.permute(1, 2, 0) + 1.0) * 127.5).cpu().numpy()), 0, 255).astype(np.uint8)
        painting = enlarge(painting, frame, self.upsampler) if painting.shape[:2] != frame.shape[:2] else painting
        return self._settle(frame, painting) if self.steady else painting

    def _settle(self, frame: np.ndarray, painting: np.ndarray) -> np.ndarray:
        """Where the picture did not change since the last frame (sensor noise, a still scene), the painting
        moves only part of the way to the new one (a running average); where it changed, it takes the new one.
        The generator paints noise as texture, so a still noisy scene otherwise shimmers."""
        grey = frame.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        current = painting.astype(np.float32)
        if self.previous is not None:
            last_grey, last = self.previous
            change = _box_mean(np.abs(grey - last_grey), GATE_RADIUS)
            weight = (GATE_FLOOR + (1 - GATE_FLOOR) * np.clip(change / GATE_CHANGE, 0, 1))[..., None]
            current = last + weight * (current - last)
        self.previous = (grey, current)
        return np.clip(np.rint(current), 0, 255).astype(np.uint8)


GATE_RADIUS = 2  # the change between frames is averaged over (2r+1)^2 pixels, so sensor noise averages out
GATE_CHANGE = 16.0  # a change of this many grey levels (averaged) takes the new painting whole
GATE_FLOOR = 0.25  # an unchanged pixel moves this share of the way to the new painting


def _box_mean(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window (edges replicated), by cumulative sums."""
    p = np.pad(x, ((r + 1, r), (r + 1, r)), mode="edge")
    c = p.cumsum(0).cumsum(1)
    k = 2 * r + 1
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


# -- reading and writing --------------------------------------------------------------------------------

@dataclass
class ClipResult:
    frames: int  # frames painted
    shots: int  # shots found (1 + the cuts)
    info: ClipInfo


def paint_clip(translator, source: str | os.PathLike, target: str | os.PathLike, mode: str = "steady",
               smoothing: float = DEFAULT_SMOOTHING, stroke_scale: float | None = None, upsampler: str = "guided",
               progress: Callable[[int, int], None] | None = None, stop: Callable[[], bool] | None = None,
               limits: Callable[[ClipInfo], None] | None = None) -> ClipResult:
    """Paint the clip ``source`` into ``target`` (an MP4, written whole or not at all). ``progress(done,
    total)`` after each frame; ``stop()`` asked before each frame (True: PaintingStopped); ``limits(info)``
    may raise before any frame is decoded. Raises VideoError for a clip that can't be read or is damaged."""
    av = _av()
    info = probe(source)  # the header: limits are checked before any frame is decoded
    if limits is not None:
        limits(info)
    info = probe(source, rotation=True)  # the rotation comes with the first frame; the output's header needs it
    with _open(source) as container:
        result = ClipResult(0, 0, info)

        def write(tmp: str) -> None:
            _transcode(av, container, tmp, translator, info, result, mode, smoothing, stroke_scale, upsampler,
                       progress, stop)

        atomic_write(target, write)
    if result.frames == 0:
        Path(target).unlink(missing_ok=True)
        raise VideoError("the video has no frames")
    return result


def _transcode(av, container, tmp, translator, info, result, mode, smoothing, stroke_scale, upsampler, progress,
               stop) -> None:
    vin = container.streams.video[0]
    vin.thread_type = "AUTO"
    ain = container.streams.audio[0] if container.streams.audio else None
    painter = FramePainter(translator, (info.width, info.height), mode, smoothing, stroke_scale, upsampler)
    with av.open(tmp, "w", format="mp4") as out:
        vout = out.add_stream("libx264", rate=Fraction(info.fps).limit_denominator(100000))
        vout.width, vout.height = info.width, info.height
        even = info.width % 2 == 0 and info.height % 2 == 0
        vout.pix_fmt = "yuv420p" if even else "yuv444p"  # 4:2:0 needs even sides; the size is kept either way
        vout.time_base = vout.codec_context.time_base = vin.time_base  # the input's timestamps, as they are
        if info.rotation and hasattr(vout, "set_display_rotation"):  # PyAV >= 17
            vout.set_display_rotation(info.rotation)
        vout.options = {"crf": "18", "preset": "veryfast"}
        aout, resampler = None, None
        if ain is not None:
            if ain.codec_context.name in _MP4_AUDIO:
                aout = out.add_stream_from_template(ain)
            else:
                aout = out.add_stream("aac", rate=ain.codec_context.sample_rate or 48000)
                resampler = av.AudioResampler(format="fltp", layout="stereo", rate=aout.rate)
        streams = [vin] + ([ain] if ain is not None else [])
        try:
            for packet in container.demux(*streams):
                if packet.stream.type == "audio":
                    _audio(out, packet, aout, resampler)
                    continue
                for frame in packet.decode():
                    if stop is not None and stop():
                        raise PaintingStopped("the clip is no longer wanted")
                    image = frame.to_ndarray(format="rgb24")
                    if image.shape[1] != info.width or image.shape[0] != info.height:
                        raise VideoError("the picture size changes within the clip")
                    painted = av.VideoFrame.from_ndarray(painter.paint(image), format="rgb24")
                    painted.pts, painted.time_base = frame.pts, frame.time_base
                    for p in vout.encode(painted):
                        out.mux(p)
                    result.frames += 1
                    if progress is not None:
                        progress(result.frames, max(info.frames, result.frames))
            for p in vout.encode():
                out.mux(p)
            if resampler is not None:
                for p in aout.encode(None):
                    out.mux(p)
        except av.FFmpegError as exc:
            if result.frames == 0:
                raise VideoError(f"damaged video ({_reason(exc)})") from None
            raise VideoError(f"damaged video after frame {result.frames} ({_reason(exc)})") from None
    result.shots = painter.shots


def _audio(out, packet, aout, resampler) -> None:
    if resampler is None:
        if packet.dts is None:  # the demuxer's flush packet
            return
        packet.stream = aout
        out.mux(packet)
        return
    for frame in packet.decode():
        for resampled in resampler.resample(frame):
            for p in aout.encode(resampled):
                out.mux(p)


def read_frames(path: str | os.PathLike) -> tuple[list[np.ndarray], list[int]]:
    """Every frame of a clip as uint8 RGB arrays, with their timestamps (for tests and benchmarks)."""
    with _open(path) as container:
        frames, pts = [], []
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            pts.append(frame.pts)
        return frames, pts
