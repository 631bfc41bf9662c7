"""`python -m model.translate INPUT... --out DIR`: convert photos to Monet-style paintings offline.

Inputs are image files, video clips and folders of either (searched recursively). A clip is painted into
OUT/NAME.mp4 (H.264; frame count, timing, size, rotation and audio kept) with steady colours (model/video.py).
Unreadable inputs are skipped with a warning and make the exit code 1 at the end. `--zip images.zip` writes a Kaggle-style submission archive
(JPEG unless --format says otherwise) as well.
"""
from __future__ import annotations

import argparse
import functools
import io
import os
import sys
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

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
AHEAD = 2  # batches read ahead of the model, and batches whose writes may still be running behind it


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
    p.add_argument("--workers", type=int, default=None,
                   help="threads that read, decode, encode and write images while the model paints the next batch "
                        "(default: the number of cores, at most 8; 0: one step after the other on the main thread)")
    p.add_argument("--video-mode", choices=VIDEO_MODES, default=VIDEO_MODES[0],
                   help="clips: steady (normalisation statistics shared over each shot, unchanged pixels settled "
                        "over time: no shimmer) or per-frame (each frame painted on its own, for comparison)")
    p.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING,
                   help=f"clips, steady mode: weight of a shot's running statistics against each new frame's "
                        f"(0 to below 1; default {DEFAULT_SMOOTHING})")
    return p


def _load(item: tuple[Path, Path], device_codec: bool, max_side, stroke_scale, tile) -> tuple:
    """One input read for painting: (JPEG bytes for the device path or None, a Pillow image or None, the error
    that made it unreadable or None)."""
    path, _ = item
    if device_codec:  # the device path paints whole and pixel for pixel; the plan sends the rest (a stroke scale
        data = _read(path)  # over 1, tiles) through Pillow and Translator.paint
        if data is not None and _batched(data, max_side, stroke_scale, tile):
            return data, None, None
    try:
        return None, _open(path), None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        return None, None, exc


def _save(out: Path, rel: Path, fmt: str, data: bytes | None = None, image: Image.Image | None = None,
          painting: Image.Image | None = None) -> tuple[Path, str]:
    """Write one painting (encoded bytes, or a Pillow painting to encode) whole, a temp file then a rename, to
    ``out/rel`` with ``fmt``'s extension; returns (the file, its name in the zip)."""
    kind = FORMATS[fmt]
    name = rel.with_suffix(kind.extension)
    target = out / name
    if data is not None:
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
        return target, name.as_posix()
    if fmt in ALPHA_FORMATS and (alpha := alpha_channel(image, painting.size)) is not None:
        painting = painting.copy()
        painting.putalpha(alpha)  # a transparent photo's painting keeps its transparency
    atomic_write(target, lambda tmp: painting.save(tmp, kind.pil, **kind.options))
    return target, name.as_posix()


class _Inline:
    """ThreadPoolExecutor's ``submit`` run at once on this thread (--workers 0)."""

    def submit(self, fn, *args):
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


def convert_images(translator, files: list[tuple[Path, Path]], args, stroke_scale, device_codec: bool,
                   workers: int, problems: list[str], bar) -> list[tuple[Path, str]]:
    """Paint ``files`` a batch at a time; returns the (file written, name in the zip) pairs in input order.

    With ``workers`` threads the reads and decodes of the next ``AHEAD`` batches and the encodes and writes of the
    last ones run while the model paints (Pillow, libjpeg-turbo and the file system release the GIL); with 0 each
    step waits for the one before, on this thread. Raises NonFiniteOutput, after every write already started has
    finished (no file is left half-written)."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="convert") if workers else _Inline()
    batches = [files[i : i + args.batch_size] for i in range(0, len(files), args.batch_size)]
    load = functools.partial(_load, device_codec=device_codec, max_side=args.max_side, stroke_scale=stroke_scale,
                             tile=args.tile)
    loads = {}  # batch index -> its per-image futures, submitted AHEAD batches early
    saves: list[tuple[list, int]] = []  # per batch: its write futures, and how many inputs it held
    written: list[tuple[Path, str]] = []

    def collect(done_batches: int) -> None:  # wait for the oldest writes until at most ``done_batches`` remain
        while len(saves) > done_batches:
            futures, size = saves.pop(0)
            written.extend(f.result() for f in futures)
            bar.update(size)

    try:
        for n, batch in enumerate(batches):
            for ahead in range(n, min(n + 1 + AHEAD, len(batches))):
                if ahead not in loads:
                    loads[ahead] = [pool.submit(load, item) for item in batches[ahead]]
            loaded = [f.result() for f in loads.pop(n)]
            futures = []

            def save(rel: Path, **painted):
                futures.append(pool.submit(functools.partial(_save, args.out, rel, args.format, **painted)))

            jpegs = [i for i, (data, _, _) in enumerate(loaded) if data is not None]
            if jpegs:
                painted = paint_jpegs(translator, [loaded[i][0] for i in jpegs], args.max_side,
                                      FORMATS[args.format].options["quality"])
                for i, data in zip(jpegs, painted):
                    if data is not None:
                        save(batch[i][1], data=data)
                        loaded[i] = (data, None, None)
                    else:  # the device path could not take it after all (CMYK, damaged): Pillow's path
                        loaded[i] = _load(batch[i], False, args.max_side, stroke_scale, args.tile)
            chunk, images = [], []
            for (path, rel), (data, image, error) in zip(batch, loaded):
                if error is not None:
                    problems.append(f"{path}: unreadable image ({error})")
                    tqdm.write(f"warning: skipping {path}: unreadable image", file=sys.stderr)
                elif image is not None:
                    chunk.append(rel)
                    images.append(image)
            if images:
                paintings = translator.translate(images, max_side=args.max_side, tile=args.tile,
                                                 stroke_scale=stroke_scale, upsampler=args.upsampler)
                for rel, image, painting in zip(chunk, images, paintings):
                    save(rel, image=image, painting=painting)
            saves.append((futures, len(batch)))
            collect(AHEAD)
        collect(0)
    finally:
        for futures in loads.values():  # an error: drop what was read ahead; let started writes finish
            for f in futures:
                f.cancel()
        pool.shutdown(wait=True)
    return written


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
    started = time.perf_counter()
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
    device_codec = args.format == "jpeg" and (args.codec == "torchvision" or (
        args.codec == "auto" and translator.device.type == "cuda"))
    args.out.mkdir(parents=True, exist_ok=True)
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    loaded = time.perf_counter()
    with tqdm(total=len(files), unit="img", disable=None) as bar:
        try:
            written = convert_images(translator, files, args, stroke_scale, device_codec, workers, problems, bar)
        except NonFiniteOutput as exc:  # nothing half-written: files so far are complete, the rest untouched
            print(f"error: {args.weights}: {exc}", file=sys.stderr)
            return 2
    converted = time.perf_counter() - loaded
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
    if written:  # the conversion's own rate, the model's load (and its first compilation) reported apart
        print(f"images: {len(written)} in {converted:.2f} s ({len(written) / converted:.1f} images/s); start-up "
              f"(model load, file listing) {loaded - started:.2f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
