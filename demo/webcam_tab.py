"""Webcam tab: live segmentation of the browser's camera stream, single scale, small test size."""

from __future__ import annotations

import base64
import binascii
import time
from collections import OrderedDict

import gradio as gr

from segcore.image import check_image_size

from .common import UserError, user_errors
from .panel import Context, model_for

STREAM_EVERY = 0.2
"""Seconds between the frames the browser sends. A stream event is one long run that, after each frame,
takes the newest frame the browser has: frames that arrive meanwhile are skipped, never queued (in
Gradio 6 that is the stream's own behaviour; ``trigger_mode="always_last"`` stops a stream after one frame)."""
STREAM_SECONDS = 120
"""One webcam session's turn (concurrency 1): then the next session in the queue gets the model."""


class WebcamImage(gr.Image):
    """``gr.Image`` whose frames meet the pixel cap, checked from their header before Gradio decodes them.

    Gradio decodes a streamed frame (a JPEG data URL, or an uploaded file through the API) itself, before
    the event function runs; Pillow's own cap refused a huge one there, but the user read a bare "Error".
    Here the frame's size is read from its header and an over-cap frame gets the cap's message.
    """

    is_template = True  # the browser draws it as a plain Image
    max_pixels: int | None = None
    """The app's pixel cap, set on the instance (Gradio sends the browser the arguments of ``gr.Image``'s
    own ``__init__``, so this class adds none)."""

    def preprocess(self, payload):
        source = None if payload is None else frame_source(payload)
        if source is not None:
            with user_errors("webcam frame"):
                check_image_size(source, max_pixels=self.max_pixels, name="webcam frame")
        return super().preprocess(payload)


def frame_source(payload):
    """What a frame's header can be read from: the bytes of its data URL, or its uploaded file."""
    url = payload.url or ""
    if url.startswith("data:"):
        try:
            return base64.b64decode(url.partition(",")[2], validate=False)
        except (binascii.Error, ValueError) as exc:
            raise UserError(f"webcam frame: not a base64 data URL ({exc})") from exc
    return payload.path


def build(ctx: Context) -> None:
    with gr.Tab("Webcam", id="webcam"):
        gr.Markdown("Live segmentation of your camera: single scale, no CRF and a small test size for speed. "
                    "Frames that arrive while one is being segmented are dropped, so the picture stays current.")
        with gr.Row():
            camera = WebcamImage(label="Camera", sources=["webcam"], streaming=True, type="numpy",
                                 elem_id="webcam-input", height=360)
            camera.max_pixels = ctx.config.max_image_pixels
            live = gr.Image(label="Segmentation", interactive=False, format="jpeg", elem_id="webcam-output",
                            height=360)
        with gr.Row():
            size = gr.Slider(65, 513, value=257, step=8, label="Webcam test size")
            fps = gr.Markdown("– frames/s", elem_id="webcam-fps")
    clocks: OrderedDict[str, dict] = OrderedDict()  # per session: time of the last frame, smoothed rate

    def segment_frame(frame, weights, opacity, test_size, request: gr.Request):
        if frame is None:
            return None, "– frames/s"
        seg = model_for(ctx, weights, False, False, test_size)
        with user_errors("webcam frame"):
            over = seg.predict(frame).overlay(float(opacity if opacity is not None else 0.5))
        key = getattr(request, "session_hash", None) or "default"
        now = time.perf_counter()
        last = clocks.pop(key, None)
        rate = None
        if last is not None and now - last["t"] < 5:  # a pause restarts the count
            dt = max(now - last["t"], 1e-6)
            rate = 1.0 / dt if last["fps"] is None else 0.7 * last["fps"] + 0.3 / dt
        clocks[key] = {"t": now, "fps": rate}
        while len(clocks) > 256:
            clocks.popitem(last=False)
        return over, f"{rate:.1f} frames/s" if rate is not None else "– frames/s"

    camera.stream(segment_frame, [camera, ctx.weights, ctx.opacity, size], [live, fps],
                  stream_every=STREAM_EVERY, concurrency_limit=1, concurrency_id="webcam",
                  time_limit=STREAM_SECONDS, api_visibility="undocumented",
                  show_progress="hidden")
