"""Hostile checkpoints and videos (issue 13): refused from names and shapes before any model is built,
within bounded memory; a video's audio is copied only as far as its video goes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import TINY_BLOCKS, TINY_WIDTH, shape_bomb_checkpoints, tiny_model

import annotations
from segcore import CheckpointError, Segmenter, build_model, load_model
from segcore.checkpoint import validate_checkpoint
from segcore.checkpoint import MAX_PARAMETERS, check_architecture, check_shapes, estimate_parameters
from segcore.video import AUDIO_TAIL_SECONDS, audio_packet_wanted, segment_video
from video_files import audio_seconds, clip_with_long_audio

ROOT = Path(__file__).resolve().parents[1]


def _published_keys(n_classes=21, blocks=(3, 4, 23, 3), width=(256, 512, 1024, 2048), aspp="v2", rates=None) -> dict:
    """``{name: shape}`` of a model, read from the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = build_model(n_classes, n_blocks=blocks, width=width, aspp=aspp, atrous_rates=rates)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- hostile files of ~1 KB


@pytest.mark.parametrize("kind,match", [("stride0", "backed by only 4 bytes"), ("zero", "zero-size shape"),
                                        ("wide", "describes a model of"), ("block20000", "index 20000")])
def test_shape_bombs_are_refused_before_building(tmp_path, kind, match, monkeypatch):
    path = shape_bomb_checkpoints(tmp_path)[kind]
    if kind != "wide":
        assert path.stat().st_size < 4096
    built = []
    monkeypatch.setattr("segcore.checkpoint.build_model", lambda **kw: built.append(kw))
    with pytest.raises(CheckpointError, match=match):
        load_model(path)
    with pytest.raises(CheckpointError, match=match):
        validate_checkpoint(path)
    assert built == []


def test_shape_bombs_cost_bounded_memory(tmp_path):
    """Peak memory (VmHWM) of a fresh process refusing every shape bomb grows by less than 64 MB."""
    files = shape_bomb_checkpoints(tmp_path)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch, segcore
        from segcore import CheckpointError, load_model

        def hwm_kb():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])

        load_model.__module__  # everything imported before the baseline
        before = hwm_kb()
        refused = 0
        for path in {[str(p) for p in files.values()]!r}:
            try:
                load_model(path)
            except CheckpointError:
                refused += 1
        print(refused, hwm_kb() - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    refused, grown_kb = map(int, out.stdout.split())
    assert refused == len(files)
    assert grown_kb < 64 * 1024, f"peak memory grew by {grown_kb / 1024:.0f} MB"


def test_shapes_and_architecture_bounds():
    published = _published_keys()
    values = check_shapes(published)
    assert 40_000_000 < values < 50_000_000  # DeepLab-v2 ResNet-101: 43 M values
    arch = {"n_classes": 21, "n_blocks": (3, 4, 23, 3), "atrous_rates": (6, 12, 18, 24), "width": (256, 512, 1024, 2048)}
    assert check_architecture(arch, values) == estimate_parameters(arch)
    for bad, match in ((dict(n_classes=0), "0 classes"), (dict(n_classes=100_000), "100000 classes"),
                       (dict(n_blocks=(3, 4, 65, 3)), "blocks per stage"), (dict(width=(256, 512, 1024, 9000)), "widths"),
                       (dict(atrous_rates=(6, 12, 18, 24000)), "atrous rates"),
                       (dict(atrous_rates=tuple(range(1, 10))), "atrous rates")):
        with pytest.raises(CheckpointError, match=match):
            check_architecture({**arch, **bad}, values)
    with pytest.raises(CheckpointError, match=f"limit {MAX_PARAMETERS:,}"):
        check_architecture({**arch, "width": (4096, 8192, 8192, 8192)}, 10**12)
    for shapes, match in (({"base.x": (2, 3, 4, 5, 6)}, "5 dimensions"), ({"base.x": (70000,)}, "over 65536"),
                          ({"base.aspp.c8.weight": (2, 2, 3, 3)}, "index 8"),
                          ({"base.x": (20000, 20000)}, "more than")):
        with pytest.raises(CheckpointError, match=match):
            check_shapes(shapes)


@pytest.mark.parametrize("aspp,rates", [("v2", (6, 12, 18, 24)), ("v3", (6, 12, 18)), ("v3", (4, 8))])
@pytest.mark.parametrize("blocks,width,classes", [(TINY_BLOCKS, TINY_WIDTH, 4), ((3, 4, 23, 3), (256, 512, 1024, 2048), 21),
                                                  ((2, 1, 3, 2), (32, 64, 128, 256), 182)])
def test_estimated_size_is_the_model_size(blocks, width, classes, aspp, rates):
    """The formula (what runs before building) against the model's own state dict on the meta device."""
    shapes = _published_keys(classes, blocks, width, aspp, rates)
    real = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith("num_batches_tracked"))
    arch = {"n_classes": classes, "n_blocks": blocks, "atrous_rates": rates, "width": width, "aspp": aspp}
    assert estimate_parameters(arch) == real


def test_real_checkpoints_still_load(tmp_path):
    path = tmp_path / "ok.pth"
    torch.save(tiny_model(4).state_dict(), path)
    assert validate_checkpoint(path).n_classes == 4
    assert load_model(path).config.n_blocks == TINY_BLOCKS


# ----------------------------------------------------------------------------- video


def test_long_audio_track_is_cut_to_the_video(tmp_path):
    src = clip_with_long_audio(tmp_path / "in.mp4")
    assert audio_seconds(src) > 29
    space = annotations.get_label_space("voc")
    seg = Segmenter(tiny_model(21, scales=()), space.class_names, space.palette, scales=(), test_size=33,
                    device="cpu", precision="fp32")
    res = segment_video(seg, src, tmp_path / "out.mp4")
    assert res.frames == 3 and res.audio
    assert 0 < audio_seconds(res.path) <= 0.3 + AUDIO_TAIL_SECONDS + 0.2  # 3 frames at 10 fps, plus a packet


def test_audio_bound():
    assert audio_packet_wanted(1.0, video_seconds=0.0, video_end=None)  # audio may lead the video a little
    assert not audio_packet_wanted(11.0, video_seconds=0.5, video_end=None)  # but not run on alone
    assert not audio_packet_wanted(2.0, video_seconds=5.0, video_end=1.0)  # nor past the video's end
    assert audio_packet_wanted(1.0 + AUDIO_TAIL_SECONDS, video_seconds=5.0, video_end=1.0)
