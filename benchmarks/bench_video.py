"""Video end to end: frames per second, the share of time outside the model, and peak memory vs length.

Throughput: a generated 640x360 clip (moving scene_image content, AAC audio) through
``segment_video`` with the default path (``precision="auto"``) and the default options (test size 513,
multi-scale inputs), random-weight ResNet-101. "Outside the model" is everything but ``Segmenter.logits``:
decoding, resizing, upsampling/argmax, overlay, H.264 encoding and audio copy.

Memory: the same pipeline on a short clip and on one 10x longer, each in its own subprocess, reporting the
peak resident set size (``ru_maxrss``); a smaller test size keeps the long clip quick. Bounded memory
means the two peaks are close.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .memory import current_rss_mb, peak_rss_mb, reset_peak

ROOT = Path(__file__).resolve().parent.parent


def make_clip(path, frames, size=(640, 360), fps=25, audio=True):
    sys.path.insert(0, str(ROOT / "tests"))
    from video_files import make_video

    return make_video(path, frames=frames, size=size, fps=fps, audio=audio)


def _segmenter(full: bool, test_size: int, scales):
    from .workloads import resnet101, tiny_model, voc_segmenter

    return voc_segmenter(resnet101() if full else tiny_model(21, seed=0), scales=scales, test_size=test_size)


def _memory_child(clip: str, full: bool, test_size: int) -> None:
    """Runs in a subprocess: segment ``clip``; print the peak RSS during the run and the RSS before it.

    The model is built and warmed up (fast copy included) first, then the kernel's peak-RSS mark is reset
    (``/proc/self/clear_refs``), so the peak is the video run's own and not the model construction's.
    """
    from segcore.video import segment_video

    seg = _segmenter(full, test_size, ())
    with tempfile.TemporaryDirectory() as tmp:
        warm = make_clip(Path(tmp) / "warm.mp4", 2, size=(64, 48), audio=False)
        segment_video(seg, warm, Path(tmp) / "warm_out.mp4")
        before = current_rss_mb()
        reset = reset_peak()
        res = segment_video(seg, clip, Path(tmp) / "out.mp4")
    print(json.dumps({"peak_rss_mib": peak_rss_mb(), "rss_before_mib": before, "peak_reset": reset,
                      "frames": res.frames}))


def _memory(clip: Path, full: bool, test_size: int) -> dict:
    code = ("import sys; sys.path.insert(0, %r); from benchmarks.bench_video import _memory_child; "
            "_memory_child(%r, %r, %r)" % (str(ROOT), str(clip), full, test_size))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool) -> dict:
    from segcore.video import segment_video

    full = not quick
    result = {"weights": "random (seeded) ResNet-101, 21 classes" if full else "tiny random model (quick)",
              "note": "side by side in one run, medians after warm-up"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = 4 if quick else 12
        clip = make_clip(tmp / "clip.mp4", n, size=(320, 180) if quick else (640, 360))
        seg = _segmenter(full, 129 if quick else 513, (0.5, 0.75))
        segment_video(seg, make_clip(tmp / "warm.mp4", 2, size=(320, 180)), tmp / "warm_out.mp4")  # warm-up
        res = segment_video(seg, clip, tmp / "out.mp4", batch_size=4)
        result["throughput"] = {
            "clip": f"{res.width}x{res.height}, {res.frames} frames, audio {res.audio}",
            "test_size": seg.test_size, "scales": [1.0, *seg.scales], "precision": seg.precision,
            "frames_per_s": round(res.frames / res.seconds, 3), "seconds": round(res.seconds, 2),
            "model_seconds": round(res.model_seconds, 2),
            "outside_model_share": round(1 - res.model_seconds / res.seconds, 4)}
        short_n = 5 if quick else 30
        short = make_clip(tmp / "short.mp4", short_n, size=(320, 180) if quick else (640, 360))
        long = make_clip(tmp / "long.mp4", 10 * short_n, size=(320, 180) if quick else (640, 360))
        test_size = 65 if quick else 161
        a, b = _memory(short, full, test_size), _memory(long, full, test_size)
        grow_a, grow_b = a["peak_rss_mib"] - a["rss_before_mib"], b["peak_rss_mib"] - b["rss_before_mib"]
        result["memory"] = {"test_size": test_size, "scales": [1.0], "short_frames": a["frames"],
                            "long_frames": b["frames"], "peak_reset": a["peak_reset"] and b["peak_reset"],
                            "short_peak_rss_mib": round(a["peak_rss_mib"], 1),
                            "long_peak_rss_mib": round(b["peak_rss_mib"], 1),
                            "long_over_short": round(b["peak_rss_mib"] / a["peak_rss_mib"], 3),
                            "short_growth_during_run_mib": round(grow_a, 1),
                            "long_growth_during_run_mib": round(grow_b, 1)}
    return result
