"""Video pipeline (issue 8): decodes, keeps size/rate/frame count/audio, cancels cleanly, bounded memory."""

from __future__ import annotations

import time
import tracemalloc
from fractions import Fraction

import av
import numpy as np
import pytest
from factories import scene_image, tiny_model
from video_files import make_video, read_video

import annotations
from segcore import Segmenter
from segcore.video import VideoCancelled, VideoError, VideoResult, segment_video


@pytest.fixture(scope="module")
def seg():
    space = annotations.get_label_space("voc")
    return Segmenter(tiny_model(21, seed=3, scales=()), space.class_names, space.palette, scales=(),
                     test_size=65, device="cpu", precision="fp32")


def test_output_keeps_frames_size_rate_and_audio(tmp_path, seg):
    src = make_video(tmp_path / "in.mp4", frames=30, size=(96, 64), fps=15, audio=True)
    calls, model_calls = [], []
    timed = seg.with_options()
    model = timed.logits

    def logits(batch):  # the Segmenter's model call, timed from outside
        start = time.perf_counter()
        try:
            return model(batch)
        finally:
            model_calls.append(time.perf_counter() - start)

    timed.logits = logits
    res = segment_video(timed, src, tmp_path / "out.mp4", batch_size=4,
                        progress=lambda done, total: calls.append((done, total)))
    assert isinstance(res, VideoResult) and res.path == tmp_path / "out.mp4"
    n, size, rate, has_audio, codec, frames = read_video(res.path)
    assert (n, size, rate, has_audio, codec) == (30, (96, 64), Fraction(15), True, "h264")
    assert (res.frames, res.width, res.height, res.audio) == (30, 96, 64, True)
    assert res.fps == pytest.approx(15)
    assert calls == [(done, 30) for done in (4, 8, 12, 16, 20, 24, 28, 30)]  # after every batch of 4
    # the model's share: every model call of the 8 batches, and not the decoding and encoding around them
    assert len(model_calls) == 8 and sum(model_calls) <= res.model_seconds < res.seconds
    # opacity 1 shows the class colours: the decoded frame is close to a palette colour everywhere
    res1 = segment_video(seg, src, tmp_path / "solid.mp4", opacity=1.0)
    first = read_video(res1.path)[5][0].astype(int)
    dist = np.abs(first[:, :, None, :] - seg.palette[None, None].astype(int)).sum(-1).min(-1)
    assert np.median(dist) < 30


def test_no_audio_odd_size_and_stride(tmp_path, seg):
    src = make_video(tmp_path / "odd.mkv", frames=17, size=(75, 49), fps=10, codec="mpeg4")
    res = segment_video(seg, src, tmp_path / "out.mp4", frame_stride=3, smoothing=0.5, batch_size=2)
    n, size, rate, has_audio, codec, frames = read_video(res.path)
    assert (n, size, has_audio, codec) == (17, (74, 48), False, "h264")  # one pixel cropped for yuv420p
    assert rate == Fraction(10) and not res.audio


def video_of(path, frames, fps=8):
    """A lossless-enough clip of the given RGB frames (H.264 at high quality)."""
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=fps, options={"crf": "1"})
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        for rgb in frames:
            for p in v.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                out.mux(p)
        for p in v.encode(None):
            out.mux(p)
    return path


def _closest(frame, candidates):
    return int(np.argmin([np.abs(frame.astype(int) - c.astype(int)).mean() for c in candidates]))


def _two_scenes(seg):
    a, b = scene_image(64, 96, seed=1), scene_image(64, 96, seed=7)
    colours = [seg.predict(x).colorize() for x in (a, b)]
    assert (colours[0] != colours[1]).any(-1).mean() > 0.2  # the model tells the scenes apart
    return a, b, colours


def test_frame_stride_shows_the_last_key_frames_labels(tmp_path, seg):
    a, b, colours = _two_scenes(seg)
    src = video_of(tmp_path / "in.mp4", [a, b, b, b, a, a])  # key frames 0 and 3 with stride 3
    outputs = read_video(segment_video(seg, src, tmp_path / "out.mp4", opacity=1.0, frame_stride=3).path)[5]
    assert [_closest(f, colours) for f in outputs] == [0, 0, 0, 1, 1, 1]
    every = read_video(segment_video(seg, src, tmp_path / "every.mp4", opacity=1.0).path)[5]
    assert [_closest(f, colours) for f in every] == [0, 1, 1, 1, 0, 0]


def test_smoothing_carries_the_previous_frames_over_a_cut(tmp_path, seg):
    a, b, colours = _two_scenes(seg)
    src = video_of(tmp_path / "in.mp4", [a] * 4 + [b] * 4)
    sharp = read_video(segment_video(seg, src, tmp_path / "sharp.mp4", opacity=1.0).path)[5]
    smooth = read_video(segment_video(seg, src, tmp_path / "smooth.mp4", opacity=1.0, smoothing=0.9).path)[5]
    assert [_closest(f, colours) for f in sharp] == [0] * 4 + [1] * 4
    # p = 0.9 p_prev + 0.1 p_new: right after the cut the running average is still mostly scene a
    assert _closest(smooth[4], colours) == 0 and _closest(smooth[0], colours) == 0
    assert np.abs(smooth[4].astype(int) - sharp[4].astype(int)).mean() > 5


def test_labels_match_the_image_pipeline(tmp_path, seg):
    # with opacity 1 the output is the colour map: it matches predict() on the decoded input frames
    src = make_video(tmp_path / "in.mp4", frames=6, size=(96, 64), fps=6)
    _, _, _, _, _, inputs = read_video(src)
    res = segment_video(seg, src, tmp_path / "out.mp4", opacity=1.0, batch_size=4)
    _, _, _, _, _, outputs = read_video(res.path)
    for rgb, out in zip(inputs, outputs):
        expected = seg.predict(rgb).colorize().astype(int)
        assert np.abs(out.astype(int) - expected).mean() < 12  # H.264 is lossy; a wrong label is ~100+


def test_cancel_removes_partial_output(tmp_path, seg):
    src = make_video(tmp_path / "in.mp4", frames=24)
    dst = tmp_path / "out.mp4"
    seen = []
    with pytest.raises(VideoCancelled):
        segment_video(seg, src, dst, batch_size=2, progress=lambda d, t: seen.append(d), cancel=lambda: len(seen) >= 2)
    assert not dst.exists() and list(tmp_path.iterdir()) == [src]


def test_bad_inputs_name_the_file(tmp_path, seg):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(VideoError, match="broken.mp4"):
        segment_video(seg, bad, tmp_path / "out.mp4")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(VideoError, match="notes.txt"):
        segment_video(seg, text, tmp_path / "out.mp4")
    with pytest.raises(VideoError, match="missing.mp4"):
        segment_video(seg, tmp_path / "missing.mp4", tmp_path / "out.mp4")
    assert not (tmp_path / "out.mp4").exists()


def test_limits_fail_before_work(tmp_path, seg):
    src = make_video(tmp_path / "in.mp4", frames=24, size=(96, 64), fps=12)
    calls = []
    for kwargs, msg in (({"max_frames": 10}, "frames"), ({"max_seconds": 1.0}, "limit"),
                        ({"max_pixels": 1000}, "pixels")):
        with pytest.raises(VideoError, match=msg):
            segment_video(seg, src, tmp_path / "out.mp4", progress=lambda d, t: calls.append(d), **kwargs)
    assert calls == [] and not (tmp_path / "out.mp4").exists()


def _peak_bytes(seg, src, dst):
    tracemalloc.start()
    try:
        segment_video(seg, src, dst, batch_size=2)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_length(tmp_path, seg):
    # numpy registers its buffers with tracemalloc, so a pipeline that kept frames would show here
    short = make_video(tmp_path / "short.mp4", frames=5, size=(64, 48), fps=8)
    long = make_video(tmp_path / "long.mp4", frames=50, size=(64, 48), fps=8)
    _peak_bytes(seg, short, tmp_path / "warm.mp4")
    a = _peak_bytes(seg, short, tmp_path / "a.mp4")
    b = _peak_bytes(seg, long, tmp_path / "b.mp4")
    frame = 64 * 48 * 3
    assert b < a * 1.2 + 20 * frame, (a, b)  # keeping all 50 frames would add 45 frames' worth


def test_video_command(tmp_path):
    from factories import tiny_checkpoint

    from segcore.cli import main

    ckpt = tiny_checkpoint(tmp_path / "tiny.pth", n_classes=21, seed=2)
    src = make_video(tmp_path / "in.mp4", frames=10, size=(64, 48), fps=10, audio=True)
    dst = tmp_path / "out.mp4"
    code = main(["video", str(src), str(dst), "--weights", str(ckpt), "--test-size", "65", "--scales",
                 "--stride", "2", "--smoothing", "0.3", "--opacity", "0.6"])
    assert code == 0
    n, size, rate, has_audio, codec, _ = read_video(dst)
    assert (n, size, rate, has_audio) == (10, (64, 48), Fraction(10), True)
    assert main(["video", str(tmp_path / "nope.mp4"), str(dst), "--weights", str(ckpt)]) == 2
