import threading

import numpy as np
import pytest
import torch
from PIL import Image

from model.networks import UnetGenerator, init_weights
from model.backends import openvino_available, resolve_backend
from model.translator import Translator
from tests.conftest import photo, small_generator


@pytest.fixture(scope="module")
def translator():
    return Translator(small_generator(), device="cpu", precision="fp32", max_batch=4)


def as_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.mark.parametrize("size", [(64, 48), (37, 23), (5, 301), (1, 1), (3, 2)])
def test_output_has_the_input_size(translator, size):
    (out,) = translator.translate([photo(*size)])
    assert out.size == size and out.mode == "RGB"


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "I", "F", "YCbCr", "PA"])
def test_every_mode_becomes_rgb_of_the_same_size(translator, mode):
    src = photo(30, 22, mode="RGBA" if mode == "PA" else mode) if mode not in ("I;16", "I", "F") else None
    if mode == "PA":
        src = src.convert("PA")
    if mode == "I;16":
        src = Image.fromarray((np.arange(30 * 22, dtype=np.uint16).reshape(22, 30) * 90))
    elif mode == "I":
        src = Image.fromarray(np.arange(30 * 22, dtype=np.int32).reshape(22, 30) * 90, "I")
    elif mode == "F":
        src = Image.fromarray(np.linspace(0, 1, 30 * 22, dtype=np.float32).reshape(22, 30), "F")
    (out,) = translator.translate([src])
    assert out.size == (30, 22) and out.mode == "RGB"


def test_sixteen_bit_greys_use_their_full_range(translator):
    from model.images import to_rgb

    ramp = Image.fromarray(np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8))
    rgb = np.asarray(to_rgb(ramp))
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) > 32


def test_transparent_pixels_are_painted_over_white():
    from model.images import to_rgb

    clear = Image.new("RGBA", (4, 4), (10, 200, 10, 0))
    assert np.asarray(to_rgb(clear)).min() == 255


def test_exif_orientation_is_applied(translator, tmp_path):
    img = photo(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    with Image.open(path) as loaded:
        (out,) = translator.translate([loaded])
    assert out.size == (20, 40)


def test_max_side_keeps_the_aspect_ratio(translator):
    (out,) = translator.translate([photo(200, 100)], max_side=50)
    assert out.size == (50, 25)
    (small,) = translator.translate([photo(30, 20)], max_side=50)
    assert small.size == (30, 20)


def test_batched_output_equals_one_at_a_time(translator):
    images = [photo(40, 32, seed=i) for i in range(5)] + [photo(24, 24, seed=9), photo(40, 32, seed=7)]
    batched = translator.translate(images)
    single = [translator.translate([img])[0] for img in images]
    for b, s in zip(batched, single):
        assert b.size == s.size
        assert np.abs(as_array(b) - as_array(s)).max() <= 1


def test_default_precision_stays_close_to_fp32():
    g = small_generator(seed=5)
    fast = Translator(g, device="cpu")
    exact = Translator(small_generator(seed=5), device="cpu", precision="fp32")
    images = [photo(64, 64, seed=i) for i in range(3)]
    for a, b in zip(fast.translate(images), exact.translate(images)):
        assert np.abs(as_array(a) - as_array(b)).mean() < 3.0


def test_thread_safe(translator):
    images = [photo(32, 32, seed=i) for i in range(8)]
    expected = [as_array(o) for o in translator.translate(images)]
    results = [None] * 8

    def work(i):
        results[i] = as_array(translator.translate([images[i]])[0])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, e in zip(results, expected):
        assert np.abs(r - e).max() <= 1


def test_unet_pads_to_its_multiple_of_256():
    torch.manual_seed(0)
    t = Translator(init_weights(UnetGenerator(ngf=4)), device="cpu", precision="fp32", warmup=False)
    assert t.size_multiple == 256
    (out,) = t.translate([photo(70, 300)])
    assert out.size == (70, 300)


def test_from_file_and_device_errors(weights_file):
    t = Translator.from_file(weights_file, device="cpu")
    assert t.info.architecture == "resnet"
    with pytest.raises(ValueError, match="device"):
        Translator.from_file(weights_file, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Translator.from_file(weights_file, device="cuda")


@pytest.mark.skipif(not openvino_available(), reason="the openvino extra is not installed")
def test_openvino_paints_like_torch_within_one_level():
    from model.weights import SHIPPED_WEIGHTS as DEFAULT_WEIGHTS

    images = [photo(256, 256, seed=1), photo(200, 120, seed=2)]
    torch_fp32 = Translator.from_file(DEFAULT_WEIGHTS, device="cpu", precision="fp32", backend="torch")
    for precision in ("fp32", "auto"):  # auto: bf16 where the CPU has bf16 units
        ov = Translator.from_file(DEFAULT_WEIGHTS, device="cpu", precision=precision, backend="openvino")
        assert ov.backend == "openvino"
        for a, b in zip(torch_fp32.translate(images), ov.translate(images)):
            assert a.size == b.size
            mad = np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean()
            assert mad < 1.0, (precision, mad)  # within 1/255 of our own fp32 result


def test_backend_choice_is_checked():
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cpu")) == ("openvino" if openvino_available() else "torch")
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("tensorrt", torch.device("cpu"))
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend("openvino", torch.device("cuda"))


def test_export_writes_openvino_ir_in_one_command(tmp_path, weights_file):
    from tests.conftest import run_module

    if not openvino_available():
        r = run_module("model.backends", "export", str(weights_file), str(tmp_path / "g.xml"))
        assert r.returncode == 2 and "openvino" in r.stderr
        return
    r = run_module("model.backends", "export", str(weights_file), str(tmp_path / "g.xml"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "g.xml").stat().st_size > 0 and (tmp_path / "g.bin").stat().st_size > 0
    import openvino as ov

    compiled = ov.Core().compile_model(str(tmp_path / "g.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    from model.weights import load_generator

    g, _ = load_generator(weights_file)
    with torch.no_grad():
        expected = g.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(compiled.create_infer_request().infer({0: x})[0] - expected).max() < 1e-3
    r = run_module("model.backends", "export", str(tmp_path / "missing.safetensors"), str(tmp_path / "h.xml"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0


@pytest.mark.skipif(not openvino_available(), reason="the openvino extra is not installed")
def test_openvino_reports_nan_output_for_one_image_and_for_a_batch():
    from model.translator import NonFiniteOutput

    g = small_generator(seed=3)
    with torch.no_grad():
        # loading would refuse such a file, so the output check is the last line; poisoned after the last
        # ReLU, since OpenVINO's ReLU (a max with 0) turns NaN into 0
        g.model[-2].bias[0] = float("nan")
    ov = Translator(g, device="cpu", precision="fp32", warmup=False, backend="openvino", max_batch=4)
    for n in (1, 3):  # one image: the latency form; several: split across the throughput form's streams
        with pytest.raises(NonFiniteOutput):
            ov.translate([photo(32, 32, seed=i) for i in range(n)])


@pytest.mark.skipif(not openvino_available(), reason="the openvino extra is not installed")
def test_openvino_batches_split_across_streams_paint_like_single_images():
    ov = Translator(small_generator(seed=4), device="cpu", precision="fp32", backend="openvino", max_batch=8)
    images = [photo(48, 40, seed=i) for i in range(5)]
    batched = ov.translate(images)
    for img, b in zip(images, batched):
        assert np.abs(as_array(ov.translate([img])[0]) - as_array(b)).max() <= 1


def test_cpu_cores_respects_a_container_cpu_quota(tmp_path):
    from model.runtime import cpu_cores

    machine = len(__import__("os").sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert cpu_cores(str(quota)) == machine
    quota.write_text("150000 100000\n")  # 1.5 CPUs: 2 threads
    assert cpu_cores(str(quota)) == min(machine, 2)
    quota.write_text("50000 100000\n")
    assert cpu_cores(str(quota)) == 1
    assert cpu_cores(str(tmp_path / "missing")) == machine


def test_a_compiled_translator_paints_like_the_eager_one_at_every_size():
    """compile_mode runs the torch backend's uint8-to-uint8 module through torch.compile (a candidate of issue
    35 for the GPU, measured by bench_model --candidates): the same paintings, at a new size too (a recompile)."""
    eager = Translator(small_generator(seed=11), device="cpu", precision="fp32", backend="torch", max_batch=4)
    compiled = Translator(small_generator(seed=11), device="cpu", precision="fp32", backend="torch", max_batch=4,
                          compile_mode="default")
    assert type(compiled._run.module).__name__ == "OptimizedModule"
    for size in ((64, 48), (40, 32)):
        images = [photo(*size, seed=s) for s in range(3)]
        for a, b in zip(eager.translate(images), compiled.translate(images)):
            assert np.abs(as_array(a) - as_array(b)).max() <= 1
