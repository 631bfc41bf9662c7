"""Make the model card's before/after grid: `python -m tools.make_grid OUT.jpg IMAGE... [--weights FILE]`.

Each row is a photo and its painting, side by side, scaled to --height pixels.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from model.images import fit_max_side, to_rgb
from model.translator import Translator
from model.weights import SHIPPED_WEIGHTS as DEFAULT_WEIGHTS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--max-side", type=int, default=512)
    args = p.parse_args()
    translator = Translator.from_file(args.weights)
    rows = []
    for path in args.images:
        with Image.open(path) as img:
            img.load()
            (painting,) = translator.translate([img], max_side=args.max_side)
        source = fit_max_side(to_rgb(img), args.max_side)
        scale = args.height / source.height
        size = (round(source.width * scale), args.height)
        rows.append((source.resize(size, Image.Resampling.LANCZOS), painting.resize(size, Image.Resampling.LANCZOS)))
    width = max(a.width + b.width for a, b in rows) + 12
    grid = Image.new("RGB", (width, len(rows) * (args.height + 4) + 4), "white")
    for i, (a, b) in enumerate(rows):
        y = 4 + i * (args.height + 4)
        grid.paste(a, (4, y))
        grid.paste(b, (8 + a.width, y))
    grid.save(args.out, quality=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
