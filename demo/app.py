"""The Blocks app: model panel on top, one tab per task; queue and upload limits."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from . import convert_tab, evaluate_tab, image_tab, prelabel_tab, video_tab, webcam_tab
from .common import EXAMPLES_DIR, AppConfig
from .isolation import warm_up
from .jobs import Jobs, JobDirs, TempSpace
from .memory import tune_malloc
from .models import ModelStore
from .panel import Context, build_panel, remember_uploads

TITLE = "DeepLab-v2 semantic segmentation"

CSS = """
.limits { opacity: 0.75; font-size: 0.9em; }
.segcore-legend td, .segcore-legend th { padding: 2px 8px; }
/* worst-images strips are wide: tiles take the strip's shape instead of a square that crops it */
#eval-worst .thumbnail-item { aspect-ratio: auto; height: auto; }
#eval-worst .thumbnail-item img { height: auto; }
"""

INTRO = (f"# {TITLE}\n"
         "Segment photos, videos and your webcam with DeepLab-v2 ResNet-101, measure a model on your own "
         "labelme annotations, and convert labelme files to a VOC-style dataset. Every tab is also an API "
         "endpoint (see *Use via API* at the bottom).")


def build_app(config: AppConfig | None = None) -> gr.Blocks:
    """The app, queued (``default_concurrency_limit`` 1 on the CPU, 2 on a GPU; ``max_size`` on the queue).

    Each kind of work has its own concurrency group, so a long job never holds up a quick one: "model"
    (images, checkpoint uploads), "long" (videos, evaluations), "convert" (in a worker process), "webcam".

    Nothing is loaded here: weights load on first use, so the app starts in seconds even offline.
    """
    cfg = config or AppConfig.from_env()
    store = ModelStore(cfg.weights, upload_dir=cfg.work_dir / "checkpoints", max_loaded=cfg.max_loaded_models,
                       precision=cfg.precision,
                       max_pixels=cfg.max_image_pixels, device=cfg.device, shared_uploads=cfg.shared_uploads)
    work = JobDirs(cfg.work_dir, cfg.keep_seconds)
    # the app's folder, Gradio's uploads and results, and segcore's extractions of zipped labelme datasets
    space = TempSpace([cfg.work_dir, get_upload_folder(), Path(tempfile.gettempdir()) / "segcore-labelme-*"],
                      cfg.max_temp_bytes)
    ctx = Context(cfg, store, work, jobs=Jobs(work, space, cfg.time_limit,
                                                   (cfg.max_unpacked_bytes, cfg.max_unpacked_files)))
    with gr.Blocks(title=TITLE, delete_cache=(600, cfg.keep_seconds)) as demo:
        gr.Markdown(INTRO)
        build_panel(ctx)
        with gr.Tabs():
            image_tab.build(ctx)
            prelabel_tab.build(ctx)
            video_tab.build(ctx)
            webcam_tab.build(ctx)
            evaluate_tab.build(ctx)
            convert_tab.build(ctx)
        remember_uploads(ctx, demo)
    demo.queue(max_size=cfg.queue_size, default_concurrency_limit=cfg.job_concurrency())
    demo.segcore = ctx
    return demo


def bound_image_decoding(max_pixels: int | None) -> None:
    """Make Pillow refuse, from the header and before decoding, any image over the app's pixel cap.

    Gradio decodes some inputs itself before a callback sees them (webcam frames, image uploads); Pillow
    raises DecompressionBombError above twice its MAX_IMAGE_PIXELS, so half the cap refuses them there.
    The app's own readers check the cap from the header as well and say so in their own words."""
    import warnings

    from PIL import Image

    if max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels // 2
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def launch(demo: gr.Blocks, *, server_name: str | None = None, server_port: int | None = None, **kwargs):
    """``demo.launch`` with the app's upload cap, allowed folders and theme."""
    cfg: AppConfig = demo.segcore.config
    tune_malloc()
    bound_image_decoding(cfg.max_image_pixels)
    return_at_once = kwargs.pop("prevent_thread_lock", False)
    result = demo.launch(server_name=server_name, server_port=server_port, max_file_size=cfg.max_file_size,
                         allowed_paths=[str(cfg.work_dir), str(EXAMPLES_DIR)], theme=gr.themes.Soft(), css=CSS,
                         footer_links=["api", "gradio", "settings"], prevent_thread_lock=True, **kwargs)
    # the process that runs conversions starts once the server is up (not during Gradio's start-up checks)
    warm_up()
    if not return_at_once:
        demo.block_thread()
    return result
