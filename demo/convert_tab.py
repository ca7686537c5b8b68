"""Convert tab: labelme folder or zip → VOC-style dataset zip and the conversion report."""

from __future__ import annotations

import json

from pathlib import Path

import gradio as gr

import annotations

from .common import UserError, as_paths, gather_uploads, readable, require, user_errors, zip_folder
from .isolation import run_isolated
from .jobs import current_job


def convert_uploads(paths: list[Path], job: Path, space, map_file, unknown, instances, budget, max_pixels,
                    progress=None):
    """The whole conversion (extract, rasterise, zip), run in a worker process: returns (report, zip or None).

    ``budget`` bounds what all the request's zips unpack to; ``max_pixels`` every image's size."""
    # a single zip goes in as it is: the report then names files relative to the zip
    source = paths[0] if len(paths) == 1 and paths[0].suffix.lower() == ".zip" \
        else gather_uploads(paths, job / "input", budget)
    out = job / "dataset"
    report = annotations.convert_folder(source, out, space, mapping=map_file, unknown=unknown, instances=instances,
                                        workers=1, progress=progress, budget=budget, max_pixels=max_pixels)
    return report, (zip_folder(out, job / "dataset.zip") if report.converted else None)


def build(ctx) -> None:
    with gr.Tab("Convert", id="convert"):
        gr.Markdown("Turn labelme polygons into a VOC-style dataset (JPEGImages, SegmentationClass palette PNGs, "
                    "visualisations, class_names.txt, ImageSets, report.json), ready for `train/` or evaluation.")
        with gr.Row():
            files = gr.File(label="labelme files (.json with their images) or a .zip", file_count="multiple",
                            elem_id="convert-files")
            with gr.Column():
                with gr.Row():
                    space = gr.Dropdown(["voc", "cocostuff"], value="voc", label="Label space")
                    unknown = gr.Radio(["error", "ignore"], value="error", label="Unknown labels",
                                       info="ignore: such shapes become 255 (ignore) with a warning")
                labels = gr.File(label="labels.txt (optional, overrides the label space)", file_types=[".txt"],
                                 height=120)
                mapping = gr.File(label="Name mapping (YAML / JSON, optional)", file_types=[".yaml", ".yml", ".json"],
                                  height=120)
                instances = gr.Checkbox(False, label="Also write instance maps (SegmentationObject)")
        run = gr.Button("Convert", variant="primary", elem_id="run-convert")
        with gr.Row():
            dataset = gr.File(label="Dataset (zip)", elem_id="convert-dataset")
            summary = gr.Textbox(label="Conversion report", lines=6, max_lines=30, elem_id="convert-summary")
        details = gr.JSON(label="report.json", open=False)

    # None defaults: the optional files are optional for API clients too (Gradio reads the signature)
    @ctx.jobs.scoped
    def convert(labelme_files, label_space="voc", unknown_labels="error", labels_file=None, mapping_file=None,
                instances=False, progress=gr.Progress()):
        require(as_paths(labelme_files), "Upload labelme files (.json with their images) or a .zip first.")
        job = ctx.work.new("convert")
        space = str(as_paths(labels_file)[0]) if as_paths(labels_file) else (label_space or "voc")
        map_file = str(as_paths(mapping_file)[0]) if as_paths(mapping_file) else None

        def on_progress(done, total):
            progress((done, total), desc="Converting", unit="files")

        limits = current_job()  # @ctx.jobs.scoped: the time limit kills the worker process
        with user_errors():
            report, archive = run_isolated(
                convert_uploads, as_paths(labelme_files), job, space, map_file, unknown_labels or "error",
                bool(instances), limits.budget, ctx.config.max_image_pixels, timeout=limits.seconds_left(),
                on_progress=on_progress, on_timeout=limits.timeout_error())
        text = readable(report.summary())
        warnings = [f"warning {w['file']}{' shape ' + str(w['shape']) if w.get('shape') is not None else ''}: "
                    f"{w['reason']}" for w in report.warnings]
        if warnings:
            text += "\n" + readable("\n".join(warnings[:200]))
            if len(warnings) > 200:
                text += f"\n... and {len(warnings) - 200} more warnings (see report.json)"
        if not report.converted:
            raise UserError("Nothing was converted.\n" + text, duration=None)
        return str(archive), text, json.loads(readable(json.dumps(report.to_dict())))

    run.click(convert, [files, space, unknown, labels, mapping, instances], [dataset, summary, details],
              api_name="convert", concurrency_id="convert")
