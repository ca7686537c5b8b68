"""Hostile checkpoints and videos (issue 13): refused from names and shapes before any model is built,
within bounded memory; a video's audio is copied only as far as its video goes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from factories import TINY_BLOCKS, TINY_WIDTH, tiny_model

import annotations
from segcore import CheckpointError, Segmenter, build_model, load_model
from segcore.checkpoint import validate_checkpoint
from segcore.checkpoint import MAX_PARAMETERS, check_architecture, check_shapes, estimate_parameters
from segcore.video import AUDIO_TAIL_SECONDS, audio_packet_wanted, segment_video

ROOT = Path(__file__).resolve().parents[1]


def _published_keys(n_classes=21, blocks=(3, 4, 23, 3), width=(256, 512, 1024, 2048), aspp="v2", rates=None) -> dict:
    """``{name: shape}`` of a model, read from the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = build_model(n_classes, n_blocks=blocks, width=width, aspp=aspp, atrous_rates=rates)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- hostile files of ~1 KB


def _shape_bombs(folder: Path) -> dict[str, Path]:
    """Checkpoints of a few KB (``torch.save``'s zip adds about 1 KB) that describe enormous models."""
    folder.mkdir(parents=True, exist_ok=True)
    one = torch.zeros(1)
    files = {
        # a 2048x2048x3x3 weight, all views of one float: 38 M values (150 MB once copied) in 1 KB
        "stride0": {"base.aspp.c0.weight": one.expand(2048, 2048, 3, 3)},
        # zero-size tensors whose other dimensions set huge widths and class counts
        "zero": {"base.aspp.c0.weight": torch.zeros(60000, 0, 3, 3),
                 **{f"base.layer{s}.block1.increase.conv.weight": torch.zeros(60000, 0, 1, 1) for s in range(2, 6)},
                 **{f"base.layer{s}.block1.reduce.conv.weight": torch.zeros(1, 0, 1, 1) for s in range(2, 6)}},
        # small real tensors naming huge widths: the model would have billions of parameters
        "wide": {"base.aspp.c0.weight": torch.zeros(2, 1, 1, 1),
                 **{f"base.layer{s}.block1.increase.conv.weight": torch.zeros(8192, 1, 1, 1)
                    for s in range(2, 6)},
                 **{f"base.layer{s}.block{b}.reduce.conv.weight": torch.zeros(1, 1, 1, 1)
                    for s in range(2, 6) for b in range(1, 64)}},
        # a block index that would build twenty thousand blocks
        "block20000": {"base.aspp.c0.weight": torch.zeros(2, 1, 1, 1),
                       **{f"base.layer{s}.block1.increase.conv.weight": torch.zeros(4, 1, 1, 1) for s in range(2, 6)},
                       "base.layer4.block20000.reduce.conv.weight": torch.zeros(1, 1, 1, 1)},
    }
    out = {}
    for name, sd in files.items():
        torch.save(sd, folder / f"{name}.pth")
        out[name] = folder / f"{name}.pth"
    return out


@pytest.mark.parametrize("kind,match", [("stride0", "backed by only 4 bytes"), ("zero", "zero-size shape"),
                                        ("wide", "describes a model of"), ("block20000", "index 20000")])
def test_shape_bombs_are_refused_before_building(tmp_path, kind, match, monkeypatch):
    path = _shape_bombs(tmp_path)[kind]
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
    files = _shape_bombs(tmp_path)
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


def _clip_with_long_audio(path: Path, frames=3, fps=10, audio_seconds=30.0) -> Path:
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = out.add_stream("aac", rate=8000)
        a.layout = "mono"
        rng = np.random.default_rng(0)
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), format="rgb24")
            for p in v.encode(frame):
                out.mux(p)
        for p in v.encode(None):
            out.mux(p)
        n = int(8000 * audio_seconds)
        samples = (0.2 * np.sin(np.arange(n) / 8000 * 2 * np.pi * 440)).astype(np.float32)[None]
        for start in range(0, n, 1024):
            af = av.AudioFrame.from_ndarray(samples[:, start:start + 1024], format="fltp", layout="mono")
            af.sample_rate, af.pts = 8000, start
            for p in a.encode(af):
                out.mux(p)
        for p in a.encode(None):
            out.mux(p)
    return path


def _audio_seconds(path: Path) -> float:
    with av.open(str(path)) as c:
        end = 0.0
        for p in c.demux(c.streams.audio[0]):
            if p.pts is not None and p.duration:
                end = max(end, float((p.pts + p.duration) * p.time_base))
        return end


def test_long_audio_track_is_cut_to_the_video(tmp_path):
    src = _clip_with_long_audio(tmp_path / "in.mp4")
    assert _audio_seconds(src) > 29
    space = annotations.get_label_space("voc")
    seg = Segmenter(tiny_model(21, scales=()), space.class_names, space.palette, scales=(), test_size=33,
                    device="cpu", precision="fp32")
    res = segment_video(seg, src, tmp_path / "out.mp4")
    assert res.frames == 3 and res.audio
    assert 0 < _audio_seconds(res.path) <= 0.3 + AUDIO_TAIL_SECONDS + 0.2  # 3 frames at 10 fps, plus a packet


def test_audio_bound():
    assert audio_packet_wanted(1.0, video_seconds=0.0, video_end=None)  # audio may lead the video a little
    assert not audio_packet_wanted(11.0, video_seconds=0.5, video_end=None)  # but not run on alone
    assert not audio_packet_wanted(2.0, video_seconds=5.0, video_end=1.0)  # nor past the video's end
    assert audio_packet_wanted(1.0 + AUDIO_TAIL_SECONDS, video_seconds=5.0, video_end=1.0)
