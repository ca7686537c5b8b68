"""Weights the app can use, loaded lazily and shared by every request.

A small LRU cache keyed by the weights' name holds loaded :class:`segcore.Segmenter` objects; a lock
makes sure two requests never load the same file twice. Each request gets a light
``with_options`` copy (scales, CRF, test size) that shares the loaded model.
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

UPLOAD_SUFFIX = " (uploaded)"


@dataclass(frozen=True)
class WeightsSource:
    """What a name in the weights menu stands for: a registry name or a checkpoint file."""

    name: str
    target: str
    """Registry name or file path handed to ``Segmenter.from_pretrained``."""
    label_space: str | None = None
    """``voc``, ``cocostuff``, a labels file, or None (the checkpoint / class count decides)."""

    @property
    def registry(self) -> segcore.Weights | None:
        return segcore.REGISTRY.get(self.target)


class ModelStore:
    """Registry names plus checkpoint files, loaded on first use and kept (``max_loaded`` at most)."""

    def __init__(self, default: str = "voc12", *, upload_dir: Path, max_loaded: int = 2,
                 max_pixels: int | None = None, device: str = "auto"):
        self.upload_dir = Path(upload_dir)
        self.max_loaded = max(1, int(max_loaded))
        self.max_pixels = max_pixels
        self.device = device
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

    def choices(self) -> list[str]:
        return list(self._sources)

    def source(self, name: str) -> WeightsSource:
        if name not in self._sources:
            raise segcore.CheckpointError(f"unknown weights {name!r}: choose one of {', '.join(self._sources)} "
                                          "or upload a checkpoint (.pth / .safetensors)")
        return self._sources[name]

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def missing(self, name: str) -> str | None:
        """Why ``name`` cannot be used without a download or a file, and how to fix that; None if ready."""
        src = self._sources.get(name)
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

    def get(self, name: str, progress=None) -> segcore.Segmenter:
        """The loaded model for ``name`` (downloaded and loaded on first use, under a lock)."""
        seg = self._loaded.get(name)
        if seg is not None:
            return seg
        src = self.source(name)
        with self._lock:
            seg = self._loaded.get(name)
            if seg is None:
                if progress is not None:
                    reg = src.registry
                    what = "Downloading and loading" if reg is not None and not reg.path.is_file() else "Loading"
                    progress(0.0, desc=f"{what} the {name} weights (first use)")
                seg = segcore.Segmenter.from_pretrained(src.target, label_space=src.label_space,
                                                        device=self.device, max_pixels=self.max_pixels)
                seg.name = name
                self._loaded[name] = seg
                while len(self._loaded) > self.max_loaded:
                    self._loaded.popitem(last=False)
            else:
                self._loaded.move_to_end(name)
        return seg

    def segmenter(self, name: str, *, multiscale: bool = True, crf: bool = False, test_size: int = 513,
                  progress=None) -> segcore.Segmenter:
        """A Segmenter with this request's options, sharing the cached model."""
        base = self.get(name, progress)
        return base.with_options(scales=DEFAULT_SCALES if multiscale else (), crf=bool(crf),
                                 test_size=int(test_size))

    def upload(self, path: str | Path, label_space: str | None = None) -> tuple[str, segcore.Segmenter]:
        """Keep an uploaded checkpoint, load it (which validates it) and add it to the menu."""
        path = Path(path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digest = h.hexdigest()[:12]
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        kept = self.upload_dir / f"{digest}_{path.name}"
        if not kept.exists():
            shutil.copyfile(path, kept)
        if label_space and Path(label_space).is_file():
            labels = self.upload_dir / f"{digest}_{Path(label_space).name}"
            shutil.copyfile(label_space, labels)
            label_space = str(labels)
        seg = segcore.Segmenter.from_pretrained(kept, label_space=label_space, device=self.device,
                                                max_pixels=self.max_pixels)
        name = self.add(str(kept), label_space, display=path.name + UPLOAD_SUFFIX)
        seg.name = name
        with self._lock:
            self._loaded[name] = seg
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
        return name, seg
