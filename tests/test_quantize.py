"""precision="int8" (segcore/quantize.py): the oneDNN int8 path, its calibration, its cache and its limits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from factories import scene_image, tiny_model, upscaled_images
from segcore import Segmenter
from segcore.errors import OptionError
from segcore.fast import cpu_int8_supported
from segcore.precision import resolve_precision
from segcore.quantize import QuantizedConv, _Kernel, calibration_images, int8_cache_dir

ROOT = Path(__file__).resolve().parents[1]
NAMES = [f"c{i}" for i in range(21)]
PALETTE = np.zeros((21, 3), np.uint8)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test starts with an empty int8 cache of its own."""
    monkeypatch.setenv("SEGCORE_HOME", str(tmp_path / "home"))


def test_this_machine_runs_int8():
    # CI and this project's machines are x86 with oneDNN: the path must be testable here, not skipped
    assert cpu_int8_supported()


def test_int8_kernel_matches_the_float_convolution_within_its_rounding():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 24, 3, padding=2, dilation=2)
    x = torch.rand(1, 32, 17, 19) * 3
    with torch.no_grad():
        ref = F.relu(conv(x))
    in_scale, out_scale = 3 / 255, float(ref.max()) / 255
    q = QuantizedConv.from_conv(conv, (in_scale, 0), (out_scale, 0))
    qx = (x / in_scale).round().clamp(0, 255).to(torch.uint8).contiguous(memory_format=torch.channels_last)
    got = _Kernel(q)(qx, relu=True).float() * out_scale
    # input rounding (half a step per value) through the weights, weight rounding, one output step
    bound = 0.5 * in_scale * conv.weight.abs().sum((1, 2, 3)).max() + 0.5 * q.weight_scale.max() * x.sum((1,)).max() * 9
    assert (got - ref).abs().max() <= bound + out_scale
    assert (got - ref).abs().mean() < 2 * out_scale  # and most values within a couple of output steps
    # a wrong scale convention would be off by orders of magnitude, not by rounding
    assert torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1] > 0.999


def test_int8_keeps_a_trained_models_answers(smoke_model, tmp_path):
    """Calibrated on pictures of its own kind, int8 keeps >= 99.5% of a trained model's pixels; on the
    shipped photos (another world than the smoke model's coloured shapes) it keeps less, but most."""
    checkpoint, run = smoke_model
    images = upscaled_images(run, tmp_path / "images", 8, size=192)
    tests, own = images[:4], images[4:]
    fp32 = Segmenter.from_pretrained(str(checkpoint), device="cpu", precision="fp32", test_size=192)
    reference = [fp32.predict(p).label_map for p in tests]
    for calibration, bar in ((own, 0.995), (None, 0.95)):
        int8 = Segmenter.from_pretrained(str(checkpoint), device="cpu", precision="int8", test_size=192,
                                         calibration=calibration)
        agree = [float((int8.predict(p).label_map == ref).mean()) for p, ref in zip(tests, reference)]
        assert min(agree) >= bar, (calibration is None, agree)
    assert int8.describe()["precision"] == "int8"
    assert int8.describe()["calibration"] == "shipped"


def test_second_start_reads_the_quantised_weights_from_the_cache():
    model = tiny_model(21, seed=3)
    image = scene_image(90, 120, seed=1)
    first = Segmenter(model, NAMES, PALETTE, device="cpu", precision="int8", test_size=97)
    labels = first.predict(image).label_map
    assert first.fast_path().cache_hit is False
    files = list(int8_cache_dir().glob("*.pt"))
    assert len(files) == 1
    second = Segmenter(model, NAMES, PALETTE, device="cpu", precision="int8", test_size=97)
    assert np.array_equal(second.predict(image).label_map, labels)
    assert second.fast_path().cache_hit is True
    # other weights, or other calibration images, are another entry, never the first one's
    other = Segmenter(tiny_model(21, seed=4), NAMES, PALETTE, device="cpu", precision="int8", test_size=97)
    other.predict(image)
    own = Segmenter(model, NAMES, PALETTE, device="cpu", precision="int8", test_size=97,
                    calibration=[scene_image(80, 80, seed=9)])
    own.predict(image)
    assert other.fast_path().cache_hit is False and own.fast_path().cache_hit is False
    assert len(list(int8_cache_dir().glob("*.pt"))) == 3


def test_a_damaged_cache_file_is_rebuilt_not_trusted():
    model = tiny_model(21, seed=5)
    image = scene_image(64, 64, seed=2)
    labels = Segmenter(model, NAMES, PALETTE, device="cpu", precision="int8", test_size=65).predict(image).label_map
    (cached,) = int8_cache_dir().glob("*.pt")
    cached.write_bytes(b"not a torch file")
    again = Segmenter(model, NAMES, PALETTE, device="cpu", precision="int8", test_size=65)
    assert np.array_equal(again.predict(image).label_map, labels)
    assert again.fast_path().cache_hit is False
    assert torch.load(cached, weights_only=True)["version"] >= 1  # rewritten


def test_the_v3_head_runs_on_int8_features():
    model = tiny_model(21, seed=6, aspp="v3")
    image = scene_image(80, 100, seed=4)
    int8 = Segmenter(model, NAMES, PALETTE, device="cpu", precision="int8", test_size=81)
    fp32 = Segmenter(model, NAMES, PALETTE, device="cpu", precision="fp32", test_size=81)
    got = int8.logits(int8.to_tensor([int8.preprocess(image)[1]]))
    ref = fp32.logits(fp32.to_tensor([fp32.preprocess(image)[1]]))
    assert got.shape == ref.shape
    assert torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1] > 0.99


def test_int8_is_a_cpu_path():
    with pytest.raises(OptionError, match="CPU"):
        resolve_precision("int8", torch.device("cuda"))
    assert resolve_precision("int8", torch.device("cpu")) == "int8"
    assert resolve_precision("auto", torch.device("cpu")) != "int8"  # opt-in: see docs/performance.md


def test_shipped_calibration_photos_are_in_the_package():
    photos = calibration_images()
    assert [p.name for p in photos] == ["astronaut.jpg", "cat.jpg", "coffee.jpg", "rocket.jpg"]
    assert all(p.parent == ROOT / "segcore" / "calibration" for p in photos)


def test_cli_predict_and_video_run_int8(tmp_path):
    from factories import tiny_checkpoint

    checkpoint = tiny_checkpoint(tmp_path / "tiny.pth")
    image = tmp_path / "scene.png"
    from PIL import Image

    Image.fromarray(scene_image(60, 80, seed=7)).save(image)
    env = dict(os.environ, SEGCORE_HOME=str(tmp_path / "home"))
    run = subprocess.run([sys.executable, "-m", "segcore", "predict", "--weights", str(checkpoint), "--precision",
                          "int8", "--test-size", "65", "--out", str(tmp_path / "out"), str(image)],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "scene.png").is_file()
    assert len(list((tmp_path / "home" / "int8").glob("*.pt"))) == 1


def test_cli_video_runs_int8_with_own_calibration_folder(tmp_path):
    from factories import tiny_checkpoint
    from PIL import Image
    from video_files import make_video, read_video

    checkpoint = tiny_checkpoint(tmp_path / "tiny.pth")
    clip = make_video(tmp_path / "clip.mp4", frames=6, size=(64, 48), fps=6)
    calibration = tmp_path / "mine"
    calibration.mkdir()
    for seed in range(2):
        Image.fromarray(scene_image(48, 64, seed=seed)).save(calibration / f"{seed}.png")
    env = dict(os.environ, SEGCORE_HOME=str(tmp_path / "home"))
    run = subprocess.run([sys.executable, "-m", "segcore", "video", "--weights", str(checkpoint), "--precision",
                          "int8", "--calibration", str(calibration), "--scales", "--test-size", "65", str(clip),
                          str(tmp_path / "out.mp4")], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    count, size, *_ = read_video(tmp_path / "out.mp4")
    assert count == 6 and size == (64, 48)
    missing = subprocess.run([sys.executable, "-m", "segcore", "video", "--weights", str(checkpoint), "--precision",
                              "int8", "--calibration", str(tmp_path / "nowhere"), str(clip), str(tmp_path / "o.mp4")],
                             cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 2
    assert "nowhere: no such file or folder" in missing.stderr and "Traceback" not in missing.stderr


def test_app_serves_int8(tmp_path):
    from app_server import TEST_SIZE, running_server
    from factories import tiny_checkpoint
    from gradio_client import Client, handle_file
    from PIL import Image

    checkpoint = tiny_checkpoint(tmp_path / "tiny.pth")
    rgb = scene_image(60, 84, seed=3)
    Image.fromarray(rgb).save(tmp_path / "scene.png")
    with running_server(tmp_path / "server", checkpoint, "--precision", "int8") as (url, _):
        client = Client(url, verbose=False)
        result = client.predict(handle_file(str(tmp_path / "scene.png")), "tiny.pth", False, False, TEST_SIZE, 0.4,
                                api_name="/segment_image")
    # the app calibrates when it loads the weights, at the model's own test size, whatever the request's
    loaded = Segmenter.from_pretrained(str(checkpoint), device="cpu", precision="int8")
    loaded.fast_path()
    expected = loaded.with_options(scales=(), test_size=TEST_SIZE).predict(rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(result[3])), expected.label_map)
    # the server ran the int8 path: it calibrated and cached the checkpoint's quantised weights
    assert len(list((tmp_path / "server" / "home" / "int8").glob("*.pt"))) == 1


def test_app_refuses_an_unknown_precision_in_one_line():
    run = subprocess.run([sys.executable, "app.py", "--precision", "int4"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert "precision must be one of" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("size", [(65, 65), (13, 9), (3, 4)])  # rates 6-24: from all taps inside to centre only
def test_aspp_as_shifted_taps_equals_the_dilated_convolutions(size):
    from segcore.model import ASPP
    from segcore.quantize import _aspp_taps, _TapASPP

    torch.manual_seed(1)
    aspp = ASPP(64, 21, [6, 12, 18, 24])
    for conv in aspp.children():
        torch.nn.init.normal_(conv.weight, std=0.05)
        torch.nn.init.normal_(conv.bias, std=0.5)
    scale = 4 / 255
    qx = torch.randint(0, 256, (1, 64, *size), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = aspp(qx.float() * scale)
    got = _TapASPP(_aspp_taps(aspp, (scale, 0)))(qx)
    assert got.shape == ref.shape
    # only the weights are rounded (per tap and class, half a step each): a bound on the error of every score
    weight_step = max(c.weight.abs().amax() for c in aspp.children()) / 127
    bound = 0.5 * weight_step * (qx.float() * scale).sum(1).max() * 36
    assert (got - ref).abs().max() <= bound
    assert (got - ref).abs().mean() < 0.02 * ref.abs().mean()


def test_the_app_quantises_when_it_loads_the_weights_and_says_so(tmp_path):
    """The int8 calibration runs while the weights load (registry or upload), under the loading message, not
    inside a later request: the quantised state is on disk before anything is segmented."""
    from demo.models import ModelStore
    from demo.panel import status_text
    from factories import tiny_checkpoint

    store = ModelStore(str(tiny_checkpoint(tmp_path / "tiny.pth")), upload_dir=tmp_path / "uploads",
                       device="cpu", precision="int8")
    assert "quantised to int8 on first use" in status_text(store, None)  # what the page says before
    messages = []
    segmenter = store.get(store.default, progress=lambda *a, desc="": messages.append(desc))
    assert any("int8" in m for m in messages), messages
    assert len(list(int8_cache_dir().glob("*.pt"))) == 1
    assert segmenter.with_options(scales=(), test_size=65).fast_path() is segmenter.fast_path()
    assert status_text(store, None).endswith("cpu, int8.")
    # an uploaded checkpoint is quantised the same way, while it is checked and loaded
    messages.clear()
    other = tiny_checkpoint(tmp_path / "other.pth", seed=7)
    store.upload(other, progress=lambda *a, desc="": messages.append(desc))
    assert any("int8" in m for m in messages), messages
    assert len(list(int8_cache_dir().glob("*.pt"))) == 2
