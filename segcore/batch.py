"""Batch prediction at scale: many images in, label maps / overlays / labelme projects / npz out.

What makes it safe to run on thousands of images: every output is written atomically (a hidden part file
renamed into place), so a stopped run leaves only whole files; a run folder remembers its settings
(``.segcore-predict``), so running the same command again skips finished images, while a different
command on the same folder is refused instead of mixing results; under ``torchrun`` each process takes
every N-th image of the sorted list, so every output is written once; images are decoded by background
threads while the model runs. The CLI (``python -m segcore predict``) and the app both run this.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

import annotations

from .distributed import barrier, gather_objects, rank_and_world
from .errors import SegcoreError
from .prelabel import DEFAULT_MIN_AREA, DEFAULT_TOLERANCE, LabelmeWriter, dumps, round_trip, write_inverse_map

FORMATS = ("png", "labelme", "npz")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MANIFEST = ".segcore-predict"
"""The run's settings (JSON); no .json suffix, so globs for labelme files never pick it up."""
REPORT = "predict_report.jsonl"
LABELME_DIR = "labelme"
"""Where the labelme project goes when other formats are written too: labelme's "Open Dir" would list
label-map PNGs and overlays as images to annotate."""


class PredictError(SegcoreError):
    """Bad batch input or a run folder that cannot be used as asked."""


@dataclass(frozen=True)
class InputImage:
    """An image to segment and its path relative to the input it came from (what the outputs mirror)."""

    source: Path
    rel: PurePosixPath
    shown: str = ""
    """How messages name it (a zip member as ``archive.zip/inner/path``); the source path when empty."""

    def __str__(self) -> str:
        return self.shown or str(self.source)


@dataclass
class BatchResult:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    round_trip: dict[str, float] = field(default_factory=dict)
    stopped: bool = False

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.stopped else 0

    def merge(self, other: BatchResult) -> None:
        self.done += other.done
        self.skipped += other.skipped
        self.failed.update(other.failed)
        self.round_trip.update(other.round_trip)
        self.stopped = self.stopped or other.stopped


# ----------------------------------------------------------------------------- inputs


class Inputs(contextlib.AbstractContextManager):
    """The images named by files, folders (searched recursively) and ``.zip`` files.

    Zips are extracted (with ``annotations.safe_extract_zip``'s limits) into a temporary folder that is
    removed on :meth:`close`. Folder entries that cannot be listed are kept in :attr:`failed`.
    """

    def __init__(self, inputs, *, max_zip_bytes: int = annotations.DEFAULT_MAX_BYTES,
                 max_zip_files: int = annotations.DEFAULT_MAX_FILES, workdir: Path | None = None):
        self.images: list[InputImage] = []
        self.failed: dict[str, str] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="segcore-predict-", dir=workdir))
        try:
            for i, item in enumerate(inputs):
                self._add(Path(item), i, max_zip_bytes, max_zip_files)
            self._check_unique()
        except BaseException:
            self.close()
            raise

    def _add(self, path: Path, i: int, max_zip_bytes: int, max_zip_files: int) -> None:
        if path.is_dir():
            self._folder(path, path)
        elif path.is_file() and path.suffix.lower() == ".zip":
            target = self._tmp / f"zip{i}"
            try:
                annotations.safe_extract_zip(path, target, max_bytes=max_zip_bytes, max_files=max_zip_files)
            except annotations.AnnotationError as exc:  # named in the report; the other inputs still run
                self.failed[str(path)] = str(exc).removeprefix(f"{path}: ")
                return
            self._folder(target, target, shown=path)
        elif path.is_file():
            self.images.append(InputImage(path, PurePosixPath(path.name)))
        else:
            self.failed[str(path)] = "no such file or folder"

    def _folder(self, folder: Path, root: Path, shown: Path | None = None) -> None:
        def unreadable(exc: OSError) -> None:
            where = Path(exc.filename) if exc.filename else folder
            self.failed[str(shown / where.relative_to(root) if shown else where)] = \
                f"cannot list the folder ({exc.strerror or exc})"

        for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
            for name in sorted(filenames):
                if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    p = Path(dirpath) / name
                    rel = PurePosixPath(p.relative_to(root).as_posix())
                    self.images.append(InputImage(p, rel, f"{shown}/{rel}" if shown else ""))

    def _check_unique(self) -> None:
        seen: dict[PurePosixPath, InputImage] = {}
        for image in self.images:
            key = image.rel.with_suffix("")
            if key in seen:
                raise PredictError(f"{image} and {seen[key]} would write the same outputs "
                                   f"({key}.*); pass them in separate runs or rename one")
            seen[key] = image
        self.images.sort(key=lambda im: str(im.rel))

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_path(dest: Path):
    """A hidden part-file path beside ``dest``, renamed onto ``dest`` when the block succeeds and removed
    when it fails, so ``dest`` is either absent, its old self or whole."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        yield part
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


class StopFlag:
    """Set by SIGTERM / SIGINT while a run is going: the run ends after the image in hand."""

    def __init__(self):
        self.event = threading.Event()

    def __bool__(self) -> bool:
        return self.event.is_set()

    @contextlib.contextmanager
    def on_signals(self, *signals):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, lambda *_: self.event.set()) for s in signals}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class BatchPredictor:
    """Segments images with one :class:`~segcore.Segmenter` and writes the chosen formats under ``out``."""

    def __init__(self, segmenter, out, formats=("png",), *, names: dict | None = None,
                 tolerance: float = DEFAULT_TOLERANCE, min_area: int = DEFAULT_MIN_AREA,
                 write_background: bool = False, opacity: float = 0.5, probabilities: bool = False,
                 copy_images: bool = True, embed_images: bool = False, overwrite: bool = False,
                 decode_workers: int = 2):
        formats = tuple(dict.fromkeys(formats))
        bad = [f for f in formats if f not in FORMATS]
        if bad or not formats:
            raise PredictError(f"unknown output format(s) {bad or formats}; choose from {', '.join(FORMATS)}")
        if not 0 <= opacity <= 1:
            raise PredictError(f"opacity must be in [0, 1], got {opacity}")
        self.segmenter = segmenter
        self.out = Path(out)
        self.formats = formats
        self.labelme_root = self.out if formats == ("labelme",) else self.out / LABELME_DIR
        try:
            self.writer = LabelmeWriter(segmenter.class_names, names=dict(names or {}), tolerance=tolerance,
                                        min_area=min_area, write_background=write_background,
                                        description=self.description())
        except ValueError as exc:
            raise PredictError(str(exc)) from exc
        self.opacity = float(opacity)
        self.probabilities = bool(probabilities)
        self.copy_images = bool(copy_images)
        self.embed_images = bool(embed_images)
        self.overwrite = bool(overwrite)
        self.decode_workers = max(1, int(decode_workers))
        self.settings = {"formats": list(formats), **segmenter.describe(), "opacity": self.opacity,
                         "probabilities": self.probabilities, "copy_images": self.copy_images,
                         "embed_images": self.embed_images}
        if "labelme" in formats:
            self.settings.update(names=self.writer.names, tolerance=tolerance, min_area=min_area,
                                 write_background=bool(write_background))
        self.settings.pop("device", None)  # the same run may continue on another device

    def description(self) -> str:
        return f"predicted by {self.segmenter.name or 'a DeepLab-v2 model'}"

    # -- what an image produces ------------------------------------------------------------------

    def outputs(self, image: InputImage) -> list[Path]:
        stem = image.rel.with_suffix("")
        paths = []
        if "png" in self.formats:
            paths += [self.out / f"{stem}.png", self.out / f"{stem}_overlay.jpg"]
        if "npz" in self.formats:
            paths.append(self.out / f"{stem}.npz")
        if "labelme" in self.formats:
            if self.copy_images and not self.embed_images:
                paths.append(self.labelme_root / image.rel)
            paths.append(self.labelme_root / f"{stem}.json")  # last: the file labelme opens
        return paths

    def finished(self, image: InputImage) -> bool:
        return all(p.is_file() for p in self.outputs(image))

    def write(self, image: InputImage, pred) -> float | None:
        """Write ``image``'s outputs; returns the labelme round-trip figure (None without labelme)."""
        stem = image.rel.with_suffix("")
        if "png" in self.formats:
            with atomic_path(self.out / f"{stem}.png") as part:
                pred.to_pil().save(part, format="PNG")
            with atomic_path(self.out / f"{stem}_overlay.jpg") as part:
                Image.fromarray(pred.overlay(self.opacity)).save(part, format="JPEG", quality=92)
        if "npz" in self.formats:
            arrays = {"label_map": pred.label_map, "class_names": np.array(pred.class_names)}
            if self.probabilities:
                arrays["probabilities"] = pred.probabilities.astype(np.float16)
            with atomic_path(self.out / f"{stem}.npz") as part, open(part, "wb") as f:
                np.savez_compressed(f, **arrays)
        if "labelme" in self.formats:
            return self._write_labelme(image, pred)
        return None

    def _write_labelme(self, image: InputImage, pred) -> float:
        json_path = self.labelme_root / f"{image.rel.with_suffix('')}.json"
        data = None
        if self.embed_images:
            data = base64.b64encode(embedded_image(image.source)).decode("ascii")
            image_path = image.rel.name
        elif self.copy_images:
            with atomic_path(self.labelme_root / image.rel) as part:
                shutil.copyfile(image.source, part)
            image_path = image.rel.name
        else:
            image_path = Path(os.path.relpath(image.source.resolve(), json_path.parent.resolve())).as_posix()
        document = self.writer.document(pred.label_map, image_path, image_data=data)
        with atomic_path(json_path) as part:
            part.write_text(dumps(document), encoding="utf-8")
        return round_trip(document, self.writer, pred.label_map)

    # -- the run -----------------------------------------------------------------------------------

    def prepare(self, images: list[InputImage], rank: int = 0) -> None:
        """Check the run folder: resume a run with these settings, refuse one with others or stray outputs
        (unless ``overwrite``), and (rank 0) record the settings."""
        manifest = self.out / MANIFEST
        if not self.overwrite:
            if manifest.is_file():
                try:
                    previous = json.loads(manifest.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    previous = None
                if previous != self.settings:
                    changed = sorted(k for k in set(self.settings) | set(previous or {})
                                     if (previous or {}).get(k) != self.settings.get(k))
                    raise PredictError(f"{self.out} holds a predict run with other settings "
                                       f"({', '.join(changed) or 'unreadable'}); pass --overwrite to replace "
                                       "its outputs, or choose another --out")
            else:
                clash = next((p for im in images for p in self.outputs(im) if p.exists()), None)
                if clash is not None:
                    raise PredictError(f"{clash} already exists and is not from a segcore predict run; pass "
                                       "--overwrite to replace it, or choose another --out")
        if rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with atomic_path(manifest) as part:
                part.write_text(json.dumps(self.settings, indent=1, sort_keys=True), encoding="utf-8")
            if "labelme" in self.formats:
                self.labelme_root.mkdir(parents=True, exist_ok=True)
                write_inverse_map(self.writer, self.labelme_root / "label_names.yaml")

    def run(self, images: list[InputImage], *, rank: int = 0, world: int = 1, progress: bool = True,
            on_image=None, stop=None) -> BatchResult:
        """Segment this process's share of ``images`` (every ``world``-th from ``rank``), skipping finished
        ones unless ``overwrite``. ``on_image(done, total)`` is called after each image; a true ``stop``
        ends the run after the image in hand."""
        from tqdm.auto import tqdm

        result = BatchResult()
        mine = images[rank::world]
        todo = []
        for image in mine:
            if not self.overwrite and self.finished(image):
                result.skipped.append(str(image.rel))
            else:
                todo.append(image)
        bar = tqdm(total=len(todo), desc="predict" if world == 1 else f"predict [rank {rank}]", unit="img",
                   disable=not progress, position=rank, dynamic_ncols=True)
        report = self.out / REPORT
        batch_size = max(1, self.segmenter.batch_size)
        with ThreadPoolExecutor(self.decode_workers, thread_name_prefix="decode") as pool, bar:
            pending: deque = deque()
            queue = iter(todo)

            def refill():
                while len(pending) < batch_size + 2 * self.decode_workers:
                    image = next(queue, None)
                    if image is None:
                        return
                    pending.append((image, pool.submit(self.segmenter.preprocess, image.source)))

            refill()
            while pending and not stop:
                batch = []
                while pending and len(batch) < batch_size:
                    image, future = pending.popleft()
                    try:
                        batch.append((image, future.result()))
                    except (SegcoreError, OSError, ValueError) as exc:
                        self._failed(result, image, exc, bar, report)
                    refill()
                if not batch:
                    continue
                predictions = self.segmenter.predict_prepared([p for _, p in batch],
                                                              return_probs=self.probabilities)
                for (image, _), pred in zip(batch, predictions):
                    try:
                        figure = self.write(image, pred)
                    except OSError as exc:
                        for path in self.outputs(image):  # an image's outputs are all there or none
                            path.unlink(missing_ok=True)
                        self._failed(result, image, exc, bar, report)
                        continue
                    key = str(image.rel)
                    result.done.append(key)
                    record = {"image": key, "size": [int(pred.label_map.shape[1]), int(pred.label_map.shape[0])]}
                    if figure is not None:
                        result.round_trip[key] = figure
                        record["round_trip"] = round(figure, 6)
                    _append_line(report, record)
                    bar.update(1)
                    if on_image:
                        on_image(len(result.done) + len(result.failed), len(todo))
            for _, future in pending:
                future.cancel()
            result.stopped = bool(stop) and bool(pending)
        return result

    def _failed(self, result: BatchResult, image: InputImage, exc: Exception, bar, report: Path) -> None:
        from tqdm.auto import tqdm

        message = str(exc).replace(str(image.source), str(image)).removeprefix(f"{image}: ")
        result.failed[str(image)] = message
        _append_line(report, {"image": str(image.rel), "error": message})
        tqdm.write(f"FAILED {image}: {message}", file=sys.stderr)
        bar.update(1)


def embedded_image(path: Path) -> bytes:
    """The bytes labelme would embed for ``path`` (its ``read_image_file``): the file itself, or, for an
    EXIF-rotated photo or a format other than JPEG/PNG, the upright image re-encoded, so ``imageData`` has
    the size the label map (and ``imageHeight``/``imageWidth``) has."""
    with Image.open(path) as raw:
        upright = annotations.apply_exif_orientation(raw)
        if upright is raw and path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            return path.read_bytes()
        buffer = io.BytesIO()
        fmt = "PNG" if "A" in upright.mode else "JPEG"
        (upright if fmt == "PNG" else upright.convert("RGB")).save(buffer, format=fmt, quality=95)
        return buffer.getvalue()


def _append_line(path: Path, record: dict) -> None:
    """One JSON line in a single write(), so processes appending to the same report never interleave."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_report(out: Path) -> dict[str, dict]:
    """The run folder's per-image records, the latest per image (a resumed image is recorded again)."""
    path = Path(out) / REPORT
    if not path.is_file():
        return {}
    records = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            records[record["image"]] = record
    return records


def predict_files(segmenter, inputs, out, formats=("png",), *, progress: bool = True, on_image=None,
                  stop=None, max_zip_bytes: int = annotations.DEFAULT_MAX_BYTES,
                  max_zip_files: int = annotations.DEFAULT_MAX_FILES, workdir: Path | None = None,
                  **options) -> BatchResult:
    """Segment the images in ``inputs`` (files, folders, zips, or an open :class:`Inputs`) into ``out`` in
    ``formats`` (see :class:`BatchPredictor` for ``options``). Under torchrun, call it in every process: each
    takes its share and the result returned on every rank covers all of them."""
    rank, world = rank_and_world()
    predictor = BatchPredictor(segmenter, out, formats, **options)
    found = inputs if isinstance(inputs, Inputs) else Inputs(inputs, max_zip_bytes=max_zip_bytes,
                                                             max_zip_files=max_zip_files, workdir=workdir)
    with found:
        if not found.images and not found.failed:
            raise PredictError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, inputs))}")
        if rank == 0:
            for name, message in found.failed.items():  # named as they are found, like unreadable images
                print(f"FAILED {name}: {message}", file=sys.stderr)
        predictor.prepare(found.images, rank)
        barrier(world)
        result = predictor.run(found.images, rank=rank, world=world, progress=progress, on_image=on_image,
                               stop=stop)
        if rank == 0:
            result.failed.update(found.failed)
        merged = BatchResult()
        for part in gather_objects(result, world):
            merged.merge(part)
    return merged
