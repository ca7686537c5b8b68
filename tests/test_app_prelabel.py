"""The app's Pre-label mode (``/prelabel``) end to end: a zip of images in, a labelme project zip out."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import labelme
import numpy as np
import pytest
from app_server import TEST_SIZE, running_app
from factories import upscaled_images
from PIL import Image

import annotations

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

MODEL = ("final.pth", False, False, TEST_SIZE)  # weights, multi-scale, CRF, test size


@pytest.fixture(scope="module")
def prelabel_app(smoke_model, tmp_path_factory):
    ckpt, run = smoke_model
    root = tmp_path_factory.mktemp("prelabel_app")
    with running_app(root / "server", ckpt) as url:
        yield Client(url, verbose=False), root / "server" / "app", run


def prelabel_jobs(app_dir: Path) -> set[Path]:
    jobs = app_dir / "jobs"
    return {d for d in jobs.iterdir() if d.name.startswith("prelabel-")} if jobs.is_dir() else set()


def test_prelabel_returns_a_labelme_project_with_its_round_trip(prelabel_app, tmp_path):
    client, app_dir, run = prelabel_app
    images = upscaled_images(run, tmp_path / "photos", 3, size=200)
    archive = tmp_path / "holiday.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in images:
            zf.write(p, f"holiday/{p.name}")
        zf.writestr("holiday/broken.jpg", b"\xff\xd8 not a jpeg")
    project, summary, table = client.predict(handle_file(str(archive)), *MODEL, 1.0, 10, api_name="/prelabel")
    assert "3 of 4 images pre-labelled" in summary and "broken.jpg" in summary
    rows = {row[0]: row[1] for row in table["data"]}
    assert sorted(rows) == [f"holiday/{p.name}" for p in images]
    unpacked = tmp_path / "project"
    with zipfile.ZipFile(project) as zf:
        zf.extractall(unpacked)
    top = unpacked / "holiday_labelme"
    space = annotations.label_space_for_names(["background", "disc", "square", "triangle"])
    for p in images:
        json_path = top / "holiday" / f"{p.stem}.json"
        lf = labelme.LabelFile(filename=str(json_path))
        assert lf.shapes and (top / "holiday" / p.name).read_bytes() == p.read_bytes()
        back = annotations.convert_file(json_path, space).class_map
        assert back.shape == (200, 200)
        assert rows[f"holiday/{p.name}"] >= 99.5
    assert not list(top.rglob("broken*"))
    # nothing of the request is left unpacked on the server: only the project zip stays for the download
    job = next(d for d in prelabel_jobs(app_dir) if (d / Path(project).name).is_file())
    assert [p.name for p in job.rglob("*")] == [Path(project).name]


def test_prelabel_refuses_hostile_or_empty_zips_readably(prelabel_app, tmp_path):
    client, app_dir, _ = prelabel_app
    before = prelabel_jobs(app_dir)
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.jpg", b"x")
    with pytest.raises(Exception, match="escapes the target folder"):
        client.predict(handle_file(str(evil)), *MODEL, 1.0, 10, api_name="/prelabel")
    empty = tmp_path / "notes.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("notes.txt", "no images here")
    with pytest.raises(Exception, match="holds no images"):
        client.predict(handle_file(str(empty)), *MODEL, 1.0, 10, api_name="/prelabel")
    assert prelabel_jobs(app_dir) == before  # a failed job leaves no folder behind
