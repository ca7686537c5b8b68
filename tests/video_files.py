"""Short clips tests write for themselves, and a decoder that reads one back frame by frame (PyAV)."""

from __future__ import annotations

import av
import numpy as np
from factories import scene_image


def make_video(path, frames=24, size=(96, 64), fps=12, audio=False, codec="libx264"):
    """Write a short clip of moving scene_image content (and a 440 Hz sine track when asked)."""
    w, h = size
    scene = scene_image(h, w * 2, seed=1)
    with av.open(str(path), "w") as out:
        v = out.add_stream(codec, rate=fps)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        a = None
        if audio:
            a = out.add_stream("aac", rate=16000)
            a.layout = "mono"
        for i in range(frames):
            shift = (i * 3) % w
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(scene[:, shift:shift + w]), format="rgb24")
            for p in v.encode(frame):
                out.mux(p)
        for p in v.encode(None):
            out.mux(p)
        if a is not None:
            n = int(16000 * frames / fps)
            t = np.arange(n) / 16000
            samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            for start in range(0, n, 1024):
                af = av.AudioFrame.from_ndarray(samples[:, start:start + 1024], format="fltp", layout="mono")
                af.sample_rate = 16000
                af.pts = start
                for p in a.encode(af):
                    out.mux(p)
            for p in a.encode(None):
                out.mux(p)
    return path


def read_video(path):
    """(frame count, (w, h), average rate, has audio, codec name, every frame as RGB) by decoding the clip."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        rate = v.average_rate
        has_audio = bool(c.streams.audio)
        codec = v.codec_context.name
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return len(frames), (frames[0].shape[1], frames[0].shape[0]), rate, has_audio, codec, frames
