"""The model panel shared by every tab: weights, multi-scale, CRF, test size, overlay opacity."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

import segcore

from .common import USER_ERRORS, AppConfig, UserError, WorkDir, as_paths, readable, user_errors
from .jobs import Jobs
from .models import ModelStore
from .sessions import Owners

LABEL_CHOICES = ["auto", "voc", "cocostuff"]


@dataclass
class Context:
    """What every tab is built from: settings, the model store, result folders, the panel's inputs."""

    config: AppConfig
    store: ModelStore
    work: WorkDir
    weights: gr.Dropdown | None = None
    multiscale: gr.Checkbox | None = None
    crf: gr.Checkbox | None = None
    test_size: gr.Slider | None = None
    opacity: gr.Slider | None = None
    status: gr.Markdown | None = None
    owners: Owners = field(default_factory=Owners)
    """Whose uploads a request may see (per browser token, else per API session)."""
    remembered: gr.BrowserState | None = None
    jobs: Jobs | None = None
    """Wraps each event into a job (temp-space cap, time limit, folder clean-up): ``@ctx.jobs.scoped``."""

    def model_inputs(self) -> list:
        return [self.weights, self.multiscale, self.crf, self.test_size]


def status_text(store: ModelStore, name: str | None, owner: str | None = None) -> str:
    name = name or store.default
    problem = store.missing(name, owner)
    if problem:
        return f"**Weights missing.** {problem}"
    if store.is_loaded(name):
        seg = store.get(name, owner=owner)
        return f"**Ready:** `{name}` is loaded, {seg.n_classes} classes, {seg.device}, {seg.precision}."
    if store.precision == "int8":
        return (f"**Ready:** `{name}` loads and is quantised to int8 on first use (up to a minute on a CPU, "
                "seconds once cached), then stays loaded for every request.")
    return f"**Ready:** `{name}` loads on first use (a few seconds), then stays loaded for every request."


def build_panel(ctx: Context) -> None:
    store = ctx.store
    with gr.Accordion("Model", open=True):
        ctx.status = gr.Markdown(status_text(store, store.default), elem_id="model-status")
        with gr.Row():
            ctx.weights = gr.Dropdown(store.choices(), value=store.default, label="Weights",
                                      allow_custom_value=True, scale=2, elem_id="weights",
                                      info="published weights, --weights / SEGCORE_WEIGHTS, or an upload")
            ctx.multiscale = gr.Checkbox(True, label="Multi-scale", info="max over ×0.5, ×0.75, ×1 (slower)")
            ctx.crf = gr.Checkbox(False, label="CRF", info="DenseCRF refinement (slow on CPU)")
        with gr.Row():
            ctx.test_size = gr.Slider(65, 1025, value=513, step=8, label="Test size",
                                      info="long side the image is resized to (px)")
            ctx.opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity",
                                    info="0: the photo, 1: the class colours")
        with gr.Accordion("Upload a checkpoint (.pth / .safetensors, e.g. one trained with train/)", open=False,
                          elem_id="upload-accordion"):
            with gr.Row():
                ckpt = gr.File(label="Checkpoint", file_types=[".pth", ".safetensors", ".pt"], scale=2,
                               elem_id="checkpoint-file")
                space = gr.Dropdown(LABEL_CHOICES, value="auto", label="Label set",
                                    info="auto: the checkpoint's own names, else 21 = VOC, 182 = COCO-Stuff")
                labels = gr.File(label="labels.txt (overrides the label set)", file_types=[".txt"])
            upload = gr.Button("Use this checkpoint", elem_id="upload-checkpoint")
            uploaded = gr.Textbox(visible=False, label="Weights name")
    # this browser's owner token, kept in its localStorage: its uploads survive a page reload
    ctx.remembered = gr.BrowserState(None, storage_key="segcore-owner")

    ctx.weights.change(lambda name: status_text(store, name, ctx.owners.owner()), ctx.weights, ctx.status,
                       api_visibility="private",
                       queue=False)

    @ctx.jobs.scoped
    def upload_checkpoint(file, label_set, labels_file, progress=gr.Progress()):
        paths = as_paths(file)
        if not paths:
            raise UserError("Choose a checkpoint file (.pth or .safetensors) first.")
        label_space = str(as_paths(labels_file)[0]) if as_paths(labels_file) else (
            None if label_set in (None, "", "auto") else label_set)
        progress(0.1, desc="Checking and loading the checkpoint")
        with user_errors(Path(paths[0]).name):
            name, seg = store.upload(paths[0], label_space, owner=ctx.owners.owner(), progress=progress)
        message = (f"**Ready:** `{name}` is loaded, {seg.n_classes} classes "
                   f"({', '.join(seg.class_names[:6])}{', …' if seg.n_classes > 6 else ''}).")
        return name, message

    # the API answers with the plain name; the menu is refreshed by a second, private step
    upload.click(upload_checkpoint, [ckpt, space, labels], [uploaded, ctx.status], api_name="upload_checkpoint",
                 concurrency_id="model").success(
        lambda name: gr.Dropdown(choices=store.choices(ctx.owners.owner()), value=name), uploaded, ctx.weights,
        api_visibility="private", queue=False)


def refresh_status(ctx: Context, event) -> None:
    """After a job, show what is loaded now (a private step: not part of the API)."""
    event.then(lambda name: status_text(ctx.store, name, ctx.owners.owner()), ctx.weights, ctx.status,
               api_visibility="private",
               queue=False)


def model_for(ctx: Context, weights, multiscale, crf, test_size, progress=None) -> segcore.Segmenter:
    """The request's Segmenter; a failed download or a bad file becomes a readable gr.Error."""
    try:
        return ctx.store.segmenter(weights or ctx.store.default, multiscale=bool(multiscale), crf=bool(crf),
                                   test_size=int(test_size or 513), progress=progress, owner=ctx.owners.owner())
    except segcore.DownloadError as exc:
        raise UserError(f"The {weights} weights are not available: {readable(str(exc))}. "
                       "Or upload a checkpoint under Model ▸ Upload a checkpoint.", duration=None) from exc
    except USER_ERRORS as exc:
        raise UserError(f"weights {weights}: {readable(str(exc))}", duration=None) from exc


def remember_uploads(ctx: Context, demo: gr.Blocks) -> None:
    """On page load, tie the page's session to its browser's owner token and list that browser's uploads.

    Private steps (not in the API); the token never leaves that browser and this server.
    """

    def restore(remembered, weights, request: gr.Request):
        token = ctx.owners.adopt(request, remembered)
        choices = ctx.store.choices(token)
        value = weights if weights in choices else ctx.store.default
        return {"owner": token}, gr.Dropdown(choices=choices, value=value)

    demo.load(restore, [ctx.remembered, ctx.weights], [ctx.remembered, ctx.weights], api_visibility="private",
              queue=False)

    def forget(request: gr.Request):
        ctx.owners.forget(request)

    demo.unload(forget)
