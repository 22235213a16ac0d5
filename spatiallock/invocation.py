"""The command line running now: `spatiallock.cli.main` sets it for the length of one command, and a training run
records it (`train/commands.txt`) so that its folder says how it was made and resumed."""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

_ARGUMENTS: list[str] | None = None


@contextmanager
def invoked(arguments: Sequence[str]) -> Iterator[None]:
    """Within it, `command_line()` is `spatiallock` with `arguments`."""
    global _ARGUMENTS
    before, _ARGUMENTS = _ARGUMENTS, list(arguments)
    try:
        yield
    finally:
        _ARGUMENTS = before


def command_line() -> str | None:
    """The running command as a shell line, or None outside one (a trainer called from Python)."""
    return None if _ARGUMENTS is None else shlex.join(["spatiallock", *_ARGUMENTS])
