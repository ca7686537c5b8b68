"""Video in, segmented overlay video out: stream-decoded with PyAV, batched through the model.

:func:`segment_video` decodes the input frame by frame, runs every ``frame_stride``-th frame through the
Segmenter in batches of ``batch_size``, blends the class colours over each frame and encodes the result as
H.264 (libx264, yuv420p) at the input's size, time stamps and frame rate. The audio stream, when there is
one, is copied packet for packet (re-encoded to AAC when the output container cannot hold its codec), but
only as far as the video goes: see :func:`audio_packet_wanted` (a 1-frame video with hours of audio gives a
1-frame output with about a second of audio, not hours).

Memory does not grow with the video's length: at most ``batch_size * frame_stride + 1`` decoded frames are
held at a time (the frames waiting for their batch), and encoded packets go straight to the muxer.

yuv420p needs even dimensions: an odd width or height loses its last column or row (a one-pixel crop),
which the result's ``width``/``height`` report.

The output is written next to ``dst`` under a temporary name and renamed when complete, so a cancelled
or failed run leaves no partial file behind.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import OptionError, SegcoreError
from .image import MAX_IMAGE_PIXELS
from .segmenter import blend_overlay

# audio codecs an MP4/MOV file can carry as they are; anything else is re-encoded to AAC there
_MP4_AUDIO = {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"}
AUDIO_LEAD_SECONDS = 10.0
"""How far audio may run ahead of the video packets read so far (ffmpeg's default interleaving delta)."""
AUDIO_TAIL_SECONDS = 0.5
"""How far audio may run past the video's declared duration."""


class VideoError(SegcoreError):
    """A video cannot be read, is outside the limits, or the output cannot be written."""


class VideoCancelled(VideoError):
    """``cancel()`` returned True; the partial output was removed."""


@dataclass
class VideoResult:
    path: Path
    frames: int
    fps: float
    width: int
    height: int
    audio: bool
    seconds: float
    model_seconds: float


@dataclass
class _Pending:
    rgb: np.ndarray
    pts: int | None
    key: int  # index of the segmented frame whose labels this frame shows


def _open_input(src: Path):
    import av

    if not src.is_file():
        raise VideoError(f"{src}: no such file")
    try:
        container = av.open(str(src), mode="r")
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise VideoError(f"{src}: not a readable video ({exc})") from exc
    if not container.streams.video:
        container.close()
        raise VideoError(f"{src}: the file has no video stream")
    return container


def _describe(container, src: Path) -> dict:
    stream = container.streams.video[0]
    ctx = stream.codec_context
    width, height = int(ctx.width or 0), int(ctx.height or 0)
    if width < 2 or height < 2:
        raise VideoError(f"{src}: the video stream has no usable frame size ({width}x{height})")
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    seconds = None
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / 1_000_000
    frames = int(stream.frames) if stream.frames else None
    if frames is None and seconds is not None and fps > 0:
        frames = int(math.ceil(seconds * fps))
    return {"width": width, "height": height, "fps": fps, "rate": rate, "seconds": seconds, "frames": frames,
            "audio": bool(container.streams.audio)}


def audio_packet_wanted(seconds: float, video_seconds: float, video_end: float | None = None) -> bool:
    """Whether an audio packet starting at ``seconds`` is copied: not more than
    :data:`AUDIO_LEAD_SECONDS` past the latest video packet read (``video_seconds``), nor more than
    :data:`AUDIO_TAIL_SECONDS` past ``video_end`` (the declared end of the video, or of ``max_seconds``)."""
    limit = video_seconds + AUDIO_LEAD_SECONDS
    if video_end is not None:
        limit = min(limit, video_end + AUDIO_TAIL_SECONDS)
    return seconds <= limit


def _packet_seconds(packet) -> float | None:
    stamp = packet.pts if packet.pts is not None else packet.dts
    if stamp is None or packet.time_base is None:
        return None
    return float(stamp * packet.time_base)


def _check_limits(info: dict, src: Path, max_seconds, max_frames, max_pixels) -> None:
    if max_pixels is not None and info["width"] * info["height"] > max_pixels:
        raise VideoError(f"{src}: frames of {info['width']}x{info['height']} exceed the cap of "
                         f"{max_pixels} pixels a frame")
    if max_seconds is not None and info["seconds"] is not None and info["seconds"] > max_seconds:
        raise VideoError(f"{src}: {info['seconds']:.1f} s long, over the limit of {max_seconds} s")
    if max_frames is not None and info["frames"] is not None and info["frames"] > max_frames:
        raise VideoError(f"{src}: {info['frames']} frames, over the limit of {max_frames}")


class _Labeller:
    """Frames → label maps via the Segmenter's own steps, with optional EMA smoothing of probabilities."""

    def __init__(self, segmenter, smoothing: float):
        self.seg = segmenter
        self.smoothing = float(smoothing)
        self.state: torch.Tensor | None = None
        self.model_seconds = 0.0

    def __call__(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        seg = self.seg
        prepared = [seg.preprocess(f) for f in frames]
        start = time.perf_counter()
        logits = seg.logits(seg.to_tensor([small for _, small in prepared]))
        if logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        self.model_seconds += time.perf_counter() - start
        out = []
        for row, (rgb, small) in enumerate(prepared):
            if self.smoothing <= 0:
                out.append(seg.postprocess(logits[row], rgb, small).label_map)
            else:
                out.append(self._smoothed(logits[row], rgb, small))
        return out

    @torch.inference_mode()
    def _smoothed(self, logits: torch.Tensor, rgb: np.ndarray, small: np.ndarray) -> np.ndarray:
        _, probs = self.seg.processing_scores(logits, small, probabilities=True)
        self.state = probs if self.state is None else self.smoothing * self.state + (1 - self.smoothing) * probs
        return self.seg.labels_from_scores(self.state, rgb.shape[:2])


def segment_video(segmenter, src, dst, *, opacity: float = 0.5, frame_stride: int = 1, smoothing: float = 0.0,
                  batch_size: int = 4, test_size: int | None = None,
                  progress: Callable[[int, int | None], None] | None = None,
                  cancel: Callable[[], bool] | None = None,
                  max_seconds: float | None = None, max_frames: int | None = None,
                  max_pixels: int | None = MAX_IMAGE_PIXELS) -> VideoResult:
    """Segment every frame of ``src`` and write the colour overlay video to ``dst`` (H.264, audio kept).

    ``frame_stride`` k runs the model on every k-th frame and shows its labels on the frames in between;
    ``smoothing`` a in [0, 1) blends each segmented frame's class probabilities with the running average
    (p = a·p_prev + (1−a)·p_new; 0 turns it off); ``batch_size`` frames go through the model together.
    ``progress(done, total)`` is called after every batch (``total`` None when the container does not
    say); ``cancel()`` is checked between batches and raises :class:`VideoCancelled`. The limits are
    checked on the container's header before any frame is decoded and raise :class:`VideoError`
    (``max_pixels`` defaults to the image cap); a frame whose decoded size differs from the header's is
    refused before its RGB conversion.
    """
    import av

    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not 0.0 <= float(opacity) <= 1.0:
        raise OptionError(f"opacity must be in [0, 1], got {opacity}")
    if int(frame_stride) < 1:
        raise OptionError(f"frame_stride must be at least 1, got {frame_stride}")
    if not 0.0 <= float(smoothing) < 1.0:
        raise OptionError(f"smoothing must be in [0, 1), got {smoothing}")
    if int(batch_size) < 1:
        raise OptionError(f"batch_size must be at least 1, got {batch_size}")
    frame_stride, batch_size, opacity = int(frame_stride), int(batch_size), float(opacity)
    # every frame's size is checked on the container's header below, against this call's max_pixels
    segmenter = segmenter.with_options(max_pixels=None)
    if test_size is not None:
        segmenter = segmenter.with_options(test_size=int(test_size))

    container = _open_input(src)
    tmp = dst.parent / f".{dst.stem}.partial{dst.suffix or '.mp4'}"
    output = None
    try:
        info = _describe(container, src)
        _check_limits(info, src, max_seconds, max_frames, max_pixels)
        if not dst.parent.is_dir():
            raise VideoError(f"{dst}: the output folder does not exist")
        vin = container.streams.video[0]
        vin.thread_type = "AUTO"
        ain = container.streams.audio[0] if container.streams.audio else None
        width, height = info["width"] - info["width"] % 2, info["height"] - info["height"] % 2
        rate = info["rate"] or Fraction(25)
        rate = Fraction(rate).limit_denominator(1_000_000)
        try:
            output = av.open(str(tmp), mode="w", format=None if dst.suffix else "mp4")
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise VideoError(f"{dst}: cannot write the video ({exc})") from exc
        vout = output.add_stream("libx264", rate=rate)
        vout.width, vout.height, vout.pix_fmt = width, height, "yuv420p"
        time_base = vin.time_base or Fraction(1, 1) / rate
        vout.time_base = time_base
        vout.codec_context.time_base = time_base
        vout.codec_context.options = {"crf": "20", "preset": "veryfast"}
        aout, resampler = _audio_stream(output, ain, dst)

        labeller = _Labeller(segmenter, smoothing)
        palette = segmenter.palette
        total = info["frames"]
        pending: list[_Pending] = []
        keys: list[np.ndarray] = []  # frames to segment, in order; pending[i].key indexes into these
        key_labels: np.ndarray | None = None  # labels of the last segmented frame of the previous batch
        done = 0
        last_pts = None
        first_pts = None

        def flush():
            nonlocal done, key_labels, pending, keys
            if cancel is not None and cancel():
                raise VideoCancelled(f"{src}: cancelled after {done} frames")
            labels = labeller(keys) if keys else []
            for item in pending:
                lab = labels[item.key] if item.key >= 0 else key_labels
                shown = item.rgb if opacity == 0 else blend_overlay(item.rgb, lab, palette, opacity)
                frame = av.VideoFrame.from_ndarray(shown, format="rgb24")
                frame.pts = item.pts
                frame.time_base = time_base
                for packet in vout.encode(frame):
                    output.mux(packet)
            if labels:
                key_labels = labels[-1]
            done += len(pending)
            pending, keys = [], []
            if progress is not None:
                progress(done, total)

        index = 0
        # audio is bounded by the video: its declared end (or max_seconds) and the latest video packet read
        starts = vin.start_time is not None and vin.time_base is not None
        video_seconds = float(vin.start_time * vin.time_base) if starts else 0.0
        lengths = [x for x in (info["seconds"], max_seconds) if x is not None]
        video_end = video_seconds + min(lengths) if lengths else None
        try:
            streams = [s for s in (vin, ain) if s is not None]
            for packet in container.demux(*streams):
                t = _packet_seconds(packet)
                if packet.stream.type == "audio":
                    if t is not None and audio_packet_wanted(t, video_seconds, video_end):
                        _write_audio(output, packet, aout, resampler)
                    continue
                if t is not None:
                    video_seconds = max(video_seconds, t)
                for frame in packet.decode():
                    if max_frames is not None and index >= max_frames:
                        raise VideoError(f"{src}: more than the limit of {max_frames} frames")
                    if (frame.width, frame.height) != (info["width"], info["height"]):
                        # checked before the RGB conversion: the header's size is what the limits allowed
                        raise VideoError(f"{src}: frame {index} is {frame.width}x{frame.height} but the stream "
                                         f"declares {info['width']}x{info['height']}; size changes mid-stream "
                                         "are not supported")
                    rgb = frame.to_ndarray(format="rgb24")[:height, :width]
                    pts = frame.pts
                    if pts is None or (last_pts is not None and pts <= last_pts):
                        pts = (last_pts + 1) if last_pts is not None else 0
                    if first_pts is None:
                        first_pts = pts
                    last_pts = pts
                    is_key = index % frame_stride == 0
                    if is_key and len(keys) == batch_size:
                        flush()
                    if is_key:
                        keys.append(rgb)
                    pending.append(_Pending(rgb, pts - first_pts, len(keys) - 1))
                    index += 1
            if pending:
                flush()
        except av.FFmpegError as exc:
            raise VideoError(f"{src}: the video cannot be decoded ({exc})") from exc
        if index == 0:
            raise VideoError(f"{src}: the video has no frames")
        for packet in vout.encode(None):
            output.mux(packet)
        if aout is not None and resampler is not None:
            _flush_audio(output, aout, resampler)
        output.close()
        output = None
        os.replace(tmp, dst)
    except BaseException:
        if output is not None:
            try:
                output.close()
            except Exception:  # noqa: BLE001 - the original error matters, not the cleanup's
                pass
        tmp.unlink(missing_ok=True)
        raise
    finally:
        container.close()
    return VideoResult(path=dst, frames=index, fps=float(rate), width=width, height=height,
                       audio=aout is not None, seconds=time.perf_counter() - started,
                       model_seconds=labeller.model_seconds)


def _audio_stream(output, ain, dst: Path):
    """(output audio stream, resampler or None for a packet copy); (None, None) without audio."""
    if ain is None:
        return None, None
    name = ain.codec_context.name
    mp4_like = dst.suffix.lower() in ("", ".mp4", ".m4v", ".mov")
    if not mp4_like or name in _MP4_AUDIO:
        try:
            return output.add_stream_from_template(ain), None
        except (ValueError, Exception):  # noqa: BLE001 - fall back to AAC when the muxer refuses
            pass
    import av

    rate = ain.codec_context.sample_rate or 48000
    aout = output.add_stream("aac", rate=rate)
    layout = ain.codec_context.layout.name if ain.codec_context.layout else "stereo"
    aout.layout = layout
    return aout, av.AudioResampler(format="fltp", layout=layout, rate=rate)


def _write_audio(output, packet, aout, resampler) -> None:
    if packet.dts is None:
        return
    if resampler is None:
        packet.stream = aout
        output.mux(packet)
        return
    for frame in packet.decode():
        for res in resampler.resample(frame):
            for out in aout.encode(res):
                output.mux(out)


def _flush_audio(output, aout, resampler) -> None:
    for res in resampler.resample(None):
        for out in aout.encode(res):
            output.mux(out)
    for out in aout.encode(None):
        output.mux(out)
