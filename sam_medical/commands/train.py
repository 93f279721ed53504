"""``sam-medical train``: LoRA fine-tuning on ``.npz`` slice files (see :mod:`sam_medical.training`).

Single process::

    sam-medical train --data NPZ_DIR --out RUN_DIR --model vit_b --epochs 20

Several GPUs (or CPU processes, gloo)::

    torchrun --nproc_per_node 4 -m sam_medical.cli train --data NPZ_DIR --out RUN_DIR ...

Ctrl-C, or a file named ``STOP`` in ``RUN_DIR``, ends the run after the current step with the best
adapter kept; ``--resume`` continues from ``RUN_DIR/last.pt``.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..model_registry import DEFAULT_MODEL, MODEL_NAMES


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="LoRA fine-tune SAM's image encoder on .npz slice files",
        description="LoRA fine-tune SAM's image encoder (q and v of every block) on .npz slice files, "
        "with a 0.8 Dice + 0.2 CE loss; writes adapter.pt (best validation Dice), last.pt, log.jsonl and "
        "summary.json into --out. Works under torchrun for several GPUs.",
    )
    g = p.add_argument_group("data and output")
    g.add_argument("--data", required=True, help="folder of .npz slice files (from `sam-medical preprocess`)")
    g.add_argument(
        "--out", required=True, help="run folder (created; one run per folder: see --resume, --overwrite)"
    )
    g.add_argument("--labels", type=_int_list, default=None, help="label values to train on (default: all)")
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="fraction of volumes for validation (0: validate on the training volumes)",
    )
    g.add_argument(
        "--val-max-items", type=int, default=None, help="validate on at most this many items (evenly spaced)"
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=MODEL_NAMES,
        help=f"model family (default {DEFAULT_MODEL}: LiteMedSAM, packaged and SHA-256-checked; tiny has "
        "random weights, for tests)",
    )
    g.add_argument("--checkpoint", default=None, help="weights file (official checkpoints are MD5-checked)")
    g.add_argument("--random-weights", action="store_true", help="seeded random weights (tests, benchmarks)")
    g.add_argument("--image-size", type=int, default=256, help="model input size: 256 (native, fast) or 1024")
    g.add_argument("--cache-dir", default=None, help="where official checkpoints are cached")
    g.add_argument("--no-download", action="store_true", help="never download a missing official checkpoint")
    g.add_argument("--lora-rank", type=int, default=4)
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank, scale 1)")
    g.add_argument(
        "--lora-blocks", type=_int_list, default=None, help="encoder blocks to adapt (default: all)"
    )
    g.add_argument("--train-decoder", action="store_true", help="train the mask decoder too")
    g.add_argument("--adapter-init", default=None, help="start from this adapter (same base model and rank)")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", choices=("box", "points", "both"), default="box")
    g.add_argument("--num-points", type=int, default=1, help="up to this many foreground clicks per item")
    g.add_argument("--num-bg-points", type=int, default=0, help="up to this many background clicks per item")
    g.add_argument(
        "--box-jitter", type=int, default=5, help="box sides move by 0..N canvas pixels (default 5)"
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument(
        "--warmup-steps", type=int, default=None, help="linear warm-up steps (default 5%% of the run)"
    )
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("running")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    g.add_argument("--resume", action="store_true", help="continue the run in --out (from OUT/last.pt)")
    g.add_argument(
        "--overwrite", action="store_true", help="start again in an --out that holds an earlier run (deleted)"
    )
    g.add_argument("--log-every", type=int, default=0, help="also log every N steps to log.jsonl")
    g.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    from ..training import TrainConfig

    return TrainConfig(
        data=args.data,
        out=args.out,
        model=args.model,
        checkpoint=args.checkpoint,
        random_weights=args.random_weights,
        image_size=args.image_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_blocks=args.lora_blocks,
        prompt=args.prompt,
        num_points=args.num_points,
        num_bg_points=args.num_bg_points,
        box_jitter=args.box_jitter,
        train_decoder=args.train_decoder,
        val_fraction=args.val_fraction,
        val_max_items=args.val_max_items,
        label_values=args.labels,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        grad_accum=args.grad_accum,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        workers=args.workers,
        adapter_init=args.adapter_init,
        cache_dir=args.cache_dir,
        download=not args.no_download,
        log_every=args.log_every,
    )


def run(args: argparse.Namespace) -> int:
    import json
    import signal
    import sys
    import threading

    from ..training import DistInfo, train

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
        )
        print(json.dumps({k: summary[k] for k in keys}))
    return 0
