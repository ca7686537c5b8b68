"""Pre-labelling cost: ``predict --format labelme`` against ``--format png`` on the same folder, side by
side in one run, and the labelme writer's contour extraction per image at 513 and at 2000 px.

Model: ``train/configs/smoke.yaml`` trained briefly here (seconds), so predictions are blobs with
realistically ragged edges rather than a random model's speckle (which would make contours unrealistically
costly). Folder: the smoke data set's images enlarged to 513 px. Both formats run through
``segcore.batch.predict_files`` into fresh folders; medians over repeats after a warm-up run. Contour
extraction: :meth:`segcore.prelabel.LabelmeWriter.shapes` on the model's label maps enlarged (nearest) to
513 and 2000 px on the long side, with the round-trip check timed separately.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _train(run: Path, iterations: int) -> Path:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # a tiny model: threads only contend
    subprocess.run([sys.executable, "-m", "train", "--config", "train/configs/smoke.yaml", "--out", str(run),
                    "--set", f"solver.iterations={iterations}", "--set", "log.val_every=0",
                    "--set", "log.progress=false", "--set", "log.tensorboard=false",
                    "--set", f"log.save_every={iterations}"], cwd=ROOT, env=env, check=True, capture_output=True)
    return run / "checkpoints" / "final.pth"


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(quick: bool) -> dict:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import numpy as np
    from PIL import Image

    import segcore
    from segcore.batch import predict_files
    from segcore.prelabel import LabelmeWriter, round_trip

    n = 4 if quick else 16
    repeats = 1 if quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="bench-prelabel-"))
    try:
        ckpt = _train(tmp / "smoke", 60 if quick else 150)
        folder = tmp / "images"
        folder.mkdir()
        sources = sorted((tmp / "smoke/data/synthetic/JPEGImages").glob("*.jpg"))[:n]
        for p in sources:
            Image.open(p).convert("RGB").resize((513, 513), Image.BILINEAR).save(folder / p.name, quality=95)
        seg = segcore.Segmenter.from_pretrained(ckpt, scales=(), test_size=513, device="cpu")
        runs = iter(range(10**6))

        def predict(formats):
            predict_files(seg, [folder], tmp / f"out{next(runs)}", formats, progress=False)

        predict(("png",))  # warm-up: the fast path is built, the page cache filled
        t_png = _median_time(lambda: predict(("png",)), repeats)
        t_labelme = _median_time(lambda: predict(("labelme",)), repeats)
        t_both = _median_time(lambda: predict(("png", "labelme")), repeats)

        writer = LabelmeWriter(seg.class_names)
        maps = [seg.predict(folder / p.name).label_map for p in sources[: 2 if quick else 8]]
        contours = {}
        for side in (513, 2000):
            big = [np.asarray(Image.fromarray(m).resize((side, side), Image.NEAREST)) for m in maps]
            t_shapes = _median_time(lambda: [writer.shapes(m) for m in big], repeats) / len(big)
            docs = [writer.document(m, "x.jpg") for m in big]
            t_check = _median_time(lambda: [round_trip(d, writer, m) for d, m in zip(docs, big)], repeats) / len(big)
            contours[f"{side}px"] = {
                "contour_ms_per_image": round(1000 * t_shapes, 2),
                "round_trip_check_ms_per_image": round(1000 * t_check, 2),
                "shapes_per_image": round(sum(len(d["shapes"]) for d in docs) / len(docs), 1),
                "round_trip_min": round(min(round_trip(d, writer, m) for d, m in zip(docs, big)), 5),
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "images": n,
        "image_size": [513, 513],
        "model": "smoke.yaml trained briefly (4 classes), single scale, test size 513",
        "precision": seg.precision,
        "png_images_per_s": round(n / t_png, 2),
        "labelme_images_per_s": round(n / t_labelme, 2),
        "png_and_labelme_images_per_s": round(n / t_both, 2),
        "labelme_vs_png_speed": round(t_png / t_labelme, 3),
        "contours": contours,
        "note": "side by side in one run, medians after warm-up; labelme includes copying the image and the "
                "round-trip check",
    }


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=2))
