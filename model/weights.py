"""The generator weight file: one safetensors file whose metadata describes the network.

Metadata keys (all strings, as safetensors requires):
  format        "monet-cyclegan-generator"
  version       "1"
  architecture  "resnet" | "unet"
  settings      JSON of the constructor settings, e.g. {"ngf": 64, "n_blocks": 9, ...}
  direction     e.g. "photo->monet"
  training      JSON summary of how it was trained (free form)

Loading reads tensors with safetensors only, so it never unpickles anything.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from model.networks import build_generator

FORMAT = "monet-cyclegan-generator"
VERSION = "1"
# The generator this project ships; the service and the CLI load it when nothing else is named.
SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "photo2monet.safetensors"


_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)


class WeightsError(ValueError):
    """A weight file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class GeneratorInfo:
    """What a weight file says about the generator inside it."""

    path: str
    architecture: str
    settings: dict
    direction: str = "photo->monet"
    training: dict = field(default_factory=dict)
    stored_dtype: str = "float32"

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "architecture": self.architecture,
            "settings": self.settings,
            "direction": self.direction,
            "training": self.training,
            "stored_dtype": self.stored_dtype,
        }


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_generator(
    path: str | os.PathLike,
    generator: nn.Module,
    direction: str = "photo->monet",
    training: dict | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``generator`` (a ResnetGenerator or UnetGenerator) and its description to ``path``.

    ``dtype=torch.float16`` halves the file; the loader casts back. The write is atomic.
    """
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in generator.state_dict().items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": generator.spec.architecture,
        "settings": json.dumps(generator.spec.settings, sort_keys=True),
        "direction": direction,
        "training": json.dumps(training or {}, sort_keys=True),
    }
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def pickle_kind(path: str | os.PathLike) -> str | None:
    """"zip" or "pickle" when the file is a PyTorch checkpoint (torch.save's zip archive, or a legacy raw
    pickle), read from its first bytes only; None otherwise."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2-5
        return "pickle"
    return None


def read_info(path: str | os.PathLike) -> tuple[GeneratorInfo, dict[str, torch.Tensor]]:
    """Read a weight file's description and tensors. Raises WeightsError with a one-line message."""
    name = str(path)
    if not Path(path).is_file():
        raise WeightsError(f"weights file {name} not found")
    if pickle_kind(path) is not None:  # never unpickled: say what it is and what to do
        raise WeightsError(f"{name} is not a readable safetensors file: it is a PyTorch pickle checkpoint, and "
                           "pickles are never loaded. Export a training checkpoint of this project with "
                           "`python -m training.export CHECKPOINT OUT.safetensors`")
    try:
        with safe_open(name, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{name} is not a readable safetensors file ({detail})") from None
    if meta.get("format") != FORMAT or "architecture" not in meta:
        raise WeightsError(f"{name} has no monet-cyclegan generator metadata (is it a weight file of this project?)")
    try:
        settings = json.loads(meta.get("settings", "{}"))
        training = json.loads(meta.get("training", "{}"))
    except json.JSONDecodeError:
        raise WeightsError(f"{name} has unreadable settings in its metadata") from None
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    info = GeneratorInfo(
        path=name,
        architecture=meta["architecture"],
        settings=settings,
        direction=meta.get("direction", "photo->monet"),
        training=training,
        stored_dtype=",".join(sorted(dtypes)) or "none",
    )
    return info, tensors


def load_generator(path: str | os.PathLike) -> tuple[nn.Module, GeneratorInfo]:
    """Build the generator a weight file describes and load its tensors (fp32, CPU, eval mode).

    Raises WeightsError naming the file for a missing, truncated or corrupt file, an unknown
    architecture, tensors that don't match the described network, or a tensor holding NaN or Inf.
    """
    info, tensors = read_info(path)
    try:
        generator = build_generator(info.architecture, **info.settings)
    except ValueError as exc:
        raise WeightsError(f"{info.path}: {exc}") from None
    expected = generator.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise WeightsError(f"{info.path}: tensors don't match a {info.architecture} generator {info.settings}: " + ", ".join(parts))
    for key in sorted(tensors):
        t = tensors[key]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise WeightsError(f"{info.path}: tensor {key} holds non-finite values (NaN or Inf); the file is "
                               "damaged or its training diverged")
    generator.load_state_dict({k: v.float() for k, v in tensors.items()})
    return generator.eval(), info
