"""Output folders: made before any work starts, refused in one line when they cannot be written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from sam_medical.errors import UserInputError


def prepare_output_dir(path: str | os.PathLike, flag: str = "--out") -> list[Path]:
    """Create the folder ``path`` (and its parents) and check that a file can be written in it.

    Returns the folders this call created, outermost first, so that a command that ends with nothing
    to show can take them away again (:func:`remove_created`).

    Raises:
        UserInputError: ``path`` (or one of its parents) is a file, or the folder cannot be created or
            written (permissions, a read-only file system).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserInputError(f"{flag} {p} is a file, not a folder")
    missing = []
    for folder in (p, *p.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserInputError(f"{flag} {p} cannot be created: {folder} is a file, not a folder")
            break
        missing.append(folder)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"{flag} {p} cannot be created: {exc.strerror or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=p)
    except OSError as exc:
        remove_created(list(reversed(missing)))
        raise UserInputError(f"{flag} {p} is not writable: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
    return list(reversed(missing))


def remove_created(created: list[Path]) -> None:
    """Remove the folders :func:`prepare_output_dir` created, innermost first, where they are still empty."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()
