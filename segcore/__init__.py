"""segcore: DeepLab-v2 ResNet-101 inference, checkpoints, CRF, metrics and evaluation, without UI."""

from .caffe import convert_caffe_file, convert_caffemodel, read_backbone
from .checkpoint import Checkpoint, load_model, read_checkpoint, save_checkpoint, validate_checkpoint
from .crf import DenseCRF
from .datasets import DatasetError, Sample, SegmentationDataset, open_dataset
from .errors import CheckpointError, DownloadError, ImageError, OptionError, SegcoreError
from .evaluate import EvaluationError, EvaluationResult, evaluate
from .image import check_image_size, load_image, resize_long_side
from .metrics import ConfusionMatrix, MetricsError, compute_scores, image_scores, to_json_dict
from .model import BGR_MEAN, MSC, DeepLabV2, ModelConfig, build_model, msc_forward
from .protocol import PROTOCOLS, Protocol, ProtocolError, default_protocol
from .segmenter import Prediction, Segmenter, palette_image
from .video import VideoCancelled, VideoError, VideoResult, segment_video
from .weights import REGISTRY, Weights, cache_dir, download

_REPORT = ("ReportError", "class_iou_figure", "confusion_figure", "format_score_table", "sha256_file",
           "write_report")


_BATCH = {"BatchPredictor": "batch", "predict_files": "batch", "LabelmeWriter": "prelabel"}


def __getattr__(name):
    # the report helpers pull in plotly, batch prediction and pre-labelling OpenCV: import them when asked for
    if name in _REPORT:
        from . import report

        return getattr(report, name)
    if name in _BATCH:
        import importlib

        return getattr(importlib.import_module(f".{_BATCH[name]}", __name__), name)
    raise AttributeError(f"module 'segcore' has no attribute {name!r}")


__all__ = [*_REPORT, *_BATCH, "DatasetError", "EvaluationError", "EvaluationResult", "Sample", "SegmentationDataset",
           "evaluate", "open_dataset", "VideoCancelled", "VideoError", "VideoResult", "segment_video",
           "PROTOCOLS", "Protocol", "ProtocolError", "default_protocol",
           "convert_caffe_file", "convert_caffemodel", "read_backbone",
           "ConfusionMatrix", "MetricsError", "compute_scores", "image_scores", "to_json_dict",
    "BGR_MEAN", "MSC", "REGISTRY", "Checkpoint", "CheckpointError", "DeepLabV2", "DenseCRF", "DownloadError",
    "ImageError", "ModelConfig", "OptionError", "Prediction", "SegcoreError", "Segmenter", "Weights", "build_model",
    "cache_dir", "download", "load_image", "load_model", "msc_forward", "palette_image", "read_checkpoint",
    "resize_long_side", "save_checkpoint", "check_image_size", "validate_checkpoint",
]
