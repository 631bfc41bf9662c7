"""Plot validation KID curves of training runs as a small PNG (Pillow only, no plotting library).

    python -m tools.plot_curves OUT.png RUN_DIR[=label] ... [--x minutes|step] [--line label=value ...]

Each RUN_DIR's metrics.jsonl gives the `val_kid` points; `--line` draws a dashed horizontal reference
(e.g. the raw photos' or the colour transfer's KID on the same validation photos). `--chain` draws the runs
end to end, as phases of one training (a fine-tune with `--init-generator` after the run it started from).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (227, 119, 194)]


def read_curve(run: Path, x: str) -> list[tuple[float, float]]:
    points = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val_kid" in record:
            points.append((record["train_seconds"] / 60 if x == "minutes" else record["step"], record["val_kid"]))
    return points


def plot(curves: dict[str, list[tuple[float, float]]], lines: dict[str, float], x_label: str, out: Path,
         size: tuple[int, int] = (720, 420)) -> None:
    w, h = size
    left, right, top, bottom = 70, 190, 20, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = [p[0] for c in curves.values() for p in c] or [0, 1]
    ys = [p[1] for c in curves.values() for p in c] + list(lines.values()) or [0, 1]
    x0, x1 = 0.0, max(xs) * 1.02 or 1.0
    y0, y1 = 0.0, max(ys) * 1.05 or 1.0

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(6):
        y = y0 + (y1 - y0) * i / 5
        d.text((8, at(0, y)[1] - 6), f"{y:.3f}", fill="black", font=font)
        d.line([left - 4, at(0, y)[1], left, at(0, y)[1]], fill="black")
        xv = x0 + (x1 - x0) * i / 5
        d.text((at(xv, 0)[0] - 10, h - bottom + 6), f"{xv:.0f}", fill="black", font=font)
    d.text(((left + w - right) / 2 - 30, h - 22), x_label, fill="black", font=font)
    d.text((8, 4), "validation KID (lower is better)", fill="black", font=font)
    legend_y = top + 4
    for label, value in lines.items():
        y = at(0, value)[1]
        for x in range(left, w - right, 12):
            d.line([x, y, min(x + 6, w - right), y], fill=(110, 110, 110))
        d.text((w - right + 6, y - 6), f"{label} {value:.4f}", fill=(90, 90, 90), font=font)
    for (label, points), colour in zip(curves.items(), COLOURS):
        pts = [at(*p) for p in points]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for px, py in pts:
            d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        d.line([left + 8, legend_y + 6, left + 28, legend_y + 6], fill=colour, width=3)
        d.text((left + 32, legend_y), label, fill=colour, font=font)
        legend_y += 14
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR=label")
    p.add_argument("--x", choices=["minutes", "step"], default="minutes")
    p.add_argument("--line", action="append", default=[], help="label=value, a dashed reference line")
    p.add_argument("--chain", action="store_true", help="each run's x continues from the previous run's last point")
    args = p.parse_args()
    curves, offset = {}, 0.0
    for spec in args.runs:
        path, _, label = spec.partition("=")
        points = [(x + offset, y) for x, y in read_curve(Path(path), args.x)]
        curves[label or Path(path).name] = points
        if args.chain and points:
            offset = points[-1][0]
    lines = {k: float(v) for k, _, v in (spec.rpartition("=") for spec in args.line)}
    plot(curves, lines, "training minutes (validation excluded)" if args.x == "minutes" else "step", args.out)


if __name__ == "__main__":
    main()
