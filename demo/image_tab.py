"""Image tab: upload / paste / example → overlay and colour label map, legend, palette PNG mask."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

import segcore
from segcore.image import load_image
from segcore.prelabel import LabelmeWriter, dumps

from .common import EXAMPLES_DIR, UserError, legend_html, safe_stem, user_errors, write_png
from .panel import Context, model_for, refresh_status


def path_image(**kwargs) -> gr.Image:
    """A gr.Image that hands the uploaded file to segcore untouched.

    segcore's ``load_image`` then decodes it once, with the pixel cap, EXIF rotation and a readable
    message for corrupt or unsupported files (gr.Image would open it with Pillow first and fail with a
    bare error). The instance's ``preprocess`` is replaced rather than subclassing gr.Image, because
    Gradio writes a ``.pyi`` file beside every module that defines a component class.
    """
    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    base = image.preprocess

    def preprocess(payload):
        if payload is None:
            return None
        if payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)
        try:
            return base(payload)
        except gr.Error:
            raise
        except Exception as exc:
            raise UserError(f"{payload.orig_name or 'the image'}: not a readable image ({exc})") from exc

    image.preprocess = preprocess
    return image


def labelme_json(job: Path, name: str, pred, weights) -> Path:
    """The prediction as a labelme file whose imagePath is the uploaded image's name (put them side by side)."""
    writer = LabelmeWriter(pred.class_names, description=f"predicted by {weights}")
    path = job / f"{safe_stem(name)}.json"
    path.write_text(dumps(writer.document(pred.label_map, Path(name).name)), encoding="utf-8")
    return path


def examples() -> list[str]:
    return [str(p) for p in sorted(EXAMPLES_DIR.glob("*.jpg"))]


def build(ctx: Context) -> None:
    cfg = ctx.config
    with gr.Tab("Image", id="image"):
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                image = path_image(label="Image", sources=["upload", "clipboard"], elem_id="image-input",
                                   height=300)
                run = gr.Button("Segment", variant="primary", elem_id="segment-image")
                if examples():
                    gr.Examples(examples(), inputs=image, label="Examples")
            with gr.Column(scale=2):
                with gr.Row():
                    overlay = gr.Image(label="Overlay", format="png", interactive=False, elem_id="overlay",
                                       height=300)
                    colour = gr.Image(label="Label map", format="png", interactive=False, elem_id="label-map",
                                      height=300)
                with gr.Row():
                    legend = gr.HTML(label="Classes present", elem_id="legend")
                    with gr.Column():
                        mask = gr.File(label="Palette PNG mask (pixel value = class id)", elem_id="mask-file")
                        polygons = gr.File(label="labelme JSON (the regions as polygons, to correct in labelme)",
                                           elem_id="labelme-file")
        if cfg.max_image_pixels:
            gr.Markdown(f"Images up to {cfg.max_image_pixels / 1e6:g} megapixels.", elem_classes="limits")

    @ctx.jobs.scoped
    def segment_image(image, weights, multiscale, crf, test_size, opacity, progress=gr.Progress()):
        if not image:
            raise UserError("Upload, paste or pick an example image first.")
        seg = model_for(ctx, weights, multiscale, crf, test_size, progress)
        name = Path(image).name
        with user_errors():
            rgb = load_image(image, max_pixels=cfg.max_image_pixels, name=name)
            progress(0.5, desc="Segmenting")
            pred = seg.predict(rgb)
            over = pred.overlay(float(opacity if opacity is not None else 0.5))
        job = ctx.work.new("image")
        out = job / f"{safe_stem(name)}_mask.png"
        pred.save(out)
        json_path = labelme_json(job, name, pred, weights or ctx.store.default)
        legend_markup = legend_html(pred.class_fractions(), pred.class_names, pred.palette)
        # files written once in this job's own folder: Gradio would otherwise rewrite a shared cache file
        # (named by content) in place while another client may be downloading it
        return write_png(over, job / "overlay.png"), write_png(pred.colorize(), job / "label_map.png"), \
            legend_markup, str(out), str(json_path)

    event = run.click(segment_image, [image, *ctx.model_inputs(), ctx.opacity],
                      [overlay, colour, legend, mask, polygons],
              api_name="segment_image", concurrency_id="model")
    refresh_status(ctx, event)
