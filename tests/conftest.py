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
