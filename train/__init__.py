"""train: DeepLab-v2 training from the command line (``python -m train``), one GPU to many with torchrun."""

from .config import TrainConfig, config_from_dict, load_config
from .engine import TrainResult, evaluate, train
from .errors import ConfigError, TrainError
from .init_weights import convert_torchvision, initialise, reset_classifier
from .protocol import freeze_bn, msc_loss, param_groups, poly_factor, resize_labels, set_train_mode

__all__ = [
    "ConfigError", "TrainConfig", "TrainError", "TrainResult", "config_from_dict", "convert_torchvision",
    "evaluate", "freeze_bn", "initialise", "load_config", "msc_loss", "param_groups", "poly_factor",
    "reset_classifier", "resize_labels", "set_train_mode", "train",
]
