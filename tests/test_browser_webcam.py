"""The webcam tab in headless Chromium with its synthetic camera (640x480 frames): the stream is segmented,
and a server whose pixel cap is below the camera's frames shows the cap's message instead of a bare "Error".
"""

from __future__ import annotations

import pytest
from factories import tiny_checkpoint
from app_server import running_app

pytestmark = pytest.mark.browser


def start_camera(browser, url):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(120_000)
    page.goto(url)
    page.get_by_role("tab", name="Webcam").click()
    page.locator("#webcam-input").get_by_text("Click to Access Webcam").click()
    page.locator("#webcam-input button.capture-button").click()
    return context, page


def test_camera_frames_come_back_segmented(browser, tmp_path):
    with running_app(tmp_path / "server", tiny_checkpoint(tmp_path / "tiny.pth")) as url:
        context, page = start_camera(browser, url)
        try:
            page.wait_for_function("/[0-9.]+ frames\\/s/.test(document.querySelector('#webcam-fps').innerText)")
            page.wait_for_selector("#webcam-output img")
        finally:
            context.close()


def test_frames_over_the_cap_show_the_caps_message(browser, tmp_path):
    with running_app(tmp_path / "server", tiny_checkpoint(tmp_path / "tiny.pth"),
                     SEGCORE_MAX_IMAGE_PIXELS=100_000) as url:
        context, page = start_camera(browser, url)
        try:
            toast = page.get_by_text("webcam frame:").first
            toast.wait_for()
            assert "exceeds" in toast.inner_text()
        finally:
            context.close()
