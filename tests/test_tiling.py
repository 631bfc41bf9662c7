"""Tiled painting (model/tiling.py): one set of normalisation statistics, smooth blending, bounded memory."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from model.tiling import ramp, tile_starts
from model.translator import Translator
from model.weights import SHIPPED_WEIGHTS, save_generator
from tests.conftest import ROOT, photo, small_generator


@pytest.fixture(scope="module")
def translator():
    return Translator.from_file(SHIPPED_WEIGHTS, device="cpu", backend="torch", precision="fp32")


def test_tiles_cover_every_pixel_and_their_weights_never_vanish():
    for n, tile, overlap in [(1536, 512, 64), (1000, 512, 64), (512, 512, 64), (300, 512, 64), (1025, 256, 32)]:
        starts = tile_starts(n, tile, overlap)
        covered = np.zeros(n)
        for s in starts:
            length = min(tile, n - s)
            covered[s : s + length] += ramp(length, s, n, overlap)
        assert starts[0] == 0 and min(tile, n - starts[-1]) + starts[-1] == n
        assert covered.min() > 0.5, (n, tile, covered.min())
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours overlap enough


def test_an_image_that_fits_one_tile_is_painted_exactly_as_whole(translator):
    img = np.asarray(photo(500, 380, seed=1))
    assert np.array_equal(translator.translate_tiled(img, tile=512), translator.translate_many([img])[0])


def test_tiled_at_512_is_within_2_levels_of_whole_on_1536x1024_with_no_seam(translator):
    img = np.asarray(photo(1536, 1024, seed=3))
    whole = translator.translate_many([img])[0].astype(np.int16)
    tiled = translator.translate_tiled(img, tile=512).astype(np.int16)
    assert tiled.shape == whole.shape
    assert np.abs(tiled - whole).mean() <= 2.0
    # across a tile border the painting changes no more than between any two neighbouring columns or rows
    cols = np.abs(np.diff(tiled, axis=1)).mean(axis=(0, 2))  # step between column j and j+1
    rows = np.abs(np.diff(tiled, axis=0)).mean(axis=(1, 2))
    for steps, n in ((cols, 1536), (rows, 1024)):
        borders = [s - 1 for s in tile_starts(n, 512, 64)[1:]] + [s + 511 for s in tile_starts(n, 512, 64)[:-1]]
        assert max(steps[b] for b in borders) <= 1.5 * np.median(steps) + 0.5, (
            [round(float(steps[b]), 2) for b in borders], float(np.median(steps)))


def test_tiles_without_shared_statistics_would_differ(translator):
    """The control: the same tiles, each normalised by its own statistics (what the reference code does),
    are much further from the whole painting, so the shared statistics are what the test above measures."""
    img = np.asarray(photo(1024, 512, seed=4))
    whole = translator.translate_many([img])[0].astype(np.int16)
    own = np.concatenate([translator.translate_many([img[:, :512]])[0], translator.translate_many([img[:, 512:]])[0]],
                         axis=1).astype(np.int16)
    shared = translator.translate_tiled(img, tile=512).astype(np.int16)
    assert np.abs(shared - whole).mean() < np.abs(own - whole).mean()


def test_the_cli_paints_large_images_in_tiles_at_their_full_size(tmp_path):
    weights = tmp_path / "g.safetensors"
    save_generator(weights, small_generator(ngf=8, n_blocks=1))
    src = tmp_path / "in"
    src.mkdir()
    photo(701, 333, seed=5).save(src / "wide.png")
    photo(97, 61, seed=6).save(src / "small.png")
    for tile in ("256", "0"):
        out = tmp_path / f"out{tile}"
        run = subprocess.run([sys.executable, "-m", "model.translate", str(src), "--out", str(out), "--weights",
                              str(weights), "--device", "cpu", "--tile", tile], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert Image.open(out / "wide.png").size == (701, 333) and Image.open(out / "small.png").size == (97, 61)
    bad = subprocess.run([sys.executable, "-m", "model.translate", str(src), "--out", str(tmp_path / "x"),
                          "--weights", str(weights), "--tile", "10"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--tile" in bad.stderr


# -- stroke scale (model/stroke.py) ------------------------------------------------------------------------

def test_default_stroke_scale_paints_phone_photos_at_about_1024_and_small_ones_as_they_are():
    from model.stroke import default_stroke_scale, painted_size

    assert default_stroke_scale(640, 427) == 1.0 and default_stroke_scale(1024, 768) == 1.0
    assert default_stroke_scale(4032, 3024) == pytest.approx(3.9375)
    assert painted_size(4032, 3024, default_stroke_scale(4032, 3024)) == (1024, 768)
    assert painted_size(8064, 6048, default_stroke_scale(8064, 6048)) == (1024, 768)


def test_stroke_scale_1_paints_pixel_for_pixel(translator):
    img = np.asarray(photo(300, 200, seed=5))
    assert np.array_equal(translator.paint(img, stroke_scale=1, tile=0), translator.translate_many([img])[0])


@pytest.mark.parametrize("upsampler", ["guided", "lanczos"])
@pytest.mark.parametrize("size, scale", [((301, 203), 2.5), ((513, 257), 3.0), ((97, 61), 1.7)])
def test_a_painting_at_any_stroke_scale_has_the_photos_size(translator, size, scale, upsampler):
    img = np.asarray(photo(*size, seed=6))
    out = translator.paint(img, stroke_scale=scale, tile=1024, upsampler=upsampler)
    assert out.shape == img.shape and out.dtype == np.uint8


def test_every_exif_orientation_keeps_its_upright_size_at_a_stroke_scale(translator):
    base = photo(517, 311, seed=7)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = __import__("io").BytesIO()
        base.save(buf, "JPEG", exif=exif)
        buf.seek(0)
        with Image.open(buf) as img:
            out = translator.translate([img], stroke_scale=2.0)[0]
        upright = (311, 517) if orientation >= 5 else (517, 311)
        assert out.size == upright, orientation


def test_the_guided_upsampler_takes_its_edges_from_the_photo(translator):
    """A photo with one hard vertical edge, painted at 1/4 size: brought back with the guided filter the edge
    is as sharp as the photo's (the step happens within 2 columns); Lanczos spreads it over the 4x zoom."""
    img = np.full((256, 512, 3), 40, np.uint8)
    img[:, 258:] = 215
    painted = {m: translator.paint(img, stroke_scale=4.0, upsampler=m).astype(np.float32).mean(axis=(0, 2))
               for m in ("guided", "lanczos")}

    def width_of_step(profile):  # columns taken to go from 10% to 90% of the step
        lo, hi = profile[200:240].mean(), profile[280:320].mean()
        inside = np.nonzero((profile[230:290] - lo) / (hi - lo) > 0.1)[0][0], \
            np.nonzero((profile[230:290] - lo) / (hi - lo) > 0.9)[0][0]
        return inside[1] - inside[0]

    assert width_of_step(painted["guided"]) <= 2
    assert width_of_step(painted["lanczos"]) > width_of_step(painted["guided"])


def test_the_cli_takes_a_stroke_scale_and_refuses_a_bad_one(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    photo(333, 215, seed=8).save(src / "a.jpg")
    ok = subprocess.run([sys.executable, "-m", "model.translate", str(src), "--out", str(tmp_path / "out"),
                         "--stroke-scale", "2.5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    with Image.open(tmp_path / "out" / "a.png") as out:
        assert out.size == (333, 215)
    for bad in ("0.5", "huge", "nan"):
        done = subprocess.run([sys.executable, "-m", "model.translate", str(src), "--out", str(tmp_path / "x"),
                               "--stroke-scale", bad], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--stroke-scale" in done.stderr
