"""Run a pure-Python, CPU-heavy function in a separate process that can be stopped.

A thread that holds the interpreter (a C call that never releases the GIL, a runaway pure-Python loop)
stalls the whole server's event loop; a process does not, and a process can be killed at the time
limit. Used for work that needs no model (labelme conversion). Processes come from a fork server
started once, with the packages already imported, so a job starts in milliseconds.
"""

from __future__ import annotations

import multiprocessing
import time

PRELOAD = ["demo.isolation", "annotations"]
"""Imported once by the fork server (importing `demo` brings Gradio in: each job would pay for it)."""


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def warm_up() -> None:
    """Start the fork server now (in the background), so the first job does not wait for it."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


class _Progress:
    def __init__(self, conn):
        self.conn = conn

    def __call__(self, done, total):
        self.conn.send(("progress", (done, total)))


def _child(conn, fn, args, kwargs, with_progress):
    try:
        if with_progress:
            kwargs = {**kwargs, "progress": _Progress(conn)}
        conn.send(("result", fn(*args, **kwargs)))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
        try:
            conn.send(("error", exc))
        except Exception:  # an exception that does not pickle: its text still does
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
    finally:
        conn.close()


class WorkerDied(RuntimeError):
    pass


def run_isolated(fn, *args, timeout: float | None, on_progress=None, on_timeout=TimeoutError, **kwargs):
    """``fn(*args, **kwargs)`` in a child process; its exceptions are raised here.

    ``on_progress(done, total)`` receives the child's ``progress`` calls (``fn`` then gets a ``progress``
    keyword). Past ``timeout`` seconds the child is killed and ``on_timeout`` (an exception) is raised.
    """
    ctx = _context()
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, fn, args, kwargs, on_progress is not None), daemon=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    proc.start()
    sender.close()
    try:
        while True:
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait <= 0:
                raise on_timeout
            if receiver.poll(wait):
                try:
                    kind, payload = receiver.recv()
                except EOFError:
                    raise WorkerDied(f"the worker process ended unexpectedly (exit code {proc.exitcode})") from None
                if kind == "progress":
                    on_progress(*payload)
                elif kind == "result":
                    return payload
                else:
                    raise payload
    finally:
        receiver.close()
        if proc.is_alive():
            proc.kill()
        proc.join()


def read_every_item(dataset) -> int:
    """Read each item of a dataset once (errors are the evaluation's to report); returns how many read."""
    ok = 0
    for i in range(len(dataset)):
        try:
            dataset[i]
            ok += 1
        except Exception:  # noqa: BLE001 - the real run reports it, with its file name
            pass
    return ok
