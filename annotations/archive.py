"""Safe extraction of ``.zip`` inputs, within one byte and file budget per request.

A server request may carry several zips; :class:`ExtractionBudget` is shared by all of them so
three zips cannot each take the full cap. :func:`extracted_zips` removes every extraction when the
``with`` block ends, whether the work inside succeeded or failed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import UnsafeArchiveError

DEFAULT_MAX_BYTES = 2 * 1024**3  # 2 GiB unpacked
DEFAULT_MAX_FILES = 20_000
_CHUNK = 1 << 20
_IGNORED_TOP = ("__MACOSX",)  # what macOS's "Compress" adds beside the folder


@dataclass
class ExtractionBudget:
    """Unpacked bytes and entries allowed across every zip of one request.

    Pass the same instance to each :func:`safe_extract_zip` call (or to :func:`extracted_zips`):
    ``bytes_used``/``files_used`` grow with every zip, and the zip that crosses a cap is refused
    with an error naming it. A refused zip's partial extraction is removed and its usage given back.
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    max_files: int = DEFAULT_MAX_FILES
    bytes_used: int = 0
    files_used: int = 0

    def remaining_bytes(self) -> int:
        return max(0, self.max_bytes - self.bytes_used)

    def remaining_files(self) -> int:
        return max(0, self.max_files - self.files_used)


def _check_name(name: str, archive: str) -> PurePosixPath:
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} has an absolute path; refusing to extract")
    parts = PurePosixPath(norm).parts
    if any(p == ".." for p in parts):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} escapes the target folder ('..'); refusing to extract")
    return PurePosixPath(*[p for p in parts if p not in ("", ".")]) if parts else PurePosixPath()


def safe_extract_zip(archive: str | Path, target: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                     max_files: int = DEFAULT_MAX_FILES, budget: ExtractionBudget | None = None) -> Path:
    """Extract ``archive`` into ``target`` refusing zip-slip (``..``), absolute paths,
    symbolic links, more than ``max_files`` entries, and more than ``max_bytes`` unpacked
    (checked on the declared sizes first and on the bytes actually decompressed, counted while
    streaming: headers are not trusted).

    With ``budget`` the caps are the budget's remaining bytes and files (``max_bytes``/``max_files``
    are then ignored) and the usage is added to it. Raises :class:`UnsafeArchiveError` naming the
    zip; on error nothing extracted is left behind.
    """
    archive = Path(archive)
    target = Path(target)
    name = archive.name
    if budget is not None:
        max_bytes, max_files = budget.remaining_bytes(), budget.remaining_files()
        scope = f" (what is left of this request's {budget.max_bytes:,} bytes / {budget.max_files:,} files)"
    else:
        scope = ""
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as e:
        raise UnsafeArchiveError(f"{name}: not a readable zip file: {e}") from e
    with zf:
        infos = zf.infolist()
        if len(infos) > max_files:
            raise UnsafeArchiveError(
                f"{name}: {len(infos)} entries exceed the cap of {max_files} files{scope}")
        declared = 0
        plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        for info in infos:
            rel = _check_name(info.filename, name)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(
                    f"{name}: entry {info.filename!r} is a symbolic link; refusing to extract")
            if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) and stat.S_IFMT(mode):
                raise UnsafeArchiveError(f"{name}: entry {info.filename!r} is not a regular file")
            declared += info.file_size
            if declared > max_bytes:
                raise UnsafeArchiveError(
                    f"{name}: declared unpacked size exceeds the cap of {max_bytes:,} bytes{scope}")
            plan.append((info, rel))
        existed = target.exists()
        target.mkdir(parents=True, exist_ok=True)
        root = target.resolve()
        written = 0
        try:
            for info, rel in plan:
                if not rel.parts:
                    continue
                dest = root.joinpath(*rel.parts)
                if os.path.commonpath([str(root), str(dest.resolve())]) != str(root):
                    raise UnsafeArchiveError(f"{name}: entry {info.filename!r} escapes the target folder")
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                entry_bytes = 0
                with zf.open(info) as src, open(dest, "wb") as out:
                    while True:
                        chunk = src.read(_CHUNK)
                        if not chunk:
                            break
                        entry_bytes += len(chunk)
                        written += len(chunk)
                        if written > max_bytes:
                            raise UnsafeArchiveError(
                                f"{name}: unpacked data exceeds the cap of {max_bytes:,} bytes{scope} "
                                f"(while writing {info.filename!r})")
                        if entry_bytes > info.file_size:
                            raise UnsafeArchiveError(
                                f"{name}: entry {info.filename!r} unpacks to more than its declared "
                                f"{info.file_size} bytes")
                        out.write(chunk)
        except BaseException as e:
            if existed:  # a folder shared with other uploads: remove only what this zip wrote
                for _, rel in reversed(plan):
                    if rel.parts:
                        p = root.joinpath(*rel.parts)
                        if p.is_file():
                            p.unlink(missing_ok=True)
            else:
                shutil.rmtree(root, ignore_errors=True)
            if isinstance(e, (OSError, zipfile.BadZipFile, EOFError, RuntimeError)):
                raise UnsafeArchiveError(f"{name}: cannot extract: {e}") from e
            raise
    if budget is not None:
        budget.bytes_used += written
        budget.files_used += len(infos)
    return target


def single_top_folder(folder: str | Path) -> Path:
    """``folder``'s only sub-folder when everything else in it is hidden or ``__MACOSX`` (what
    zipping a folder produces), else ``folder`` itself: dataset ids are counted from there."""
    folder = Path(folder)
    entries = [e for e in folder.iterdir() if not e.name.startswith(".") and e.name not in _IGNORED_TOP]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return folder


@contextlib.contextmanager
def extracted_zips(archives: str | Path | Sequence[str | Path], budget: ExtractionBudget | None = None, *,
                   dir: str | Path | None = None) -> Iterator[list[Path]]:
    """Extract one or several zips under one ``budget``; yields one folder per zip, in order.

    Every folder is removed when the ``with`` block ends, on success, error or cancellation, not at
    garbage collection. ``dir`` is where the temporary folder is made (default: the system's).
    """
    if isinstance(archives, (str, os.PathLike)):
        archives = [archives]
    budget = budget if budget is not None else ExtractionBudget()
    tmp = tempfile.mkdtemp(prefix="annotations-zip-", dir=dir)
    try:
        folders = []
        for k, archive in enumerate(archives):
            folders.append(safe_extract_zip(archive, Path(tmp) / str(k), budget=budget))
        yield folders
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
