"""The photo split docs/experiments.md scores on: a photo is held out when the SHA-1 of its bytes, as a number,
is below 9 modulo 100 (545 of the 6,340 competition photos). A split by content, not by name or order, so it
holds for any copy or subset of the folder.

    python -m tools.heldout DIR --train      # the paths that training may use, one a line, sorted
    python -m tools.heldout DIR --held-out   # the paths no run sees, for training.evaluate
    python -m tools.heldout DIR --held-out --link TO   # the held-out photos as links in the folder TO
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def is_held_out(path: Path) -> bool:
    return int(hashlib.sha1(Path(path).read_bytes()).hexdigest(), 16) % 100 < 9


def split(folder: Path) -> tuple[list[Path], list[Path]]:
    """(training photos, held-out photos) of the image files in ``folder``, each sorted by name."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    held = [p for p in files if is_held_out(p)]
    chosen = set(held)
    return [p for p in files if p not in chosen], held


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.heldout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--train", action="store_true", help="print the photos training may use")
    which.add_argument("--held-out", action="store_true", help="print the photos no run sees")
    p.add_argument("--link", type=Path, default=None, help="link the chosen photos into this folder instead")
    args = p.parse_args(argv)
    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder", file=sys.stderr)
        return 2
    train, held = split(args.folder)
    chosen = train if args.train else held
    if args.link is None:
        sys.stdout.write("".join(f"{path}\n" for path in chosen))
        return 0
    args.link.mkdir(parents=True, exist_ok=True)
    for path in chosen:
        target = args.link / path.name
        if not target.exists():
            target.symlink_to(path.resolve())
    print(f"{len(chosen)} photos linked into {args.link}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
