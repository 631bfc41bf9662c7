"""The Gradio UI in a real headless Chromium: upload a photo, get a painting, take a screenshot."""
import os
import shutil

import pytest
from PIL import Image

from model.weights import save_generator
from tests.conftest import Server, photo, small_generator

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no chromium here")


def test_upload_and_paint_in_the_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI installs Debian's chromium (.ci/run)"
    weights = tmp_path / "g.safetensors"
    save_generator(weights, small_generator())
    src = tmp_path / "my photo.jpg"
    photo(120, 80).save(src)
    server = Server(weights).wait_ready()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                "--disable-background-networking", "--disable-component-update"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            external = []
            page.on("request", lambda r: external.append(r.url) if not r.url.startswith(
                (server.url, "data:", "blob:")) else None)
            page.goto(server.url + "/", wait_until="networkidle")
            assert page.url.endswith("/ui/")
            page.locator("#photo input[type=file]").set_input_files(str(src))
            page.locator("#paint").click()
            result = page.locator("#result img")
            result.first.wait_for(state="visible", timeout=60_000)
            page.locator("#download a").first.wait_for(timeout=60_000)
            shot = tmp_path / "ui.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        with Image.open(shot) as img:
            assert img.size[0] >= 1280
        assert external == [], f"the UI reached outside the server: {external[:5]}"
        if os.environ.get("MONET_SCREENSHOT_DIR"):
            shutil.copy(shot, os.environ["MONET_SCREENSHOT_DIR"])
    finally:
        server.stop()
