"""The app under load and abuse: `python app.py` on loopback, driven by N concurrent gradio_client clients.

Load: ``clients`` threads, each with its own gradio_client session, send ``/segment_image`` requests (a
small image, the tiny random checkpoint, single scale, test size 65) one after the other and download
the results, as a visitor's browser would. Reported: requests/s, p50/p95 latency, failures (with the
first messages), and the server's resident memory (VmRSS) after 100, 500 and 1000 requests: bounded
memory means the last figures are close.

Abuse: while a hostile ``/evaluate`` runs (one labelme circle whose drawing holds the interpreter for
over a minute), another client's plain HTTP requests are timed: the server must keep answering, and the
hostile request must end at the server's time limit with a message.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from .memory import current_rss_mb

ROOT = Path(__file__).resolve().parent.parent
TEST_SIZE = 65
TIME_LIMIT = 15


def _rss(pid: int) -> float:
    return round(current_rss_mb(pid), 1)


def hostile_labelme(folder: Path) -> Path:
    """One circle centred on the image corner with a radius of 999,990 px (labelme accepts it)."""
    import numpy as np
    from labelme_fixtures import write_labelme

    shapes = [{"label": "cat", "points": [[0, 0], [999990, 0]], "shape_type": "circle", "group_id": None,
               "flags": {}}]
    return write_labelme(folder / "circle.json", shapes, np.zeros((40, 40, 3), np.uint8))


def load(url: str, pid: int, image: Path, clients: int, requests: int, marks, downloads: Path) -> dict:
    from gradio_client import Client, handle_file

    lock = threading.Lock()
    latencies, failures, rss = [], [], {}
    counter = iter(range(requests))

    def worker():
        try:
            client = Client(url, verbose=False, httpx_kwargs={"timeout": 300},
                            download_files=tempfile.mkdtemp(prefix="client-", dir=downloads))
        except Exception as exc:  # noqa: BLE001 - a failure is a result here
            with lock:
                failures.append(f"connecting: {type(exc).__name__}: {str(exc)[:200]}")
            return
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            start = time.perf_counter()
            try:
                out = client.predict(handle_file(str(image)), "tiny.pth", False, False, TEST_SIZE, 0.5,
                                     api_name="/segment_image")
                if not all(Path(p).is_file() for p in (out[0], out[1], out[3])):
                    raise RuntimeError(f"result files missing: {out}")
            except Exception as exc:  # noqa: BLE001 - a failure is a result here
                with lock:
                    failures.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            with lock:
                latencies.append(time.perf_counter() - start)
                done = len(latencies)
                if done in marks:
                    rss[done] = _rss(pid)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(latencies), "failures": len(failures),
            "failure_examples": failures[:5], "seconds": round(seconds, 1),
            "requests_per_s": round(len(latencies) / seconds, 2) if latencies else 0.0,
            "latency_p50_s": round(statistics.median(ordered), 3) if ordered else None,
            "latency_p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3) if ordered else None,
            "rss_mib_after": {str(k): v for k, v in sorted(rss.items())}}


def abuse(url: str, folder: Path) -> dict:
    """A hostile /evaluate in one client; plain GET /config from another, timed, until it ends."""
    from gradio_client import Client, handle_file

    bomb = hostile_labelme(folder)
    client = Client(url, verbose=False, httpx_kwargs={"timeout": 300}, download_files=str(folder))
    start = time.perf_counter()
    job = client.submit("Model on labelme annotations", [handle_file(str(bomb))], None, None, "voc", None,
                        "error", "tiny.pth", False, False, TEST_SIZE, api_name="/evaluate")
    waits = []
    while not job.done():
        t = time.perf_counter()
        with urllib.request.urlopen(url + "config", timeout=300) as r:
            r.read()
        waits.append(time.perf_counter() - t)
        time.sleep(0.2)
    try:
        job.result()
        answer = "finished"
    except Exception as exc:  # noqa: BLE001 - the expected outcome: the time limit's message
        answer = str(exc)[:160]
    return {"hostile": "labelme circle, radius 999,990 px, /evaluate", "time_limit_s": TIME_LIMIT,
            "hostile_seconds": round(time.perf_counter() - start, 1), "hostile_answer": answer,
            "other_requests": len(waits), "other_latency_max_s": round(max(waits, default=0.0), 3),
            "other_latency_p50_s": round(statistics.median(waits), 3) if waits else None}


def run(quick: bool) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import numpy as np
    from factories import scene_image, tiny_checkpoint
    from PIL import Image
    from app_server import running_server

    clients = 4 if quick else 16
    marks = (20, 40) if quick else (100, 500, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = tiny_checkpoint(root / "tiny.pth")
        image = root / "scene.png"
        Image.fromarray(np.ascontiguousarray(scene_image(48, 64, seed=1))).save(image)
        with running_server(root / "server", ckpt, SEGCORE_TIME_LIMIT=TIME_LIMIT) as (url, proc):
            rss_idle = _rss(proc.pid)
            result = {"server": "python app.py, tiny random checkpoint, default queue settings",
                      "load_average_before": [round(v, 1) for v in os.getloadavg()],
                      "request": f"/segment_image, 64x48 PNG, single scale, test size {TEST_SIZE}",
                      "rss_mib_idle": rss_idle,
                      "load": load(url, proc.pid, image, clients, marks[-1], set(marks), root)}
            result["abuse"] = abuse(url, root)
            result["rss_mib_end"] = _rss(proc.pid)
    return result
