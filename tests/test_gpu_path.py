"""The GPU path (model/codecs.py, model/backends.py) on the device this machine has: torchvision's codecs on CPU stand in for
nvJPEG, the same code otherwise; CUDA graphs are checked only where CUDA is."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from model.backends import BATCH_BUCKETS
from model.codecs import decode_jpegs, encode_jpegs, fit_tensor, jpeg_orientation, paint_jpegs
from model.translator import Translator
from tests.conftest import ROOT, photo, small_generator


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decoded_jpegs_are_upright_exactly_as_pillow_turns_them(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    blob = jpeg(photo(50, 30, seed=orientation), exif=exif)
    assert jpeg_orientation(blob) == orientation
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(blob))).convert("RGB"))
    got = decode_jpegs([blob], "cpu")[0].permute(1, 2, 0).numpy()
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_files_the_device_decoder_cannot_take_come_back_as_none():
    good, grey = jpeg(photo(40, 40, seed=1)), jpeg(photo(40, 40, seed=2).convert("L"))
    cmyk, png = jpeg(photo(40, 40, seed=3).convert("CMYK")), io.BytesIO()
    photo(40, 40).save(png, "PNG")
    out = decode_jpegs([good, cmyk, png.getvalue(), b"not an image", grey, good[:300]], "cpu")
    assert out[0].shape == (3, 40, 40) and out[4].shape == (3, 40, 40)
    assert out[1] is None and out[2] is None and out[3] is None and out[5] is None
    assert (out[4][0] == out[4][1]).all()  # grey as RGB


def test_fit_tensor_keeps_the_aspect_ratio_and_the_look():
    img = photo(300, 200, seed=4)
    t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    small = fit_tensor(t, 150)
    assert small.shape == (3, 100, 150) and small.dtype == torch.uint8
    reference = np.asarray(img.resize((150, 100), Image.Resampling.LANCZOS), dtype=float)
    assert np.abs(small.permute(1, 2, 0).numpy() - reference).mean() < 2.0
    assert fit_tensor(t, 400) is t


def test_paint_jpegs_matches_the_pillow_path():
    translator = Translator(small_generator(seed=6), device="cpu", precision="fp32", backend="torch", max_batch=4)
    photos = [photo(64, 48, seed=i) for i in range(3)] + [photo(40, 40, seed=9)]
    blobs = [jpeg(p) for p in photos] + [jpeg(photos[0].convert("CMYK"))]
    out = paint_jpegs(translator, blobs, quality=95)
    assert out[-1] is None  # CMYK: for Pillow
    expected = translator.translate([Image.open(io.BytesIO(b)) for b in blobs[:-1]])
    for data, painting in zip(out[:-1], expected):
        got = Image.open(io.BytesIO(data))
        assert got.format == "JPEG" and got.size == painting.size
        same_codec = Image.open(io.BytesIO(jpeg(painting)))  # the same pixels through Pillow's encoder
        assert np.abs(np.asarray(got, dtype=float) - np.asarray(same_codec, dtype=float)).mean() < 1.0


def test_translate_many_on_tensors_equals_translate_arrays():
    translator = Translator(small_generator(seed=7), device="cpu", precision="fp32", backend="torch", max_batch=2)
    arrays = [np.asarray(photo(32, 24, seed=i)) for i in range(3)] + [np.asarray(photo(20, 20, seed=5))]
    tensors = translator.translate_many([torch.from_numpy(a.copy()) for a in arrays])
    for a, t in zip(arrays, tensors):
        assert np.array_equal(translator.translate_arrays(a[None])[0], t.numpy())
    encoded = encode_jpegs(tensors[:2])
    assert [Image.open(io.BytesIO(e)).size for e in encoded] == [(32, 24), (32, 24)]


def test_cli_device_codec_writes_the_same_paintings_and_still_takes_every_file(tmp_path, weights_file):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        photo(80, 60, seed=i).save(src / f"p{i}.jpg", quality=95)
    photo(80, 60, seed=5).convert("CMYK").save(src / "cmyk.jpg")
    photo(80, 60, seed=6).save(src / "x.png")
    (src / "broken.jpg").write_bytes((src / "p0.jpg").read_bytes()[:400])
    photo(1300, 700, seed=7).save(src / "big.jpg", quality=95)  # default stroke scale 1.27: painted by Translator.paint
    outs = {}
    for codec in ("pil", "torchvision"):
        outs[codec] = tmp_path / codec
        r = subprocess.run([sys.executable, "-m", "model.translate", str(src), "--out", str(outs[codec]),
                            "--weights", str(weights_file), "--device", "cpu", "--backend", "torch",
                            "--format", "jpeg", "--codec", codec, "--batch-size", "4"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 1, r.stderr  # the broken file is skipped and counted
        assert "broken.jpg" in r.stderr and "Traceback" not in r.stderr
    names = sorted(p.name for p in outs["pil"].iterdir())
    assert names == sorted(p.name for p in outs["torchvision"].iterdir()) == ["big.jpg", "cmyk.jpg", "p0.jpg",
                                                                             "p1.jpg", "p2.jpg", "x.jpg"]
    assert Image.open(outs["torchvision"] / "big.jpg").size == (1300, 700)
    for name in names:
        a, b = (np.asarray(Image.open(outs[c] / name), dtype=float) for c in ("pil", "torchvision"))
        assert a.shape == b.shape and np.abs(a - b).mean() < 2.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_paint_like_eager_for_every_batch_bucket():
    g = small_generator(seed=8)
    graphed = Translator(g, device="cuda", precision="bf16", backend="torch", max_batch=8)
    eager = Translator(small_generator(seed=8), device="cuda", precision="bf16", backend="torch", max_batch=8,
                       cuda_graphs=False)
    for n in (1, 3, 8, 3):
        batch = np.stack([np.asarray(photo(64, 64, seed=i)) for i in range(n)])
        for _ in range(2):  # the second sighting of a shape is captured
            assert np.abs(graphed.translate_arrays(batch).astype(int) - eager.translate_arrays(batch)).max() <= 1
    assert graphed._graphs.graphs and all(k[0] in BATCH_BUCKETS for k in graphed._graphs.graphs)


class _ReplayOnCPU:
    """Stands in for torch.cuda.CUDAGraph where there is no GPU: replay() re-runs the module on the static
    input into the static outputs, so CudaGraphs' own bookkeeping (buckets, padding slots, slicing, LRU,
    capture on the second sighting) is checked on any machine."""

    def __init__(self, module, static_in, out, finite):
        self.module, self.static_in, self.out, self.finite = module, static_in, out, finite
        self.replays = 0

    def replay(self):
        out, finite = self.module(self.static_in)
        self.out.copy_(out)
        self.finite.copy_(finite)
        self.replays += 1


def test_cuda_graphs_bookkeeping_buckets_batches_and_keeps_the_most_recent_shapes():
    from model.backends import CudaGraphs, UInt8Generator

    painter = UInt8Generator(small_generator(seed=9).eval())
    captured = []

    class OnCPU(CudaGraphs):
        def _capture(self, key, device):
            static_in = torch.zeros((key[0], key[1], key[2], 3), dtype=torch.uint8)
            out, finite = self.module(static_in)
            graph = _ReplayOnCPU(self.module, static_in, out, finite)
            captured.append((key, graph))
            return static_in, graph, out, finite

    graphs = OnCPU(painter, max_graphs=2)
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        for n, side in ((3, 32), (3, 32), (3, 32), (1, 32), (1, 32), (5, 24), (5, 24), (3, 32)):
            x = torch.from_numpy(rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8))
            got, finite = graphs(x)
            expected, _ = painter(x)
            assert bool(finite) and got.shape == expected.shape
            assert torch.equal(got, expected)  # spare slots (zeros) change nothing for the real images
    keys = [k for k, _ in captured]
    assert keys == [(4, 32, 32), (1, 32, 32), (8, 24, 24), (4, 32, 32)]  # captured on the second sighting
    assert list(graphs.graphs) == [(8, 24, 24), (4, 32, 32)]  # at most 2 kept, least recent evicted
    assert captured[0][1].replays == 2 and captured[1][1].replays == 1


def test_where_time_goes_counts_the_top_level_operators_and_ranks_them():
    """benchmarks/profiling.py, which the GPU call prints for a training step and a translator call (on CUDA the
    kernels; here the operators): each top-level operator once, its inner ones not again, the largest first."""
    from benchmarks.profiling import describe, where_time_goes

    conv = torch.nn.Conv2d(3, 8, 3)
    x = torch.rand(2, 3, 64, 64)
    prof = where_time_goes(lambda: torch.relu(conv(x)).sum(), cuda=False)
    assert sorted(name for name, _, _ in prof["top"]) == ["aten::conv2d", "aten::relu", "aten::sum"]
    assert prof["count"] == 3 and prof["top"][0][0] == "aten::conv2d"
    assert 0 < prof["busy_ms"] <= prof["wall_ms"]
    assert describe(prof).count("\n") == 3 and "operator time" in describe(prof)


@pytest.mark.parametrize("form", ["native_norm", "elementwise_norm", "nhwc_pads", "both", "tensor_core_channels"])
def test_the_norm_and_pad_forms_the_gpu_call_times_paint_the_same(form):
    """bench_model times these forms on CUDA beside the shipped path (the layers that stay NHWC against PyTorch's
    own; the first and last convolutions widened with zero channels): each must compute the same painting,
    channels-last in bf16 as the torch backend runs it."""
    import copy

    from benchmarks import bench_model
    from model.networks import for_inference

    forms = {"native_norm": bench_model.native_norm, "elementwise_norm": bench_model.elementwise_norm,
             "nhwc_pads": bench_model.nhwc_pads,
             "both": lambda g: bench_model.nhwc_pads(bench_model.elementwise_norm(g)),
             "tensor_core_channels": bench_model.tensor_core_channels}
    g = small_generator(ngf=8, n_blocks=2)
    x = (torch.rand(2, 3, 48, 40) * 2 - 1).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ours = for_inference(copy.deepcopy(g)).to(memory_format=torch.channels_last)
        other = for_inference(forms[form](copy.deepcopy(g))).to(memory_format=torch.channels_last)
        torch.testing.assert_close(other(x), ours(x), atol=2e-5, rtol=0)
        if form == "tensor_core_channels":  # widened, not just the same layers
            convs = [m for m in other.modules() if isinstance(m, torch.nn.Conv2d)]
            assert convs[0].in_channels == 8 and other[-1].weight.shape[0] == 16
        y16 = other.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
        assert (y16 - ours(x)).abs().mean() < 0.01


def test_the_gpu_scripts_smoke_mode_runs_every_measurement_on_cpu(tmp_path):
    """tools/gpu_run.sh is the one prepared call on a lent GPU (issue 35): its smoke mode runs every part here,
    with tiny networks on tiny images, so the call does not fail on the card for a reason a CPU could show. Then
    the generators of its equal-images check are scored as they would be here after the call: on the held-out
    photos the call never had (tools/heldout.py), beside the raw photos and the colour transfer."""
    from tools.heldout import split

    whole, data = tmp_path / "photos", tmp_path / "data"
    whole.mkdir()
    for i in range(40):
        photo(64, 64, seed=i).save(whole / f"{i}.jpg")
    train, held = split(whole)
    assert len(held) >= 2 and len(train) + len(held) == 40
    (data / "photo").mkdir(parents=True)
    (data / "monet").mkdir()
    for path in train:  # what tools/prepare_gpu_data.sh sends: never a held-out photo
        shutil.copy(path, data / "photo" / path.name)
    for i in range(6):
        photo(64, 64, seed=100 + i).save(data / "monet" / f"{i}.jpg")
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "GPU_DATA": str(data)}
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_run.sh"), "32"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    files = {p.name for p in out.iterdir()}
    ways = ["eq_b8_eager", "eq_b8_graph", "eq_b32_graph"]
    assert files == {"gpu.txt", "bench_model.txt", "translate.txt", "equal_images.txt", "train_speed.txt"} | {
        f"{w}.safetensors" for w in ways}  # 8: what one call brings back
    report = (out / "gpu.txt").read_text()
    assert report.count("done: ") == 10 and "failed" not in report and "stopped" not in report, report
    assert "onnxruntime" in report and "torch_tensorrt" in report, report  # the TensorRT lever: there or not
    inference = (out / "bench_model.txt").read_text()
    assert "images/s" in inference and "Traceback" not in inference
    # the inference candidates: each row measured (on CPU: no CUDA-only form, no max-autotune), none failed
    assert inference.count("inference candidates, 2 images") == 1, inference
    rows = [line for line in inference.split("inference candidates, ")[1].splitlines()
            if line.startswith("| ") and "x |" in line]
    names = [row.split("|")[1].strip() for row in rows]
    assert names[:2] == ["PyTorch's instance norm (before)", "tensor-core channels: the first convolution's "
                         "input 8, the last's output 16"] and "| failed:" not in inference, inference
    assert names[-2:] == ["the shipped path again", "torch.compile, default mode, in the CUDA graphs"], names
    assert all(float(row.split("|")[4].split("/")[1]) <= 2 for row in rows), rows  # at most 2 levels apart
    convert = (out / "translate.txt").read_text()
    assert convert.count("conversion") == 2 and "Traceback" not in convert, convert
    speed = (out / "train_speed.txt").read_text()
    assert speed.count("end to end") == 2 and speed.count("--data-in-memory on") == 2, speed
    assert "Traceback" not in speed
    assert "CUT step" in speed and "graph-safe, not captured" in speed and "0 host syncs" in speed, speed
    rows = [line.split() for line in speed.splitlines() if line.startswith(("  float32 ", "  bfloat16 "))]
    assert "DiffAugment" in speed and len(rows) == 2 and all(r[-1].endswith("x") for r in rows), speed
    assert speed.count("where the time goes: operator time") == 2, speed  # the eager and graph-safe steps
    assert "where the time goes" in (out / "bench_model.txt").read_text()
    equal = (out / "equal_images.txt").read_text()
    runs = [json.loads(line.removeprefix("summary ")) for line in equal.splitlines() if line.startswith("summary ")]
    assert [(r["name"], r["images"], r["batch"]) for r in runs] == [
        ("eq_b8_eager", 32, 2), ("eq_b8_graph", 32, 2), ("eq_b32_graph", 32, 8)], equal
    assert all(r["images_per_s"] > 0 for r in runs)
    for way in ways:
        Translator.from_file(out / f"{way}.safetensors", device="cpu")

    scored = subprocess.run([sys.executable, "-m", "tools.score_gpu_run", str(out), "--photos", str(whole),
                             "--paintings", str(data / "monet"), "--device", "cpu"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert scored.returncode == 0, scored.stderr[-2000:]
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in scored.stdout.splitlines()
             if line.startswith("| ") and "---" not in line]
    assert table[0][6:8] == ["KID", "KID / raw"]
    assert [row[0] for row in table[1:]] == ["raw photos", "colour transfer", *sorted(ways)]
    assert f"{len(held)} held-out photos" in scored.stdout
    assert table[1][7] == "1.00" and table[1][1] == ""  # KID / raw of the raw photos; no images seen
    assert {row[0]: (row[1], row[2]) for row in table[3:]} == {
        "eq_b32_graph": ("32", "8"), "eq_b8_eager": ("32", "2"), "eq_b8_graph": ("32", "2")}  # equal_images.txt
