"""A large painting run in stages (issue 34, item 4): between two stages of the generator, whoever waits for the
model (a batch of small requests) goes first, and the painting is the whole network's."""
import threading
import time

import numpy as np
import pytest

from model.backends import generator_stages, openvino_available
from model.translator import STAGE_ABOVE_PIXELS, Translator
from model.weights import SHIPPED_WEIGHTS
from tests.conftest import photo, small_generator


def test_the_resnet_generator_is_cut_at_every_residual_block():
    g = small_generator(n_blocks=3)
    stages = generator_stages(g)
    assert len(stages) == 3 + 2  # stem and downsampling, one stage per block, upsampling and head
    assert sum(len(s) for s in stages) == len(g.model)


@pytest.mark.parametrize("backend", ["torch", pytest.param("openvino", marks=pytest.mark.skipif(
    not openvino_available(), reason="the openvino extra is not installed"))])
def test_a_painting_in_stages_is_the_whole_networks(backend):
    t = Translator.from_file(SHIPPED_WEIGHTS, device="cpu", backend=backend)
    t.prepare_large(wait=True)
    image = np.asarray(photo(600, 452).convert("RGB"))  # over STAGE_ABOVE_PIXELS, so painted in stages
    assert 600 * 452 > STAGE_ABOVE_PIXELS
    staged, whole = t.paint_whole(image), t.translate_many([image])[0]
    assert staged.shape == whole.shape == image.shape
    diff = np.abs(staged.astype(int) - whole.astype(int))
    assert diff.mean() <= 0.1 and diff.max() <= 2, (diff.mean(), diff.max())


def test_a_request_waiting_mid_painting_gets_the_model_at_the_next_stage():
    """The large painting holds the model for one stage at a time; a request that asks for the model while it
    paints gets it after the current stage, not after the painting (the lock is FIFO: the painting takes it
    back after the request)."""
    t = Translator(small_generator(n_blocks=3), device="cpu", backend="torch", precision="fp32")
    t.prepare_large()
    lock, events = t._lock, []
    hooks = [s.register_forward_hook(lambda *_: events.append("stage")) for s in t._run.stages()]
    image = np.asarray(photo(600, 452).convert("RGB"))

    def request():
        with lock:
            events.append("request")

    def queued(n):  # threads holding a ticket: the one served and those waiting
        deadline = time.monotonic() + 10
        while lock._next - lock._serving < n and time.monotonic() < deadline:
            time.sleep(0.001)

    result = {}
    try:
        with lock:  # the painting, then the request, queue behind the test
            painting = threading.Thread(target=lambda: result.update(y=t.paint_whole(image)))
            painting.start()
            queued(2)
            waiting = threading.Thread(target=request)
            waiting.start()
            queued(3)
        painting.join(30), waiting.join(30)
    finally:
        for h in hooks:
            h.remove()
    stages = len(t._run.stages())
    assert events.count("stage") == stages and events.count("request") == 1
    assert events.index("request") == 1, events  # right after the painting's first stage
    assert np.array_equal(result["y"], t.translate_many([image])[0])


def test_a_painting_given_up_stops_between_stages():
    from model.tiling import PaintingStopped

    t = Translator(small_generator(n_blocks=3), device="cpu", backend="torch", precision="fp32")
    t.prepare_large()
    asked = []
    with pytest.raises(PaintingStopped):
        t.paint_whole(np.asarray(photo(600, 452).convert("RGB")), stop=lambda: asked.append(1) or len(asked) > 2)
    assert len(asked) == 3  # asked between stages; stopped at the third boundary


@pytest.mark.skipif(not openvino_available(), reason="the openvino extra is not installed")
def test_tiles_run_on_openvino_with_shared_statistics_as_close_to_whole_as_torchs():
    """Tiles with one set of statistics run on the compiled backend (the statistics a graph input), not in eager
    fp32 torch (issue 34, item 5), and are as close to the whole painting as the torch tiles are."""
    from model.backends import OpenVINOShared

    image = np.asarray(photo(1536, 1024).convert("RGB"))
    gaps = {}
    for backend in ("torch", "openvino"):
        t = Translator.from_file(SHIPPED_WEIGHTS, device="cpu", backend=backend)
        whole, tiled = t.translate_many([image])[0], t.translate_tiled(image, 512)
        assert tiled.shape == image.shape
        gaps[backend] = np.abs(whole.astype(float) - tiled.astype(float)).mean()
        if backend == "openvino":
            assert isinstance(t._shared, OpenVINOShared)
            t.release_memory()  # the tile graphs' buffers go with the backend's
            assert t._shared is None
            again = t.translate_tiled(image, 512)
            assert np.abs(again.astype(float) - tiled.astype(float)).mean() < 0.05
    assert gaps["openvino"] <= 2.0 and gaps["openvino"] <= gaps["torch"] + 0.5, gaps
