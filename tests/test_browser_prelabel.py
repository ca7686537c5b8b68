"""The Pre-label tab in a real browser (headless Chromium via Playwright): upload a zip, get the project."""

from __future__ import annotations

import zipfile

import pytest
from browser_helpers import CHROMIUM_ARGS, chromium_path, set_fast_options
from factories import upscaled_images
from app_server import running_app

pytestmark = pytest.mark.browser


def test_prelabel_tab_returns_the_project_and_the_round_trip(smoke_model, tmp_path):
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium binary (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    ckpt, run = smoke_model
    archive = tmp_path / "new_photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in upscaled_images(run, tmp_path / "photos", 2, size=160):
            zf.write(p, f"new_photos/{p.name}")
    with running_app(tmp_path / "server", ckpt) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(120_000)
            page.goto(url)
            page.wait_for_selector("#image-input")
            set_fast_options(page)
            page.get_by_role("tab", name="Pre-label").click()
            page.locator("#prelabel-zip input[type=file]").set_input_files(str(archive))
            page.wait_for_selector("#prelabel-zip [aria-label='new_photos.zip']")
            page.click("#run-prelabel")
            link = page.wait_for_selector("#prelabel-project a[download='new_photos_labelme.zip']")
            page.wait_for_function("document.querySelector('#prelabel-summary textarea').value.length > 0")
            assert "2 of 2 images pre-labelled" in page.locator("#prelabel-summary textarea").input_value()
            assert "new_photos/val_0048.jpg" in page.locator("#prelabel-table").inner_text()
            with page.expect_download() as download:
                link.click()
            download.value.save_as(tmp_path / "project.zip")
        finally:
            browser.close()
    names = zipfile.ZipFile(tmp_path / "project.zip").namelist()
    assert "new_photos_labelme/new_photos/val_0048.json" in names
    assert "new_photos_labelme/new_photos/val_0048.jpg" in names
