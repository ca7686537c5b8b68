"""Several models on the same annotations: one pass over the images (each decoded once), the same
protocol and options, then paired differences against the first model with bootstrap intervals.

Writes ``comparison.json`` (``models``: weights and the scores.json keys of each; ``differences``:
each model against the first, ``mean_iou`` = b - a with a paired 95% interval over images, per-class
IoU differences), ``per_image.csv`` (one mIoU column per model) and a self-contained
``comparison.html``. See docs/evaluation.md.
"""

from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bootstrap import ImageMatrices, paired_bootstrap
from .evaluation import EvaluationError, EvaluationResult, evaluate_models, thumbnail_strip
from .metrics import to_json_dict
from .pred_map import prediction_map
from .protocol import predict_sample

__all__ = ["ComparisonResult", "compare", "format_comparison_table"]

DISAGREEMENT_COUNT = 6
SHORT = (("pixel_accuracy", "PA"), ("mean_accuracy", "MA"), ("mean_iou", "mIoU"), ("fw_iou", "FWIoU"))


@dataclass
class ComparisonResult:
    labels: list[str]
    results: list[EvaluationResult]
    differences: list[dict]
    report: dict[str, Path] = field(default_factory=dict)
    strips: list[dict] = field(default_factory=list)
    """Images where models 1 and 2 disagree most: ``image``, both mIoUs, ``strip`` (uint8 RGB)."""

    @property
    def exit_code(self) -> int:
        return 0 if all(r.ok for r in self.results) else 1

    def document(self) -> dict:
        models = []
        for label, r in zip(self.labels, self.results):
            scores = {k: v for k, v in r.scores.items() if k != "confusion_matrix"}
            scores["class_iou_by_name"] = dict(zip(r.class_names, r.scores["class_iou"]))
            scores["class_names"] = list(r.class_names)
            if r.bootstrap is not None:
                scores["bootstrap"] = r.bootstrap
            models.append({"weights": label, "options": r.options, "evaluated": len(r.per_image),
                           "failed": len(r.failures), "scores": scores})
        return to_json_dict({"models": models, "differences": self.differences})


def _paired(a: EvaluationResult, b: EvaluationResult) -> tuple[ImageMatrices, ImageMatrices, list[int]]:
    """The images both models evaluated, as two aligned ImageMatrices."""
    pos_a = {idx: k for k, idx in enumerate(a.image_indices)}
    pos_b = {idx: k for k, idx in enumerate(b.image_indices)}
    common = [idx for idx in a.image_indices if idx in pos_b]
    ma = ImageMatrices(a.image_matrices.n_classes, [a.image_matrices.cells[pos_a[i]] for i in common])
    mb = ImageMatrices(b.image_matrices.n_classes, [b.image_matrices.cells[pos_b[i]] for i in common])
    return ma, mb, common


def _difference(label_a, a: EvaluationResult, label_b, b: EvaluationResult, seed: int) -> dict:
    ma, mb, common = _paired(a, b)
    boot = paired_bootstrap(ma, mb, seed=seed)
    per_class = {name: (None if math.isnan(ib) or math.isnan(ia) else ib - ia)
                 for name, ia, ib in zip(a.class_names, a.scores["class_iou"], b.scores["class_iou"])}
    ci = boot["ci95"] or {}
    return {"a": label_a, "b": label_b, "images": len(common),
            "mean_iou": b.scores["mean_iou"] - a.scores["mean_iou"], "ci95": ci.get("mean_iou"),
            "pixel_accuracy": b.scores["pixel_accuracy"] - a.scores["pixel_accuracy"],
            "pixel_accuracy_ci95": ci.get("pixel_accuracy"),
            "fw_iou": b.scores["fw_iou"] - a.scores["fw_iou"], "fw_iou_ci95": ci.get("fw_iou"),
            "bootstrap": {k: v for k, v in boot.items() if k != "ci95"}, "class_iou": per_class}


def compare(segmenters, dataset, *, labels=None, protocol=None, pred_maps=None, out_dir=None,
            progress: bool = True, options: dict | None = None, distributed: bool = True, seed: int = 0,
            disagreements: int = DISAGREEMENT_COUNT) -> ComparisonResult:
    """Score every model on ``dataset`` in one pass and compare each with the first (see module doc)."""
    from .distributed import rank_and_world

    segmenters = list(segmenters)
    if len(segmenters) < 2:
        raise EvaluationError("compare needs at least two models")
    labels = list(labels) if labels is not None else [s.name or f"model {k}" for k, s in enumerate(segmenters, 1)]
    results = evaluate_models(segmenters, dataset, protocol=protocol, progress=progress, options=options, worst=0,
                              distributed=distributed, pred_maps=pred_maps)
    comparison = ComparisonResult(labels, results, [])
    if rank_and_world()[0] != 0:
        return comparison
    comparison.differences = [_difference(labels[0], results[0], labels[k], results[k], seed)
                              for k in range(1, len(results))]
    if out_dir is not None:
        comparison.report = write_comparison(comparison, out_dir, segmenters, dataset, protocol, disagreements)
    return comparison


# ----------------------------------------------------------------------------- text


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def format_comparison_table(comparison: ComparisonResult) -> str:
    """Rows: models; columns: PA, MA, mIoU, FWIoU in percent (the study's layout); then the differences."""
    width = max(len(label) for label in comparison.labels) + 2
    lines = [f"{'model':<{width}}" + "".join(f"{short:>9}" for _, short in SHORT)]
    for label, r in zip(comparison.labels, comparison.results):
        lines.append(f"{label:<{width}}" + "".join(f"{_pct(r.scores[key]):>9}" for key, _ in SHORT))
    for d in comparison.differences:
        ci = d["ci95"]
        interval = f"95% interval {_pct(ci[0])}..{_pct(ci[1])}" if ci else "no interval"
        lines.append(f"mIoU {d['b']} - {d['a']}: {100 * d['mean_iou']:+.2f} points ({interval}, paired bootstrap "
                     f"over {d['images']} images)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files


def _disagreement_strips(comparison, segmenters, dataset, protocol, k: int) -> list[dict]:
    """Image | ground truth | A | B strips of the ``k`` images where A and B differ most in mIoU.

    Only these few images are read a second time (the predictions of the main pass are not kept)."""
    from .protocol import Protocol, protocol_for

    a, b = comparison.results[0], comparison.results[1]
    miou_b = {idx: row["mean_iou"] for idx, row in zip(b.image_indices, b.per_image)}
    gaps = [(abs(miou_b[idx] - row["mean_iou"]), idx, row["image"], row["mean_iou"], miou_b[idx])
            for idx, row in zip(a.image_indices, a.per_image)
            if idx in miou_b and not math.isnan(row["mean_iou"]) and not math.isnan(miou_b[idx])]
    gaps.sort(key=lambda g: (-g[0], g[1]))
    if not isinstance(protocol, Protocol):
        protocol = protocol_for(protocol, getattr(dataset, "format", None))
    strips = []
    for _, idx, name, ma, mb in gaps[:k]:
        sample = dataset[idx]
        pairs = []
        for seg, result in zip(segmenters[:2], (a, b)):
            pred, label = predict_sample(seg, sample, protocol, dataset.source(idx))
            if result.options.get("pred_map"):
                pred, label = prediction_map(seg.class_names, result.class_names, result.options["pred_map"])(pred, label)
            pairs.append((pred, label))
        # image | ground truth | A, then ground truth | B
        left = thumbnail_strip(sample.image, pairs[0][1], pairs[0][0], a.palette, 160)
        gt_b = thumbnail_strip(None, pairs[1][1], pairs[1][0], a.palette, 160)
        only_b = gt_b[:, (gt_b.shape[1] - 4) // 2 + 4:]
        h = max(left.shape[0], only_b.shape[0])
        parts = [np.concatenate([x, np.full((h - x.shape[0], x.shape[1], 3), 255, np.uint8)], 0)
                 for x in (left, only_b)]
        strip = np.concatenate([parts[0], np.full((h, 4, 3), 255, np.uint8), parts[1]], 1)
        strips.append({"image": name, "mean_iou_a": ma, "mean_iou_b": mb, "strip": strip})
    return strips


def _png_data_uri(array: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def comparison_figures(comparison: ComparisonResult):
    """(grouped per-class IoU bars, per-image mIoU scatter of A vs B) as Plotly figures."""
    import plotly.graph_objects as go

    colours = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
    names = list(comparison.results[0].class_names)
    present = [any(r.scores["present"][i] for r in comparison.results) for i in range(len(names))]
    shown = [n for n, p in zip(names, present) if p]
    bars = go.Figure()
    for k, (label, r) in enumerate(zip(comparison.labels, comparison.results)):
        values = [100 * r.scores["class_iou"][i] for i in range(len(names)) if present[i]]
        bars.add_trace(go.Bar(x=shown, y=values, name=label, marker_color=colours[k % len(colours)]))
    absent = [n for n, p in zip(names, present) if not p]
    if absent:  # after the present classes, a grey marker instead of a 0 bar, as in the single-model chart
        bars.add_trace(go.Scatter(x=absent, y=[0.0] * len(absent), mode="markers+text", text=["absent"] * len(absent),
                                  textposition="top center", marker={"color": "#bbbbbb", "symbol": "x"},
                                  name="absent (no ground-truth pixels)",
                                  hovertemplate="<b>%{x}</b><br>absent: no ground-truth pixels<extra></extra>"))
    bars.update_layout(title="Per-class IoU (%) by model" + (f"; {len(absent)} classes absent from the ground truth"
                                                              if absent else ""),
                       barmode="group", yaxis_title="IoU %", height=420, legend_title="model",
                       xaxis={"categoryorder": "array", "categoryarray": shown + absent})
    a, b = comparison.results[0], comparison.results[1]
    miou_b = {idx: row["mean_iou"] for idx, row in zip(b.image_indices, b.per_image)}
    pts = [(row["image"], 100 * row["mean_iou"], 100 * miou_b[idx]) for idx, row in zip(a.image_indices, a.per_image)
           if idx in miou_b and not math.isnan(row["mean_iou"]) and not math.isnan(miou_b[idx])]
    scatter = go.Figure(go.Scatter(x=[p[1] for p in pts], y=[p[2] for p in pts], mode="markers",
                                   text=[p[0] for p in pts], name="images"))
    scatter.add_trace(go.Scatter(x=[0, 100], y=[0, 100], mode="lines", line={"dash": "dot", "color": "#999"},
                                 name="equal"))
    scatter.update_layout(title=f"Per-image mIoU: {comparison.labels[1]} vs {comparison.labels[0]}",
                          xaxis_title=f"{comparison.labels[0]} mIoU %", yaxis_title=f"{comparison.labels[1]} mIoU %",
                          height=420)
    return bars, scatter


def write_comparison(comparison: ComparisonResult, out_dir, segmenters, dataset, protocol,
                     disagreements: int = DISAGREEMENT_COUNT) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"comparison_json": out / "comparison.json", "per_image_csv": out / "per_image.csv",
             "comparison_html": out / "comparison.html"}
    with open(paths["comparison_json"], "w", encoding="utf-8") as f:
        json.dump(comparison.document(), f, indent=2, allow_nan=False, default=str)
        f.write("\n")
    rows: dict[int, dict] = {}
    for label, r in zip(comparison.labels, comparison.results):
        for idx, row in zip(r.image_indices, r.per_image):
            rows.setdefault(idx, {"image": row["image"]})[f"mean_iou {label}"] = to_json_dict(row["mean_iou"])
    with open(paths["per_image_csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", *(f"mean_iou {lb}" for lb in comparison.labels)])
        writer.writeheader()
        writer.writerows(rows[i] for i in sorted(rows))
    bars, scatter = comparison_figures(comparison)
    comparison.strips = _disagreement_strips(comparison, segmenters, dataset, protocol, disagreements)
    paths["comparison_html"].write_text(_html(comparison, bars, scatter, comparison.strips), encoding="utf-8")
    return paths


def _html(comparison: ComparisonResult, bars, scatter, strips) -> str:
    head = "".join(f"<th>{short} %</th>" for _, short in SHORT)
    rows = "\n".join(f"<tr><th>{html.escape(label)}</th>" + "".join(f"<td>{_pct(r.scores[k])}</td>" for k, _ in SHORT)
                     + "</tr>" for label, r in zip(comparison.labels, comparison.results))
    diffs = "\n".join(
        f"<li>mIoU {html.escape(d['b'])} &minus; {html.escape(d['a'])}: {100 * d['mean_iou']:+.2f} points"
        + (f" (95% interval {_pct(d['ci95'][0])} .. {_pct(d['ci95'][1])}, paired bootstrap over {d['images']} images)"
           if d["ci95"] else " (no interval)") + "</li>" for d in comparison.differences)
    gallery = "\n".join(
        f'<figure><img src="{_png_data_uri(s["strip"])}" alt="{html.escape(s["image"])}"><figcaption>'
        f'{html.escape(s["image"])}: {comparison.labels[0]} {_pct(s["mean_iou_a"])}, {comparison.labels[1]} '
        f'{_pct(s["mean_iou_b"])} (image | ground truth | A | B)</figcaption></figure>' for s in strips)
    figs = [bars.to_html(full_html=False, include_plotlyjs=True, config={"displaylogo": False}),
            scatter.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Model comparison</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 0.3em 0.8em; }}
td {{ text-align: right; font-variant-numeric: tabular-nums; }} figure {{ display: inline-block; margin: 0.5em; }}</style>
</head><body>
<h1>Model comparison</h1>
<table><thead><tr><th>model</th>{head}</tr></thead><tbody>
{rows}
</tbody></table>
<ul>{diffs}</ul>
{figs[0]}
{figs[1]}
<h2>Images where the models disagree most</h2>
{gallery or '<p>none</p>'}
</body></html>
"""
