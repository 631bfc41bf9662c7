"""`python -m model.translate INPUT... --out DIR`: convert photos to Monet-style paintings offline.

Inputs are image files, video clips and folders of either (searched recursively). A clip is painted into
OUT/NAME.mp4 (H.264; frame count, timing, size, rotation and audio kept) with steady colours (model/video.py).
Unreadable inputs are skipped with a warning and make the exit code 1 at the end. `--zip images.zip` writes a Kaggle-style submission archive
(JPEG unless --format says otherwise) as well.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from model.codecs import ALPHA_FORMATS, FORMATS, paint_jpegs
from model.backends import BACKENDS
from model.images import IMAGE_EXTENSIONS, alpha_channel
from model.plan import plan_painting
from model.stroke import STROKE_SCALES, UPSAMPLERS
from model.translator import NonFiniteOutput, Translator
from model.video import DEFAULT_SMOOTHING, VIDEO_EXTENSIONS, VIDEO_MODES, VideoError, is_video, paint_clip
from model.weights import SHIPPED_WEIGHTS, WeightsError, atomic_write

# The CLI (not the library) honours the service's MONET_WEIGHTS, so a container converts with what it serves.
DEFAULT_WEIGHTS = Path(os.environ.get("MONET_WEIGHTS") or SHIPPED_WEIGHTS)


def collect_inputs(inputs: list[Path]) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(file, name relative to its input root) pairs in a stable order, and a list of problems."""
    found, problems = [], []
    for item in inputs:
        if item.is_dir():
            files = sorted(p for p in item.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS | set(VIDEO_EXTENSIONS))
            found += [(p, p.relative_to(item)) for p in files]
        elif item.is_file():
            found.append((item, Path(item.name)))
        else:
            problems.append(f"{item}: no such file or folder")
    return found, problems


def _open(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img.copy() if img.mode != "P" else img.convert("RGBA")


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None  # reported by the Pillow path, which tries again


def _batched(data: bytes, max_side: int | None, stroke_scale: float | None, tile: int) -> bool:
    """Whether an image is painted whole and pixel for pixel (model/plan.py), from its header; False when the
    header does not open (Pillow's path then reports it)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return plan_painting(*img.size, stroke_scale, tile, max_side).batched
    except Exception:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.translate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders")
    p.add_argument("--out", type=Path, required=True, help="folder for the paintings (created if missing)")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help=f"generator weight file (default {DEFAULT_WEIGHTS})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="runtime: auto = OpenVINO on CPU when installed (the openvino extra), else torch")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--max-side", type=int, default=None, help="downscale inputs whose longer side exceeds this")
    p.add_argument("--tile", type=int, default=1024, help="paint images with a side over N in overlapping N x N "
                   "tiles that share one set of normalisation statistics, so memory follows N, not the image "
                   "(default 1024; 0 paints each image whole)")
    p.add_argument("--stroke-scale", default="auto", help="paint at 1/S of the size and bring the painting back "
                   "to full size, for strokes S times larger (a number >= 1; default auto: the longer side / "
                   "1024, so a photo up to 1024 pixels is painted as it is)")
    p.add_argument("--upsampler", choices=UPSAMPLERS, default=UPSAMPLERS[0],
                   help="how a painting made at a stroke scale over 1 comes back to full size: guided (edges from "
                        "the photo, colours and strokes from the painting) or lanczos")
    p.add_argument("--format", choices=sorted(FORMATS), default=None,
                   help="output image format (default png; jpeg with --zip, as Kaggle submissions need)")
    p.add_argument("--zip", type=Path, default=None, help="also pack all outputs into this zip archive")
    p.add_argument("--codec", choices=["auto", "pil", "torchvision"], default="auto",
                   help="JPEG decoding and encoding: torchvision keeps the pixels on the device (nvJPEG on CUDA) for "
                        "JPEG in and --format jpeg out; other files still go through Pillow. auto = torchvision on "
                        "CUDA with --format jpeg, else pil")
    p.add_argument("--video-mode", choices=VIDEO_MODES, default=VIDEO_MODES[0],
                   help="clips: steady (normalisation statistics shared over each shot, unchanged pixels settled "
                        "over time: no shimmer) or per-frame (each frame painted on its own, for comparison)")
    p.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING,
                   help=f"clips, steady mode: weight of a shot's running statistics against each new frame's "
                        f"(0 to below 1; default {DEFAULT_SMOOTHING})")
    return p


def paint_videos(translator, clips: list[tuple[Path, Path]], args, stroke_scale, problems: list[str]) -> list:
    """Paint each clip into OUT/NAME.mp4 with a progress bar of frames; a clip that fails is reported in one
    line and added to ``problems``, the others still done. The written (target, name) pairs."""
    from tqdm import tqdm

    written = []
    for path, rel in clips:
        target = args.out / rel.with_suffix(".mp4")
        with tqdm(unit="frame", desc=rel.name, disable=None) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)
            try:
                paint_clip(translator, path, target, args.video_mode, args.smoothing, stroke_scale,
                           args.upsampler, progress)
            except VideoError as exc:
                problems.append(f"{path}: {exc}")
                tqdm.write(f"warning: skipping {path}: {exc}", file=sys.stderr)
                continue
        written.append((target, rel.with_suffix(".mp4").as_posix()))
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or (args.max_side is not None and args.max_side < 1):
        print("error: --batch-size and --max-side must be at least 1", file=sys.stderr)
        return 2
    if args.tile != 0 and args.tile < 64:
        print("error: --tile must be 0 (whole images) or at least 64", file=sys.stderr)
        return 2
    try:
        stroke_scale = None if args.stroke_scale == "auto" else float(args.stroke_scale)
    except ValueError:
        stroke_scale = 0.0
    low, high = STROKE_SCALES
    if stroke_scale is not None and not low <= stroke_scale <= high:
        print(f"error: --stroke-scale must be auto or a number from {low:g} to {high:g}, not {args.stroke_scale!r}",
              file=sys.stderr)
        return 2
    if not 0.0 <= args.smoothing < 1.0:
        print("error: --smoothing must be from 0 to below 1", file=sys.stderr)
        return 2
    if not Path(args.weights).exists() and Path(args.weights) == DEFAULT_WEIGHTS:
        print(f"error: no default weights at {DEFAULT_WEIGHTS}; train one (python -m training.fit) "
              "and pass it with --weights", file=sys.stderr)
        return 2
    try:
        translator = Translator.from_file(args.weights, device=args.device, max_batch=args.batch_size,
                                          backend=args.backend)
    except (WeightsError, ValueError, NonFiniteOutput) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files, problems = collect_inputs(args.inputs)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    clips = [item for item in files if is_video(item[0])]
    files = [item for item in files if not is_video(item[0])]
    args.format = args.format or ("jpeg" if args.zip is not None else "png")
    fmt = FORMATS[args.format]
    pil_format, ext, save_kw = fmt.pil, fmt.extension, fmt.options
    device_codec = args.format == "jpeg" and (args.codec == "torchvision" or (
        args.codec == "auto" and translator.device.type == "cuda"))
    args.out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, str]] = []
    from tqdm import tqdm

    with tqdm(total=len(files), unit="img", disable=None) as bar:
        for start in range(0, len(files), args.batch_size):
            batch = files[start : start + args.batch_size]
            if device_codec:  # JPEG in, JPEG out, pixels on the device; what it can't take goes through Pillow
                blobs = [_read(path) for path, _ in batch]
                # the device path paints whole and pixel for pixel; the plan sends the rest (a stroke scale over
                # 1, tiles) through Pillow and Translator.paint
                blobs = [b if b is not None and _batched(b, args.max_side, stroke_scale, args.tile) else None
                         for b in blobs]
                try:
                    painted = paint_jpegs(translator, [b or b"" for b in blobs], args.max_side, save_kw["quality"])
                except NonFiniteOutput as exc:
                    print(f"error: {args.weights}: {exc}", file=sys.stderr)
                    return 2
                for (path, rel), data in zip(batch, painted):
                    if data is not None:
                        target = args.out / rel.with_suffix(ext)
                        atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
                        written.append((target, rel.with_suffix(ext).as_posix()))
                batch = [item for item, data in zip(batch, painted) if data is None]
            chunk, images = [], []
            for path, rel in batch:
                try:
                    images.append(_open(path))
                    chunk.append(rel)
                except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
                    problems.append(f"{path}: unreadable image ({exc})")
                    tqdm.write(f"warning: skipping {path}: unreadable image", file=sys.stderr)
            try:
                paintings = translator.translate(images, max_side=args.max_side, tile=args.tile,
                                                 stroke_scale=stroke_scale, upsampler=args.upsampler)
            except NonFiniteOutput as exc:  # nothing half-written: files so far are complete, the rest untouched
                print(f"error: {args.weights}: {exc}", file=sys.stderr)
                return 2
            for rel, image, painting in zip(chunk, images, paintings):
                if args.format in ALPHA_FORMATS and (alpha := alpha_channel(image, painting.size)) is not None:
                    painting = painting.copy()
                    painting.putalpha(alpha)  # a transparent photo's painting keeps its transparency
                target = args.out / rel.with_suffix(ext)
                atomic_write(target, lambda tmp: painting.save(tmp, pil_format, **save_kw))
                written.append((target, rel.with_suffix(ext).as_posix()))
            bar.update(len(files[start : start + args.batch_size]))
    try:
        videos = paint_videos(translator, clips, args, stroke_scale, problems)
    except NonFiniteOutput as exc:
        print(f"error: {args.weights}: {exc}", file=sys.stderr)
        return 2
    if args.zip is not None:
        def pack(tmp):
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
                for target, name in written:
                    zf.write(target, name)
        atomic_write(args.zip, pack)
    print(f"wrote {len(written)} image(s)" + (f" and {len(videos)} clip(s)" if clips else "") + f" to {args.out}"
          + (f" and {args.zip}" if args.zip else "")
          + (f"; {len(problems)} input(s) skipped" if problems else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
