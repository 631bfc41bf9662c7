"""The Gradio UI and the API docs in a real headless Chromium: examples, upload, painting, layout, offline."""
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from model.weights import save_generator
from tests.conftest import ROOT, Server, photo, small_generator

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no chromium here")


def artifacts_dir():
    """Where screenshots go: $MONET_SCREENSHOT_DIR, else test-artifacts/ (git-ignored)."""
    folder = Path(os.environ.get("MONET_SCREENSHOT_DIR") or ROOT / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    assert CHROMIUM, "CI installs Debian's chromium (.ci/run)"
    weights = tmp_path_factory.mktemp("w") / "g.safetensors"
    save_generator(weights, small_generator())
    srv = Server(weights, jobs_dir=str(weights.parent / "jobs")).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
            "--disable-background-networking", "--disable-component-update"])
        yield b
        b.close()


class Watch:
    """A page's requests that left the server, and its answers with a 4xx/5xx status."""

    def __init__(self, page, base: str):
        self.external, self.failed = [], []
        page.on("request", lambda r: self.external.append(r.url) if not r.url.startswith(
            (base, "data:", "blob:")) else None)
        page.on("response", lambda r: self.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)


def top(page, selector: str) -> float:
    return page.locator(selector).first.bounding_box()["y"]


def test_upload_and_paint_in_the_browser(server, browser, tmp_path):
    src = tmp_path / "my photo.jpg"
    photo(120, 80).save(src)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    watch = Watch(page, server.url)
    page.goto(server.url + "/", wait_until="networkidle")
    assert page.url.endswith("/ui/")
    page.locator("#photo input[type=file]").set_input_files(str(src))
    button_before = top(page, "#paint")
    page.locator("#paint").click()
    page.locator("#result img").first.wait_for(state="visible", timeout=60_000)
    page.locator("#download a").first.wait_for(timeout=60_000)
    page.wait_for_timeout(300)
    assert abs(top(page, "#paint") - button_before) < 4, "the layout jumped when the result arrived"
    shot = artifacts_dir() / "ui-1400.png"
    page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as img:
        assert img.size[0] >= 1400
    assert watch.external == [], f"the UI reached outside the server: {watch.external[:5]}"
    assert watch.failed == [], watch.failed


def test_the_video_tab_paints_a_clip_and_plays_it(server, browser, tmp_path):
    pytest.importorskip("av")
    from tests.clips import pan, write_clip

    clip = write_clip(tmp_path / "walk.mp4", pan(128, 96, 8), fps=8)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    watch = Watch(page, server.url)
    page.goto(server.url + "/", wait_until="networkidle")
    page.get_by_role("tab", name="Video").click()
    page.locator("#clip input[type=file]").set_input_files(str(clip))
    page.locator("#clip video").first.wait_for(timeout=60_000)  # the upload plays in its own player
    page.locator("#paint-clip").click()
    painted = page.locator("#painted-clip video").first
    painted.wait_for(timeout=120_000)
    page.wait_for_function("() => { const v = document.querySelector('#painted-clip video'); "
                           "return v && v.readyState >= 2 && v.videoWidth === 128 && v.videoHeight === 96; }",
                           timeout=60_000)
    page.locator("#clip-download a").first.wait_for(timeout=60_000)
    page.screenshot(path=str(artifacts_dir() / "ui-video.png"), full_page=True)
    assert watch.external == [], f"the UI reached outside the server: {watch.external[:5]}"
    assert watch.failed == [], watch.failed


def test_a_click_on_an_example_photo_paints_it(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    watch = Watch(page, server.url)
    page.goto(server.url + "/ui/", wait_until="networkidle")
    page.locator("#examples button, #examples .gallery-item").first.click()
    shown = page.locator("#photo img").first
    shown.wait_for(state="visible", timeout=30_000)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=shown.element_handle(),
                           timeout=30_000)
    page.locator("#download a").first.wait_for(timeout=60_000)  # painted without "Paint it"
    page.locator("#result img").first.wait_for(state="visible", timeout=30_000)
    assert watch.failed == [], watch.failed
    assert watch.external == [], watch.external


def test_no_photo_gives_a_toast_and_no_error_badges(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server.url + "/ui/", wait_until="networkidle")
    page.locator("#paint").click()
    page.get_by_text("Upload, paste or take a photo first.").first.wait_for(timeout=30_000)
    page.wait_for_timeout(500)
    for panel in ("#result", "#download"):
        assert "Error" not in page.locator(panel).first.inner_text(), panel


def test_narrow_screen_stacks_the_columns(server, browser):
    page = browser.new_page(viewport={"width": 420, "height": 900})
    watch = Watch(page, server.url)
    page.goto(server.url + "/ui/", wait_until="networkidle")
    photo_box = page.locator("#photo").first.bounding_box()
    result_box = page.locator("#result").first.bounding_box()
    assert result_box["y"] >= photo_box["y"] + photo_box["height"], (photo_box, result_box)
    page.screenshot(path=str(artifacts_dir() / "ui-420.png"), full_page=True)
    assert watch.failed == [], watch.failed


def test_api_docs_render_offline(server, browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    watch = Watch(page, server.url)
    page.goto(server.url + "/docs", wait_until="networkidle")
    page.locator(".opblock").first.wait_for(timeout=30_000)
    operations = page.locator(".opblock-summary-path").all_inner_texts()
    assert "/translate" in operations and "/healthz" in operations, operations
    assert watch.external == [], watch.external
    assert watch.failed == [], watch.failed


def test_the_style_dropdown_paints_in_the_chosen_style(browser, tmp_path):
    import httpx

    folder = tmp_path / "styles"
    folder.mkdir()
    save_generator(folder / "alpha.safetensors", small_generator(seed=1), name="Alpha")
    save_generator(folder / "beta.safetensors", small_generator(seed=2), name="Beta")
    srv = Server(folder).wait_ready()
    try:
        src = tmp_path / "p.jpg"
        photo(96, 64).save(src)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        watch = Watch(page, srv.url)
        page.goto(srv.url + "/ui/", wait_until="networkidle")
        dropdown = page.locator("#style input").first
        dropdown.wait_for(state="visible", timeout=30_000)
        assert dropdown.input_value() == "Alpha"  # the default style
        dropdown.click()
        page.get_by_role("option", name="Beta").click()
        assert dropdown.input_value() == "Beta"
        page.locator("#photo input[type=file]").set_input_files(str(src))
        page.locator("#paint").click()
        page.locator("#download a").first.wait_for(timeout=60_000)
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'monet_paintings_total{style="beta"} 1.0' in metrics and 'style="alpha"' not in metrics, metrics
        assert watch.failed == [] and watch.external == [], (watch.failed, watch.external)
    finally:
        srv.stop()
