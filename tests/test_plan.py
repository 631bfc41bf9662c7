"""How an image is painted is decided in one place (model/plan.py): sizes and options in, a plan out; the
translator, the CLI and the service follow it."""
import io

import numpy as np
import pytest
from PIL import Image

from app.decoding import open_upload
from model.plan import plan_painting
from model.translator import Translator
from model.weights import SHIPPED_WEIGHTS
from tests.conftest import photo


@pytest.mark.parametrize("size, options, painted, batched, tiled", [
    ((256, 256), {}, (256, 256), True, False),                              # a Kaggle photo: as it is
    ((1024, 768), {"tile": 1024}, (1024, 768), True, False),                # up to 1024: pixel for pixel
    ((4032, 3024), {"tile": 1024}, (1024, 768), False, False),              # a phone photo: at stroke scale 3.9
    ((4032, 3024), {"stroke_scale": 1, "tile": 1024}, (4032, 3024), False, True),  # pixel for pixel: tiles
    ((4032, 3024), {"stroke_scale": 1, "tile": 0}, (4032, 3024), True, False),     # tiles off: whole
    ((4032, 3024), {"stroke_scale": 2, "tile": 1024}, (2016, 1512), False, True),  # larger strokes, still tiles
    ((6000, 4000), {"max_side": 1024, "tile": 1024}, (1024, 683), True, False),    # an operator's cap first
    ((300, 200), {"stroke_scale": 2.5}, (120, 80), False, False),           # a stroke scale on a small photo
    ((300, 200), {"stroke_scale": 0.5}, (300, 200), True, False),           # under 1 counts as 1
])
def test_the_plan_from_sizes_and_options(size, options, painted, batched, tiled):
    plan = plan_painting(*size, **options)
    assert (plan.painted, plan.batched, plan.tiled) == (painted, batched, tiled)
    assert plan.size == ((1024, 683) if options.get("max_side") else size)  # what comes back


def test_the_default_stroke_scale_is_the_plans():
    assert plan_painting(4032, 3024).stroke_scale == pytest.approx(4032 / 1024)
    assert plan_painting(640, 427).stroke_scale == 1.0
    assert plan_painting(8064, 6048, max_side=4032).stroke_scale == pytest.approx(4032 / 1024)


def test_a_rotated_upload_is_planned_alike_from_its_header_and_painted_at_its_upright_size(tmp_path):
    """A phone photo with EXIF orientation 6 is stored landscape and painted portrait: whether it is batched does
    not depend on the rotation (the service decides from the header), and the plan of the decoded, upright
    image paints it at its upright size."""
    from app.decoding import finish_decode

    img = photo(400, 300, seed=2)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    opened = open_upload(buf.getvalue(), 50_000_000, 0)
    assert opened.orientation == 6 and opened.image.size == (400, 300)
    for scale in (None, 1, 2):
        assert plan_painting(*opened.image.size, scale, 1024).batched == plan_painting(300, 400, scale, 1024).batched
    upright = finish_decode(opened, 0)
    assert upright.shape[:2] == (400, 300)
    assert plan_painting(upright.shape[1], upright.shape[0], stroke_scale=2).painted == (150, 200)


def test_the_translator_paints_by_the_plan():
    translator = Translator.from_file(SHIPPED_WEIGHTS, device="cpu", backend="torch", precision="fp32")
    img = np.asarray(photo(300, 200, seed=5))
    by_plan = translator.paint_planned(img, plan_painting(300, 200, stroke_scale=2.5))
    assert np.array_equal(by_plan, translator.paint(img, stroke_scale=2.5))
    assert by_plan.shape == img.shape
    whole = translator.translate([Image.fromarray(img)], stroke_scale=None)[0]  # the default: as it is
    assert np.array_equal(np.asarray(whole), translator.translate_many([img])[0])
