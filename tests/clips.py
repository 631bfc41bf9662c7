"""Clips the video tests and benchmarks make for themselves (PyAV writes them): a generated landscape, panned
over or held still with sensor noise, a cut between two scenes, with or without audio, rotated, odd-sized or at
a variable frame rate."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def landscape(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A uint8 (H, W, 3) landscape: a sky gradient, a sun, layered hills with grass texture, a lake."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    t = y / max(height - 1, 1)
    sky_top, sky_low = rng.uniform([40, 80, 150], [90, 140, 230]), rng.uniform([170, 190, 210], [230, 230, 250])
    img = sky_top[None, None] * (1 - t[..., None]) + sky_low[None, None] * t[..., None]
    cx, cy, r = rng.uniform(0.2, 0.8) * width, rng.uniform(0.1, 0.3) * height, 0.05 * min(width, height)
    img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = (250, 220, 120)
    for layer in range(3):
        phase, amp = rng.uniform(0, 6.28), rng.uniform(0.04, 0.1) * height
        ridge = height * (0.45 + 0.12 * layer) + amp * np.sin(x[0] / width * rng.uniform(3, 9) + phase)
        colour = rng.uniform([30, 90, 20], [90, 160, 60]) * (1 - 0.2 * layer)
        mask = y > ridge[None, :]
        img[mask] = colour
    grass = rng.normal(0, 18, (height, width, 1)).astype(np.float32)
    img = img + grass * (t[..., None] > 0.45)
    lake = (t > 0.85) & (np.abs(x / width - 0.5) < 0.3)
    img[lake] = img[lake] * 0.5 + np.array([60, 90, 140]) * 0.5
    return np.clip(img, 0, 255).astype(np.uint8)


def write_clip(path: Path, frames: list[np.ndarray], fps: int = 12, audio: bool = False, rotation: int = 0,
               pts: list[int] | None = None, codec: str = "libx264") -> Path:
    """Write uint8 RGB ``frames`` as an MP4 (H.264, 4:2:0 if the sides are even else 4:4:4); ``audio`` adds a
    mono AAC tone as long as the clip; ``pts`` (in 1/1000 s) makes the frame rate variable."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        v = out.add_stream(codec, rate=fps)
        v.width, v.height = w, h
        v.pix_fmt = "yuv420p" if w % 2 == 0 and h % 2 == 0 else "yuv444p"
        if pts is not None:
            v.time_base = v.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            v.set_display_rotation(rotation)
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            for p in v.encode(frame):
                out.mux(p)
        for p in v.encode():
            out.mux(p)
    if audio:  # the tone in a second pass: the video remuxed beside a new audio stream
        _add_tone(path, len(frames) / fps)
    return path


def _add_tone(path: Path, seconds: float) -> None:
    import av

    tmp = path.with_suffix(".tone.mp4")
    with av.open(str(path)) as src, av.open(str(tmp), "w") as out:
        vin = src.streams.video[0]
        vout = out.add_stream_from_template(vin)
        a = out.add_stream("aac", rate=48000)
        a.layout = "mono"
        for packet in src.demux(vin):
            if packet.dts is None:
                continue
            packet.stream = vout
            out.mux(packet)
        n = int(seconds * 48000)
        tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(n) / 48000)).astype(np.float32)
        for start in range(0, n, 1024):
            chunk = tone[start : start + 1024][None]
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
            frame.sample_rate, frame.pts = 48000, start
            for p in a.encode(frame):
                out.mux(p)
        for p in a.encode():
            out.mux(p)
    tmp.replace(path)


def pan(width: int, height: int, frames: int, seed: int = 0, step: int = 4) -> list[np.ndarray]:
    """A camera panning right over a landscape ``step`` pixels a frame."""
    wide = landscape(width + step * frames, height, seed)
    return [wide[:, i * step : i * step + width].copy() for i in range(frames)]


def still(width: int, height: int, frames: int, seed: int = 0, noise: float = 6.0) -> list[np.ndarray]:
    """A still scene with fresh sensor noise in every frame."""
    scene = landscape(width, height, seed).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    return [np.clip(scene + rng.normal(0, noise, scene.shape), 0, 255).astype(np.uint8) for _ in range(frames)]


def cut(width: int, height: int, frames: int, seed: int = 0) -> list[np.ndarray]:
    """Half the frames of one still scene, then half of another."""
    return still(width, height, frames // 2, seed) + still(width, height, frames - frames // 2, seed + 10)
