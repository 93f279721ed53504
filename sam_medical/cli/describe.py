"""``sam-medical describe``: build a model, set up what ``sam-medical train`` would train on it, print its
parameter counts as one JSON line.

What is trained comes from :class:`sam_medical.training.config.TrainConfig` (the same options and defaults
as ``train``): by default the mask decoder; with ``--lora-rank`` > 0 also LoRA on q and v of the image
encoder's attention.
"""

from __future__ import annotations

import argparse
import json
import sys

from sam_medical.errors import UserInputError

#: The TrainConfig fields that decide what is trained (their options and defaults are train's).
TRAINED_FIELDS = ("lora_rank", "lora_alpha", "lora_blocks", "train_decoder")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    # imported here: the registry and TrainConfig would load at every `sam-medical --help` otherwise
    from sam_medical.model.registry import MODEL_NAMES
    from sam_medical.training.config import add_arguments  # deferred: keeps `sam-medical --help` fast

    p = subparsers.add_parser(
        "describe",
        help="print a model's parameter counts (total, trainable as `train` would train it) as JSON",
        description=(
            "Build a SAM model, set up what `sam-medical train` trains with the same options and defaults "
            "(the mask decoder; LoRA on q and v of the image encoder with --lora-rank > 0), and print one "
            "JSON line: model, image_size, total_params, trainable_params, lora_params, decoder_params, "
            "random_weights, and the model's provenance, licence, weights digest and the prompts it was "
            "trained with. Without --checkpoint, official SAM weights are not downloaded: the counts are "
            "taken on random weights (they do not depend on them); packaged weights (medsam_lite) are loaded "
            "and verified."
        ),
    )
    p.add_argument("--model", required=True, choices=MODEL_NAMES, help="model name")
    p.add_argument(
        "--image-size", type=int, default=None, help="encoder input size (default: the model's own, 256)"
    )
    add_arguments(p, only=TRAINED_FIELDS)
    p.add_argument("--checkpoint", default=None, help="weights file to load (default: random weights)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return p


def run(args: argparse.Namespace) -> int:
    # imported here: torch and the model code load only when the command runs, not at `--help`
    from sam_medical.adapters.inject import inject_lora, lora_parameters, set_trainable
    from sam_medical.model.build import (  # deferred: keeps `sam-medical --help` fast
        build_sam,
        count_parameters,
    )
    from sam_medical.model.registry import get_family  # deferred: keeps `sam-medical --help` fast

    if args.lora_rank < 0:
        raise UserInputError(f"--lora-rank must be 0 or more, got {args.lora_rank}")
    # packaged weights are on disk already; official ones would need a download: count on random weights
    random_weights = args.checkpoint is None and get_family(args.model).weights.kind != "packaged"
    sam, info = build_sam(
        args.model,
        image_size=args.image_size,
        checkpoint=args.checkpoint,
        random_weights=random_weights,
        seed=args.seed,
        download=False,
    )
    if random_weights:
        print(f"note: no --checkpoint given; counting on random {args.model} weights", file=sys.stderr)
    blocks: list[int] = []
    if args.lora_rank > 0:
        blocks = inject_lora(sam, rank=args.lora_rank, alpha=args.lora_alpha, blocks=args.lora_blocks)
    set_trainable(sam, train_decoder=args.train_decoder)
    out = {
        "model": args.model,
        "image_size": info["image_size"],
        "total_params": count_parameters(sam),
        "trainable_params": count_parameters(sam, trainable_only=True),
        "lora_params": sum(p.numel() for p in lora_parameters(sam)),
        "decoder_params": count_parameters(sam.mask_decoder),
        "random_weights": info["random_weights"],
        "encoder_params": count_parameters(sam.image_encoder),
        "prompt_encoder_params": count_parameters(sam.prompt_encoder),
        "lora_rank": args.lora_rank,
        "lora_blocks": blocks,
        "train_decoder": bool(args.train_decoder),
        "checkpoint": info["checkpoint"],
        "family": get_family(args.model).describe(),
    }
    print(json.dumps(out))
    return 0
