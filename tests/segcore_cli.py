"""segcore's command line run in-process, as the tests call it: arguments may be paths or numbers."""

from __future__ import annotations

from segcore.cli import main


def run_cli(args) -> int:
    return main([str(a) for a in args])
