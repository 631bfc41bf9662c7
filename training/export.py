"""`python -m training.export CHECKPOINT|RUN_DIR OUT.safetensors [--fp16] [--name "My style"]`: write the
photo->Monet generator of a training checkpoint as a weight file the translator and the service load
(``--name``: the display name a server's /styles and style dropdown show)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from model.networks import build_generator
from model.weights import save_generator, without_paths
from training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from training.config import TrainConfig, generator_settings


def training_summary(cfg: TrainConfig, state: dict) -> dict:
    """What a weight file says about the run that made it: the preset, the configuration (its folders by name:
    no absolute path of the training machine is written), the step and the run's summary."""
    return without_paths({"preset": cfg.preset, "config": cfg.__dict__, "step": state["step"]}
                         | state.get("summary", {}))


def export_checkpoint(checkpoint: Path, out: Path, fp16: bool = False, name: str | None = None) -> Path:
    """Export the photo->Monet generator G of ``checkpoint`` (or of a run folder's latest) to ``out``;
    its EMA copy when the run kept one."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = latest_checkpoint(checkpoint)
    state = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(state["config"])
    generator = build_generator(cfg.generator, **generator_settings(cfg))
    if "ema" in state:  # the run kept an EMA of G: that is the generator to ship
        generator.load_state_dict(state["ema"]["module"])
    else:
        prefix = "G."
        generator.load_state_dict({k[len(prefix):]: v for k, v in state["generators"].items() if k.startswith(prefix)})
    save_generator(out, generator, training=training_summary(cfg, state), dtype=torch.float16 if fp16 else None,
                   name=name)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint file, or a run folder (its latest checkpoint)")
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    parser.add_argument("--fp16", action="store_true", help="store tensors in float16 (half the size)")
    parser.add_argument("--name", help="the style's display name (in a server's /styles and the UI's dropdown)")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.out, fp16=args.fp16, name=args.name)
    except (CheckpointError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
