"""``sam-medical train``: fine-tunes SAM's mask decoder and, with ``--lora-rank`` > 0, LoRA adapters on q and v
of the image encoder's attention, on ``.npz`` slice files (see :mod:`sam_medical.training.trainer`). The
options are generated from :class:`sam_medical.training.config.TrainConfig`.

Single process::

    sam-medical train --data NPZ_DIR --out RUN_DIR --model vit_b --epochs 20

Several GPUs (or CPU processes, gloo)::

    torchrun --nproc_per_node 4 -m sam_medical.cli.main train --data NPZ_DIR --out RUN_DIR ...

Ctrl-C, or a file named ``STOP`` in ``RUN_DIR``, ends the run after the current step with the best
adapter kept; ``--resume`` continues from ``RUN_DIR/last.pt``.

At the end it prints one JSON line (the main numbers of ``summary.json``) and then, as its last line, the
verdict: ``learned: best epoch 3, validation Dice 0.712 -> 0.805 (...)`` or ``nothing learned: best epoch
0, validation Dice 0.941 -> 0.941 (...)`` (see :mod:`sam_medical.training.outcome`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    # imported here: TrainConfig (and the model registry) would load at every `sam-medical --help` otherwise
    from sam_medical.training.config import add_arguments

    p = subparsers.add_parser(
        "train",
        help="fine-tune SAM (its mask decoder; with --lora-rank > 0 also LoRA on the image encoder) on .npz "
        "slice files",
        description="Fine-tune SAM on .npz slice files: the mask decoder and, with --lora-rank > 0, LoRA on q "
        "and v of the image encoder's attention (--no-train-decoder: LoRA alone), with a Dice + cross-entropy "
        "loss; writes adapter.pt (best validation Dice), last.pt, log.jsonl and summary.json into --out. "
        "Works under torchrun for several GPUs.",
    )
    add_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    # imported here: see register
    from sam_medical.training.config import from_args

    return from_args(args)


def run(args: argparse.Namespace) -> int:
    # imported here: torch, MONAI and the model code load only when a run starts, not at `--help`
    from sam_medical.training.distributed import DistInfo
    from sam_medical.training.trainer import train  # deferred: keeps `sam-medical --help` fast

    config = config_from_args(args)
    config.check()
    stop = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.is_set():  # a second Ctrl-C: give up at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after the current step (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        summary = train(config, progress=not args.quiet, stop_event=stop)
    finally:
        signal.signal(signal.SIGINT, previous)
    if DistInfo.from_env().is_main:
        keys = (
            "initial_val_dice",
            "best_val_dice",
            "best_epoch",
            "epochs",
            "steps",
            "stopped_early",
            "adapter",
            "learned",
            "val_dice_per_label",
            "verdict",
        )
        print(json.dumps({k: summary[k] for k in keys}))
        print(summary["verdict"])  # the last line says plainly whether anything was learned
    return 0
