"""Folder conversion: `monet-translate` on a folder of 256x256 JPEGs to a zip of JPEG paintings (the Kaggle use),
its reads, decodes, encodes and writes on threads beside the model (--workers, the default) against one step
after the other (--workers 0), and optionally against another revision's CLI, alternating, in the same run.

    python -m benchmarks.bench_convert [--photos DIR] [--files 400] [--repeats 2] [--against REV] [--device auto]

Two figures per run: the CLI's own conversion rate (its "images:" line, model load apart; an older CLI that
prints none shows "-") and the whole process's images per wall second (model load included). The photos are
copied (never committed); without DIR, smooth synthetic 256x256 photos.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.serving import ROOT, revision


def make_folder(photos: Path | None, files: int, folder: Path) -> int:
    folder.mkdir(parents=True)
    found = sorted(photos.glob("*.jpg"))[:files] if photos and photos.is_dir() else []
    for f in found:
        shutil.copy(f, folder / f.name)
    if not found:
        sys.path.insert(0, str(ROOT))
        from tests.conftest import photo

        for i in range(files):
            photo(256, 256, seed=i).save(folder / f"{i:05d}.jpg", quality=90)
    return len(list(folder.glob("*.jpg")))


def one_run(root: Path, folder: Path, extra: list[str], device: str) -> tuple[float | None, float]:
    out = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "model.translate", str(folder), "--out", str(out / "out"),
                        "--zip", str(out / "images.zip"), "--device", device, "--batch-size", "8", *extra],
                       cwd=root, capture_output=True, text=True)
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    if r.returncode != 0:
        raise SystemExit(f"the conversion failed ({root}): {r.stderr.strip().splitlines()[-1:]}")
    rate = re.search(r"images: \d+ in [\d.]+ s \(([\d.]+) images/s\)", r.stdout)
    return (float(rate.group(1)) if rate else None), wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "photo")
    p.add_argument("--files", type=int, default=400)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--against", help="also run this git revision's CLI (a worktree), alternating")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench_convert_in_")) / "photos"
    n = make_folder(args.photos, args.files, folder)
    print(f"{n} JPEG photos -> a zip of JPEG paintings, batch 8, device {args.device}")
    results: dict[str, list[tuple[float | None, float]]] = {}
    with revision(args.against) as other:
        runs = {"ours, --workers default": (ROOT, []), "ours, --workers 0": (ROOT, ["--workers", "0"])}
        if other:
            runs = {f"main ({args.against})": (other, [])} | runs
        for _ in range(args.repeats):
            for name, (root, extra) in runs.items():
                results.setdefault(name, []).append(one_run(root, folder, extra, args.device))
    shutil.rmtree(folder.parent, ignore_errors=True)
    base = max(n / wall for _, wall in next(iter(results.values())))
    for name, rows in results.items():
        rates = [r for r, _ in rows if r is not None]
        best_wall = max(n / wall for _, wall in rows)
        print(f"  {name}: conversion {max(rates):.1f} images/s" if rates else f"  {name}: conversion -",
              end="")
        print(f"; whole process {best_wall:.1f} images/s ({best_wall / base:.2f}x the first row), best of "
              f"{len(rows)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
