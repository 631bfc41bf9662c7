"""POST /translate and the operations endpoints, in process (TestClient runs the lifespan)."""
import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from tests.conftest import encode, photo
from tools import serving


def wait_ready(client: TestClient) -> None:
    serving.wait_ready("/readyz", timeout=60, client=client)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from model.weights import save_generator
    from tests.conftest import small_generator

    weights = tmp_path_factory.mktemp("w") / "g.safetensors"
    save_generator(weights, small_generator())
    settings = Settings(weights=weights, device="cpu", max_upload_bytes=300_000, max_pixels=1_000_000,
                        max_side=512, ui=False)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def decoded(response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def error(response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["detail"]


def test_multipart_and_raw_uploads(client):
    data = encode(photo(70, 50))
    out = decoded(client.post("/translate", files={"image": ("p.jpg", data, "image/jpeg")}))
    assert out.format == "PNG" and out.size == (70, 50)
    raw = client.post("/translate", content=data, headers={"content-type": "image/jpeg"})
    assert decoded(raw).size == (70, 50)
    for header in ("x-queue-ms", "x-compute-ms", "x-batch-size", "server-timing"):
        assert header in raw.headers


def test_format_negotiation(client):
    data = encode(photo(32, 32))
    post = lambda **kw: client.post("/translate", content=data, headers={"content-type": "image/jpeg", **kw.pop("h", {})}, **kw)
    assert decoded(post(params={"format": "jpeg"})).format == "JPEG"
    assert decoded(post(h={"accept": "image/webp"})).format == "WEBP"
    assert decoded(post(h={"accept": "image/jpeg;q=0.5, image/webp;q=0.9"})).format == "WEBP"
    assert decoded(post(h={"accept": "*/*"})).format == "PNG"
    assert post(params={"format": "png"}, h={"accept": "image/jpeg"}).headers["content-type"] == "image/png"
    assert "Accept" in error(post(h={"accept": "application/json"}), 406)
    error(post(params={"format": "gif"}), 422)


def test_images_of_every_kind_keep_size_and_orientation(client):
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display
    cases = {
        "cmyk.jpg": (encode(photo(40, 30, mode="CMYK"), "JPEG"), (40, 30)),
        "rgba.png": (encode(photo(40, 30, mode="RGBA"), "PNG"), (40, 30)),
        "grey16.png": (encode(Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)), "PNG"), (40, 30)),
        "palette.gif": (encode(photo(40, 30, mode="P"), "GIF"), (40, 30)),
        "rotated.jpg": (encode(photo(40, 30), "JPEG", exif=exif), (30, 40)),
        "odd.webp": (encode(photo(33, 17), "WEBP"), (33, 17)),
    }
    for name, (data, size) in cases.items():
        out = decoded(client.post("/translate", files={"image": (name, data, "application/octet-stream")}))
        assert out.size == size, name


def test_large_images_are_capped_at_max_side(client):
    out = decoded(client.post("/translate", content=encode(photo(900, 300)), headers={"content-type": "image/jpeg"}))
    assert out.size == (512, 171)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels: a decompression bomb's header, no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_from_the_header(client):
    for w, h in ((2000, 2000), (100_000, 100_000)):
        detail = error(client.post("/translate", content=png_header_only(w, h), headers={"content-type": "image/png"}), 413)
        assert "pixels" in detail
    # a real, highly compressible image over the pixel limit
    bomb = encode(Image.new("L", (1500, 1000)), "PNG", optimize=True)
    assert len(bomb) < 300_000
    error(client.post("/translate", files={"image": ("bomb.png", bomb, "image/png")}), 413)


def test_bad_bodies(client):
    jpeg = encode(photo(64, 64))
    assert "truncated" in error(client.post("/translate", content=jpeg[: len(jpeg) // 2],
                                            headers={"content-type": "image/jpeg"}), 400)
    assert "empty" in error(client.post("/translate", content=b"", headers={"content-type": "image/jpeg"}), 400)
    assert "not an image" in error(client.post("/translate", files={"image": ("a.txt", b"hello world", "text/plain")}), 400)
    error(client.post("/translate", content=b"hello", headers={"content-type": "text/plain"}), 415)
    error(client.post("/translate", content=b"hello"), 415)
    assert "'image'" in error(client.post("/translate", files={"photo": ("a.jpg", jpeg, "image/jpeg")}), 422)
    text_field = client.post("/translate", data={"image": "not a file"}, files={"other": ("o.jpg", jpeg, "image/jpeg")})
    assert "'image'" in error(text_field, 422)
    broken = client.post("/translate", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"})
    assert broken.status_code in (400, 422) and broken.json()["detail"]
    error(client.post("/translate", content=b"abc", headers={"content-type": "multipart/form-data"}), 400)
    assert "PCX" in error(client.post("/translate", content=encode(photo(8, 8), "PCX"), headers={"content-type": "image/x-pcx"}), 415)


def test_a_png_with_a_huge_compressed_text_chunk_is_still_painted(client):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = encode(photo(48, 32), "PNG")
    comment = chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"a" * (50 << 20), 9))  # 50 MB in about 50 KB
    body = png[:33] + comment + png[33:-12] + comment + png[-12:]  # before the pixels and after them
    answer = client.post("/translate", content=body, headers={"content-type": "image/png"})
    assert answer.status_code == 200, answer.text
    assert Image.open(io.BytesIO(answer.content)).size == (48, 32)


@pytest.mark.parametrize("name, head, media", [
    ("SVG", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>', "image/svg+xml"),
    ("PSD", b"8BPS\x00\x01" + bytes(64), "image/vnd.adobe.photoshop"),
])
def test_known_formats_we_do_not_take_get_415_naming_them(client, name, head, media):
    detail = error(client.post("/translate", content=head, headers={"content-type": media}), 415)
    assert detail.startswith(name) and "JPEG, PNG, WebP" in detail, detail


def heif_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, quality=80)
    return buf.getvalue()


def test_a_display_p3_photo_is_converted_to_srgb_before_painting(client):
    from model.images import to_rgb
    from tests.conftest import display_p3_profile

    flat = Image.new("RGB", (64, 48), (200, 60, 40))
    tagged = io.BytesIO()
    flat.save(tagged, "JPEG", quality=95, icc_profile=display_p3_profile())
    plain = io.BytesIO()
    flat.save(plain, "JPEG", quality=95)
    r, g, b = to_rgb(Image.open(io.BytesIO(tagged.getvalue()))).getpixel((32, 24))
    r0, g0, b0 = to_rgb(Image.open(io.BytesIO(plain.getvalue()))).getpixel((32, 24))
    assert r > r0 + 8 and g < g0 - 5, ((r, g, b), (r0, g0, b0))  # P3's red is redder than sRGB's
    # strength 0 answers with the photo the generator was given: the converted colours, P3's redder red. (A
    # painting of a flat image says nothing here: instance norm makes every flat colour the same to a generator.)
    a, c = (np.asarray(decoded(client.post("/translate?strength=0", content=jpeg.getvalue(),
                                           headers={"content-type": "image/jpeg"}))).astype(int)
            for jpeg in (tagged, plain))
    assert (a[24, 32, 0] - c[24, 32, 0] > 8) and (a[24, 32, 1] < c[24, 32, 1] - 5), (a[24, 32], c[24, 32])
    assert np.abs(a - np.array((r, g, b))).max() <= 2  # the same conversion as the CLI's to_rgb


@pytest.mark.parametrize("fmt, media, forged_status", [("HEIF", "image/heic", 413), ("AVIF", "image/avif", 400)])
def test_phone_formats_get_their_painting_and_a_forged_header_is_refused_before_decoding(client, fmt, media,
                                                                                        forged_status):
    """HEIC through pillow-heif: its header's 100k x 100k is a 413 from the header alone. AVIF (Pillow's own
    libavif) refuses the same forged header as inconsistent when it opens the file: 400."""
    data = heif_bytes(photo(96, 64, seed=7), fmt)
    assert data[4:12] in (b"ftypheic", b"ftypavif")
    answer = client.post("/translate", content=data, headers={"content-type": media})
    assert decoded(answer).size == (96, 64)
    at = data.index(b"ispe") + 8  # the image's declared width and height
    forged = data[:at] + struct.pack(">II", 100_000, 100_000) + data[at + 8 :]
    refused = error(client.post("/translate", content=forged, headers={"content-type": media}), forged_status)
    assert "pixels" in refused or "damaged" in refused
    damaged = data[:40] + bytes(64)
    error(client.post("/translate", content=damaged, headers={"content-type": media}), 400)


def test_oversized_bodies_get_413(client):
    big = b"\xff\xd8" + b"\x00" * 400_000
    assert "limit" in error(client.post("/translate", content=big, headers={"content-type": "image/jpeg"}), 413)

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(50):
            yield b"\x00" * 10_000

    error(client.post("/translate", content=chunks(), headers={"content-type": "image/jpeg"}), 413)
    error(client.post("/translate", files={"image": ("big.jpg", big, "image/jpeg")}), 413)


def test_the_next_request_after_bad_ones_still_works(client):
    client.post("/translate", content=b"junk", headers={"content-type": "image/png"})
    assert decoded(client.post("/translate", content=encode(photo(20, 20)), headers={"content-type": "image/jpeg"})).size == (20, 20)


def test_operations_endpoints(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    info = client.get("/info").json()
    assert info["model"]["architecture"] == "resnet" and info["device"] == "cpu"
    assert info["batching"]["max_batch_size"] == 8
    metrics = client.get("/metrics").text
    for name in ("monet_requests_total", "monet_queue_seconds", "monet_compute_seconds", "monet_batch_size",
                 "monet_queue_depth"):
        assert name in metrics
    assert 'route="/translate",status="200"' in metrics
    assert client.get("/docs").status_code == 200
    assert "/translate" in client.get("/openapi.json").json()["paths"]
    assert client.get("/nope").json() == {"detail": "Not Found"}


def test_readyz_is_503_while_the_weights_are_unusable(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with TestClient(create_app(Settings(weights=bad, ui=False))) as c:
        time.sleep(0.3)
        r = c.get("/readyz")
        assert r.status_code == 503 and "bad.safetensors" in r.json()["detail"]
        assert "Retry-After" not in r.headers  # a permanent failure: retrying won't help
        r = c.post("/translate", content=encode(photo(8, 8)), headers={"content-type": "image/jpeg"})
        assert r.status_code == 503 and "Retry-After" not in r.headers and "cannot serve" in r.json()["detail"]
        assert "bad.safetensors" in c.get("/info").json()["load_error"]


def poisoned(path, value: float, key: str = "model.1.weight"):
    """The test generator saved with one tensor scaled or filled, as a damaged or diverged file would be."""
    from model.weights import save_generator
    from tests.conftest import small_generator

    g = small_generator()
    with torch.no_grad():
        dict(g.named_parameters())[key].fill_(value)
    save_generator(path, g)
    return path


def test_non_finite_weights_are_refused_when_loading(tmp_path):
    from model.weights import WeightsError, load_generator

    for value in (float("nan"), float("inf")):
        bad = poisoned(tmp_path / "nan.safetensors", value)
        with pytest.raises(WeightsError, match=r"nan.safetensors: tensor model.1.weight holds non-finite values"):
            load_generator(bad)
        with TestClient(create_app(Settings(weights=bad, ui=False))) as c:
            time.sleep(0.3)
            r = c.get("/readyz")
            assert r.status_code == 503 and "non-finite" in r.json()["detail"] and "Retry-After" not in r.headers


def test_a_batch_with_non_finite_output_fails_with_a_clear_500(tmp_path):
    # finite weights so large that the forward pass overflows: loading can't see it, the output check does
    huge = poisoned(tmp_path / "huge.safetensors", 3e38)
    from model.translator import NonFiniteOutput, Translator

    # torch's kernels overflow to Inf here (OpenVINO's stay finite)
    with pytest.raises(NonFiniteOutput):
        Translator.from_file(huge, device="cpu", precision="fp32", backend="torch")  # the warm-up already trips it
    translator = Translator.from_file(huge, device="cpu", precision="fp32", warmup=False, backend="torch")
    with pytest.raises(NonFiniteOutput):
        translator.translate([photo(32, 32)])


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MONET_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("MONET_DEVICE", "cpu")
    s = Settings()
    assert s.max_batch_size == 3 and s.device == "cpu" and s.port == 8000 and s.host == "127.0.0.1"


def test_the_service_on_its_default_weights():
    with TestClient(create_app(Settings(ui=False))) as c:
        wait_ready(c)
        assert c.get("/info").json()["model"]["training"]["preset"] == "cut-cpu-256"  # the soup's ingredients' preset
        out = decoded(c.post("/translate", files={"image": ("p.jpg", encode(photo(64, 40)), "image/jpeg")}))
        assert out.size == (64, 40)


def test_strength_blends_photo_and_painting_after_the_network(client):
    src = photo(64, 48, seed=3)
    data = encode(src, "PNG")
    raw = np.asarray(src, dtype=np.int16)

    def paint(**params):
        r = client.post("/translate", params={"format": "png", **params}, content=data,
                        headers={"content-type": "image/png"})
        return np.asarray(decoded(r), dtype=np.int16)

    full, default, none, half = paint(strength=1), paint(), paint(strength=0), paint(strength=0.5)
    assert np.array_equal(full, default)  # 1 is the plain painting, and the default
    assert np.abs(none - raw).max() <= 1  # 0 gives back the input, up to rounding
    assert np.abs(full - raw).mean() > 5  # (the painting does differ from the photo)
    assert np.abs(half - (raw + full) / 2).max() <= 1
    for bad in ("-0.1", "1.5", "nan", "strong"):
        r = client.post("/translate", params={"strength": bad}, content=data, headers={"content-type": "image/png"})
        assert r.status_code == 422 and "strength" in str(r.json()["detail"]), (bad, r.text)


def test_multipart_limits_are_named(client):
    data = encode(photo(16, 16))
    two = client.post("/translate", files=[("image", ("a.jpg", data, "image/jpeg")), ("image", ("b.jpg", data, "image/jpeg"))])
    assert "2 fields named 'image'" in error(two, 422)
    five = client.post("/translate", files=[(f"f{i}", (f"{i}.jpg", data, "image/jpeg")) for i in range(4)]
                       + [("image", ("x.jpg", data, "image/jpeg"))])
    assert "Too many files. Maximum number of files is 4" in error(five, 400)
    long_name = client.post("/translate", files={"image": ("a" * 100_000 + ".jpg", data, "image/jpeg")})
    assert "part header (its name or filename) is" in error(long_name, 400) and "limit is 4096" in error(long_name, 400)


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` (a baseline JPEG) with only the width and height in its SOF0 header changed."""
    i = data.index(b"\xff\xc0")
    return data[: i + 5] + struct.pack(">HH", height, width) + data[i + 9 :]


def test_a_jpeg_header_that_claims_more_pixels_than_its_data_is_a_400(tmp_path):
    from model.weights import save_generator
    from tests.conftest import small_generator

    weights = tmp_path / "g.safetensors"
    save_generator(weights, small_generator())
    small = encode(photo(64, 64, seed=5), "JPEG", quality=90)
    forged = jpeg_with_size(small, 2000, 2000)
    flat = io.BytesIO()  # the flattest honest JPEG: one grey, progressive, optimised
    Image.new("L", (2000, 2000), 128).save(flat, "JPEG", progressive=True, optimize=True)
    with TestClient(create_app(Settings(weights=weights, device="cpu", max_side=256, ui=False))) as c:
        wait_ready(c)
        r = c.post("/translate", content=forged, headers={"content-type": "image/jpeg"})
        assert "2000x2000" in error(r, 400) and "damaged or forged" in error(r, 400)
        ok = c.post("/translate", content=flat.getvalue(), headers={"content-type": "image/jpeg"})
        assert decoded(ok).size == (256, 256)
        assert decoded(c.post("/translate", content=small, headers={"content-type": "image/jpeg"})).size == (64, 64)


def test_a_jpeg_whose_data_ends_early_is_a_400_and_honest_compressible_jpegs_are_painted(tmp_path):
    """A SOF raised to 500x500 over 64x64 of scan data (60x its data, under the bytes-per-pixel bound): libjpeg
    reports the premature end, and the answer is 400, not a grey-padded painting."""
    from model.weights import save_generator
    from tests.conftest import small_generator

    weights = tmp_path / "g.safetensors"
    save_generator(weights, small_generator())
    forged = jpeg_with_size(encode(photo(64, 64, seed=1), "JPEG", quality=75), 500, 500)
    assert len(forged) * 800 > 500 * 500  # the byte-ratio check alone lets it through
    cut = encode(photo(300, 200, seed=2), "JPEG", quality=90)
    cut = cut[: len(cut) // 2] + b"\xff\xd9"  # half the scan, then an end marker
    honest = []
    for kw in ({}, {"progressive": True}, {"optimize": True}, {"progressive": True, "optimize": True}):
        buf = io.BytesIO()
        Image.new("RGB", (1200, 900), (30, 90, 160)).save(buf, "JPEG", quality=95, **kw)  # flat colour
        honest.append(buf.getvalue())
    honest.append(encode(photo(640, 480, seed=3).convert("L"), "JPEG", quality=80))  # greyscale
    cmyk = io.BytesIO()
    photo(200, 150, seed=4).convert("CMYK").save(cmyk, "JPEG")
    honest.append(cmyk.getvalue())
    with TestClient(create_app(Settings(weights=weights, device="cpu", max_side=256, ui=False))) as c:
        wait_ready(c)
        for bad in (forged, cut):
            r = c.post("/translate", content=bad, headers={"content-type": "image/jpeg"})
            assert "ends before its declared image" in error(r, 400)
        for data in honest:
            r = c.post("/translate", content=data, headers={"content-type": "image/jpeg"})
            assert r.status_code == 200, r.text
            assert max(decoded(r).size) == 256 or decoded(r).size == (200, 150)


def test_a_large_jpeg_decodes_at_reduced_scale_and_looks_the_same():
    from app.decoding import finish_decode, open_upload
    from model.images import fit_max_side

    big = photo(6000, 4000, seed=3)
    data = encode(big, "JPEG", quality=90)
    opened = open_upload(data, 40_000_000, 1024)
    assert opened.image.size == (1500, 1000)  # libjpeg decodes at 1/4 scale, not 6000x4000
    assert opened.cost < 6000 * 4000  # the decode budget counts the reduced size
    fast = finish_decode(opened, 1024)
    with Image.open(io.BytesIO(data)) as full:
        slow = np.asarray(fit_max_side(full.convert("RGB"), 1024))
    assert fast.shape == slow.shape == (683, 1024, 3)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 2.0
    # an image that already fits is decoded at full size
    assert open_upload(encode(photo(800, 600)), 40_000_000, 1024).image.size == (800, 600)


def test_docs_and_openapi_have_their_own_metric_labels(client):
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    text = client.get("/metrics").text
    assert 'route="/docs",status="200"' in text and 'route="/openapi.json",status="200"' in text
    assert 'route="unmatched",status="200"' not in text  # only 404s are unmatched


def test_server_timing_says_where_the_time_went(client):
    r = client.post("/translate", content=encode(photo(64, 48)), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200
    parts = dict(p.strip().split(";dur=") for p in r.headers["server-timing"].split(","))
    assert set(parts) == {"decode", "queue", "compute", "encode"}
    assert all(float(v) >= 0 for v in parts.values()) and float(parts["compute"]) > 0


def test_png_encoding_is_lossless_at_every_size():
    from app.encoding import encode as encode_png

    rng = np.random.default_rng(5)
    for h, w in ((1, 1), (31, 17), (256, 256), (300, 1024)):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        with Image.open(io.BytesIO(encode_png(arr, "png"))) as img:
            assert img.format == "PNG" and np.array_equal(np.asarray(img.convert("RGB")), arr)


@pytest.fixture(scope="module")
def full_size_client(tmp_path_factory):
    """The service with its own defaults for size: no MONET_MAX_SIDE cap, tiles of 256 so that small test
    images take the tiled path too."""
    from model.weights import save_generator
    from tests.conftest import small_generator

    weights = tmp_path_factory.mktemp("w") / "g.safetensors"
    save_generator(weights, small_generator())
    with TestClient(create_app(Settings(weights=weights, device="cpu", tile=256, ui=False))) as c:
        wait_ready(c)
        yield c


def test_by_default_the_painting_has_the_uploads_full_size_and_orientation(full_size_client):
    assert Settings().max_side == 0 and Settings().max_pixels == 50_000_000
    for size in ((1500, 1001), (1031, 257), (300, 200)):  # default stroke scale 1.46, 1.01 (tiled), 1
        out = decoded(full_size_client.post("/translate", content=encode(photo(*size)),
                                            headers={"content-type": "image/jpeg"}))
        assert out.size == size
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the upright painting is 601 wide, 1203 high
    buf = io.BytesIO()
    photo(1203, 601).save(buf, "JPEG", exif=exif)
    out = decoded(full_size_client.post("/translate?stroke_scale=2", content=buf.getvalue(),
                                        headers={"content-type": "image/jpeg"}))
    assert out.size == (601, 1203)


def test_stroke_scale_is_checked_and_changes_the_painting(full_size_client):
    data = encode(photo(400, 300, seed=3))
    post = lambda query: full_size_client.post(f"/translate?{query}", content=data,
                                               headers={"content-type": "image/jpeg"})
    for bad in ("stroke_scale=0.5", "stroke_scale=100", "stroke_scale=big"):
        assert "stroke_scale" in str(error(post(bad), 422))
    one, three = (np.asarray(decoded(post(f"stroke_scale={s}&format=png")), dtype=np.int16) for s in (1, 3))
    assert one.shape == three.shape == (300, 400, 3)
    assert np.abs(one - three).mean() > 1.0  # painted at 133x100 and brought back: not the same painting


def test_the_fast_path_reads_only_queries_the_route_would_take_as_they_are():
    from app.fastpath import fast_params, route_bounds

    assert route_bounds() == {"strength": (0.0, 1.0), "stroke_scale": (1.0, 64.0)}  # read from the route's Query
    assert fast_params(b"") == {"format": None, "strength": 1.0, "stroke_scale": None, "style": None}
    assert fast_params(b"format=jpeg&strength=0.25&stroke_scale=2&style=photo2monet") == {
        "format": "jpeg", "strength": 0.25, "stroke_scale": 2.0, "style": "photo2monet"}
    for odd in (b"strength=.5", b"strength=2", b"strength=nan", b"strength=1e0", b"stroke_scale=0.5",
                b"format=gif", b"format=png&format=jpeg", b"unknown=1", b"style=a%20b", b"strength", b"&&"):
        assert fast_params(odd) is None, odd  # FastAPI reads these, with its own wording for what it refuses


def test_the_fast_path_and_the_fastapi_route_answer_alike(client):
    """?strength=0.5 takes app/fastpath.py, ?strength=.5 the FastAPI route (fast_params leaves it to FastAPI):
    the same painting, the same headers, both counted and logged as POST /translate."""
    body = io.BytesIO()
    photo(96, 64, seed=3).save(body, "JPEG", quality=90)

    def count() -> float:
        line = next((l for l in client.get("/metrics").text.splitlines()
                     if l.startswith('monet_requests_total{route="/translate",status="200"}')), None)
        return float(line.split()[-1]) if line else 0.0

    before = count()
    fast, routed = (client.post(f"/translate?strength={s}", content=body.getvalue(),
                                headers={"content-type": "image/jpeg"}) for s in ("0.5", ".5"))
    assert fast.status_code == routed.status_code == 200
    assert fast.content == routed.content
    names = {"content-type", "content-length", "x-queue-ms", "x-compute-ms", "x-batch-size", "server-timing",
             "x-style", "x-model-version"}
    assert names <= set(fast.headers) and names <= set(routed.headers)
    assert {k: fast.headers[k] for k in ("content-type", "x-style", "x-model-version")} == {
        k: routed.headers[k] for k in ("content-type", "x-style", "x-model-version")}
    assert count() == before + 2
    # refusals on the fast path have the route's JSON shape and status
    assert "not an image" in error(client.post("/translate?strength=0.5", content=b"nope",
                                               headers={"content-type": "image/jpeg"}), 400)
    assert error(client.post("/translate?strength=5", content=body.getvalue(),
                             headers={"content-type": "image/jpeg"}), 422)  # FastAPI's validation, as before


def test_plain_jpegs_decode_in_one_pass_to_pillows_pixels():
    """app.decoding decodes a plain JPEG (colour or grey, upright, no profile, no downscale) with one strict
    libjpeg-turbo pass; the pixels must be exactly what Pillow's path gives, and the rest must take that path."""
    from app.decoding import finish_decode, open_upload, plain_jpeg
    from model.images import prepare
    from tests.conftest import display_p3_profile

    def jpeg(img: Image.Image, **options) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "JPEG", **options)
        return buf.getvalue()

    cases = {"4:2:0": jpeg(photo(131, 67, seed=1), quality=85),
             "4:4:4 progressive": jpeg(photo(64, 90, seed=2), quality=95, subsampling=0, progressive=True),
             "grey": jpeg(photo(70, 50, seed=3).convert("L"), quality=90)}
    for name, data in cases.items():
        opened = open_upload(data, 1_000_000, 0)
        assert plain_jpeg(opened, 0), name
        ours = finish_decode(opened, 0)
        pillows = np.asarray(prepare(Image.open(io.BytesIO(data)), 0))
        assert ours.shape == pillows.shape and ours.dtype == np.uint8 and (ours == pillows).all(), name
    exif = Image.Exif()
    exif[0x0112] = 6
    for name, data, max_side in (
            ("rotated", jpeg(photo(64, 48), exif=exif.tobytes()), 0),
            ("display p3", jpeg(photo(64, 48), icc_profile=display_p3_profile()), 0),
            ("cmyk", jpeg(photo(64, 48).convert("CMYK")), 0),
            ("downscaled", jpeg(photo(64, 48)), 32)):
        assert not plain_jpeg(open_upload(data, 1_000_000, max_side), max_side), name


def test_codec_threads_paint_what_the_event_loop_paints(client, tmp_path):
    """MONET_CODEC_THREADS (the default on a GPU) moves small images' decode and encode off the event loop; the
    answers are the same bytes."""
    from model.weights import save_generator
    from tests.conftest import small_generator

    weights = tmp_path / "g.safetensors"
    save_generator(weights, small_generator())
    bodies = []
    for seed in range(3):
        buf = io.BytesIO()
        photo(80, 60, seed=seed).save(buf, "JPEG", quality=90)
        bodies.append(buf.getvalue())
    answers = {}
    for threads in (0, 2):
        settings = Settings(weights=weights, device="cpu", codec_threads=threads, ui=False)
        with TestClient(create_app(settings)) as c:
            wait_ready(c)
            assert (c.app.state.service.codecs is None) == (threads == 0)
            answers[threads] = [c.post("/translate?format=png", content=b, headers={"content-type": "image/jpeg"})
                                for b in bodies]
    for a, b in zip(answers[0], answers[2]):
        assert a.status_code == b.status_code == 200 and a.content == b.content
