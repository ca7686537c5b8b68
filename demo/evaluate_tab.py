"""Evaluate tab: a model on labelme annotations, or stored prediction masks against ground truth."""

from __future__ import annotations

import math

import gradio as gr
import pandas as pd

import segcore
from segcore import evaluation_advice
from segcore.datasets import annotation_label_space
from segcore.evaluation import EvaluationResult, failure_text
from segcore.protocol import PROTOCOLS, default_protocol
from segcore.report import class_iou_figure, confusion_figure

from .common import as_paths, gather_uploads, pct, readable, request_budget, require, user_errors, zip_folder
from .panel import Context, model_for, refresh_status

MODEL_MODE = "Model on labelme annotations"
MASKS_MODE = "Prediction masks vs ground truth (no model)"
SPACE_CHOICES = ["model", "voc", "cocostuff"]
PROTOCOL_INFO = ("resize: long side to the test size (bounded work; for photos). reference: deeplab-pytorch's "
                 "test loop, every image at its native size (the published scores' protocol; slow on large photos)")
SCORE_ROWS = (("pixel_accuracy", "Pixel accuracy (PA)"), ("mean_accuracy", "Mean accuracy (MA)"),
              ("mean_iou", "Mean IoU (mIoU)"), ("fw_iou", "Frequency-weighted IoU (FWIoU)"))
SCORE_COLUMNS = ["score", "%"]
PER_IMAGE_COLUMNS = ["image", "mIoU %", "pixel accuracy %", "labelled pixels"]


def empty_table(columns: list[str]) -> pd.DataFrame:
    """What a table shows before a run: its column names, no rows (not Gradio's 1, 2, 3 placeholder)."""
    return pd.DataFrame(columns=columns)


def resolve_space(choice: str | None, labels_file, seg: segcore.Segmenter | None):
    """The label space annotations are converted against: a labels file, voc/cocostuff, or the model's
    (segcore's rule, :func:`segcore.datasets.annotation_label_space`)."""
    labels = as_paths(labels_file)
    chosen = labels[0] if labels else (choice if choice and choice != "model" else None)
    return annotation_label_space(chosen, seg)


def scores_table(result: EvaluationResult) -> pd.DataFrame:
    rows = [[label, pct(result.scores[key])] for key, label in SCORE_ROWS]
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def per_image_table(result: EvaluationResult) -> pd.DataFrame:
    def key(row):
        v = row["mean_iou"]
        return (1, 0.0) if v is None or (isinstance(v, float) and math.isnan(v)) else (0, v)

    rows = [[r["image"], pct(r["mean_iou"]), pct(r["pixel_accuracy"]), int(r["valid_pixels"])]
            for r in sorted(result.per_image, key=key)]
    return pd.DataFrame(rows, columns=PER_IMAGE_COLUMNS)


def issues_text(failures: list[dict], warnings: list[dict]) -> str:
    lines = [f"FAILED {readable(failure_text(f))}" for f in failures]
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
                protocol = gr.Radio(list(PROTOCOLS), value=default_protocol("labelme"),
                                    label="Protocol", info=PROTOCOL_INFO, elem_id="eval-protocol")
                labels = gr.File(label="labels.txt (optional, overrides the label space)", file_types=[".txt"],
                                 height=120)
        run = gr.Button("Evaluate", variant="primary", elem_id="run-evaluate")
        summary = gr.Markdown(elem_id="eval-summary")
        with gr.Row():
            scores = gr.Dataframe(empty_table(SCORE_COLUMNS), label="Scores", interactive=False,
                                  elem_id="eval-scores")
            report = gr.File(label="Full report (zip: scores.json, CSVs, report.html, worst images)",
                             elem_id="eval-report")
        with gr.Row():
            bars = gr.Plot(label="Per-class IoU", show_label=False, elem_id="eval-bars")
            confusion = gr.Plot(label="Confusion matrix", show_label=False, elem_id="eval-confusion")
        per_image = gr.Dataframe(empty_table(PER_IMAGE_COLUMNS), label="Per image, worst first", interactive=False,
                                 elem_id="eval-per-image",
                                 max_height=320)
        gallery = gr.Gallery(label="Worst images: image | ground truth | prediction", columns=2, height=320,
                             object_fit="contain", format="png",
                             elem_id="eval-worst")
        issues = gr.Textbox(label="Failures and conversion warnings", lines=4, max_lines=20, elem_id="eval-issues")

        with gr.Accordion("Compare models on these annotations", open=False, elem_id="compare-section"):
            gr.Markdown("Every selected model runs on the same labelme annotations with the options above "
                        "(model panel and protocol); differences are against the first model, with a 95% paired "
                        "bootstrap interval over images. A COCO-Stuff model is mapped to VOC classes "
                        "automatically (cocostuff->voc).")
            with gr.Row():
                compare_models = gr.Dropdown(ctx.store.choices(), value=[], multiselect=True, allow_custom_value=True,
                                             label="Models (two or more: published weights or uploaded checkpoints)",
                                             elem_id="compare-models", scale=3)
                run_compare = gr.Button("Compare", variant="primary", elem_id="run-compare", scale=1)
            compare_summary = gr.Markdown(elem_id="compare-summary")
            with gr.Row():
                compare_table = gr.Dataframe(label="Scores (%)", interactive=False, elem_id="compare-table")
                compare_report = gr.File(label="Comparison report (zip: comparison.json, per_image.csv, "
                                               "comparison.html)", elem_id="compare-report")
            with gr.Row():
                compare_bars = gr.Plot(label="Per-class IoU by model", show_label=False, elem_id="compare-bars")
                compare_scatter = gr.Plot(label="Per-image mIoU", show_label=False, elem_id="compare-scatter")
            compare_gallery = gr.Gallery(label="Where the models disagree most: image | ground truth | A | B",
                                         columns=2, height=320, object_fit="contain", format="png",
                                         elem_id="compare-gallery")

    def switch(m):
        masks = m == MASKS_MODE
        return (gr.File(label="Ground-truth masks (PNG, 255 = ignore) or a .zip" if masks else
                        "labelme files (.json with their images) or a .zip"),
                gr.File(visible=masks), gr.File(visible=not masks))

    mode.change(switch, mode, [files, predictions, mapping], api_visibility="private", queue=False)
    compare_models.focus(lambda: gr.Dropdown(choices=ctx.store.choices(ctx.owners.owner())), None, compare_models,
                         api_visibility="private", queue=False)

    def open_annotations(annotation_files, mapping_file, unknown_labels, space, job):
        """The uploaded labelme files as a dataset, read once in a killable process first (see Jobs.screen)."""
        paths = as_paths(annotation_files)
        # a single zip is read as it is, like `python -m segcore evaluate data.zip` (same image ids)
        source = paths[0] if len(paths) == 1 and paths[0].suffix.lower() == ".zip" \
            else gather_uploads(paths, job / "annotations")
        map_file = str(as_paths(mapping_file)[0]) if as_paths(mapping_file) else None
        dataset = segcore.open_dataset(source, "labelme", label_space=space, mapping=map_file,
                                       unknown=unknown_labels or "error", budget=request_budget(),
                                       max_pixels=ctx.config.max_image_pixels)
        ctx.jobs.screen(dataset)  # a file that holds the interpreter is stopped in a separate process
        return dataset

    # None defaults make the optional inputs optional for API clients (Gradio reads the signature); the
    # others default to their component's value there
    @ctx.jobs.scoped
    def evaluate(mode_name, annotation_files, prediction_files=None, mapping_file=None, label_space="model",
                 labels_file=None, unknown_labels="error", weights=None, multiscale=False, crf=False, test_size=513,
                 protocol_name=None, progress=gr.Progress(track_tqdm=True)):
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
                dataset = segcore.open_dataset(gt, "masks", predictions=pred, label_space=space,
                                               max_pixels=ctx.config.max_image_pixels)
            else:
                seg = model_for(ctx, weights, multiscale, crf, test_size, progress)
                space = resolve_space(label_space, labels_file, seg)
                dataset = open_annotations(annotation_files, mapping_file, unknown_labels, space, job)
            progress(0.0, desc="Evaluating")
            out = job / "report"
            result = segcore.evaluate(seg, dataset, protocol=protocol_name or None, out_dir=out, progress=True,
                                      distributed=False, palette=space.palette)
            evaluation_advice.raise_if_nothing_evaluated(result, evaluation_advice.APP)
            warnings = [{**w, "file": readable(w["file"])} for w in result.warnings]
            archive = zip_folder(out, job / "evaluation_report.zip")
            palette = space.palette
            bar_fig = class_iou_figure(result.scores, result.class_names, palette)
            conf_fig = confusion_figure(result.scores, result.class_names)
        what = f"`{seg.name}` ({result.options['protocol']['name']} protocol, images " \
               f"{result.options['protocol']['image_size']}, {'multi-scale' if seg.scales else 'single scale'}" \
               f"{', CRF' if seg.crf else ''}, {seg.precision})" if seg is not None else "stored predictions"
        text = f"**{len(result.per_image)} of {result.images} images evaluated** with {what}"
        if result.failures:
            text += f"; **{len(result.failures)} failed** (see below)"
        gallery_items = [(w["thumbnail"], f"{w['image']}: mIoU {pct(w['mean_iou'])}%") for w in result.worst]
        return (text + ".", scores_table(result), str(archive), bar_fig, conf_fig, per_image_table(result),
                gallery_items, issues_text(result.failures, warnings))

    event = run.click(evaluate, [mode, files, predictions, mapping, space, labels, unknown, *ctx.model_inputs(),
                                 protocol],
              [summary, scores, report, bars, confusion, per_image, gallery, issues], api_name="evaluate",
              concurrency_id="long")
    refresh_status(ctx, event)

    @ctx.jobs.scoped
    def compare(annotation_files, mapping_file=None, label_space="model", labels_file=None, unknown_labels="error",
                models=None, multiscale=False, crf=False, test_size=513, protocol_name=None,
                progress=gr.Progress(track_tqdm=True)):
        from segcore.comparison import SHORT, compare as compare_models_on, comparison_figures

        require(as_paths(annotation_files), "Upload labelme files (.json with their images) or a .zip first.")
        models = [m for m in (models or []) if m]
        require(len(models) >= 2, "Choose two or more models to compare.")
        job = ctx.work.new("compare")
        with user_errors():
            segs = [model_for(ctx, name, multiscale, crf, test_size, progress) for name in models]
            space = resolve_space(label_space, labels_file, segs[0])
            dataset = open_annotations(annotation_files, mapping_file, unknown_labels, space, job)
            progress(0.0, desc="Comparing")
            out = job / "comparison"
            result = compare_models_on(segs, dataset, labels=models, protocol=protocol_name or None, out_dir=out,
                                       progress=True, distributed=False)
            archive = zip_folder(out, job / "comparison_report.zip")
            bars_fig, scatter_fig = comparison_figures(result)
        table = pd.DataFrame([[label, *(pct(r.scores[key]) for key, _ in SHORT)]
                              for label, r in zip(result.labels, result.results)],
                             columns=["model", *(short for _, short in SHORT)])
        lines = [f"**{len(result.results[0].per_image)} of {result.results[0].images} images compared.**"]
        for d in result.differences:
            ci = d["ci95"]
            lines.append(f"mIoU `{d['b']}` − `{d['a']}`: **{100 * d['mean_iou']:+.2f}** points"
                         + (f" (95% interval {pct(ci[0])} … {pct(ci[1])})" if ci else " (no interval)"))
        strips = [(st["strip"], f"{st['image']}: {result.labels[0]} {pct(st['mean_iou_a'])}%, "
                                f"{result.labels[1]} {pct(st['mean_iou_b'])}%") for st in result.strips]
        return "\n\n".join(lines), table, str(archive), bars_fig, scatter_fig, strips

    compare_event = run_compare.click(
        compare, [files, mapping, space, labels, unknown, compare_models, ctx.multiscale, ctx.crf, ctx.test_size,
                  protocol],
        [compare_summary, compare_table, compare_report, compare_bars, compare_scatter, compare_gallery],
        api_name="compare", concurrency_id="long")
    refresh_status(ctx, compare_event)
