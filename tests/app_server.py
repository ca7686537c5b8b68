"""``python app.py`` in a subprocess on 127.0.0.1 and a free port, for every test (and benchmark) that drives
the real app: one start-up and shut-down rule instead of a copy in each module."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_SIZE = 65  # single scale at this test size, the tiny checkpoints answer at once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(workdir: Path, weights, **env_extra):
    """Start ``python app.py`` on 127.0.0.1 and a free port; yield its URL once it answers."""
    with running_server(workdir, weights, **env_extra) as (url, _):
        yield url


@contextlib.contextmanager
def running_server(workdir: Path, weights, *args, **env_extra):
    """:func:`running_app` that also yields the server's process (``(url, proc)``); ``args`` go to app.py.

    Everything the server writes stays under ``workdir`` (its log is ``workdir/server.log``); nothing is
    downloaded (``SEGCORE_WEIGHTS`` names the checkpoint, the Hugging Face hub is offline)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "SEGCORE_WEIGHTS": str(weights), "SEGCORE_HOME": str(workdir / "home"),
           "SEGCORE_APP_DIR": str(workdir / "app"), "GRADIO_TEMP_DIR": str(workdir / "gradio"),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           **{k: str(v) for k, v in env_extra.items()}}
    log = workdir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    # and Gradio's own check of the URL is over: it ends launch() when slow (a busy machine)
                    if r.status == 200 and b"To create a public link" in log.read_bytes():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the app did not answer within 180 s:\n{log.read_text()}")
            time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
