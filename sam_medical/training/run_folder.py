"""The files of one training run in its folder (``--out``), and the rule "one run per folder".

* ``adapter.pt`` -- the best adapter so far (:func:`sam_medical.adapters.save_and_load.save_adapter`;
  ``extra`` holds ``val_dice`` and ``epoch``). Epoch 0 (the starting model) counts, so the file exists from
  the first validation on and the served model is never one that validated worse than where training
  started;
* ``last.pt`` -- everything to resume (:mod:`sam_medical.training.state`);
* ``log.jsonl`` -- one JSON line per epoch, optionally per step, and one when a run is stopped;
* ``summary.json`` -- the outcome;
* ``STOP`` -- made by the user: the run ends after the current optimiser step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sam_medical.atomic import atomic_path
from sam_medical.errors import UserInputError
from sam_medical.outdir import prepare_output_dir

#: The files of one run; a new run refuses a folder holding any of them (unless ``overwrite``).
RUN_FILES = ("summary.json", "last.pt", "log.jsonl", "adapter.pt")
#: What ``SAM_MEDICAL_DEBUG_RANK_HASH=1`` makes each DDP rank write (see the trainer).
DEBUG_HASH_GLOB = "rank*_lora_sha.txt"


@dataclass(frozen=True)
class RunFolder:
    """The run folder ``out``; only rank 0 (``is_main``) writes into it."""

    out: Path
    is_main: bool = True

    @property
    def adapter(self) -> Path:
        return self.out / "adapter.pt"

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    @property
    def log_path(self) -> Path:
        return self.out / "log.jsonl"

    @property
    def summary(self) -> Path:
        return self.out / "summary.json"

    @property
    def stop(self) -> Path:
        return self.out / "STOP"

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``log.jsonl`` (rank 0)."""
        if self.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def start_log(self) -> None:
        """A fresh run starts a fresh log (rank 0)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            with atomic_path(self.log_path) as tmp:
                tmp.write_text("")

    def remove_stale_stop(self) -> None:
        """A ``STOP`` file left from an earlier run would end this one at once: remove it (rank 0)."""
        if self.is_main and self.stop.exists():
            self.stop.unlink()

    def check(self, *, resume: bool, overwrite: bool) -> None:
        """One run per folder: a new run refuses a folder that holds another one, unless ``overwrite``.

        ``resume`` needs ``last.pt``; ``overwrite`` deletes the earlier run's files first (rank 0), so
        that an old ``summary.json`` or ``last.pt`` never sits beside a new run's files.

        Raises:
            UserInputError: ``out`` is a file or cannot be written; it holds a run and neither
                ``resume`` nor ``overwrite`` was given; ``resume`` without ``last.pt``.
        """
        out = self.out
        if out.exists() and not out.is_dir():
            raise UserInputError(f"--out {out} is a file, not a folder")
        found = [name for name in RUN_FILES if (out / name).exists()]
        if resume:
            if not self.last.is_file():
                why = (
                    f" (the run in {out} ended before its first validation finished: start it again with "
                    "--overwrite)"
                    if found
                    else ""
                )
                raise UserInputError(f"cannot resume: {self.last} does not exist{why}")
        elif found:
            if not overwrite:
                raise UserInputError(
                    f"--out {out} already holds a training run ({', '.join(found)}): continue it with "
                    "--resume, or start again with --overwrite"
                )
            if self.is_main:
                for path in [*(out / name for name in RUN_FILES), self.stop, *out.glob(DEBUG_HASH_GLOB)]:
                    path.unlink(missing_ok=True)
        prepare_output_dir(out)
