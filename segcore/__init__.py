"""segcore: DeepLab-v2 ResNet-101 inference, checkpoints, CRF, metrics and evaluation, without UI."""

from .checkpoint import Checkpoint, load_model, read_checkpoint, save_checkpoint
from .crf import DenseCRF
from .errors import CheckpointError, DownloadError, ImageError, SegcoreError
from .image import load_image, resize_long_side
from .model import BGR_MEAN, MSC, DeepLabV2, ModelConfig, build_model, msc_forward
from .segmenter import Prediction, Segmenter, palette_image
from .weights import REGISTRY, Weights, cache_dir, download

__all__ = [
    "BGR_MEAN", "MSC", "REGISTRY", "Checkpoint", "CheckpointError", "DeepLabV2", "DenseCRF", "DownloadError",
    "ImageError", "ModelConfig", "Prediction", "SegcoreError", "Segmenter", "Weights", "build_model",
    "cache_dir", "download", "load_image", "load_model", "msc_forward", "palette_image", "read_checkpoint",
    "resize_long_side", "save_checkpoint",
]
