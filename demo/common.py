"""Glue shared by the tabs: settings, readable errors, request folders, uploads, zips, the legend."""

from __future__ import annotations

import contextlib
import html
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

import annotations
import segcore
from segcore.precision import resolve_precision
from segcore.segmenter import resolve_device

log = logging.getLogger("demo")

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return int(float(value)) or None


@dataclass
class AppConfig:
    """Everything the app is built from; :meth:`from_env` reads the ``SEGCORE_*`` variables."""

    weights: str = "voc12"
    device: str = "auto"
    precision: str = "auto"
    """Inference precision of every model the app loads (segcore.precision.PRECISIONS); ``int8`` is the
    fastest on a small CPU Space (calibrated once per checkpoint, then cached)."""
    max_image_pixels: int | None = 25_000_000
    max_video_seconds: int | None = 120
    max_video_frames: int | None = 3600
    max_video_pixels: int | None = 1920 * 1080
    max_file_size: str = "200mb"
    queue_size: int = 32
    """Requests waiting in the queue (per app) before new ones are told the queue is full."""
    concurrency: int | None = None
    """Jobs run at once per event; None: 1 on the CPU, 2 on a GPU."""
    max_loaded_models: int = 2
    work_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "segcore-app")
    keep_seconds: int = 3600
    """Result files older than this are removed when later requests come in."""
    shared_uploads: bool = False
    """Uploaded checkpoints visible to every visitor (a private server); off: each browser sees its own."""
    max_temp_bytes: int | None = 10 * 1024**3
    """Temporary space (app folder + Gradio's cache) past which new jobs get "server busy"."""
    time_limit: int | None = 600
    """Seconds a request may run before it is stopped with a message."""
    max_unpacked_bytes: int = 1024**3
    """Bytes all zips of one request may unpack to, together (annotations.ExtractionBudget)."""
    max_unpacked_files: int = 20_000
    """Entries all zips of one request may hold, together."""

    @classmethod
    def from_env(cls, **overrides) -> AppConfig:
        cfg = cls(
            weights=os.environ.get("SEGCORE_WEIGHTS") or "voc12",
            device=os.environ.get("SEGCORE_DEVICE") or "auto",
            precision=os.environ.get("SEGCORE_PRECISION") or "auto",
            max_image_pixels=_env_int("SEGCORE_MAX_IMAGE_PIXELS", cls.max_image_pixels),
            max_video_seconds=_env_int("SEGCORE_MAX_VIDEO_SECONDS", cls.max_video_seconds),
            max_video_frames=_env_int("SEGCORE_MAX_VIDEO_FRAMES", cls.max_video_frames),
            max_video_pixels=_env_int("SEGCORE_MAX_VIDEO_PIXELS", cls.max_video_pixels),
            max_file_size=os.environ.get("SEGCORE_MAX_FILE_SIZE") or cls.max_file_size,
            queue_size=_env_int("SEGCORE_QUEUE_SIZE", cls.queue_size) or cls.queue_size,
            concurrency=_env_int("SEGCORE_CONCURRENCY", None),
            shared_uploads=os.environ.get("SEGCORE_SHARED_UPLOADS", "").lower() in ("1", "true", "yes", "on"),
            max_temp_bytes=_env_int("SEGCORE_MAX_TEMP_BYTES", cls.max_temp_bytes),
            time_limit=_env_int("SEGCORE_TIME_LIMIT", cls.time_limit),
            max_unpacked_bytes=_env_int("SEGCORE_MAX_UNPACKED_BYTES", cls.max_unpacked_bytes)
            or cls.max_unpacked_bytes,
            max_unpacked_files=_env_int("SEGCORE_MAX_UNPACKED_FILES", cls.max_unpacked_files)
            or cls.max_unpacked_files,
        )
        if os.environ.get("SEGCORE_APP_DIR"):
            cfg.work_dir = Path(os.environ["SEGCORE_APP_DIR"])
        for key, value in overrides.items():
            if value is not None:
                setattr(cfg, key, value)
        return cfg

    def problem(self) -> str | None:
        """What is wrong with the settings a person typed (device, precision), in one line; None if nothing."""
        try:
            resolve_precision(self.precision, resolve_device(self.device))
        except segcore.OptionError as exc:
            return str(exc)
        return None

    def job_concurrency(self) -> int:
        if self.concurrency:
            return self.concurrency
        import torch

        return 2 if torch.cuda.is_available() and self.device != "cpu" else 1


# ----------------------------------------------------------------------------- errors

def readable(message: str) -> str:
    """An error message without the server's temporary folders (file names stay)."""
    tmp = re.escape(os.path.realpath(tempfile.gettempdir()))
    pattern = rf"(?:/private)?{tmp}/(?:[^/\s'\":]+/)*"
    return re.sub(pattern, "", str(message)).strip()


class UserError(gr.Error):
    """A user's mistake (no weights, a bad upload): shown in the browser, one line in the server log.

    Gradio prints the traceback of every gr.Error by default (some 115 lines for a missing download);
    an expected error is not a bug, so it is logged as one line instead.
    """

    def __init__(self, message: str, **kwargs):
        kwargs.setdefault("print_exception", False)
        super().__init__(message, **kwargs)
        log.warning("refused: %s", " ".join(str(message).split())[:500])


USER_ERRORS = (segcore.SegcoreError, annotations.AnnotationError, ValueError, OSError, zipfile.BadZipFile)


@contextlib.contextmanager
def user_errors(what: str = ""):
    """Turn bad input (segcore / annotations errors and friends) into a :class:`gr.Error`.

    Anything else is a bug: logged with its traceback, and still reported readably so the
    browser never shows a bare "Error".
    """
    try:
        yield
    except gr.Error:
        raise
    except USER_ERRORS as exc:
        message = readable(str(exc) or type(exc).__name__)
        if what and not message.startswith(what):
            message = f"{what}: {message}"
        raise UserError(message, duration=None) from exc
    except Exception as exc:  # pragma: no cover - a bug, but the server keeps serving
        log.exception("unexpected error")
        raise gr.Error(f"Unexpected error ({type(exc).__name__}): {readable(str(exc))}", duration=None,
                       print_exception=False) from exc  # log.exception above printed the traceback


def require(value, message: str):
    if value is None or value == [] or value == "":
        raise UserError(message)
    return value


# ----------------------------------------------------------------------------- files


class WorkDir:
    """Per-request result folders under one root; folders older than ``keep_seconds`` are swept."""

    def __init__(self, root: Path, keep_seconds: int = 3600):
        self.root = Path(root)
        self.keep_seconds = keep_seconds
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)

    def new(self, kind: str) -> Path:
        self.sweep()
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=self.root / "jobs"))

    def sweep(self) -> None:
        jobs = self.root / "jobs"
        if not jobs.is_dir():
            return
        limit = time.time() - self.keep_seconds
        with self._lock:
            for d in jobs.iterdir():
                try:
                    if d.stat().st_mtime < limit:
                        shutil.rmtree(d, ignore_errors=True)
                except OSError:
                    pass


def as_paths(files) -> list[Path]:
    """gr.File values (a path, a list of paths, or None) as a list of paths."""
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    return [Path(f if isinstance(f, (str, os.PathLike)) else f.name) for f in files if f]


def extract_upload(archive: Path, target: Path, budget: annotations.ExtractionBudget | None = None) -> Path:
    """Every zip the app's tabs extract goes through here, drawing on one budget per request: all zips of
    the request together may unpack to so many bytes and files (a fresh default budget outside a job)."""
    return annotations.safe_extract_zip(archive, target, budget=budget or request_budget())


def request_budget() -> annotations.ExtractionBudget:
    """The running job's extraction budget (see :class:`demo.jobs.Job`); a fresh default one outside a job."""
    from .jobs import current_job

    job = current_job()
    return job.budget if job is not None else annotations.ExtractionBudget(AppConfig.max_unpacked_bytes,
                                                                           AppConfig.max_unpacked_files)


def gather_uploads(files, dest: Path, budget: annotations.ExtractionBudget | None = None) -> Path:
    """Put uploaded files (loose files and/or zips) into one folder, as a dataset reader expects.

    Loose files go side by side under their own names (labelme's imagePath then finds images that
    were uploaded with their JSON); zips are extracted safely. A zip holding a single top-level
    folder yields that folder.
    """
    paths = as_paths(files)
    dest.mkdir(parents=True, exist_ok=True)
    for p in paths:
        if p.suffix.lower() == ".zip":
            extract_upload(p, dest / p.stem if len(paths) > 1 else dest, budget)
        else:
            shutil.copyfile(p, dest / p.name)
    entries = [e for e in dest.iterdir() if not e.name.startswith(".") and e.name != "__MACOSX"]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


def write_png(rgb, path: Path) -> str:
    """An image array as a PNG file, written once (a path to return instead of an array)."""
    from PIL import Image

    Image.fromarray(rgb).save(path)
    return str(path)


def zip_folder(folder: Path, archive: Path) -> Path:
    """``folder``'s contents in a zip under a top-level folder named like the archive."""
    top = archive.with_suffix("").name
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, f"{top}/{p.relative_to(folder).as_posix()}")
    return archive


def safe_stem(path: str | Path, default: str = "image") -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(path)).stem)[:60].strip("._")
    return stem or default


# ----------------------------------------------------------------------------- display


def legend_html(fractions: dict[str, float], class_names, palette) -> str:
    """The classes present, largest area first: colour swatch, name, share of the image."""
    index = {n: i for i, n in enumerate(class_names)}
    rows = []
    for name, frac in fractions.items():
        share = f"{100 * frac:.1f}%" if frac >= 0.0005 else "<0.1%"
        r, g, b = (int(v) for v in palette[index[name]])
        rows.append(
            f'<tr><td><span class="swatch" style="display:inline-block;width:1.1em;height:1.1em;'
            f'border:1px solid #555;border-radius:3px;vertical-align:middle;background:rgb({r},{g},{b})">'
            f'</span></td><td class="cls">{html.escape(name)}</td>'
            f'<td class="pct" style="text-align:right">{share}</td></tr>')
    return ('<table class="segcore-legend" style="border-collapse:collapse;min-width:14em">'
            '<thead><tr><th></th><th style="text-align:left">class</th><th style="text-align:right">area</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def pct(value) -> float | None:
    """A fraction as a percentage rounded to 2 decimals; None for NaN."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else round(100.0 * value, 2)
