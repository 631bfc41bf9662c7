"""Shared helpers: small generators saved to weight files, and images made on the spot."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.networks import ResnetGenerator, init_weights
from model.weights import save_generator
from tools import serving
from tools.serving import free_port, wait_ready  # noqa: F401 (the tests' names for them)

ROOT = Path(__file__).resolve().parent.parent


def small_generator(seed: int = 0, ngf: int = 8, n_blocks: int = 1) -> ResnetGenerator:
    torch.manual_seed(seed)
    return init_weights(ResnetGenerator(ngf=ngf, n_blocks=n_blocks)).eval()


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    """A small random photo->Monet generator in the project's weight format."""
    path = tmp_path / "small.safetensors"
    save_generator(path, small_generator(), training={"note": "random init for tests"})
    return path


def photo(width: int = 64, height: int = 48, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth random image (gradients plus noise), like a tiny photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), (x + y) / max(width + height - 2, 1)], -1) * 200
    arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img if mode == "RGB" else img.convert(mode)


def unpaired_folders(root: Path, photos: int = 6, paintings: int = 6) -> Path:
    """``root/photos`` (colour) and ``root/paintings`` (grey), tiny 40x40 images, as training.fit takes them."""
    (root / "photos").mkdir()
    (root / "paintings").mkdir()
    for i in range(photos):
        photo(40, 40, seed=i).save(root / "photos" / f"p{i}.jpg")
    for i in range(paintings):
        photo(40, 40, seed=100 + i).convert("L").convert("RGB").save(root / "paintings" / f"m{i}.png")
    return root


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def run_module(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` from the repository root, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


class Server(serving.Server):
    """`python -m app` on ``weights`` (tools/serving.py), its log beside the weights for ``output()``."""

    def __init__(self, weights: Path, extra_env: dict | None = None, port: int | None = None, **settings):
        super().__init__({"MONET_WEIGHTS": str(weights), **(extra_env or {})}, port=port or free_port(),
                         log=weights.parent / f"server-{port or 'auto'}-{id(self)}.log", **settings)


def display_p3_profile() -> bytes:
    """A minimal ICC v2 matrix/TRC profile with Display P3's primaries (D50-adapted) and gamma 2.2: enough for
    LittleCMS to convert from, made here so the tests need no profile file."""
    import struct

    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    text = b"Display P3 (test)\x00"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4) + bytes(4) + bytes(3) + bytes(67)
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(2.2 * 256)) + bytes(2)
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.5151, 0.2412, -0.0011)),
            (b"gXYZ", xyz(0.2920, 0.6922, 0.0419)), (b"bXYZ", xyz(0.1571, 0.0666, 0.7841)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = [], b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table.append(sig + struct.pack(">II", offset + len(data), len(body)))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + bytes(12)
              + b"acsp" + bytes(24) + struct.pack(">I", 0) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48))
    return header + struct.pack(">I", len(tags)) + b"".join(table) + data
