"""Headless Chromium for the browser tests (Debian's chromium driven by Playwright), shared by every test
module that opens the app in a browser; the ``browser`` fixture itself lives in conftest.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-dev-shm-usage",
                 # a synthetic camera for the webcam tab, allowed without a prompt
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if candidate and Path(candidate).is_file():
            return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")


def set_fast_options(page, test_size: int = 65):
    """Single scale, test size 65: the tiny model answers at once."""
    page.get_by_label("Multi-scale").uncheck()
    size = page.locator("input[aria-label='number input for Test size']")
    size.fill(str(test_size))
    size.press("Enter")
