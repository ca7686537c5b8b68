"""An uploaded checkpoint in a real browser: still selectable after a page reload, invisible to another browser.

Headless Chromium (Playwright) against `python app.py` on loopback, like tests/test_browser_app.py.
Screenshots of each step go to the test's folder (``SEGCORE_SCREENSHOTS=dir`` keeps them somewhere).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from browser_helpers import REPO
from factories import tiny_checkpoint
from app_server import running_app

pytestmark = pytest.mark.browser

CLASS_NAMES = [f"mine{i}" for i in range(21)]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-uploads")
    with running_app(root / "server", tiny_checkpoint(root / "tiny.pth")) as url:
        yield url


def open_page(context, url):
    page = context.new_page()
    page.set_default_timeout(120_000)
    page.goto(url)
    page.wait_for_selector("#image-input")
    page.wait_for_function("() => !!localStorage.getItem('segcore-owner')")  # the browser's token is stored
    return page


def weight_options(page) -> list[str]:
    page.locator("#weights input").click()
    options = page.locator("[role=listbox] [role=option]")
    options.first.wait_for()
    names = [t.strip().split("\n")[-1].strip() for t in options.all_inner_texts()]  # without the ✓ mark
    page.keyboard.press("Escape")
    return names


def segment_with(page, name: str) -> None:
    """Pick ``name`` in the weights menu, fast options, segment the example cat."""
    page.locator("#weights input").fill(name)
    page.locator("#weights input").press("Enter")
    page.get_by_label("Multi-scale").uncheck()
    size = page.locator("input[aria-label='number input for Test size']")
    size.fill("65")
    size.press("Enter")
    page.locator("#image-input input[type=file]").set_input_files(str(REPO / "examples" / "cat.jpg"))
    page.wait_for_selector("#image-input img")
    page.click("#segment-image")


def test_upload_survives_reload_and_stays_private(browser, app_url, tmp_path):
    shots = Path(os.environ.get("SEGCORE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    ckpt = tiny_checkpoint(tmp_path / "final.pth", seed=7, meta={"class_names": CLASS_NAMES})

    mine = browser.new_context(viewport={"width": 1280, "height": 900})
    page = open_page(mine, app_url)
    page.click("#upload-accordion button")
    page.locator("#checkpoint-file input[type=file]").set_input_files(str(ckpt))
    page.wait_for_selector("#checkpoint-file [aria-label='final.pth']")
    page.click("#upload-checkpoint")
    page.wait_for_function("() => document.querySelector('#weights input').value.startsWith('final.pth')")
    name = page.locator("#weights input").input_value()
    assert name.startswith("final.pth (") and name.endswith("(uploaded)")
    page.screenshot(path=str(shots / "1-uploaded.png"))

    page.reload()
    page.wait_for_selector("#image-input")
    assert name in weight_options(page)  # remembered by this browser across the reload
    segment_with(page, name)
    legend = page.wait_for_selector("#legend table.segcore-legend")
    assert "mine" in legend.inner_text()  # the uploaded model ran: its own class names
    page.screenshot(path=str(shots / "2-after-reload.png"))

    other = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        stranger = open_page(other, app_url)
        options = weight_options(stranger)
        assert "tiny.pth" in options and not any(o.startswith("final.pth") for o in options)
        stranger.screenshot(path=str(shots / "3-other-browser.png"))
    finally:
        other.close()
        mine.close()
