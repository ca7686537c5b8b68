"""How every command line of the project reports bad input: one line on stderr and exit code 2.

It lives here, in the package every other one may import (segcore and train use it too), so
``python -m annotations``, ``python -m segcore`` and ``python -m train`` answer a mistake the same
way: ``error: <file or option>: <what is wrong and what to do>``, never a traceback. A traceback
is still printed for anything else, because that is a bug to report, not a user's mistake.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (no usage block) and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def one_line(exc: BaseException) -> str:
    """The user's message of ``exc``: an OSError as ``file: reason``, otherwise its text."""
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        return f"{where}: {exc.strerror}" if where else exc.strerror
    return str(exc) or type(exc).__name__


def run_cli(body: Callable[[], int], user_errors: tuple[type[BaseException], ...], *,
            interrupted: str = "interrupted") -> int:
    """Run ``body()`` and return its exit code; ``user_errors`` become ``error: ...`` and exit code 2.

    OSError (a folder that cannot be written, a disk that is full) counts as the user's too.
    """
    try:
        return int(body() or 0)
    except (*user_errors, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
