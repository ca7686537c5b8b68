"""Weights the app can use, loaded lazily and shared by every request.

A small LRU cache keyed by the weights' name holds loaded :class:`segcore.Segmenter` objects; a lock
makes sure two requests never load the same file twice. Each request gets a light
``with_options`` copy (scales, CRF, test size) that shares the loaded model.

Uploaded checkpoints are stored by content digest (``<upload_dir>/<sha256>/<file name>``) and belong to
the owners (browser or API session, see :mod:`demo.sessions`) that uploaded them: nobody else can list
or select them unless the server runs with ``shared_uploads``. Registry names and the server's own
``--weights`` file are public.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import segcore
from segcore.model import DEFAULT_SCALES
from segcore.report import sha256_file
from segcore.weights import Weights

UPLOAD_SUFFIX = " (uploaded)"
MAX_UPLOADS_PER_OWNER = 5
"""An owner's sixth upload drops their oldest (deleted from disk when nobody else uploaded it too)."""


@dataclass(frozen=True)
class WeightsSource:
    """What a name in the weights menu stands for: a registry name or a checkpoint file."""

    name: str
    target: str
    """Registry name or file path handed to ``Segmenter.from_pretrained``."""
    label_space: str | None = None
    """``voc``, ``cocostuff``, a labels file, or None (the checkpoint / class count decides)."""

    @property
    def registry(self) -> Weights | None:
        return segcore.REGISTRY.get(self.target)


class ModelStore:
    """Registry names plus checkpoint files, loaded on first use and kept (``max_loaded`` at most)."""

    def __init__(self, default: str = "voc12", *, upload_dir: Path, max_loaded: int = 2,
                 max_pixels: int | None = None, device: str = "auto", precision: str = "auto",
                 shared_uploads: bool = False):
        self.upload_dir = Path(upload_dir)
        self.shared_uploads = bool(shared_uploads)
        self._owners: dict[str, set[str]] = {}
        """Upload menu name -> the owners who uploaded it (names not in here are public)."""
        self._by_owner: dict[str, list[str]] = {}
        """Owner -> their uploads, oldest first."""
        self.max_loaded = max(1, int(max_loaded))
        self.max_pixels = max_pixels
        self.device = device
        self.precision = precision
        self._sources: dict[str, WeightsSource] = {n: WeightsSource(n, n) for n in segcore.REGISTRY}
        self._loaded: OrderedDict[str, segcore.Segmenter] = OrderedDict()
        self._lock = threading.Lock()
        self.default = self.add(default) if default else next(iter(self._sources))

    # -- the menu ---------------------------------------------------------------------------------

    def add(self, name_or_path: str, label_space: str | None = None, *, display: str | None = None) -> str:
        """Make registry weights or a checkpoint file selectable; returns its menu name."""
        if name_or_path in segcore.REGISTRY:
            return name_or_path
        path = Path(name_or_path).expanduser()
        name = display or path.name
        self._sources[name] = WeightsSource(name, str(path), label_space)
        with self._lock:
            self._loaded.pop(name, None)
        return name

    def visible(self, name: str, owner: str | None) -> bool:
        """Whether ``owner`` may list and use ``name``: public weights, the owner's uploads, or all when shared."""
        if name not in self._sources:
            return False
        owners = self._owners.get(name)
        return owners is None or self.shared_uploads or (owner is not None and owner in owners)

    def choices(self, owner: str | None = None) -> list[str]:
        """The menu for ``owner``: public weights plus their own uploads (everyone's with ``shared_uploads``)."""
        return [n for n in list(self._sources) if self.visible(n, owner)]

    def source(self, name: str, owner: str | None = None) -> WeightsSource:
        if not self.visible(name, owner):  # someone else's upload reads exactly like a name that does not exist
            raise segcore.CheckpointError(f"unknown weights {name!r}: choose one of {', '.join(self.choices(owner))} "
                                          "or upload a checkpoint (.pth / .safetensors)")
        return self._sources[name]

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def missing(self, name: str, owner: str | None = None) -> str | None:
        """Why ``name`` cannot be used without a download or a file, and how to fix that; None if ready."""
        src = self._sources.get(name) if self.visible(name, owner) else None
        if src is None:
            return f"Unknown weights `{name}`."
        if name in self._loaded:
            return None
        reg = src.registry
        if reg is not None:
            if reg.path.is_file():
                return None
            return (f"The `{name}` weights are not downloaded yet. They are fetched on first use from "
                    f"{reg.url} to `{reg.path}`. Offline? Download that file yourself and place it at "
                    f"`{reg.path}` (or set `SEGCORE_HOME`), or upload a checkpoint (.pth / .safetensors) "
                    "under **Model ▸ Upload a checkpoint**.")
        if not Path(src.target).is_file():
            return (f"The checkpoint `{src.target}` does not exist. Pass an existing file with `--weights PATH` "
                    "(or `SEGCORE_WEIGHTS`), pick registry weights, or upload a checkpoint under "
                    "**Model ▸ Upload a checkpoint**.")
        return None

    # -- loading ----------------------------------------------------------------------------------

    def get(self, name: str, progress=None, owner: str | None = None) -> segcore.Segmenter:
        """The loaded model for ``name`` (downloaded and loaded on first use, under a lock)."""
        src = self.source(name, owner)
        seg = self._loaded.get(name)
        if seg is not None:
            return seg
        with self._lock:
            seg = self._loaded.get(name)
            if seg is None:
                if progress is not None:
                    reg = src.registry
                    what = "Downloading and loading" if reg is not None and not reg.path.is_file() else "Loading"
                    progress(0.0, desc=f"{what} the {name} weights (first use)")
                seg = self._load(name, src.target, src.label_space, progress)
                self._loaded[name] = seg
                while len(self._loaded) > self.max_loaded:
                    self._loaded.popitem(last=False)
            else:
                self._loaded.move_to_end(name)
        return seg

    def _load(self, name: str, target, label_space, progress=None) -> segcore.Segmenter:
        """A Segmenter for the checkpoint ``target``, ready to serve.

        int8 weights are quantised here, once (cached on disk), under the loading message: no request waits
        for it unexplained, and the calibration is the model's own, not the first request's test size.
        """
        seg = segcore.Segmenter.from_pretrained(target, label_space=label_space, device=self.device,
                                                precision=self.precision, max_pixels=self.max_pixels)
        seg.name = name
        if seg.precision == "int8":
            if progress is not None:
                progress(0.5, desc=f"Quantising the {name} weights to int8 "
                                   "(first use; kept for later starts)")
            seg.fast_path()
        return seg

    def segmenter(self, name: str, *, multiscale: bool = True, crf: bool = False, test_size: int = 513,
                  progress=None, owner: str | None = None) -> segcore.Segmenter:
        """A Segmenter with this request's options, sharing the cached model."""
        base = self.get(name, progress, owner)
        return base.with_options(scales=DEFAULT_SCALES if multiscale else (), crf=bool(crf),
                                 test_size=int(test_size))

    def upload(self, path: str | Path, label_space: str | None = None, owner: str | None = None, progress=None
               ) -> tuple[str, segcore.Segmenter]:
        """Keep an uploaded checkpoint under its content digest, load it (which validates it), give it to ``owner``.

        The menu name carries the digest, so two files called ``final.pth`` never replace each other; the
        same file uploaded by two owners is stored once and belongs to both. A file that does not load is
        deleted at once, with the copy Gradio received.
        """
        path = Path(path)
        digest = sha256_file(path)
        folder = self.upload_dir / digest
        labels_digest = ""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            kept = folder / ("checkpoint" + path.suffix.lower())
            if not kept.exists():
                staging = folder / f".{kept.name}.{threading.get_ident()}"
                shutil.copyfile(path, staging)
                staging.replace(kept)  # written once, under its final name only when complete
            if label_space and Path(label_space).is_file():
                labels_digest = sha256_file(label_space)
                labels = folder / f"labels-{labels_digest[:16]}.txt"
                if not labels.exists():
                    shutil.copyfile(label_space, labels)
                label_space = str(labels)
            key = hashlib.sha256(f"{digest}|{labels_digest or label_space or ''}".encode()).hexdigest()[:8]
            name = f"{path.name} ({key}){UPLOAD_SUFFIX}"
            with self._lock:
                seg = self._loaded.get(name)
            if seg is None:
                seg = self._load(name, kept, label_space, progress)
        except Exception:
            if not any(n for n, s in self._sources.items() if Path(s.target).parent == folder):
                shutil.rmtree(folder, ignore_errors=True)  # refused, and nobody else's file: gone now
            path.unlink(missing_ok=True)
            raise
        self._sources[name] = WeightsSource(name, str(kept), label_space)
        self._remember(name, owner or "")
        seg.name = name
        with self._lock:
            self._loaded[name] = seg
            self._loaded.move_to_end(name)
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
        return name, seg

    def _remember(self, name: str, owner: str) -> None:
        """Give ``name`` to ``owner``; past their quota, forget their oldest upload."""
        with self._lock:
            self._owners.setdefault(name, set()).add(owner)
            mine = [n for n in self._by_owner.get(owner, []) if n != name] + [name]
            while len(mine) > MAX_UPLOADS_PER_OWNER:
                self._forget(mine.pop(0), owner)
            self._by_owner[owner] = mine

    def _forget(self, name: str, owner: str) -> None:
        owners = self._owners.get(name, set())
        owners.discard(owner)
        if owners:
            return
        src = self._sources.pop(name)
        self._owners.pop(name, None)
        self._loaded.pop(name, None)
        folder = Path(src.target).parent
        if not any(Path(s.target).parent == folder for s in self._sources.values()):
            shutil.rmtree(folder, ignore_errors=True)
