"""The generator weight file: one safetensors file whose metadata describes the network.

Metadata keys (all strings, as safetensors requires):
  format        "monet-cyclegan-generator"
  version       "1"
  architecture  "resnet" | "unet"
  settings      JSON of the constructor settings, e.g. {"ngf": 64, "n_blocks": 9, ...}
  direction     e.g. "photo->monet"
  training      JSON summary of how it was trained (free form)
  name          optional: the style's display name (e.g. "Claude Monet"), shown by the service's /styles
  scores        optional: JSON of evaluation figures (e.g. {"heldout_kid": 0.0261})

Loading reads tensors with safetensors only, so it never unpickles anything.

    python -m model.weights info FILE                       # what a weight file says about its generator
    python -m model.weights import latest_net_G.pth --out style.safetensors [--name "Van Gogh"]
                                                            # a reference CycleGAN (junyanz) generator
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
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
    name: str | None = None  # display name, when the file gives one
    scores: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "architecture": self.architecture,
            "settings": self.settings,
            "direction": self.direction,
            "training": self.training,
            "stored_dtype": self.stored_dtype,
            "name": self.name,
            "scores": self.scores,
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
    name: str | None = None,
    scores: dict | None = None,
) -> None:
    """Write ``generator`` (a ResnetGenerator or UnetGenerator) and its description to ``path``; ``name`` and
    ``scores`` (optional) are the style's display name and evaluation figures.

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
    if name:
        meta["name"] = name
    if scores:
        meta["scores"] = json.dumps(scores, sort_keys=True)
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


# safetensors' dtype names as torch's (GeneratorInfo.stored_dtype)
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def without_paths(value):
    """``value`` (a weight file's training description) with every absolute path cut to its last part (a
    folder or file name): what a run read or wrote on the machine that trained it is not for /info."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    if isinstance(value, str) and (value.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", value)):
        return Path(value).name or value
    return value


def read_info(path: str | os.PathLike, tensors: bool = True) -> tuple[GeneratorInfo, dict[str, torch.Tensor]]:
    """Read a weight file's description and tensors (``tensors`` False: the description alone, from the header;
    the dict comes back empty). Raises WeightsError with a one-line message."""
    name = str(path)
    if not Path(path).is_file():
        raise WeightsError(f"weights file {name} not found")
    if pickle_kind(path) is not None:  # never unpickled: say what it is and what to do
        raise WeightsError(f"{name} is not a readable safetensors file: it is a PyTorch pickle checkpoint, and "
                           "pickles are never loaded. Export a training checkpoint of this project with "
                           "`python -m training.export CHECKPOINT OUT.safetensors`, or convert a reference CycleGAN "
                           "generator with `python -m model.weights import latest_net_G.pth --out OUT.safetensors`")
    try:
        with safe_open(name, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            stored = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{name} is not a readable safetensors file ({detail})") from None
    if meta.get("format") != FORMAT or "architecture" not in meta:
        raise WeightsError(f"{name} has no monet-cyclegan generator metadata (is it a weight file of this project?)")
    try:
        settings = json.loads(meta.get("settings", "{}"))
        training = json.loads(meta.get("training", "{}"))
        scores = json.loads(meta.get("scores", "{}"))
    except json.JSONDecodeError:
        raise WeightsError(f"{name} has unreadable settings in its metadata") from None
    dtypes = {_DTYPE_NAMES.get(d, d.lower()) for d in stored}
    info = GeneratorInfo(
        path=name,
        architecture=meta["architecture"],
        settings=settings,
        direction=meta.get("direction", "photo->monet"),
        training=without_paths(training),
        stored_dtype=",".join(sorted(dtypes)) or "none",
        name=meta.get("name") or None,
        scores=scores if isinstance(scores, dict) else {},
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
    return load_checked(generator, tensors, info.path, f"a {info.architecture} generator {info.settings}"), info


def load_checked(generator: nn.Module, tensors: dict[str, torch.Tensor], source: str, what: str) -> nn.Module:
    """Load ``tensors`` into ``generator`` (fp32, eval mode) after checking that they are exactly its state
    dict's keys and shapes and hold finite values. Raises WeightsError naming ``source`` (and ``what`` the
    generator is)."""
    expected = generator.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise WeightsError(f"{source}: tensors don't match {what}: " + ", ".join(parts))
    for key in sorted(tensors):
        t = tensors[key]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise WeightsError(f"{source}: tensor {key} holds non-finite values (NaN or Inf); the file is "
                               "damaged or its training diverged")
    generator.load_state_dict({k: v.float() for k, v in tensors.items()})
    return generator.eval()


def file_version(path: str | os.PathLike) -> str:
    """A weight file's version: the first 16 hex digits of the SHA-256 of its bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# -- the reference CycleGAN's generators (junyanz/pytorch-CycleGAN-and-pix2pix) ---------------------------------
# Its ResnetGenerator is a Sequential with the same layer order as model.networks.ResnetGenerator (transposed-
# convolution upsampling): the same "model.N..." keys, except that with dropout (--no_dropout off) each block's
# second pad and conv sit one index later (conv_block.6 instead of .5). Its instance norms have no parameters;
# checkpoints from PyTorch < 0.4 carry running statistics for them, which its loader drops, and so does this one.
_BLOCK_KEY = re.compile(r"^model\.(\d+)\.conv_block\.(\d+)\.(weight|bias)$")


def reference_generator(state: dict[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """A ResnetGenerator holding a reference-CycleGAN generator's state dict; ngf, the block count and the
    channel counts are read from the tensors' shapes. Raises WeightsError when the tensors are not such a
    generator."""
    state = {k.removeprefix("module."): v for k, v in state.items()
             if torch.is_tensor(v) and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    first = state.get("model.1.weight")
    if first is None or first.dim() != 4 or tuple(first.shape[2:]) != (7, 7):
        raise WeightsError(f"{source}: not a reference CycleGAN ResnetGenerator (no 7x7 first convolution "
                           "model.1.weight; U-Net generators are not supported)")
    ngf, input_nc = int(first.shape[0]), int(first.shape[1])
    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))})
    if not blocks or blocks != list(range(10, 10 + len(blocks))):
        raise WeightsError(f"{source}: no residual blocks at model.10 onwards; not a reference ResnetGenerator")
    dropout = any(k.endswith("conv_block.6.weight") for k in state)
    renamed = {}
    for key, value in state.items():
        m = _BLOCK_KEY.match(key)
        if m and dropout and m.group(2) == "6":
            key = f"model.{m.group(1)}.conv_block.5.{m.group(3)}"
        renamed[key] = value
    n = len(blocks)
    last = renamed.get(f"model.{10 + n + 7}.weight")  # after the blocks: 2 x (convT, norm, relu), pad, conv
    if last is None:
        raise WeightsError(f"{source}: no final 7x7 convolution model.{10 + n + 7}.weight")
    generator = build_generator("resnet", input_nc=input_nc, output_nc=int(last.shape[0]), ngf=ngf, n_blocks=n,
                                upsample="transpose")
    return load_checked(generator, renamed, source, f"a reference ResnetGenerator (ngf {ngf}, {n} blocks)")


def import_reference(checkpoint: str | os.PathLike, out: str | os.PathLike, name: str | None = None,
                     direction: str = "photo->style") -> GeneratorInfo:
    """Convert a reference CycleGAN generator checkpoint (``latest_net_G.pth``, a state dict saved with
    ``torch.save``) into this project's weight file ``out``. It is read with ``torch.load(weights_only=True)``:
    tensors and plain containers only, never arbitrary objects."""
    source = str(checkpoint)
    if not Path(checkpoint).is_file():
        raise WeightsError(f"{source} not found")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (the unpickler refuses objects with several exception types)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{source} is not a state dict that loads without unpickling objects ({detail[:200]})") \
            from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{source} holds a {type(state).__name__}, not a state dict")
    generator = reference_generator(state, source)
    save_generator(out, generator, direction=direction, name=name,
                   training={"imported_from": Path(checkpoint).name, "source": "junyanz/pytorch-CycleGAN-and-pix2pix"})
    return read_info(out)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("info", help="print what a weight file says about its generator (JSON)")
    show.add_argument("weights", type=Path)
    imp = sub.add_parser("import", help="convert a reference CycleGAN generator checkpoint (.pth)")
    imp.add_argument("checkpoint", type=Path, help="e.g. checkpoints/style_monet_pretrained/latest_net_G.pth")
    imp.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    imp.add_argument("--name", help="the style's display name (the file's stem names it in the service)")
    imp.add_argument("--direction", default="photo->style", help="what it turns into what (default photo->style)")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            info, _ = read_info(args.weights)
            load_generator(args.weights)  # the full check: shapes and finite values
            print(json.dumps({**info.as_dict(), "version": file_version(args.weights)}, indent=2))
        else:
            if args.out.suffix != ".safetensors":
                raise WeightsError(f"--out {args.out}: the file name must end in .safetensors")
            info = import_reference(args.checkpoint, args.out, args.name, args.direction)
            s = info.settings
            print(f"wrote {args.out}: reference ResnetGenerator, ngf {s['ngf']}, {s['n_blocks']} blocks, "
                  f"version {file_version(args.out)}")
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
