"""segcore: DeepLab-v2 ResNet-101 inference, checkpoints, CRF, metrics and evaluation, without UI.

The names here are what users call; everything else is imported from its submodule
(``segcore.checkpoint``, ``segcore.metrics``, ``segcore.report``, ...).
"""

from .batch import predict_files
from .checkpoint import load_model
from .comparison import compare
from .crf import DenseCRF
from .datasets import DatasetError, open_dataset
from .errors import CheckpointError, DownloadError, ImageError, OptionError, SegcoreError
from .evaluation import EvaluationError, evaluate
from .model import build_model
from .segmenter import Prediction, Segmenter
from .video import VideoCancelled, VideoError, segment_video
from .weights import REGISTRY

__all__ = [
    "Segmenter", "Prediction", "load_model", "build_model", "REGISTRY", "DenseCRF",
    "evaluate", "compare", "open_dataset", "predict_files", "segment_video",
    "SegcoreError", "CheckpointError", "DatasetError", "DownloadError", "EvaluationError", "ImageError",
    "OptionError", "VideoError", "VideoCancelled",
]
