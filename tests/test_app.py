"""The Gradio app, end to end: `python app.py` in a subprocess on loopback, driven with gradio_client.

The server gets a tiny random checkpoint through SEGCORE_WEIGHTS (nothing is downloaded) and small
limits so the limit paths can be exercised with small files. Expected values come from segcore /
annotations called directly, or are computed by hand in the test.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from app_server import TEST_SIZE, free_port, running_app
from factories import scene_image, tiny_checkpoint
from labelme_fixtures import generate_folder, write_labelme
from PIL import Image
from video_files import make_video

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file

MAX_IMAGE_PIXELS = 200_000
MAX_VIDEO_SECONDS = 3


@pytest.fixture(scope="module")
def app_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    return root, tiny_checkpoint(root / "tiny.pth")


@pytest.fixture(scope="module")
def app_url(app_files):
    root, ckpt = app_files
    with running_app(root / "server", ckpt, SEGCORE_MAX_IMAGE_PIXELS=MAX_IMAGE_PIXELS,
                     SEGCORE_MAX_VIDEO_SECONDS=MAX_VIDEO_SECONDS) as url:
        yield url


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


def tiny_segmenter(ckpt):
    from segcore import Segmenter

    return Segmenter.from_pretrained(ckpt, scales=(), test_size=TEST_SIZE, device="cpu")


def labelme_zip(root: Path, n: int = 4, seed: int = 0, extra=None) -> Path:
    folder = root / f"labelme_{seed}"
    generate_folder(folder, n, seed=seed, size=(72, 56), n_shapes=5)
    if extra:
        extra(folder)
    archive = root / f"labelme_{seed}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, f"annotations/{p.relative_to(folder).as_posix()}")
    return archive


def call(client, api_name, *args):
    return client.predict(*args, api_name=api_name)


MODEL = ("tiny.pth", False, False, TEST_SIZE)  # weights, multi-scale, CRF, test size


# ----------------------------------------------------------------------------- image


def test_segment_image_matches_segmenter(client, app_files, tmp_path):
    _, ckpt = app_files
    rgb = scene_image(60, 84, seed=3)
    src = tmp_path / "scene.png"
    Image.fromarray(rgb).save(src)

    overlay, colour, legend, mask, polygons = call(client, "/segment_image", handle_file(str(src)), *MODEL, 0.4)

    expected = tiny_segmenter(ckpt).predict(rgb)
    with Image.open(mask) as m:
        assert m.mode == "P"
        labels = np.asarray(m)
    np.testing.assert_array_equal(labels, expected.label_map)
    document = json.loads(Path(polygons).read_text())
    assert document["imagePath"] == "scene.png" and (document["imageHeight"], document["imageWidth"]) == (60, 84)
    assert document["shapes"] and all(s["description"] == "predicted by tiny.pth" for s in document["shapes"])
    # overlay: 60% image + 40% class colour, rounded (computed here, not by the app)
    palette = expected.palette
    blend = np.rint(rgb.astype(np.float64) * 0.6 + palette[labels].astype(np.float64) * 0.4)
    got = np.asarray(Image.open(overlay).convert("RGB")).astype(np.float64)
    assert got.shape == rgb.shape and np.abs(got - blend).max() <= 1
    np.testing.assert_array_equal(np.asarray(Image.open(colour).convert("RGB")), palette[labels])
    # legend: every class present with its colour and area share
    counts = np.bincount(labels.ravel(), minlength=21)
    for k in np.flatnonzero(counts):
        name = expected.class_names[k]
        r, g, b = palette[k]
        assert f">{name}<" in legend and f"rgb({r},{g},{b})" in legend
        share = counts[k] / labels.size
        assert (f"{100 * share:.1f}%" if share >= 0.0005 else "<0.1%") in legend


def test_bad_images_get_messages_and_the_server_keeps_serving(client, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 this is not really a jpeg")
    with pytest.raises(Exception, match="corrupt.jpg.*(not an image|cannot)"):
        call(client, "/segment_image", handle_file(str(corrupt)), *MODEL, 0.5)

    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((500, 500, 3), np.uint8)).save(big)  # 250,000 px > the 200,000 cap
    with pytest.raises(Exception, match="exceeds the cap"):
        call(client, "/segment_image", handle_file(str(big)), *MODEL, 0.5)

    with pytest.raises(Exception, match="unknown weights 'no-such-weights'"):
        call(client, "/segment_image", handle_file(str(big)), "no-such-weights", False, False, TEST_SIZE, 0.5)

    ok = tmp_path / "ok.png"
    Image.fromarray(scene_image(40, 40)).save(ok)
    assert Path(call(client, "/segment_image", handle_file(str(ok)), *MODEL, 0.5)[3]).is_file()


def test_checkpoint_upload(client, tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="broken.pth"):
        call(client, "/upload_checkpoint", handle_file(str(bad)), "auto", None)

    good = tiny_checkpoint(tmp_path / "mine.safetensors", seed=5, meta={"class_names": [f"c{i}" for i in range(21)]})
    weights, status = call(client, "/upload_checkpoint", handle_file(str(good)), "auto", None)
    assert re.fullmatch(r"mine\.safetensors \([0-9a-f]{8}\) \(uploaded\)", weights) and "21 classes" in status
    src = tmp_path / "x.png"
    Image.fromarray(scene_image(40, 48, seed=1)).save(src)
    _, _, legend, _, _ = call(client, "/segment_image", handle_file(str(src)), weights, False, False, TEST_SIZE, 0.5)
    assert ">c" in legend  # the checkpoint's own class names


def test_v3_checkpoint_upload_segments_like_the_segmenter(client, tmp_path):
    # issue 20: a checkpoint with the improved ASPP head runs in the app unchanged
    ckpt = tiny_checkpoint(tmp_path / "mine_v3.pth", seed=6, aspp="v3", meta={"aspp": "v3"})
    weights, status = call(client, "/upload_checkpoint", handle_file(str(ckpt)), "auto", None)
    assert re.fullmatch(r"mine_v3\.pth \([0-9a-f]{8}\) \(uploaded\)", weights) and "21 classes" in status
    rgb = scene_image(48, 64, seed=2)
    src = tmp_path / "v3.png"
    Image.fromarray(rgb).save(src)
    mask = call(client, "/segment_image", handle_file(str(src)), weights, False, False, TEST_SIZE, 0.5)[3]
    expected = tiny_segmenter(ckpt).predict(rgb).label_map
    assert len(np.unique(expected)) > 1
    np.testing.assert_array_equal(np.asarray(Image.open(mask)), expected)


# ----------------------------------------------------------------------------- video


def test_segment_video(client, tmp_path):
    import av

    src = make_video(tmp_path / "clip.mp4", frames=12, size=(64, 48), fps=8, codec="mpeg4")
    out, info = call(client, "/segment_video", handle_file(str(src)), *MODEL, 0.5, 1, 0.0)
    path = out["video"] if isinstance(out, dict) else out
    with av.open(path) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        decoded = sum(1 for _ in container.decode(stream))
    assert decoded == 12
    assert "12 frames" in info


def test_cancel_reaches_a_running_video_job(app_files, tmp_path, monkeypatch):
    """Cancel stops a job in flight at its next check and leaves no partial video.

    A handshake instead of a race against the clock: the app runs in this process, and its call to
    segcore's segment_video is held after the first batch until the Cancel request has set the job's flag,
    so the job can neither finish first nor miss the request."""
    from demo import AppConfig, build_app, launch
    from segcore import video as segvideo

    real, started = segvideo.segment_video, threading.Event()

    def held_after_the_first_batch(*args, progress, cancel, **kwargs):
        def report(done, total):
            progress(done, total)
            if not started.is_set():
                started.set()
                deadline = time.monotonic() + 120
                while not cancel():  # waits for the Cancel request, whenever it comes
                    assert time.monotonic() < deadline, "the Cancel request never reached the job"
                    time.sleep(0.01)

        return real(*args, progress=report, cancel=cancel, **kwargs)

    monkeypatch.setattr(segvideo, "segment_video", held_after_the_first_batch)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # launch() lowers it process-wide
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    _, ckpt = app_files
    demo = build_app(AppConfig(weights=str(ckpt), device="cpu", work_dir=tmp_path / "app"))
    port = free_port()
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        src = make_video(tmp_path / "clip.mp4", frames=24, size=(64, 48), fps=8, codec="mpeg4")
        job = client.submit(handle_file(str(src)), *MODEL, 0.5, 1, 0.0, api_name="/segment_video")
        assert started.wait(120), f"the job never finished its first batch: {job.status()}"
        client.predict(api_name="/cancel_video")  # the same client: the same session
        video, info = job.result(timeout=120)
    finally:
        demo.close()
    # batches of 4 frames: the check before the second batch stopped it
    assert video is None and info == "Cancelled: clip.mp4: cancelled after 4 frames"
    assert not [p.name for p in (tmp_path / "app").rglob("*.mp4")]


def test_video_limits_and_bad_files(client, tmp_path):
    long = make_video(tmp_path / "long.mp4", frames=8 * (MAX_VIDEO_SECONDS + 2), size=(64, 48), fps=8,
                      codec="mpeg4")
    with pytest.raises(Exception, match=r"^long.mp4: 5.0 s long, over the limit of 3 s"):
        call(client, "/segment_video", handle_file(str(long)), *MODEL, 0.5, 1, 0.0)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing else")
    with pytest.raises(Exception, match="junk.mp4"):
        call(client, "/segment_video", handle_file(str(junk)), *MODEL, 0.5, 1, 0.0)


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_labelme_zip_matches_the_evaluator(client, app_files, tmp_path):
    import segcore

    _, ckpt = app_files
    archive = labelme_zip(tmp_path)
    summary, scores, report, bars, confusion, per_image, gallery, issues = call(
        client, "/evaluate", "Model on labelme annotations", [handle_file(str(archive))], None, None, "model", None,
        "error", *MODEL)

    dataset = segcore.open_dataset(archive, "labelme", label_space="voc")
    direct = segcore.evaluate(tiny_segmenter(ckpt), dataset, progress=False, distributed=False)
    got = {row[0]: row[1] for row in scores["data"]}
    for key, label in (("pixel_accuracy", "PA"), ("mean_accuracy", "MA"), ("mean_iou", "mIoU"), ("fw_iou", "FWIoU")):
        (value,) = [v for k, v in got.items() if f"({label})" in k]
        assert value == pytest.approx(100 * direct.scores[key], abs=0.006)
    assert "4 of 4 images evaluated" in summary

    rows = per_image["data"]
    assert [r[1] for r in rows] == sorted(r[1] for r in rows)  # worst first
    by_name = {r["image"]: r for r in direct.per_image}
    for name, miou, pa, pixels in rows:
        assert miou == pytest.approx(100 * by_name[name]["mean_iou"], abs=0.006)
        assert pixels == by_name[name]["valid_pixels"]
    assert len(gallery) == 4 and gallery[0]["caption"].startswith(rows[0][0])

    assert bars["type"] == "plotly" and "Per-class IoU" in bars["plot"]
    assert "Confusion matrix" in confusion["plot"]
    with zipfile.ZipFile(report) as zf:
        names = zf.namelist()
        scores_json = json.loads(zf.read(next(n for n in names if n.endswith("/scores.json"))))
    assert any(n.endswith("report.html") for n in names) and any("/worst/" in n for n in names)
    assert scores_json["mean_iou"] == pytest.approx(direct.scores["mean_iou"])
    assert "warning" in issues  # the generated files have shapes reaching outside the image


def test_evaluate_with_the_reference_protocol(client, app_files, tmp_path):
    """The protocol choice reaches segcore.evaluate and the summary says which one ran."""
    import segcore

    _, ckpt = app_files
    archive = labelme_zip(tmp_path)
    summary, scores, *_ = call(client, "/evaluate", "Model on labelme annotations", [handle_file(str(archive))],
                               None, None, "model", None, "error", *MODEL, "reference")
    dataset = segcore.open_dataset(archive, "labelme", label_space="voc")
    seg = tiny_segmenter(ckpt)
    direct = segcore.evaluate(seg, dataset, protocol="reference", progress=False, distributed=False)
    resized = segcore.evaluate(seg, dataset, protocol="resize", progress=False, distributed=False)
    assert direct.scores["mean_iou"] != resized.scores["mean_iou"]  # the choice matters on these images
    (value,) = [row[1] for row in scores["data"] if "(mIoU)" in row[0]]
    assert value == pytest.approx(100 * direct.scores["mean_iou"], abs=0.006)
    assert "reference protocol, images native" in summary


def test_compare_api_matches_segcore_compare(client, app_files, tmp_path):
    """/compare: two checkpoints (one uploaded) on the same labelme zip, as segcore.compare computes it."""
    import segcore
    from segcore.comparison import compare

    _, ckpt = app_files
    other = tiny_checkpoint(tmp_path / "other.pth", seed=9)
    name, _ = call(client, "/upload_checkpoint", handle_file(str(other)), "auto", None)
    archive = labelme_zip(tmp_path)
    summary, table, report, bars, scatter, gallery = call(
        client, "/compare", [handle_file(str(archive))], None, "model", None, "error", ["tiny.pth", name],
        False, False, TEST_SIZE, "resize")
    dataset = segcore.open_dataset(archive, "labelme", label_space="voc")
    other_seg = segcore.Segmenter.from_pretrained(other, scales=(), test_size=TEST_SIZE, device="cpu")
    direct = compare([tiny_segmenter(ckpt), other_seg], dataset, protocol="resize", progress=False,
                     distributed=False)
    rows = {row[0]: row for row in table["data"]}
    assert rows[name][3] == pytest.approx(100 * direct.results[1].scores["mean_iou"], abs=0.006)
    assert f"{100 * direct.differences[0]['mean_iou']:+.2f}" in summary and "95% interval" in summary
    assert bars["type"] == "plotly" and "Per-class IoU (%) by model" in bars["plot"]
    assert "Per-image mIoU" in scatter["plot"] and gallery
    with zipfile.ZipFile(report) as zf:
        assert any(n.endswith("comparison.html") for n in zf.namelist())


def test_evaluate_reports_bad_files_and_unknown_labels(client, tmp_path):
    def spoil(folder: Path):
        (folder / "broken.json").write_text("{ not json")
        write_labelme(folder / "zebra.json", [{"label": "zebra", "points": [[2, 2], [30, 2], [30, 30]],
                                                "shape_type": "polygon"}],
                      np.full((40, 40, 3), 90, np.uint8))

    archive = labelme_zip(tmp_path, n=2, seed=1, extra=spoil)
    summary, *_, issues = call(client, "/evaluate", "Model on labelme annotations", [handle_file(str(archive))],
                               None, None, "voc", None, "error", *MODEL)
    assert "2 of 4 images evaluated" in summary and "2 failed" in summary
    assert "broken.json" in issues and "'zebra'" in issues
    assert "/tmp/" not in issues  # server folders stay out of messages

    with pytest.raises(Exception, match="klingon"):
        call(client, "/evaluate", "Model on labelme annotations", [handle_file(str(archive))], None, None,
             "klingon", None, "error", *MODEL)
    not_a_dataset = tmp_path / "notes.txt"
    not_a_dataset.write_text("hello")
    with pytest.raises(Exception, match="no labelme .json files"):
        call(client, "/evaluate", "Model on labelme annotations", [handle_file(str(not_a_dataset))], None, None,
             "voc", None, "error", *MODEL)


def test_evaluate_and_convert_need_only_the_uploads(client, tmp_path):
    """Optional inputs have defaults: keyword calls name only the files (the README's API example)."""
    archive = labelme_zip(tmp_path, n=2, seed=3)
    summary, scores, report_zip, *_ = client.predict(annotation_files=[handle_file(str(archive))],
                                                     api_name="/evaluate")
    assert "2 of 2 images evaluated" in summary and Path(report_zip).is_file()
    assert [row[0] for row in scores["data"]][0] == "Pixel accuracy (PA)"
    dataset_zip, text, report = client.predict(labelme_files=[handle_file(str(archive))], api_name="/convert")
    assert text.startswith("2/2 files converted") and Path(dataset_zip).is_file()


def test_evaluate_with_only_unknown_labels_says_why_and_draws_nothing(client, app_files, tmp_path):
    def zebras_only(folder: Path):
        for p in folder.iterdir():
            p.unlink()
        for name in ("z1", "z2"):
            write_labelme(folder / f"{name}.json", [{"label": "zebra", "points": [[2, 2], [30, 2], [30, 30]],
                                                     "shape_type": "polygon"}], np.full((40, 40, 3), 90, np.uint8))

    archive = labelme_zip(tmp_path, n=1, seed=5, extra=zebras_only)
    log_file = app_files[0] / "server" / "server.log"
    logged_before = len(log_file.read_text())
    with pytest.raises(Exception) as info:
        client.predict(annotation_files=[handle_file(str(archive))], label_space="voc", api_name="/evaluate")
    message = str(info.value)
    assert "nothing could be evaluated" in message and "'zebra' in " in message
    assert "annotations/z1.json" in message and "annotations/z2.json" in message  # relative to the upload
    assert "Name mapping" in message and "Unknown labels: ignore" in message and "weights" in message
    assert "/tmp/" not in message
    # an expected error is one line in the server's log, not a traceback
    logged = log_file.read_text()[logged_before:]
    assert "refused: nothing could be evaluated" in logged and "Traceback" not in logged


def test_evaluate_masks_without_a_model(client, tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    a = np.zeros((10, 10), np.uint8)
    a[:, 5:] = 15  # person on the right half
    b = a.copy()
    b[:, 5] = 0  # one column of person predicted as background
    a2 = np.full((10, 10), 255, np.uint8)
    a2[:2] = 0
    for folder, arr, arr2 in ((gt, a, a2), (pred, b, np.zeros((10, 10), np.uint8))):
        Image.fromarray(arr).save(folder / "one.png")
        Image.fromarray(arr2).save(folder / "two.png")
    summary, scores, *_ = call(client, "/evaluate", "Prediction masks vs ground truth (no model)",
                               [handle_file(str(p)) for p in sorted(gt.iterdir())],
                               [handle_file(str(p)) for p in sorted(pred.iterdir())], None, "voc", None, "error",
                               *MODEL)
    got = {row[0]: row[1] for row in scores["data"]}
    # 120 labelled pixels, 110 right; background: 70 gt / 80 predicted, 70 shared; person 50 / 40 / 40
    assert got["Pixel accuracy (PA)"] == pytest.approx(100 * 110 / 120, abs=0.006)
    assert got["Mean IoU (mIoU)"] == pytest.approx(100 * (70 / 80 + 40 / 50) / 2, abs=0.006)
    assert "stored predictions" in summary


# ----------------------------------------------------------------------------- convert


def test_convert_zip(client, tmp_path):
    import annotations

    archive = labelme_zip(tmp_path, n=3, seed=2)
    dataset, summary, report = call(client, "/convert", [handle_file(str(archive))], "voc", "error", None, None,
                                    False)
    assert summary.startswith("3/3 files converted")
    assert report["converted"] == 3
    with zipfile.ZipFile(dataset) as zf:
        names = zf.namelist()
        top = names[0].split("/")[0]
        assert f"{top}/class_names.txt" in names and f"{top}/ImageSets/Segmentation/all.txt" in names
        for i in range(3):
            # the zip holds one folder, annotations/: ids as in that folder (issue 15)
            mask = Image.open(io.BytesIO(zf.read(f"{top}/SegmentationClass/img_000{i}.png")))
            assert mask.mode == "P"
            expected = annotations.convert_file(tmp_path / "labelme_2" / f"img_000{i}.json", "voc").class_map
            np.testing.assert_array_equal(np.asarray(mask), expected)


def test_convert_errors(client, tmp_path):
    folder = tmp_path / "only_unknown"
    write_labelme(folder / "a.json", [{"label": "unicorn", "points": [[1, 1], [20, 1], [20, 20]],
                                       "shape_type": "polygon"}], np.full((32, 32, 3), 50, np.uint8))
    with pytest.raises(Exception, match="unicorn"):
        call(client, "/convert", [handle_file(str(folder / "a.json"))], "voc", "error", None, None, False)
    bad_map = tmp_path / "map.yaml"
    bad_map.write_text("map:\n  unicorn: pegasus\n")
    with pytest.raises(Exception, match="pegasus"):
        call(client, "/convert", [handle_file(str(folder / "a.json"))], "voc", "error", None,
             handle_file(str(bad_map)), False)
    # mapped, it converts
    good_map = tmp_path / "good.yaml"
    good_map.write_text("map:\n  unicorn: horse\n")
    _, summary, _ = call(client, "/convert", [handle_file(str(folder / "a.json"))], "voc", "error", None,
                         handle_file(str(good_map)), False)
    assert summary.startswith("1/1 files converted")


# ----------------------------------------------------------------------------- start-up without weights


def test_starts_without_weights_and_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCORE_HOME", str(tmp_path / "empty-cache"))
    from demo import AppConfig, build_app
    from segcore import REGISTRY

    demo = build_app(AppConfig(weights="voc12", work_dir=tmp_path / "app"))
    config = json.dumps(demo.get_config_file(), default=str)
    w = REGISTRY["voc12"]
    assert w.url in config and str(tmp_path / "empty-cache" / w.filename) in config
    assert "Upload a checkpoint" in config
