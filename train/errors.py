"""Error types of the trainer; all are :class:`segcore.SegcoreError` so callers catch bad input at once."""

from segcore.errors import SegcoreError


class TrainError(SegcoreError):
    """Training cannot go on: bad data, a non-finite loss, a checkpoint that cannot be written."""


class ConfigError(TrainError):
    """A training config is malformed: unknown keys, wrong types, impossible values."""
