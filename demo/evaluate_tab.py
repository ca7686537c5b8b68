"""Evaluate tab: a model on labelme annotations, or stored prediction masks against ground truth."""

from __future__ import annotations

import math

import gradio as gr
import pandas as pd

import annotations
import segcore

from .common import as_paths, gather_uploads, pct, readable, require, user_errors, zip_folder
from .panel import Context, model_for, refresh_status

MODEL_MODE = "Model on labelme annotations"
MASKS_MODE = "Prediction masks vs ground truth (no model)"
SPACE_CHOICES = ["model", "voc", "cocostuff"]
SCORE_ROWS = (("pixel_accuracy", "Pixel accuracy (PA)"), ("mean_accuracy", "Mean accuracy (MA)"),
              ("mean_iou", "Mean IoU (mIoU)"), ("fw_iou", "Frequency-weighted IoU (FWIoU)"))


def resolve_space(choice: str | None, labels_file, seg: segcore.Segmenter | None):
    """The label space annotations are converted against: a labels file, voc/cocostuff, or the model's."""
    labels = as_paths(labels_file)
    if labels:
        return annotations.LabelSpace.from_file(labels[0])
    if choice and choice != "model":
        return annotations.get_label_space(choice)
    if seg is None:
        return annotations.get_label_space("voc")
    return annotations.label_space_for_names(seg.class_names, palette=seg.palette, name=seg.name or "model")


def scores_table(result: segcore.EvaluationResult) -> pd.DataFrame:
    rows = [[label, pct(result.scores[key])] for key, label in SCORE_ROWS]
    return pd.DataFrame(rows, columns=["score", "%"])


def per_image_table(result: segcore.EvaluationResult) -> pd.DataFrame:
    def key(row):
        v = row["mean_iou"]
        return (1, 0.0) if v is None or (isinstance(v, float) and math.isnan(v)) else (0, v)

    rows = [[r["image"], pct(r["mean_iou"]), pct(r["pixel_accuracy"]), int(r["valid_pixels"])]
            for r in sorted(result.per_image, key=key)]
    return pd.DataFrame(rows, columns=["image", "mIoU %", "pixel accuracy %", "labelled pixels"])


def issues_text(failures: list[dict], warnings: list[dict]) -> str:
    lines = []
    for f in failures:
        reason = readable(f["reason"])
        lines.append(f"FAILED {reason}" if reason.startswith(readable(f["file"])) else
                     f"FAILED {readable(f['file'])}: {reason}")
    for w in warnings:
        where = f" shape {w['shape']}" if w.get("shape") is not None else ""
        lines.append(f"warning {w['file']}{where}: {readable(w['reason'])}")
    return "\n".join(lines) or "No failures and no conversion warnings."


def build(ctx: Context) -> None:
    with gr.Tab("Evaluate", id="evaluate"):
        mode = gr.Radio([MODEL_MODE, MASKS_MODE], value=MODEL_MODE, label="What to evaluate", elem_id="eval-mode")
        with gr.Row():
            files = gr.File(label="labelme files (.json with their images) or a .zip", file_count="multiple",
                            elem_id="eval-files")
            predictions = gr.File(label="Predicted masks (PNG, same file names) or a .zip", file_count="multiple",
                                  visible=False, elem_id="eval-predictions")
            with gr.Column():
                mapping = gr.File(label="Name mapping (YAML / JSON, optional)", file_types=[".yaml", ".yml", ".json"],
                                  height=120)
                with gr.Row():
                    space = gr.Dropdown(SPACE_CHOICES, value="model", label="Label space",
                                        info="model: the selected weights' classes")
                    unknown = gr.Radio(["error", "ignore"], value="error", label="Unknown labels")
                labels = gr.File(label="labels.txt (optional, overrides the label space)", file_types=[".txt"],
                                 height=120)
        run = gr.Button("Evaluate", variant="primary", elem_id="run-evaluate")
        summary = gr.Markdown(elem_id="eval-summary")
        with gr.Row():
            scores = gr.Dataframe(label="Scores", interactive=False, elem_id="eval-scores")
            report = gr.File(label="Full report (zip: scores.json, CSVs, report.html, worst images)",
                             elem_id="eval-report")
        with gr.Row():
            bars = gr.Plot(label="Per-class IoU", show_label=False, elem_id="eval-bars")
            confusion = gr.Plot(label="Confusion matrix", show_label=False, elem_id="eval-confusion")
        per_image = gr.Dataframe(label="Per image, worst first", interactive=False, elem_id="eval-per-image",
                                 max_height=320)
        gallery = gr.Gallery(label="Worst images: image | ground truth | prediction", columns=2, height=320,
                             object_fit="contain", format="png",
                             elem_id="eval-worst")
        issues = gr.Textbox(label="Failures and conversion warnings", lines=4, max_lines=20, elem_id="eval-issues")

    def switch(m):
        masks = m == MASKS_MODE
        return (gr.File(label="Ground-truth masks (PNG, 255 = ignore) or a .zip" if masks else
                        "labelme files (.json with their images) or a .zip"),
                gr.File(visible=masks), gr.File(visible=not masks))

    mode.change(switch, mode, [files, predictions, mapping], api_visibility="private", queue=False)

    @ctx.jobs.scoped
    def evaluate(mode_name, annotation_files, prediction_files, mapping_file, label_space, labels_file,
                 unknown_labels, weights, multiscale, crf, test_size, progress=gr.Progress(track_tqdm=True)):
        masks = mode_name == MASKS_MODE
        require(as_paths(annotation_files), "Upload ground-truth masks first." if masks else
                "Upload labelme files (.json with their images) or a .zip first.")
        job = ctx.work.new("evaluate")
        seg = None
        with user_errors():
            if masks:
                require(as_paths(prediction_files), "Upload the predicted masks too (PNG files or a .zip).")
                gt = gather_uploads(annotation_files, job / "ground_truth")
                pred = gather_uploads(prediction_files, job / "predictions")
                space = resolve_space(label_space if label_space != "model" else "voc", labels_file, None)
                dataset = segcore.open_dataset(gt, "masks", predictions=pred, label_space=space)
            else:
                seg = model_for(ctx, weights, multiscale, crf, test_size, progress)
                space = resolve_space(label_space, labels_file, seg)
                paths = as_paths(annotation_files)
                # a single zip is read as it is, like `python -m segcore evaluate data.zip` (same image ids)
                source = paths[0] if len(paths) == 1 and paths[0].suffix.lower() == ".zip" \
                    else gather_uploads(paths, job / "annotations")
                map_file = str(as_paths(mapping_file)[0]) if as_paths(mapping_file) else None
                dataset = segcore.open_dataset(source, "labelme", label_space=space, mapping=map_file,
                                               unknown=unknown_labels or "error")
                ctx.jobs.screen(dataset)  # a file that holds the interpreter is stopped in a separate process
            progress(0.0, desc="Evaluating")
            out = job / "report"
            result = segcore.evaluate(seg, dataset, out_dir=out, progress=True, distributed=False,
                                      palette=space.palette)
            warnings = [{**w, "file": readable(w["file"])} for w in result.warnings]
            archive = zip_folder(out, job / "evaluation_report.zip")
            palette = space.palette
            bar_fig = segcore.class_iou_figure(result.scores, result.class_names, palette)
            conf_fig = segcore.confusion_figure(result.scores, result.class_names)
        what = f"`{seg.name}` ({'multi-scale' if seg.scales else 'single scale'}{', CRF' if seg.crf else ''}, " \
               f"test size {seg.test_size})" if seg is not None else "stored predictions"
        text = f"**{len(result.per_image)} of {result.images} images evaluated** with {what}"
        if result.failures:
            text += f"; **{len(result.failures)} failed** (see below)"
        gallery_items = [(w["thumbnail"], f"{w['image']}: mIoU {pct(w['mean_iou'])}%") for w in result.worst]
        return (text + ".", scores_table(result), str(archive), bar_fig, conf_fig, per_image_table(result),
                gallery_items, issues_text(result.failures, warnings))

    event = run.click(evaluate, [mode, files, predictions, mapping, space, labels, unknown, *ctx.model_inputs()],
              [summary, scores, report, bars, confusion, per_image, gallery, issues], api_name="evaluate",
              concurrency_id="long")
    refresh_status(ctx, event)
