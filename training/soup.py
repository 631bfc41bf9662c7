"""`python -m training.soup`: average the weights of generators fine-tuned from one start (a "model soup",
Wortsman et al., ICML 2022), chosen greedily by validation.

    python -m training.soup CANDIDATE.safetensors... --photos DIR --paintings DIR --out SOUP.safetensors

Generators trained from the same weights (a run's validated steps, runs of other recipes started from the
shipped generator) stay in one basin, where their average is often better than any of them: it keeps what they
agree on and drops each run's own noise. The greedy recipe: score every candidate on the validation photos
(``training.fit``'s split of --photos: the same 200 photos a run validates on, or --val-photos), sort them by
KID, start from the best, and add each next one when the average of the kept ones and it has a lower KID with a
texture KID still under the colour transfer's on the same photos. The soup is written with its ingredients'
file names, their figures and its own; held-out photos play no part.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

from model.weights import WeightsError, load_generator, save_generator


def average(generators: list[nn.Module]) -> nn.Module:
    """A generator whose every floating-point tensor is the mean of ``generators``' (which must share one
    architecture and settings); integer buffers come from the first."""
    first = generators[0]
    states = [g.state_dict() for g in generators]
    for g, state in zip(generators[1:], states[1:]):
        if g.spec.architecture != first.spec.architecture or g.spec.settings != first.spec.settings:
            raise WeightsError(f"cannot average a {g.spec.architecture} {g.spec.settings} generator with a "
                               f"{first.spec.architecture} {first.spec.settings} one")
    mean = {k: (torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v)
            for k, v in states[0].items()}
    soup = copy.deepcopy(first)
    soup.load_state_dict(mean)
    return soup.eval()


def label(path: Path) -> str:
    """A candidate's name in the report and the soup's metadata: its file with two folders above it (a run's
    name, validated/, the step), never an absolute path."""
    return "/".join(Path(path).resolve().parts[-3:])


def greedy(candidates: dict[str, nn.Module], score, texture_limit: float, say=print,
           known: dict[str, dict] | None = None) -> tuple[list[str], dict]:
    """The greedy soup: ``score(generator) -> {"kid", "texture_kid"}``; returns the kept names (best first) and
    the soup's scores. ``known``: candidates' scores already measured on the same photos (not scored again)."""
    known = known or {}
    scores = {name: known[name] if name in known else score(g) for name, g in candidates.items()}
    for name, s in scores.items():
        say(f"  {name}: KID {s['kid']:.5f}, texture KID {s['texture_kid']:.4f}")
    order = sorted(scores, key=lambda n: scores[n]["kid"])
    kept, best = [order[0]], scores[order[0]]
    for name in order[1:]:
        trial = score(average([candidates[n] for n in kept + [name]]))
        better = trial["kid"] < best["kid"] and trial["texture_kid"] < texture_limit
        say(f"  + {name}: KID {trial['kid']:.5f}, texture KID {trial['texture_kid']:.4f} -> "
            f"{'kept' if better else 'left out'}")
        if better:
            kept, best = kept + [name], trial
    return kept, best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.soup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("candidates", nargs="+", type=Path, help="generator weight files of one architecture")
    p.add_argument("--photos", type=Path, required=True, help="the runs' photo folder (its validation split is used)")
    p.add_argument("--paintings", type=Path, required=True, help="folder of paintings")
    p.add_argument("--val-photos", type=Path, default=None, help="validation photos (default: the split of --photos)")
    p.add_argument("--out", type=Path, required=True, help="where the soup is written (.safetensors)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--recorded", action="store_true", help="take a candidate's own figures from its file (the "
                   "val_kid and val_texture_kid training.fit records in RUN_DIR/validated/) instead of scoring it "
                   "again: only for candidates validated on these same photos")
    args = p.parse_args(argv)
    from model.runtime import autocast_dtype, resolve_device
    from training.baselines import colour_transfer, lab_statistics
    from training.data import DataError, scan_folder
    from training.metrics import eval_extra_missing, kid, texture_kid
    from training.validation import Validator, split_validation

    if (missing := eval_extra_missing()) is not None:
        print(f"error: the eval extra is not installed ({missing})", file=sys.stderr)
        return 2
    try:
        labels = [label(path) for path in args.candidates]
        if len(set(labels)) != len(labels):
            raise DataError("a candidate is named twice")
        candidates, known = {}, {}
        for name, path in zip(labels, args.candidates):
            candidates[name], info = load_generator(path)
            recorded = info.training or {}
            if args.recorded and "val_kid" in recorded and "val_texture_kid" in recorded:
                known[name] = {"kid": float(recorded["val_kid"]), "texture_kid": float(recorded["val_texture_kid"])}
        average(list(candidates.values()))  # one architecture, or a one-line error now
        if args.val_photos:
            val = scan_folder(args.val_photos, "validation photos").files
        else:
            _, val = split_validation(scan_folder(args.photos, "photos").files, 0.0)
        paintings = scan_folder(args.paintings, "paintings").files
        device = resolve_device(args.device)
    except (WeightsError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import numpy as np
    from PIL import Image

    validator = Validator(val, paintings, device, amp_dtype=autocast_dtype(device, "auto"))
    mean, std = lab_statistics(Image.open(p) for p in paintings)
    colour = torch.stack([torch.from_numpy(np.asarray(colour_transfer(
        Image.fromarray(photo.permute(1, 2, 0).numpy()), mean, std)).copy()).permute(2, 0, 1)
        for photo in validator.photos])
    limit = texture_kid(validator.texture(colour), validator.real_texture)[0]
    colour_kid = kid(validator.features(colour), validator.real_features)[0]
    print(f"{len(candidates)} candidates on {len(val)} validation photos; colour transfer: KID {colour_kid:.5f}, "
          f"texture KID {limit:.4f} (the soup's texture KID must stay under it)", flush=True)
    kept, best = greedy(candidates, validator.scores, limit, say=lambda s: print(s, flush=True), known=known)
    soup = average([candidates[n] for n in kept])
    save_generator(args.out, soup, training={"soup": kept, "val_kid": best["kid"],
                                             "val_texture_kid": best["texture_kid"]})
    print(f"soup of {len(kept)} ({', '.join(kept)}): validation KID {best['kid']:.5f}, texture KID "
          f"{best['texture_kid']:.4f}; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
