"""Evaluation report: Plotly figures, console table and the files of one evaluation run.

Works on the dict returned by :meth:`segcore.metrics.ConfusionMatrix.compute`
(fractions; NaN for absent classes).  Figures and the HTML report show percent.
The per-class IoU chart lists present classes **best at the top**, then the
absent classes (no ground-truth pixel) at the bottom with a grey "absent" marker.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import html
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import plotly.graph_objects as go

from .errors import SegcoreError
from .metrics import to_json_dict

__all__ = [
    "ReportError",
    "class_iou_figure",
    "confusion_figure",
    "format_score_table",
    "sha256_file",
    "write_report",
]

# Console/HTML labels mirror the key names of the reference scores() dict.
SCORE_LABELS = (
    ("pixel_accuracy", "Pixel Accuracy"),
    ("mean_accuracy", "Mean Accuracy"),
    ("mean_iou", "Mean IoU"),
    ("fw_iou", "Frequency Weighted IoU"),
)

ABSENT_COLOR = "rgb(170,170,170)"
_BAR_PX = 20  # vertical pixels per class row
_CELL_TEXT_MAX = 30  # confusion heatmaps with more classes get no per-cell text


class ReportError(SegcoreError, ValueError):
    """Inputs to the report do not fit together (class names, palette, scores)."""


# --------------------------------------------------------------------------- helpers


def _isnan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _n_classes(scores: dict) -> int:
    try:
        return int(scores["n_classes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ReportError("scores has no 'n_classes'; pass the dict from ConfusionMatrix.compute()") from exc


def _check_names(scores: dict, class_names: Sequence[str]) -> list[str]:
    n = _n_classes(scores)
    names = [str(c) for c in class_names]
    if len(names) != n:
        raise ReportError(f"{len(names)} class names given for {n} classes")
    # Plotly category axes merge equal labels; keep every class on its own row.
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    return [f"{name} ({i})" if seen[name] > 1 else name for i, name in enumerate(names)]


def _palette_colors(palette: Any, n: int) -> list[str]:
    pal = np.asarray(palette)
    if pal.ndim != 2 or pal.shape[1] != 3:
        raise ReportError(f"palette must be an N x 3 array of RGB values, got shape {pal.shape}")
    if pal.shape[0] < n:
        raise ReportError(f"palette has {pal.shape[0]} colours for {n} classes")
    pal = pal[:n].astype(np.int64)
    return [f"rgb({r},{g},{b})" for r, g, b in pal.tolist()]


def _pct(v: Any, digits: int = 2) -> str:
    return "n/a" if _isnan(v) else f"{100.0 * float(v):.{digits}f}"


# --------------------------------------------------------------------------- figures


def class_iou_figure(scores: dict, class_names: Sequence[str], palette: Any) -> go.Figure:
    """Horizontal bars of per-class IoU (percent), best class at the top.

    Bars take the class's palette colour; hovering shows IoU, accuracy and the
    ground-truth / predicted pixel counts.  Classes without ground-truth pixels
    are listed below the bars with a grey "absent" marker instead of a 0 bar.
    The figure grows by ``20`` px per listed class, so 182 classes stay readable.
    """
    names = _check_names(scores, class_names)
    n = len(names)
    colors = _palette_colors(palette, n)
    present = [bool(p) for p in scores["present"]]
    iou = scores["class_iou"]
    acc = scores["class_accuracy"]
    gt_px = scores["gt_pixels"]
    pred_px = scores["pred_pixels"]

    shown = sorted((i for i in range(n) if present[i]), key=lambda i: (-iou[i], i))
    absent = [i for i in range(n) if not present[i]]

    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            name="IoU",
            orientation="h",
            x=[100.0 * iou[i] for i in shown],
            y=[names[i] for i in shown],
            marker=dict(color=[colors[i] for i in shown], line=dict(color="rgb(80,80,80)", width=0.5)),
            customdata=[[100.0 * acc[i], gt_px[i], pred_px[i], i] for i in shown],
            hovertemplate=(
                "<b>%{y}</b> (class %{customdata[3]})<br>IoU %{x:.2f}%<br>accuracy %{customdata[0]:.2f}%"
                "<br>ground-truth pixels %{customdata[1]:,}<br>predicted pixels %{customdata[2]:,}"
                "<extra></extra>"
            ),
        )
    )
    fig.add_trace(
        go.Scatter(
            name="absent",
            mode="markers+text",
            x=[0.0] * len(absent),
            y=[names[i] for i in absent],
            marker=dict(color=ABSENT_COLOR, symbol="line-ew-open", size=12, line=dict(width=2)),
            text=["absent" for _ in absent],
            textposition="middle right",
            textfont=dict(color=ABSENT_COLOR),
            customdata=[[pred_px[i], i] for i in absent],
            hovertemplate=(
                "<b>%{y}</b> (class %{customdata[1]})<br>absent: no ground-truth pixels"
                "<br>predicted pixels %{customdata[0]:,}<extra></extra>"
            ),
            cliponaxis=False,
        )
    )
    rows = len(shown) + len(absent)
    fig.update_layout(
        title=dict(text=f"Per-class IoU (%), {len(shown)} present classes, {len(absent)} absent", y=0.995,
                   yanchor="top"),
        height=max(320, _BAR_PX * rows + 140),
        margin=dict(l=10, r=30, t=100, b=40),
        showlegend=False,
        bargap=0.15,
        template="plotly_white",
    )
    fig.update_xaxes(title="IoU (%)", range=[0, 100], side="top")
    fig.update_yaxes(
        categoryorder="array",
        categoryarray=[names[i] for i in shown + absent],
        autorange="reversed",  # first listed (best) class at the top
        automargin=True,
        tickfont=dict(size=11),
    )
    return fig


def confusion_figure(scores: dict, class_names: Sequence[str]) -> go.Figure:
    """Row-normalised confusion matrix (rows = ground truth) of the classes that occur.

    Only classes with ground-truth or predicted pixels are kept (dropping the
    others loses no count).  A cell shows the share of the row's ground-truth
    pixels; hovering gives the pixel count and the row percentage.  Rows of
    classes that occur only in predictions have no ground truth and stay empty.
    Cell text is drawn only up to 30 classes.
    """
    names = _check_names(scores, class_names)
    m = np.asarray(scores["confusion_matrix"], dtype=np.int64)
    if m.shape != (len(names), len(names)):
        raise ReportError(f"confusion matrix shape {m.shape} does not match {len(names)} classes")
    keep = np.flatnonzero((m.sum(axis=1) > 0) | (m.sum(axis=0) > 0))
    sub = m[np.ix_(keep, keep)]
    rows = sub.sum(axis=1, keepdims=True).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(rows > 0, sub / rows, np.nan)
    labels = [names[i] for i in keep]
    k = len(keep)
    heat = go.Heatmap(
        z=norm,
        x=labels,
        y=labels,
        customdata=sub,
        zmin=0.0,
        zmax=1.0,
        colorscale="Blues",
        colorbar=dict(title="row share", tickformat=".0%"),
        xgap=1 if k <= 60 else 0,
        ygap=1 if k <= 60 else 0,
        hovertemplate=(
            "ground truth <b>%{y}</b><br>predicted <b>%{x}</b><br>%{customdata:,} pixels"
            "<br>%{z:.2%} of the ground-truth row<extra></extra>"
        ),
        hoverongaps=False,
    )
    if k <= _CELL_TEXT_MAX:
        heat.update(texttemplate="%{z:.0%}", textfont=dict(size=10))
    fig = go.Figure(heat)
    side = max(420, min(16 * k, 3200) + 220)
    fig.update_layout(
        title=dict(text=f"Confusion matrix, row-normalised ({k} classes that occur)", y=0.995, yanchor="top"),
        width=side + 120,
        height=side,
        margin=dict(l=10, r=10, t=150, b=10),
        template="plotly_white",
    )
    tick = dict(size=11 if k <= 60 else 8)
    fig.update_xaxes(title=dict(text="prediction", standoff=4), side="top", tickangle=-60, automargin=True,
                     tickfont=tick)
    fig.update_yaxes(title="ground truth", autorange="reversed", automargin=True, tickfont=tick)
    return fig


# --------------------------------------------------------------------------- text


def format_score_table(scores: dict, class_names: Sequence[str] | None = None) -> str:
    """The four scores in percent, one per line, named like the reference's keys.

    With ``class_names``, a "Class IoU" block follows (absent classes say so).
    """
    width = max(len(label) for _, label in SCORE_LABELS) + 1
    lines = [f"{label + ':':<{width}} {_pct(scores[key])}" for key, label in SCORE_LABELS]
    if class_names is not None:
        names = _check_names(scores, class_names)
        w = max((len(s) for s in names), default=0) + 1
        lines.append("Class IoU:")
        for i, name in enumerate(names):
            value = _pct(scores["class_iou"][i]) if scores["present"][i] else "absent"
            lines.append(f"  {name + ':':<{w}} {value}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- files


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _csv_value(v: Any) -> Any:
    if _isnan(v):
        return ""
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return v


def _per_image_sort_key(row: dict) -> tuple:
    v = row.get("mean_iou")
    try:
        v = float(v)
    except (TypeError, ValueError):
        v = math.nan
    return (math.isnan(v), v if not math.isnan(v) else 0.0)


def _write_per_image(path: Path, per_image: Iterable[dict]) -> None:
    rows = sorted((dict(r) for r in per_image), key=_per_image_sort_key)  # stable: ties keep order
    fields: list[str] = []
    for r in rows:
        for key in r:
            if key not in fields:
                fields.append(key)
    if not fields:
        fields = ["image", "pixel_accuracy", "mean_iou"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in fields})


def _write_per_class(path: Path, scores: dict, names: list[str]) -> None:
    fields = [
        "class_id",
        "class_name",
        "present",
        "iou",
        "accuracy",
        "precision",
        "dice",
        "gt_pixels",
        "pred_pixels",
    ]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for i, name in enumerate(names):
            w.writerow(
                [
                    i,
                    name,
                    int(bool(scores["present"][i])),
                    _csv_value(scores["class_iou"][i]),
                    _csv_value(scores["class_accuracy"][i]),
                    _csv_value(scores["class_precision"][i]),
                    _csv_value(scores["class_dice"][i]),
                    scores["gt_pixels"][i],
                    scores["pred_pixels"][i],
                ]
            )


def _protocol_html(protocol: dict | None) -> str:
    """One line saying how the images were run (protocol, precision, scales, CRF, size)."""
    if not protocol:
        return ""
    scales = ", ".join(f"{s:g}" for s in protocol.get("scales") or [])
    parts = [f"Protocol: <b>{html.escape(str(protocol.get('name')))}</b>",
             f"images {html.escape(str(protocol.get('image_size', '')))}",
             f"precision {html.escape(str(protocol.get('precision')))}", f"scales {html.escape(scales)}",
             f"CRF {'on' if protocol.get('crf') else 'off'}"]
    return "<p>" + ", ".join(parts) + "</p>"


def _score_rows(scores: dict, published: dict | None) -> tuple[str, str]:
    """(header, rows) of the scores table; with published figures, two more columns."""
    figures = (published or {}).get("scores", {})
    head = "<tr><th>Score</th><td>%</td>" + ("<td>Published %</td><td>Difference</td>" if figures else "") + "</tr>"
    rows = []
    for key, label in SCORE_LABELS:
        cells = f"<td>{_pct(scores[key])}</td>"
        if figures:
            if key in figures and not _isnan(scores[key]):
                diff = 100.0 * float(scores[key]) - figures[key]
                cells += f"<td>{figures[key]:.2f}</td><td>{diff:+.2f}</td>"
            else:
                cells += "<td></td><td></td>"
        rows.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    return head, "\n".join(rows)


def _html_page(scores: dict, figs: list[go.Figure], meta: dict) -> str:
    published = meta.get("published")
    head, rows = _score_rows(scores, published)
    source = (f'<p class="note">Published figures: {html.escape(published["weights"])} on '
              f'{html.escape(published["dataset"])}{" with CRF" if published["crf"] else ""}.</p>'
              if published else "")
    ck = meta.get("checkpoint")
    ck_line = (
        f"{html.escape(ck['file'])} <code>sha256 {html.escape(ck['sha256'])}</code>" if ck else "none"
    )
    n_present = sum(bool(p) for p in scores["present"])
    parts = [
        # Only the first figure carries plotly.js (inline), so the page works offline.
        fig.to_html(full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False})
        for i, fig in enumerate(figs)
    ]
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Segmentation evaluation report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table.scores {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
table.scores th, table.scores td {{ border: 1px solid #ccc; padding: 0.3em 0.8em; }}
table.scores td {{ text-align: right; font-variant-numeric: tabular-nums; }}
.note {{ color: #555; max-width: 60em; }}
</style>
</head>
<body>
<h1>Segmentation evaluation report</h1>
<p>Date (UTC): {html.escape(meta['date'])}<br>Checkpoint: {ck_line}</p>
{_protocol_html(meta.get("protocol"))}
<table class="scores">
<thead>{head}</thead>
<tbody>
{rows}
</tbody>
</table>
{source}
<p class="note">{n_present} of {scores['n_classes']} classes occur in the ground truth.
Mean Accuracy, Mean IoU and Frequency Weighted IoU average over the classes that occur in
the ground truth; classes with no ground-truth pixels are reported as absent (not as 0 and
not inside the means).</p>
{_failures_html(meta.get("failures") or [])}
{parts[0]}
{''.join(parts[1:])}
</body>
</html>
"""


def _failures_html(failures: list[dict]) -> str:
    if not failures:
        return ""
    rows = "\n".join(
        f"<tr><td>{html.escape(str(f.get('file', '')))}</td>"
        f"<td>{html.escape(str(f.get('reason', '')))}</td></tr>"
        for f in failures
    )
    return (
        f'<h2 class="failures">{len(failures)} file(s) could not be evaluated</h2>\n'
        '<p class="note">They are not inside the scores above.</p>\n'
        f'<table class="scores failures"><thead><tr><th>File</th><th>Reason</th></tr></thead>\n'
        f"<tbody>\n{rows}\n</tbody></table>"
    )


def write_report(
    out_dir: str | os.PathLike,
    scores: dict,
    class_names: Sequence[str],
    palette: Any,
    *,
    options: dict,
    checkpoint: str | os.PathLike | None,
    per_image: Iterable[dict],
    failures: Iterable[dict] | None = None,
    extra: dict | None = None,
) -> dict[str, Path]:
    """Write ``scores.json``, ``per_class.csv``, ``per_image.csv`` and ``report.html``.

    ``scores.json`` holds every key of ``scores`` (NaN as ``null``) plus
    ``class_names``, ``options``, ``checkpoint`` (``{"file", "sha256"}`` or
    ``null``) and ``date`` (ISO-8601, UTC).  ``per_image`` rows (dicts, e.g. the
    image name plus :func:`segcore.metrics.image_scores`) are written worst
    ``mean_iou`` first, rows without a score last.  ``report.html`` is one
    self-contained file with both figures and the four scores.

    ``failures`` (dicts with ``file`` and ``reason``, e.g. images that could not be read), when
    given, go into ``scores.json`` under ``failures`` and into a table of the HTML report, so
    nothing skipped is silent; ``extra`` (a dict) adds further top-level keys to ``scores.json``
    (e.g. a summary); it never replaces a key written above.

    Returns ``{"scores_json", "per_class_csv", "per_image_csv", "report_html"}`` paths.
    """
    names = _check_names(scores, class_names)
    raw_names = [str(c) for c in class_names]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    ck_info = None
    if checkpoint is not None:
        ck_path = Path(checkpoint)
        if not ck_path.is_file():
            raise ReportError(f"{ck_path}: checkpoint file not found")
        ck_info = {"file": ck_path.name, "sha256": sha256_file(ck_path)}
    date = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()

    doc = dict(scores)
    doc["class_names"] = raw_names
    doc["options"] = options
    doc["checkpoint"] = ck_info
    doc["date"] = date
    failure_list = [dict(f) for f in (failures or ())]
    if failures is not None:
        doc["failures"] = failure_list
    for key, value in (extra or {}).items():
        doc.setdefault(key, value)
    doc = to_json_dict(doc)

    paths = {
        "scores_json": out / "scores.json",
        "per_class_csv": out / "per_class.csv",
        "per_image_csv": out / "per_image.csv",
        "report_html": out / "report.html",
    }
    with open(paths["scores_json"], "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, allow_nan=False, default=str)
        f.write("\n")
    _write_per_class(paths["per_class_csv"], scores, raw_names)
    _write_per_image(paths["per_image_csv"], per_image)

    figs = [class_iou_figure(scores, names, palette), confusion_figure(scores, names)]
    page = _html_page(scores, figs, {"date": date, "checkpoint": ck_info, "failures": failure_list,
                                     "protocol": (options or {}).get("protocol"),
                                     "published": (extra or {}).get("published")})
    paths["report_html"].write_text(page, encoding="utf-8")
    return paths
