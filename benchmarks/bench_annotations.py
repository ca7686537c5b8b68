"""labelme -> VOC conversion throughput: ours (``annotations.convert_folder``, workers = cores)
against labelme's reference conversion, side by side on the same generated folder.

Reference: the loop of labelme's ``examples/semantic_segmentation/labelme2voc.py`` (labelme 6.3.1,
one process), which writes the same set of outputs ours does: the image as JPEG, the class map
(``.npy`` and palette PNG via ``lblsave``) and a visualisation (``imgviz.label2rgb`` with the class
legend) as JPEG. A lighter "class PNG only" loop is timed too, for the bare rasterise-and-save cost.

Folder: VOC-sized 500x375 images (gradients + mild noise, so JPEG/PNG sizes are photo-like rather
than those of pure noise), 12 shapes of every type per file, half embedded as base64, half
referenced PNG/JPEG files. Each timed pass writes to a fresh output folder. Ours runs first
(before labelme and its onnxruntime/Qt imports are loaded into this process, as in the CLI).
Medians over repeats after one warm-up pass.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _reference(files: list[Path], out: Path, *, full: bool = True) -> None:
    import imgviz
    import labelme
    import numpy as np

    from labelme_fixtures import LABELME_VOC_NAME_TO_ID

    names = [n for n, _ in sorted(LABELME_VOC_NAME_TO_ID.items(), key=lambda kv: kv[1]) if _ >= 0]
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassPNG", "SegmentationClassVisualization"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for f in files:
        lf = labelme.LabelFile(filename=str(f))
        img = labelme.utils.img_data_to_arr(lf.image_data)
        cls, _ = labelme.utils.shapes_to_label(img_shape=img.shape, shapes=lf.shapes,
                                               label_name_to_value=LABELME_VOC_NAME_TO_ID)
        # imgviz 2.x's lblsave wants uint8; -1 (__ignore__) becomes 255 as in older labelme lblsave
        imgviz.io.lblsave(str(out / "SegmentationClassPNG" / f"{f.stem}.png"), cls.astype("uint8"))
        if not full:
            continue
        (out / "JPEGImages" / f"{f.stem}.jpg").write_bytes(lf.image_data)
        np.save(out / "SegmentationClass" / f"{f.stem}.npy", cls)
        viz = imgviz.label2rgb(cls.clip(0), imgviz.rgb2gray(img), font_size=15, label_names=names, loc="rb")
        imgviz.io.imsave(str(out / "SegmentationClassVisualization" / f"{f.stem}.jpg"), viz)


def _ours(src: Path, out: Path, workers: int) -> None:
    import annotations

    rep = annotations.convert_folder(src, out, "voc", workers=workers)
    assert rep.ok, rep.errors[:3]


def _time(fn, repeats: int, tmp: Path, tag: str) -> float:
    times = []
    for k in range(repeats):
        out = tmp / f"{tag}_{k}"
        t0 = time.perf_counter()
        fn(out)
        times.append(time.perf_counter() - t0)
        shutil.rmtree(out, ignore_errors=True)
    return statistics.median(times)


def run(quick: bool) -> dict:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    for p in (str(ROOT), str(ROOT / "tests")):
        if p not in sys.path:
            sys.path.insert(0, p)
    import logging

    try:
        from loguru import logger  # labelme logs every image load at DEBUG

        logger.remove()
    except ImportError:  # pragma: no cover
        pass
    logging.disable(logging.WARNING)
    from labelme_fixtures import generate_folder

    n = 16 if quick else 64
    repeats = 2 if quick else 3
    workers = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-annotations-"))
    try:
        src = tmp / "src"
        files = generate_folder(src, n, seed=0, size=(500, 375), n_shapes=12, noise=8)
        _ours(src, tmp / "warm_ours", workers)  # warm-up (imports, page cache)
        t_ours = _time(lambda out: _ours(src, out, workers), repeats, tmp, "ours")
        t_ours1 = _time(lambda out: _ours(src, out, 1), repeats, tmp, "ours1")
        _reference(files[:4], tmp / "warm_ref")
        t_ref = _time(lambda out: _reference(files, out), repeats, tmp, "ref")
        t_ref_png = _time(lambda out: _reference(files, out, full=False), repeats, tmp, "refpng")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "images": n,
        "image_size": [500, 375],
        "shapes_per_image": 12,
        "workers": workers,
        "labelme2voc_images_per_s": round(n / t_ref, 2),
        "labelme_class_png_only_images_per_s": round(n / t_ref_png, 2),
        "ours_images_per_s": round(n / t_ours, 2),
        "ours_single_worker_images_per_s": round(n / t_ours1, 2),
        "speedup_vs_labelme": round(t_ref / t_ours, 2),
        "speedup_single_worker_vs_labelme": round(t_ref / t_ours1, 2),
        "speedup_vs_class_png_only_loop": round(t_ref_png / t_ours, 2),
        "goal_speedup": 2.0,
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform()},
    }


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=2))
