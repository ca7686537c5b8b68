"""`pip install .` gives working console commands: installed into a fresh virtual environment in a
temporary folder (no network: `--no-deps --no-build-isolation`, the dependencies come from the
system site-packages), then run from another folder, where the repository is not importable."""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "requirements.txt", "README.md", "segcore", "annotations", "demo", "train")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv with the project installed from a copy of its sources (the worktree stays clean)."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    env_dir = tmp / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    proc = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", str(src)], cwd=tmp, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shutil.rmtree(src)  # what runs below is the installed copy, not the sources
    return env_dir


def run(env_dir: Path, *cmd, cwd: Path):
    return subprocess.run([str(env_dir / "bin" / cmd[0]), *map(str, cmd[1:])], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin",
                                                       "HOME": str(cwd), "SEGCORE_HOME": str(cwd / "home")})


@pytest.mark.slow
def test_pip_install_gives_console_commands_that_work_from_any_folder(installed, tmp_path):
    import numpy as np
    from factories import scene_image, tiny_checkpoint
    from labelme_fixtures import write_labelme
    from PIL import Image

    where = run(installed, "python", "-c", "import segcore, annotations, train, demo; print(segcore.__file__)",
                cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert str(installed) in where.stdout  # the installed copy, not the repository
    requires = run(installed, "python", "-c", "import importlib.metadata as m; "
                   "print(*m.requires('deeplab-segcore'), sep=chr(10))", cwd=tmp_path)
    pins = {line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line}
    assert pins and set(requires.stdout.split()) == pins  # requirements.txt is the one list of pins

    for command in ("segcore", "segcore-annotations", "segcore-train"):
        helped = run(installed, command, "--help", cwd=tmp_path)
        assert helped.returncode == 0 and "usage:" in helped.stdout, (command, helped.stderr)

    # the shipped training configs travel with the package and are found by name
    config = run(installed, "segcore-train", "--config", "smoke", "--print-config", cwd=tmp_path)
    assert config.returncode == 0 and "name: smoke" in config.stdout, config.stderr

    ckpt = tiny_checkpoint(tmp_path / "tiny.pth", n_classes=21)
    Image.fromarray(scene_image(40, 48)).save(tmp_path / "a.jpg")
    predicted = run(installed, "segcore", "predict", "a.jpg", "--weights", ckpt, "--scales", "--test-size", "65",
                    "--device", "cpu", "--out", "masks", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    assert Image.open(tmp_path / "masks" / "a.png").size == (48, 40)

    write_labelme(tmp_path / "lm" / "x.json", [{"label": "person", "points": [[2, 2], [30, 2], [30, 30]],
                                                "shape_type": "polygon"}], np.full((40, 40, 3), 90, np.uint8))
    converted = run(installed, "segcore-annotations", "convert", "lm", "dataset", "--labels", "voc", "--quiet",
                    cwd=tmp_path)
    assert converted.returncode == 0 and "1/1 files converted" in converted.stdout, converted.stderr

    bad = run(installed, "segcore", "evaluate", "--weights", ckpt, "--data", "nowhere", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: nowhere") and "Traceback" not in bad.stderr
