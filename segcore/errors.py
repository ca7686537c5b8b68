"""Error types: each says which file is at fault and what is wrong with it."""


class SegcoreError(Exception):
    """Base class of every error segcore raises on bad input."""


class CheckpointError(SegcoreError):
    """A checkpoint is unsafe, unreadable or does not match the architecture."""


class LabelCountError(CheckpointError):
    """The label set given for a checkpoint has another number of classes than the checkpoint."""


class ImageError(SegcoreError):
    """An image cannot be decoded or is outside the accepted sizes."""


class DownloadError(SegcoreError):
    """Weights could not be fetched; the message says where to put the file by hand."""


class OptionError(SegcoreError, ValueError):
    """An option value is out of range or names something this machine does not have (a device)."""
