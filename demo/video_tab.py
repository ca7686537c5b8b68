"""Video tab: upload a video → segmented H.264 MP4 (segcore.video), frame progress and a cancel button."""

from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr

from .common import UserError, readable, safe_stem, user_errors
from .panel import Context, model_for, refresh_status


class CancelFlags:
    """One cancel flag per browser session (or API client): the Cancel button sets it."""

    def __init__(self):
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(request: gr.Request | None) -> str:
        return getattr(request, "session_hash", None) or "default"

    def start(self, request) -> threading.Event:
        flag = threading.Event()
        with self._lock:
            self._flags[self.key(request)] = flag
        return flag

    def cancel(self, request) -> bool:
        with self._lock:
            flag = self._flags.get(self.key(request))
        if flag is None:
            return False
        flag.set()
        return True

    def done(self, request, flag) -> None:
        with self._lock:
            if self._flags.get(self.key(request)) is flag:
                del self._flags[self.key(request)]


def limits_text(cfg) -> str:
    parts = []
    if cfg.max_video_seconds:
        parts.append(f"{cfg.max_video_seconds} s")
    if cfg.max_video_frames:
        parts.append(f"{cfg.max_video_frames} frames")
    if cfg.max_video_pixels:
        parts.append(f"{cfg.max_video_pixels / 1e6:.1f} megapixels a frame")
    parts.append(f"{cfg.max_file_size} a file")
    return "Limits: " + ", ".join(parts) + "."


def build(ctx: Context) -> None:
    cfg = ctx.config
    flags = CancelFlags()
    with gr.Tab("Video", id="video"):
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="Video", sources=["upload"], include_audio=True, elem_id="video-input",
                                 height=320)
                with gr.Row():
                    stride = gr.Slider(1, 10, value=1, step=1, label="Frame stride",
                                       info="segment every n-th frame, reuse it in between")
                    smoothing = gr.Slider(0.0, 0.9, value=0.0, step=0.1, label="Temporal smoothing",
                                          info="blend each frame's class scores with the previous ones")
                with gr.Row():
                    run = gr.Button("Segment video", variant="primary", elem_id="segment-video")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel-video")
                gr.Markdown(limits_text(cfg), elem_classes="limits")
            with gr.Column():
                result = gr.Video(label="Segmented video (H.264 MP4)", interactive=False, elem_id="video-output",
                                  height=320)
                info = gr.Markdown(elem_id="video-info")

    @ctx.jobs.scoped
    def segment_video(video, weights, multiscale, crf, test_size, opacity, frame_stride, smooth,
                      request: gr.Request, progress=gr.Progress()):
        if not video:
            raise UserError("Upload a video first.")
        try:
            from segcore import video as segvideo
        except ImportError as exc:
            raise UserError(f"Video support is not available on this server ({exc}).") from exc
        seg = model_for(ctx, weights, multiscale, crf, test_size, progress)
        dst = ctx.work.new("video") / f"{safe_stem(video, 'video')}_segmented.mp4"
        flag = flags.start(request)

        def on_progress(done, total):
            progress((int(done), int(total) if total else None), desc="Segmenting frames", unit="frames")

        try:
            with user_errors(Path(video).name):
                try:
                    res = segvideo.segment_video(
                        seg, video, dst, opacity=float(opacity if opacity is not None else 0.5),
                        frame_stride=int(frame_stride or 1), smoothing=float(smooth or 0.0),
                        progress=on_progress, cancel=flag.is_set, max_seconds=cfg.max_video_seconds,
                        max_frames=cfg.max_video_frames, max_pixels=cfg.max_video_pixels)
                except segvideo.VideoCancelled as exc:
                    gr.Info("Video cancelled.")
                    return None, f"Cancelled: {readable(str(exc))}" if str(exc) else "Cancelled."
        finally:
            flags.done(request, flag)
        audio = "audio kept" if res.audio else "no audio"
        text = (f"{res.frames} frames, {res.width}×{res.height} at {res.fps:.3g} fps, {audio}. "
                f"Took {res.seconds:.1f} s ({res.model_seconds:.1f} s in the model).")
        return str(res.path), text

    def cancel(request: gr.Request):
        if flags.cancel(request):
            gr.Info("Cancelling after the current frames…")

    event = run.click(segment_video, [video, *ctx.model_inputs(), ctx.opacity, stride, smoothing], [result, info],
              api_name="segment_video", concurrency_id="long")
    refresh_status(ctx, event)
    stop.click(cancel, None, None, api_name="cancel_video", concurrency_limit=None, concurrency_id="cancel",
               queue=False)
