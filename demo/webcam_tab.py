"""Webcam tab: live segmentation of the browser's camera stream, single scale, small test size."""

from __future__ import annotations

import time

import gradio as gr

from .common import user_errors
from .panel import Context, model_for

STREAM_EVERY = 0.2  # seconds between frames the browser sends; late frames are dropped, not queued


def build(ctx: Context) -> None:
    with gr.Tab("Webcam", id="webcam"):
        gr.Markdown("Live segmentation of your camera: single scale, no CRF and a small test size for speed. "
                    "Frames that arrive while one is being segmented are dropped, so the picture stays current.")
        with gr.Row():
            camera = gr.Image(label="Camera", sources=["webcam"], streaming=True, type="numpy",
                              elem_id="webcam-input", height=360)
            live = gr.Image(label="Segmentation", interactive=False, format="jpeg", elem_id="webcam-output",
                            height=360)
        with gr.Row():
            size = gr.Slider(65, 513, value=257, step=8, label="Webcam test size")
            fps = gr.Markdown("– frames/s", elem_id="webcam-fps")
        state = gr.State(None)

    def segment_frame(frame, weights, opacity, test_size, last):
        if frame is None:
            return None, "– frames/s", last
        seg = model_for(ctx, weights, False, False, test_size)
        with user_errors("webcam frame"):
            over = seg.predict(frame).overlay(float(opacity if opacity is not None else 0.5))
        now = time.perf_counter()
        rate = None
        if last:
            dt = max(now - last["t"], 1e-6)
            rate = 1.0 / dt if last.get("fps") is None else 0.7 * last["fps"] + 0.3 / dt
        text = f"{rate:.1f} frames/s" if rate is not None else "– frames/s"
        return over, text, {"t": now, "fps": rate}

    camera.stream(segment_frame, [camera, ctx.weights, ctx.opacity, size, state], [live, fps, state],
                  stream_every=STREAM_EVERY, concurrency_limit=1, concurrency_id="webcam",
                  trigger_mode="always_last", time_limit=600, api_visibility="undocumented",
                  show_progress="hidden")
