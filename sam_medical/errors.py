"""The one exception type for a user's mistake, and one-line messages free of library internals."""

from __future__ import annotations

import re

#: ANSI colour codes (torch prints some in its messages).
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: A C/C++ source location, as SimpleITK/ITK put in front of their messages.
_SOURCE_LOCATION = re.compile(r"\S+\.(?:cxx|cpp|cc|c|h|hxx|txx)(?::\d+)+:?")
#: ``sitk::ERROR: `` / ``itk::ERROR: NrrdImageIO(0x5626...): `` prefixes.
_ITK_PREFIX = re.compile(r"^(?:sitk|itk)::(?:ERROR|WARNING):\s*(?:\w+\(0x[0-9a-fA-F]+\):\s*)?")
_TORCH_UNSAFE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class UserInputError(ValueError):
    """Bad input from a user: a missing or corrupt file, a wrong shape, a prompt outside the volume...

    The CLI prints ``error: <message>`` on one line and exits with code 2; the MONAI Label app turns it
    into an HTTP 422 JSON answer. Anything else that escapes is a bug in this project.
    """


def one_line(text: str, limit: int = 400) -> str:
    """``text`` without colour codes, its lines joined by ``; ``, cut to ``limit`` characters."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(text)).splitlines() if ln.strip()]
    out = "; ".join(lines)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def library_detail(exc: BaseException, limit: int = 200) -> str:
    """What a library's exception says, for a user: one line, without internals.

    * SimpleITK/ITK: the C++ source file and line of the throw and the ``itk::ERROR`` prefixes are
      dropped, and the line that says what went wrong is kept;
    * torch's refusal to unpickle a non-weights object (``weights_only=True``): its advice to load with
      ``weights_only=False`` (which would run code from the file) is replaced by what the file holds;
    * anything else: its first line.
    """
    text = _ANSI.sub("", str(exc)).strip()
    if "Weights only load failed" in text:
        found = _TORCH_UNSAFE.search(text)
        what = f" ({found.group(1)})" if found else ""
        return f"it holds Python objects other than tensors and plain values{what}, which are not loaded"
    lines = []
    for raw in text.splitlines():
        line = _ITK_PREFIX.sub("", raw.strip())
        if "Exception thrown in SimpleITK" in line:
            continue
        line = _SOURCE_LOCATION.sub("", line).strip(" :")
        if line:
            lines.append(line)
    if not lines:
        return type(exc).__name__
    for line in lines:  # the line that says what went wrong, when there is one
        if any(w in line.lower() for w in ("error", "unable", "could not", "cannot", "trouble", "failed")):
            return line[:limit]
    return lines[0][:limit]
