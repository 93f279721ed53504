"""The ``sam-medical`` command line.

Each sub-command lives in ``sam_medical/cli/<name>.py`` and exposes ``register(subparsers)`` and
``run(args) -> int``. Command modules import heavy libraries (torch, SimpleITK) inside ``run`` only, so
that ``sam-medical --help`` and argument errors answer at once.

A user's mistake (:class:`~sam_medical.errors.UserInputError`) is printed as one line, ``error: ...``,
with exit code 2, like argparse's own errors; so is a file that cannot be read or written (an
``OSError`` naming it). Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from sam_medical import __version__
from sam_medical.errors import UserInputError, one_line

COMMANDS = ("make_samples", "preprocess", "describe", "train", "evaluate", "download", "workspace")


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(prog="sam-medical", description="Segment Anything for medical volumes.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"sam_medical.cli.{name}")
        except ModuleNotFoundError as exc:  # a command still being written must not break the others
            if exc.name and exc.name.endswith(f"cli.{name}"):
                continue
            raise
        p = module.register(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserInputError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that cannot be read or written (permissions, disk full, read-only)
        if exc.filename is None:
            raise
        print(f"error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
