"""Pre-label tab: a zip of images → a zip of a labelme project (images + drafted polygons) to correct.

The zip is hostile ground: it is unpacked with ``annotations``' zip limits (no ``..``, links or bombs) and
caps on the unpacked bytes and the image count below, each image obeys the app's pixel cap, and the unpacked
copy is removed when the job ends, whether it succeeded or not.
"""

from __future__ import annotations

import shutil

import gradio as gr

from segcore.batch import MANIFEST, Inputs, predict_files
from segcore.prelabel import DEFAULT_MIN_AREA, DEFAULT_TOLERANCE

from .common import UserError, as_paths, readable, safe_stem, user_errors, zip_folder
from .panel import Context, model_for, refresh_status

MAX_IMAGES = 200
MAX_UNPACKED_BYTES = 1 << 30


def build(ctx: Context) -> None:
    with gr.Tab("Pre-label", id="prelabel"):
        gr.Markdown("Draft labelme annotations with the model: upload a .zip of images, get back a labelme project "
                    "(each image with a `.json` of polygons, one per predicted region) to open in labelme, "
                    "correct, and convert or evaluate. The round trip says how much of each prediction the "
                    "polygons reproduce.")
        with gr.Row():
            with gr.Column():
                archive = gr.File(label="Images (.zip)", file_types=[".zip"], elem_id="prelabel-zip")
                with gr.Row():
                    tolerance = gr.Number(DEFAULT_TOLERANCE, label="Simplification tolerance (px)", minimum=0,
                                          maximum=20)
                    min_area = gr.Number(DEFAULT_MIN_AREA, label="Smallest region (px)", minimum=0, precision=0)
                run = gr.Button("Pre-label", variant="primary", elem_id="run-prelabel")
                gr.Markdown(f"Up to {MAX_IMAGES} images and {MAX_UNPACKED_BYTES >> 20} MB unpacked per zip.",
                            elem_classes="limits")
            with gr.Column():
                project = gr.File(label="labelme project (zip)", elem_id="prelabel-project")
                summary = gr.Textbox(label="Summary", lines=3, elem_id="prelabel-summary")
                table = gr.Dataframe(headers=["image", "round trip (% of pixels)"], label="Per image",
                                     elem_id="prelabel-table", interactive=False)

    @ctx.jobs.scoped
    def prelabel(zip_file, weights=None, multiscale=False, crf=False, test_size=513, tolerance=DEFAULT_TOLERANCE,
                 min_area=DEFAULT_MIN_AREA, progress=gr.Progress()):
        paths = as_paths(zip_file)
        if not paths or paths[0].suffix.lower() != ".zip":
            raise UserError("Upload a .zip of images first.")
        seg = model_for(ctx, weights, multiscale, crf, test_size, progress)
        job = ctx.work.new("prelabel")
        name = f"{safe_stem(paths[0])}_labelme"
        out = job / name
        try:
            with user_errors(paths[0].name), Inputs([paths[0]], max_zip_bytes=MAX_UNPACKED_BYTES,
                                                    max_zip_files=4 * MAX_IMAGES, workdir=job) as found:
                if not found.images and found.failed:  # e.g. a zip refused as unsafe: say why
                    raise UserError(readable("; ".join(f"{k}: {v}" for k, v in found.failed.items())))
                _check_count(len(found.images))
                progress((0, len(found.images)), desc="Pre-labelling", unit="images")
                result = predict_files(
                    seg, found, out, ("labelme",), progress=False, decode_workers=1,
                    on_image=lambda done, total: progress((done, total), desc="Pre-labelling", unit="images"),
                    tolerance=float(tolerance if tolerance is not None else DEFAULT_TOLERANCE),
                    min_area=int(min_area if min_area is not None else DEFAULT_MIN_AREA))
            if not result.done:
                raise UserError("No image could be read:\n" + readable(_failures(result)), duration=None)
            (out / MANIFEST).unlink(missing_ok=True)
            archive_path = zip_folder(out, job / f"{name}.zip")
        except BaseException:
            shutil.rmtree(job, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(out, ignore_errors=True)
        figures = result.round_trip
        text = (f"{len(result.done)} of {len(result.done) + len(result.failed)} images pre-labelled; "
                f"round trip: mean {100 * sum(figures.values()) / len(figures):.2f}%, lowest "
                f"{100 * min(figures.values()):.2f}% of pixels")
        if result.failed:
            text += "\n" + readable(_failures(result))
        rows = [[image, round(100 * figure, 2)] for image, figure in sorted(figures.items())]
        return str(archive_path), text, rows

    # a queue of its own, one job at a time: a long batch never holds up single-image requests
    event = run.click(prelabel, [archive, *ctx.model_inputs(), tolerance, min_area], [project, summary, table],
                      api_name="prelabel", concurrency_id="prelabel", concurrency_limit=1)
    refresh_status(ctx, event)


def _check_count(count: int) -> None:
    """Refuse an empty zip, or one above :data:`MAX_IMAGES`, before any model work."""
    if count == 0:
        raise UserError("The zip holds no images (.jpg, .png, .bmp, .tif, .webp).")
    if count > MAX_IMAGES:
        raise UserError(f"The zip holds {count} images; this app pre-labels up to {MAX_IMAGES} at a time.")


def _failures(result) -> str:
    return "\n".join(f"{name}: {message}" for name, message in sorted(result.failed.items()))
