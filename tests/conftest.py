import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smoke_model(tmp_path_factory):
    """(checkpoint, run folder) of train/configs/smoke.yaml trained briefly, shared by the whole session."""
    from factories import train_smoke_model

    run = tmp_path_factory.mktemp("smoke_model")
    return train_smoke_model(run), run


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's, through Playwright) for one test module; skipped without the binary."""
    from browser_helpers import CHROMIUM_ARGS, chromium_path

    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium binary (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()
