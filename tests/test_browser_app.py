"""The app in a real browser: headless Chromium driven by Playwright against `python app.py` on loopback.

Skips only when no Chromium binary exists (the README's test command installs Debian's `chromium`).
Run as a script to refresh the README screenshots:

    python tests/test_browser_app.py docs/screenshots
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import pytest

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from browser_helpers import CHROMIUM_ARGS, REPO, chromium_path, set_fast_options
from factories import tiny_checkpoint
from labelme_fixtures import generate_folder
from app_server import running_app

pytestmark = pytest.mark.browser


def make_labelme_zip(root: Path, n: int = 3) -> Path:
    folder = root / "labelme"
    generate_folder(folder, n, seed=4, size=(96, 72), n_shapes=6)
    archive = root / "my_annotations.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, p.name)
    return archive


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-app")
    with running_app(root / "server", tiny_checkpoint(root / "tiny.pth")) as url:
        yield url


@pytest.fixture
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(120_000)
    page.goto(app_url)
    page.wait_for_selector("#image-input")
    yield page
    context.close()


def test_image_upload_shows_overlay_and_legend(page):
    set_fast_options(page)
    page.locator("#image-input input[type=file]").set_input_files(str(REPO / "examples" / "cat.jpg"))
    page.wait_for_selector("#image-input img")
    page.click("#segment-image")
    legend = page.wait_for_selector("#legend table.segcore-legend")
    rows = legend.query_selector_all("tbody tr")
    assert rows, "the legend lists the classes present"
    assert all("%" in r.inner_text() for r in rows)
    overlay = page.wait_for_selector("#overlay img")
    assert overlay.evaluate("img => img.complete && img.naturalWidth > 0")
    page.wait_for_selector("#mask-file a[download='cat_mask.png']")


def test_webcam_stream_segments_the_camera_frames(page):
    """Chromium's synthetic camera streams through the webcam endpoint: frames come back segmented at the
    camera's size, and the rate line counts them (it shows a number only from the second frame on)."""
    page.get_by_role("tab", name="Webcam").click()
    page.locator("#webcam-input").get_by_text("Click to Access Webcam").click()
    page.locator("#webcam-input button.capture-button").click()
    sizes = page.wait_for_function("""() => {
        const rate = document.querySelector('#webcam-fps').innerText.trim();
        const v = document.querySelector('#webcam-input video');
        const i = document.querySelector('#webcam-output img');
        if (!/^[0-9]+\\.[0-9] frames\\/s$/.test(rate) || !i || !i.complete || !i.naturalWidth) return null;
        return {camera: [v.videoWidth, v.videoHeight], segmented: [i.naturalWidth, i.naturalHeight]};
    }""").json_value()
    assert sizes["camera"][0] > 0 and sizes["segmented"] == sizes["camera"], sizes


def test_evaluate_tab_draws_the_iou_chart(page, tmp_path):
    set_fast_options(page)
    page.get_by_role("tab", name="Evaluate").click()
    page.locator("#eval-files input[type=file]").set_input_files(str(make_labelme_zip(tmp_path)))
    page.wait_for_selector("#eval-files [aria-label='my_annotations.zip']")
    page.click("#run-evaluate")
    page.wait_for_selector("#eval-bars .js-plotly-plot")
    assert page.locator("#eval-bars .barlayer .point").count() > 0
    assert "Per-class IoU" in page.locator("#eval-bars").inner_text()
    assert "3 of 3 images evaluated" in page.locator("#eval-summary").inner_text()
    # the worst-images gallery shows whole strips: each picture fills its tile at its own aspect
    # ratio (not a square tile that crops it) and the first row lies inside the gallery's visible area
    page.wait_for_selector("#eval-worst .thumbnail-item img")
    page.wait_for_function("[...document.querySelectorAll('#eval-worst .thumbnail-item img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    boxes = page.evaluate("""() => {
        const wrap = document.querySelector('#eval-worst .grid-wrap').getBoundingClientRect();
        return [...document.querySelectorAll('#eval-worst .thumbnail-item')].map(t => {
            const i = t.querySelector('img'), r = t.getBoundingClientRect(), q = i.getBoundingClientRect();
            return {tile: [r.top, r.bottom, r.left, r.right], img: [q.top, q.bottom, q.left, q.right],
                    ratio: q.width / q.height, natural: i.naturalWidth / i.naturalHeight,
                    wrap: [wrap.top, wrap.bottom]};
        });
    }""")
    assert len(boxes) == 3
    for b in boxes:
        (tt, tb, tl, tr), (it, ib, il, ir) = b["tile"], b["img"]
        assert it >= tt - 1 and ib <= tb + 1 and il >= tl - 1 and ir <= tr + 1, b
        assert abs(b["ratio"] - b["natural"]) < 0.05 * b["natural"], b  # no blank bands, nothing cut
    first = boxes[0]
    assert first["wrap"][0] - 1 <= first["tile"][0] and first["tile"][1] <= first["wrap"][1] + 1, first


def test_evaluate_with_only_unknown_labels_shows_the_message_and_no_figures(page, tmp_path):
    import numpy as np
    from labelme_fixtures import write_labelme

    folder = tmp_path / "zebras"
    write_labelme(folder / "z.json", [{"label": "zebra", "points": [[2, 2], [30, 2], [30, 30]],
                                       "shape_type": "polygon"}], np.full((40, 40, 3), 90, np.uint8))
    archive = tmp_path / "zebras.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(folder / "z.json", "z.json")
    set_fast_options(page)
    page.get_by_role("tab", name="Evaluate").click()
    # before a run the tables show their columns and no values (not Gradio's 1, 2, 3 placeholder)
    assert "Pixel accuracy" not in page.locator("#eval-scores").inner_text()
    assert "score" in page.locator("#eval-scores").inner_text()
    page.locator("#eval-files input[type=file]").set_input_files(str(archive))
    page.wait_for_selector("#eval-files [aria-label='zebras.zip']")
    page.click("#run-evaluate")
    toast = page.get_by_text("nothing could be evaluated", exact=False).first
    toast.wait_for()
    text = toast.inner_text()
    assert "'zebra' in zebras.zip:z.json" in text and "Name mapping" in text
    assert page.locator("#eval-bars .js-plotly-plot").count() == 0
    assert page.locator("#eval-confusion .js-plotly-plot").count() == 0
    assert page.locator("#eval-report a[download]").count() == 0
    assert page.locator("#eval-worst .thumbnail-item").count() == 0


def test_compare_section_draws_grouped_bars_for_two_checkpoints(page, tmp_path):
    from demo.models import UPLOAD_SUFFIX

    set_fast_options(page)
    page.get_by_text("Upload a checkpoint").click()
    page.locator("input[type=file][accept*='.pth']").set_input_files(str(tiny_checkpoint(tmp_path / "second.pth",
                                                                                         seed=7)))
    page.get_by_role("button", name="Use this checkpoint").click()
    page.wait_for_selector("#model-status:has-text('second.pth')")
    uploaded = page.locator("#weights input").input_value()  # the upload is selected, under its own name
    assert uploaded.startswith("second.pth (") and uploaded.endswith(UPLOAD_SUFFIX)
    page.get_by_role("tab", name="Evaluate").click()
    page.locator("#eval-files input[type=file]").set_input_files(str(make_labelme_zip(tmp_path)))
    page.wait_for_selector("#eval-files [aria-label='my_annotations.zip']")
    page.get_by_text("Compare models on these annotations").click()
    models = page.locator("#compare-models input")
    for name in ("tiny.pth", uploaded):
        models.click()
        models.fill(name)
        models.press("Enter")
    page.click("#run-compare")
    page.wait_for_selector("#compare-bars .js-plotly-plot")
    assert page.locator("#compare-bars .barlayer .trace").count() == 2  # one bar series per model
    assert "Per-class IoU (%) by model" in page.locator("#compare-bars").inner_text()
    assert "3 of 3 images compared" in page.locator("#compare-summary").inner_text()


# ----------------------------------------------------------------------------- screenshots


def take_screenshots(out_dir: Path) -> list[Path]:
    """One screenshot per tab, on a fresh app.

    By default with a tiny random checkpoint (the segmentations are noise). The README's come from a
    trained model: SCREENSHOT_WEIGHTS (checkpoint), SCREENSHOT_IMAGE (Image tab), SCREENSHOT_ANNOTATIONS
    (labelme .zip for Evaluate and Convert), SCREENSHOT_TEST_SIZE, optionally SCREENSHOT_VIDEO.
    """
    import tempfile

    from playwright.sync_api import sync_playwright

    out_dir.mkdir(parents=True, exist_ok=True)
    shots = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        tmp = Path(tmp)
        weights = os.environ.get("SCREENSHOT_WEIGHTS") or tiny_checkpoint(tmp / "tiny-random.pth")
        with running_app(tmp / "server", weights) as url:
            b = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
            page = b.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(300_000)
            page.goto(url)
            page.wait_for_selector("#image-input")
            set_fast_options(page, int(os.environ.get("SCREENSHOT_TEST_SIZE") or 65))
            annotations_zip = Path(os.environ.get("SCREENSHOT_ANNOTATIONS") or make_labelme_zip(tmp, n=4))

            def shot(name, full=False):
                page.wait_for_timeout(800)
                path = out_dir / f"{name}.png"
                page.screenshot(path=str(path), full_page=full)
                shots.append(path)

            image = os.environ.get("SCREENSHOT_IMAGE") or str(REPO / "examples" / "astronaut.jpg")
            page.locator("#image-input input[type=file]").set_input_files(image)
            page.click("#segment-image")
            page.wait_for_selector("#legend table.segcore-legend")
            shot("image", full=True)

            page.get_by_role("tab", name="Video").click()
            video = os.environ.get("SCREENSHOT_VIDEO")
            if video:
                page.locator("#video-input input[type=file]").set_input_files(video)
                page.click("#segment-video")
                page.wait_for_selector("#video-output video")
                page.wait_for_function("document.querySelector('#video-info').innerText.includes('frames')")
            shot("video")

            page.get_by_role("tab", name="Webcam").click()
            page.locator("#webcam-input").get_by_text("Click to Access Webcam").click()
            page.locator("#webcam-input button.capture-button").click()
            page.wait_for_function("document.querySelector('#webcam-fps').innerText.includes('frames/s') && "
                                   "!document.querySelector('#webcam-fps').innerText.includes('–')")
            page.wait_for_timeout(2000)
            shot("webcam")

            page.get_by_role("tab", name="Evaluate").click()
            page.locator("#eval-files input[type=file]").set_input_files(str(annotations_zip))
            page.wait_for_selector(f"#eval-files [aria-label='{annotations_zip.name}']")
            page.click("#run-evaluate")
            page.wait_for_selector("#eval-bars .js-plotly-plot")
            page.wait_for_selector("#eval-worst .thumbnail-item img")
            shot("evaluate", full=True)

            page.get_by_role("tab", name="Convert").click()
            page.locator("#convert-files input[type=file]").set_input_files(str(annotations_zip))
            page.wait_for_selector(f"#convert-files [aria-label='{annotations_zip.name}']")
            page.click("#run-convert")
            page.wait_for_selector("#convert-dataset a[download='dataset.zip']")
            shot("convert", full=True)
            b.close()
    return shots


if __name__ == "__main__":
    for path in take_screenshots(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/screenshots")):
        print(path)
