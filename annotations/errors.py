"""Error types of the :mod:`annotations` package."""


class AnnotationError(Exception):
    """Base class of every error raised by :mod:`annotations`."""


class LabelSpaceError(AnnotationError):
    """A label space or labels file is invalid or unknown."""


class MappingError(AnnotationError):
    """A mapping file is invalid (bad syntax, unknown target name, bad regex)."""


class LabelmeFormatError(AnnotationError):
    """A labelme JSON file cannot be read (malformed JSON, missing keys, bad shapes)."""


class ImageLoadError(AnnotationError):
    """The image of a labelme file is missing, undecodable or has the wrong size."""


class UnknownLabelError(AnnotationError):
    """A shape label is not in the label space and not mapped."""

    def __init__(self, message: str, names: tuple[str, ...] = ()):
        super().__init__(message)
        self.names = names


class UnsafeArchiveError(AnnotationError):
    """A zip archive tries to escape its target, holds links, or is too big."""


class OutputExistsError(AnnotationError):
    """The output folder exists and overwriting was not asked for (or is refused)."""
