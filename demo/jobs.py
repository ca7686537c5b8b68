"""Each request's job: a server-wide cap on temporary space, a time limit, and folders that do not outlive it.

``@jobs.scoped("evaluate")`` wraps an event function. Before it runs, the temporary space in use (the app's
folder plus Gradio's upload and result cache) is compared with the cap: over it, the user reads "server
busy". The folders the function takes from ``ctx.work.new()`` belong to the job: if it fails or is
cancelled they are removed at once; if it succeeds everything but the files it returns is removed at once,
and those are removed a minute later (Gradio has copied them into its own cache by then, and serves
them from there). The time limit is checked on every progress update; work that cannot report progress
runs in a killable process (:mod:`demo.isolation`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import glob
import inspect
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

import annotations

from .common import WorkDir
from .isolation import read_every_item, run_isolated
from .memory import trim_heap

BUSY = "Server busy: its temporary space is full. Try again in a few minutes."


class TimeLimitExceeded(gr.Error):
    """A request ran past the server's per-request time limit (a gr.Error: the user reads the message)."""

    def __init__(self, message: str):
        super().__init__(message, duration=None)


def time_limit_message(seconds: float) -> str:
    return (f"Stopped: this request ran past the server's time limit of {seconds:g} s. Try fewer or smaller "
            "files, single scale or a smaller test size, or run it locally (python -m segcore / annotations).")


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class TempSpace:
    """Bytes in use under some folders, measured at most every ``recheck`` seconds, against a cap."""

    def __init__(self, folders, cap_bytes: int | None, recheck: float = 2.0):
        self.folders = [str(f) for f in folders]
        """Folders, or glob patterns of folders (``/tmp/segcore-labelme-*``)."""
        self.cap_bytes = cap_bytes
        self.recheck = recheck
        self._measured = (-1e9, 0)
        self._lock = threading.Lock()

    def used(self, fresh: bool = False) -> int:
        with self._lock:
            at, used = self._measured
            if fresh or time.monotonic() - at > self.recheck:
                roots = [r for f in self.folders for r in (glob.glob(f) if "*" in f else [f])]
                used = sum(folder_bytes(Path(r)) for r in roots if os.path.isdir(r))
                self._measured = (time.monotonic(), used)
            return used

    def check(self) -> None:
        if self.cap_bytes and self.used() >= self.cap_bytes:
            raise gr.Error(BUSY, duration=None)


@dataclass
class Job:
    deadline: float | None
    limit: float | None
    folders: list[Path] = field(default_factory=list)
    closers: list = field(default_factory=list)
    budget: annotations.ExtractionBudget = field(default_factory=annotations.ExtractionBudget)
    """What all zips of this request may unpack to, together."""
    """Called when the job ends, however it ends (e.g. a dataset's zip extraction)."""

    def check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeLimitExceeded(time_limit_message(self.limit))

    def timeout_error(self) -> TimeLimitExceeded:
        return TimeLimitExceeded(time_limit_message(self.limit or 0))

    def seconds_left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


_current: contextvars.ContextVar[Job | None] = contextvars.ContextVar("segcore_job", default=None)


def current_job() -> Job | None:
    return _current.get()


class JobDirs(WorkDir):
    """:class:`WorkDir` whose folders belong to the running job and are removed with it."""

    def __init__(self, root: Path, keep_seconds: int = 3600, result_grace: float = 60.0):
        super().__init__(root, keep_seconds)
        self.result_grace = result_grace
        self._finished: list[tuple[float, Path]] = []

    def new(self, kind: str) -> Path:
        path = super().new(kind)
        job = current_job()
        if job is not None:
            job.folders.append(path)
        return path

    def sweep(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [p for t, p in self._finished if now - t >= self.result_grace]
            self._finished = [(t, p) for t, p in self._finished if now - t < self.result_grace]
        for path in due:
            shutil.rmtree(path, ignore_errors=True)
        super().sweep()

    def discard(self, job: Job) -> None:
        for path in job.folders:
            shutil.rmtree(path, ignore_errors=True)

    def finish(self, job: Job, result) -> None:
        """Keep only the files ``result`` names (until the grace period ends); remove the rest now."""
        keep = {os.path.realpath(p) for p in _paths_in(result)}
        for folder in job.folders:
            kept_any = False
            for root, dirs, files in os.walk(folder, topdown=False):
                for name in files:
                    path = os.path.join(root, name)
                    if os.path.realpath(path) in keep:
                        kept_any = True
                    else:
                        with contextlib.suppress(OSError):
                            os.unlink(path)
                for name in dirs:
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.join(root, name))  # only empty ones go
            if kept_any:
                with self._lock:
                    self._finished.append((time.monotonic(), folder))
            else:
                shutil.rmtree(folder, ignore_errors=True)


def _paths_in(value):
    """Every string that could be a file path in an event's return value (tuples, lists, dicts, updates)."""
    if isinstance(value, (str, os.PathLike)):
        yield os.fspath(value)
    elif isinstance(value, (list, tuple, set)):
        for v in value:
            yield from _paths_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _paths_in(v)


class _DeadlineProgress:
    """A gr.Progress that checks the job's time limit on every update."""

    def __init__(self, progress, job: Job):
        self._progress, self._job = progress, job

    def __call__(self, *args, **kwargs):
        self._job.check_time()
        return self._progress(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._progress, name)


class Jobs:
    """Wraps event functions into jobs: temp-space check, time limit, folder clean-up."""

    def __init__(self, work: JobDirs, space: TempSpace, time_limit: float | None,
                 unpacked: tuple[int, int] = (annotations.DEFAULT_MAX_BYTES, annotations.DEFAULT_MAX_FILES)):
        self.work = work
        self.space = space
        self.time_limit = time_limit
        self.unpacked = unpacked
        """(bytes, files) every zip of one request may unpack to, together."""

    def scoped(self, fn):
        sig = inspect.signature(fn)
        names = list(sig.parameters)
        progress_at = names.index("progress") if "progress" in names else None

        @functools.wraps(fn)
        def run(*args, **kwargs):
            self.space.check()
            job = Job(time.monotonic() + self.time_limit if self.time_limit else None, self.time_limit,
                      budget=annotations.ExtractionBudget(*self.unpacked))
            if progress_at is not None:
                if progress_at < len(args):
                    args = (*args[:progress_at], _DeadlineProgress(args[progress_at], job), *args[progress_at + 1:])
                elif "progress" in kwargs:
                    kwargs["progress"] = _DeadlineProgress(kwargs["progress"], job)
            token = _current.set(job)
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                self.work.discard(job)
                raise
            finally:
                _current.reset(token)
                for close in job.closers:
                    close()
                trim_heap()  # the job's buffers are free now: give their pages back (throttled)
            self.work.finish(job, result)
            return result

        return run

    def screen(self, dataset) -> None:
        """Read every item of ``dataset`` once in a killable process before the real run reads it here.

        labelme files are decoded and rasterised in pure Python and Pillow calls that hold the interpreter:
        one hostile file would stall every request of this server. Whatever is slow to read is stopped at
        the time limit out there, and never reaches this process.
        """
        job = current_job() or Job(time.monotonic() + self.time_limit if self.time_limit else None, self.time_limit)
        if hasattr(dataset, "close"):
            job.closers.append(dataset.close)  # a zip's extraction goes when the job ends, not at collection
        run_isolated(read_every_item, dataset, timeout=job.seconds_left(), on_timeout=job.timeout_error())
