"""Registry of the published DeepLab-v2 weights, and their download cache.

Metadata travels with the weights, in the manner of torchvision's weight enums: URL, label set,
preprocessing and the scores the authors published for them.
"""

from __future__ import annotations

import http.client
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from annotations import get_label_space

from .errors import DownloadError
from .model import BGR_MEAN

RELEASE_URL = "https://github.com/kazuto1011/deeplab-pytorch/releases/download/v1.0/"


def cache_dir() -> Path:
    """Where weights are kept: ``$SEGCORE_HOME`` or ``~/.cache/segcore``."""
    return Path(os.environ.get("SEGCORE_HOME") or Path.home() / ".cache" / "segcore")


@dataclass(frozen=True)
class Weights:
    name: str
    filename: str
    n_classes: int
    label_space_name: str
    dataset: str
    published: dict
    """Published scores in percent (PA, MA, mIoU, FWIoU; mIoU with CRF where given)."""
    url: str = ""
    mean_bgr: tuple = BGR_MEAN
    crf: dict = field(default_factory=lambda: dict(DEFAULT_CRF))
    sha256: str | None = None
    dataset_format: str | None = None
    """The ``segcore evaluate --format`` of the set the published scores were measured on."""

    def __post_init__(self):
        if not self.url:
            object.__setattr__(self, "url", RELEASE_URL + self.filename)

    @property
    def path(self) -> Path:
        return cache_dir() / self.filename

    def label_space(self):
        return get_label_space(self.label_space_name)

    def fetch(self, *, progress: bool = True) -> Path:
        """The cached file, downloaded first if absent."""
        if self.path.is_file():
            return self.path
        return download(self.url, self.path, progress=progress, sha256=self.sha256)


DEFAULT_CRF = dict(iter_max=10, pos_w=3, pos_xy_std=1, bi_w=4, bi_xy_std=67, bi_rgb_std=3)

REGISTRY: dict[str, Weights] = {
    w.name: w
    for w in (
        Weights("voc12", "deeplabv2_resnet101_msc-vocaug-20000.pth", 21, "voc", "PASCAL VOC 2012 val",
                {"pixel_accuracy": 94.64, "mean_accuracy": 86.50, "mean_iou": 76.65, "fw_iou": 90.41,
                 "mean_iou_crf": 77.93}, dataset_format="voc"),
        Weights("cocostuff164k", "deeplabv2_resnet101_msc-cocostuff164k-100000.pth", 182, "cocostuff",
                "COCO-Stuff 164k val",
                {"pixel_accuracy": 66.8, "mean_accuracy": 51.2, "mean_iou": 39.1, "fw_iou": 51.5},
                dataset_format="cocostuff164k"),
        Weights("cocostuff10k", "deeplabv2_resnet101_msc-cocostuff10k-20000.pth", 182, "cocostuff",
                "COCO-Stuff 10k test",
                {"pixel_accuracy": 65.8, "mean_accuracy": 45.7, "mean_iou": 34.8, "fw_iou": 51.2},
                dataset_format="cocostuff10k"),
    )
}


def download(url: str, dest: str | Path, *, progress: bool = True, sha256: str | None = None,
             timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` atomically: a temporary file in the same folder, renamed when complete.

    A dropped connection, a size that disagrees with Content-Length, a wrong SHA-256 or an interruption
    leaves no file behind. Failing to connect raises a :class:`DownloadError` naming the URL and the
    path where the file can be placed by hand.
    """
    import hashlib

    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    by_hand = f"Download {url} yourself and place it at {dest}"
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    digest = hashlib.sha256()
    received = 0
    try:
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "segcore"}),
                                              timeout=timeout)
        except (urllib.error.URLError, OSError) as exc:
            reason = f"HTTP {exc.code} {exc.reason}" if isinstance(exc, urllib.error.HTTPError) \
                else getattr(exc, "reason", exc)
            raise DownloadError(f"could not download {url} ({reason}). {by_hand}") from exc
        with response, os.fdopen(fd, "wb") as out:
            fd = None
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                      disable=not progress) as bar:
                while True:
                    try:
                        chunk = response.read(1 << 20)
                    except (OSError, ValueError, http.client.HTTPException) as exc:
                        raise DownloadError(f"the connection broke after {received} bytes of {url} ({exc}). "
                                            f"Try again, or: {by_hand}") from exc
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise DownloadError(f"{url}: received {received} bytes but the server announced {total}; "
                                f"nothing was kept. Try again, or: {by_hand}")
        if sha256 and digest.hexdigest() != sha256.lower():
            raise DownloadError(f"{url}: SHA-256 {digest.hexdigest()} does not match the expected {sha256}; "
                                f"nothing was kept. {by_hand}")
        os.replace(tmp, dest)
    finally:
        if fd is not None:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
