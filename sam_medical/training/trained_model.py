"""The model a run trains: the base SAM, LoRA on q and v of the encoder's attention when ``lora_rank`` > 0,
the mask decoder trainable when ``train_decoder``; optionally started from an adapter (``adapter_init``).

Everything else is frozen. What it is made of (:meth:`TrainedModel.identity`) ties ``last.pt`` to the run,
and what its frozen encoder layers are (:meth:`TrainedModel.frozen_identity`) names the feature cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from sam_medical.adapters.files import read_adapter_meta
from sam_medical.adapters.inject import inject_lora, set_trainable
from sam_medical.adapters.save_and_load import load_adapter
from sam_medical.errors import UserInputError
from sam_medical.model.build import build_sam, count_parameters
from sam_medical.model.checkpoints import sha256_file
from sam_medical.training.config import TrainConfig


def lora_alpha(cfg: TrainConfig) -> float:
    """The LoRA alpha this run uses (the rank when not given; 1.0 without LoRA)."""
    return float(cfg.lora_rank if cfg.lora_alpha is None else cfg.lora_alpha) if cfg.lora_rank else 1.0


@dataclass
class TrainedModel:
    """The model being trained (on the CPU until the trainer moves it) and what it is made of."""

    sam: nn.Module
    base_info: dict[str, Any]
    blocks: list[int]  #: encoder blocks with LoRA
    save_decoder: bool  #: the adapters written hold the mask decoder
    init_meta: dict[str, Any] | None  #: the starting adapter's metadata
    config: TrainConfig

    @property
    def trainable_params(self) -> int:
        return count_parameters(self.sam, trainable_only=True)

    def identity(self) -> dict[str, Any]:
        """Base model, LoRA rank/alpha/blocks and whether the decoder trains: a resume must match it."""
        cfg = self.config
        keys = ("name", "image_size", "checkpoint_md5", "weights_digest", "random_weights", "seed")
        return {
            "base": {k: self.base_info.get(k) for k in keys},
            "rank": cfg.lora_rank,
            "alpha": lora_alpha(cfg),
            "blocks": list(self.blocks),
            "train_decoder": cfg.train_decoder,
            "trained_prompts": cfg.trained_prompts(),
        }

    def frozen_identity(self) -> str:
        """What the frozen encoder layers are: the base weights, plus the starting adapter's LoRA when the
        encoder is frozen whole (its cached embeddings then include that LoRA)."""
        info = self.base_info
        base = info.get("weights_digest") or f"random:{info['name']}:{info['seed']}"
        if self.init_meta is not None and int(self.init_meta.get("rank") or 0) > 0:
            base += f"|adapter:{sha256_file(self.config.adapter_init)}"
        return f"{info['name']}|{info['image_size']}|{base}"


def build_trained_model(cfg: TrainConfig) -> TrainedModel:
    """Build the base model, add LoRA (``lora_rank`` > 0), load ``adapter_init``, set what trains.

    Raises:
        UserInputError: the model or checkpoint cannot be built; ``adapter_init`` does not fit this run.
    """
    init_meta = read_adapter_meta(cfg.adapter_init) if cfg.adapter_init else None
    sam, base_info = build_sam(cfg.model, **cfg.model_kwargs())
    blocks = (
        inject_lora(sam, rank=cfg.lora_rank, alpha=cfg.lora_alpha, blocks=cfg.lora_blocks, seed=cfg.seed)
        if cfg.lora_rank > 0
        else []
    )
    save_decoder = cfg.train_decoder
    if init_meta is not None:
        alpha = lora_alpha(cfg)
        theirs = (int(init_meta["rank"]), float(init_meta["alpha"]), sorted(init_meta["blocks"]))
        if theirs != (cfg.lora_rank, alpha, blocks):
            raise UserInputError(
                f"--adapter-init {cfg.adapter_init} has LoRA rank {theirs[0]}, alpha {theirs[1]:g} on "
                f"blocks {theirs[2]}, but this run uses rank {cfg.lora_rank}, alpha {alpha:g} on blocks "
                f"{blocks} (set --lora-rank/--lora-alpha/--lora-blocks to match)"
            )
        load_adapter(sam, cfg.adapter_init, base_info=base_info, inject=False)
        # a decoder that came with the starting adapter is kept in the adapters this run saves
        save_decoder = cfg.train_decoder or bool(init_meta.get("train_decoder"))
    set_trainable(sam, cfg.train_decoder)
    return TrainedModel(sam, base_info, blocks, save_decoder, init_meta, cfg)
