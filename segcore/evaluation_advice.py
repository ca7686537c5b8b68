"""Why an evaluation scored nothing, and what the user can do about it.

Kept apart from the evaluation loop: the CLI and the app call :func:`nothing_evaluated` on a finished
:class:`~segcore.evaluation.EvaluationResult`; when no image could be scored it returns one message (the
labels the model does not know, the files that use them, the ways out) instead of a report of NaNs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SegcoreError

SHOWN = 5


@dataclass(frozen=True)
class WaysOut:
    """How each way out is spelled where the message is shown (command-line options, or the app's inputs)."""

    mapping: str = "--map FILE"
    ignore: str = "--unknown ignore"
    weights: str = "--weights"


CLI = WaysOut()
APP = WaysOut(mapping="the 'Name mapping' file", ignore="'Unknown labels: ignore'", weights="the model menu")


class NothingEvaluatedError(SegcoreError):
    """No image of the dataset could be scored; the message says why and what to do."""


def unknown_labels_of(exc: BaseException) -> list[str]:
    """The labels an UnknownLabelError (or an error raised from one) names; [] for other errors."""
    while exc is not None:
        names = getattr(exc, "names", None)
        if names:
            return sorted(names)
        exc = exc.__cause__
    return []


def _files(files: list[str]) -> str:
    shown = ", ".join(files[:SHOWN])
    return shown + (f" (+{len(files) - SHOWN} more)" if len(files) > SHOWN else "")


def nothing_evaluated(result, ways: WaysOut = CLI) -> str | None:
    """None if at least one image was scored; otherwise the message that explains it."""
    if result.per_image:
        return None
    failures = result.failures
    if not failures:
        return f"nothing was evaluated: the dataset has {result.images} images and none was scored"
    by_label: dict[str, list[str]] = {}
    for f in failures:
        for name in f.get("unknown_labels") or ():
            by_label.setdefault(name, []).append(str(f["file"]))
    if not by_label:
        first = failures[0]
        return (f"nothing could be evaluated: all {len(failures)} images failed "
                f"(first: {first['reason']}); see the failures listed below")
    classes = list(result.class_names)
    known = ", ".join(classes[:12]) + (f", ... ({len(classes)} classes)" if len(classes) > 12 else "")
    files = {str(f["file"]) for f in failures if f.get("unknown_labels")}
    lines = [f"nothing could be evaluated: {len(files)} of {result.images} files use labels the model does not "
             f"know (its classes: {known}):"]
    lines += [f"  {name!r} in {_files(sorted(paths))}" for name, paths in sorted(by_label.items())]
    others = len(failures) - len(files)
    if others:
        lines.append(f"  ({others} more files failed for other reasons; see the failures)")
    lines.append(f"Ways out: map these names to the model's classes with a name-mapping file ({ways.mapping}); "
                 f"or leave those shapes out of the scores ({ways.ignore}); or choose weights trained on "
                 f"that label space ({ways.weights}).")
    return "\n".join(lines)


def raise_if_nothing_evaluated(result, ways: WaysOut = CLI) -> None:
    """Raise :class:`NothingEvaluatedError` with :func:`nothing_evaluated`'s message when nothing was scored."""
    message = nothing_evaluated(result, ways)
    if message:
        raise NothingEvaluatedError(message)
