"""Safe extraction of ``.zip`` inputs."""

from __future__ import annotations

import os
import re
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from .errors import UnsafeArchiveError

DEFAULT_MAX_BYTES = 2 * 1024**3  # 2 GiB unpacked
DEFAULT_MAX_FILES = 20_000
_CHUNK = 1 << 20


def _check_name(name: str, archive: str) -> PurePosixPath:
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} has an absolute path; refusing to extract")
    parts = PurePosixPath(norm).parts
    if any(p == ".." for p in parts):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} escapes the target folder ('..'); refusing to extract")
    return PurePosixPath(*[p for p in parts if p not in ("", ".")]) if parts else PurePosixPath()


def safe_extract_zip(archive: str | Path, target: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                     max_files: int = DEFAULT_MAX_FILES) -> Path:
    """Extract ``archive`` into ``target`` refusing zip-slip (``..``), absolute paths,
    symbolic links, more than ``max_files`` entries, and more than ``max_bytes`` unpacked
    (checked on the declared sizes first and on the bytes actually written).

    Raises :class:`UnsafeArchiveError`; on error nothing extracted is left behind.
    """
    archive = Path(archive)
    target = Path(target)
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as e:
        raise UnsafeArchiveError(f"{archive}: not a readable zip file: {e}") from e
    with zf:
        infos = zf.infolist()
        if len(infos) > max_files:
            raise UnsafeArchiveError(f"{archive}: {len(infos)} entries exceed the cap of {max_files} files")
        declared = 0
        plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        for info in infos:
            rel = _check_name(info.filename, str(archive))
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(f"{archive}: entry {info.filename!r} is a symbolic link; refusing to extract")
            if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) and stat.S_IFMT(mode):
                raise UnsafeArchiveError(f"{archive}: entry {info.filename!r} is not a regular file")
            declared += info.file_size
            if declared > max_bytes:
                raise UnsafeArchiveError(
                    f"{archive}: declared unpacked size exceeds the cap of {max_bytes} bytes")
            plan.append((info, rel))
        target.mkdir(parents=True, exist_ok=True)
        root = target.resolve()
        written = 0
        try:
            for info, rel in plan:
                if not rel.parts:
                    continue
                dest = root.joinpath(*rel.parts)
                if os.path.commonpath([str(root), str(dest.resolve())]) != str(root):
                    raise UnsafeArchiveError(f"{archive}: entry {info.filename!r} escapes the target folder")
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
                                f"{archive}: unpacked data exceeds the cap of {max_bytes} bytes "
                                f"(while writing {info.filename!r})")
                        if entry_bytes > info.file_size:
                            raise UnsafeArchiveError(
                                f"{archive}: entry {info.filename!r} unpacks to more than its declared "
                                f"{info.file_size} bytes")
                        out.write(chunk)
        except UnsafeArchiveError:
            shutil.rmtree(root, ignore_errors=True)
            raise
        except (OSError, zipfile.BadZipFile, EOFError, RuntimeError) as e:
            shutil.rmtree(root, ignore_errors=True)
            raise UnsafeArchiveError(f"{archive}: cannot extract: {e}") from e
    return target
