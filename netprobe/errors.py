"""Errors the command line turns into one line on stderr: exit code 2 for bad input, 1 for a run
that could not write its files."""

from __future__ import annotations

import errno
import os
import re


class ConfigError(ValueError):
    """Bad input: an unknown option, key or value. The message names it and the valid choices."""


class NothingToDo(Exception):
    """A command that finds its work already done (resuming a finished run with no more to train):
    one line on stderr, exit 0, nothing written."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line, as a one-line error wants it."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def add_note(exc: BaseException, note: str) -> None:
    """`exc.add_note(note)`, on Python 3.10 too (which has `__notes__` but no `add_note`)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]


class StorageError(OSError):
    """A run's file could not be written (a full disk, a read-only folder): the run ends `failed`
    with this one line, which names the file and the error number."""

    def __init__(self, path: str | os.PathLike, cause: OSError) -> None:
        code = cause.errno
        if code is None:  # pyarrow puts the number in its message only
            match = re.search(r"errno (\d+)", str(cause), re.IGNORECASE)
            code = int(match.group(1)) if match else None
        reason = os.strerror(code) if code is not None else (cause.strerror or str(cause))
        super().__init__(code, reason, str(path))

    def __str__(self) -> str:
        name = f" ({errno.errorcode[self.errno]})" if self.errno in errno.errorcode else ""
        return f"cannot write {self.filename}: {self.strerror}{name}"
