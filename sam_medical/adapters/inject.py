"""Model-level LoRA operations: inject into SAM's encoder, choose what trains, merge, state dicts.

PEFT's vocabulary (``tuners/lora/model.py``): :func:`inject_lora` puts a :class:`~sam_medical.adapters.layer.LoRAQKV`
on q and v of the chosen encoder attention blocks; :func:`set_trainable` picks what trains: the LoRA
parameters and, optionally, the mask decoder (what PEFT calls ``modules_to_save``: a whole module trained
and saved beside the LoRA weights); :func:`merge_lora`/:func:`unmerge_lora` fold the updates into the base
weights and back; :func:`lora_state_dict` and :func:`base_state_dict` are the two halves of a state dict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sam_medical.adapters.layer import LoRAQKV, LoRATarget
from sam_medical.errors import UserInputError
from sam_medical.model.registry import family_of, load_callable

if TYPE_CHECKING:
    from segment_anything.modeling import Sam


def lora_targets(sam: Sam) -> list[LoRATarget]:
    """The attention layers of ``sam``'s encoder that LoRA may adapt, in order (the family says which)."""
    return load_callable(family_of(sam).lora_targets)(sam)


def lora_modules(sam: Sam) -> dict[int, LoRAQKV]:
    """Attention-block index (:func:`lora_targets` order) -> its :class:`LoRAQKV`, where injected."""
    return {i: t.owner.qkv for i, t in enumerate(lora_targets(sam)) if isinstance(t.owner.qkv, LoRAQKV)}


def is_lora_injected(sam: Sam) -> bool:
    return bool(lora_modules(sam))


def lora_config(sam: Sam) -> dict[str, Any] | None:
    """``{"rank", "alpha", "blocks"}`` of the injected LoRA, or None."""
    mods = lora_modules(sam)
    if not mods:
        return None
    first = next(iter(mods.values()))
    return {"rank": first.rank, "alpha": first.alpha, "blocks": sorted(mods)}


def inject_lora(
    sam: Sam,
    rank: int = 4,
    alpha: float | None = None,
    blocks: list[int] | tuple[int, ...] | None = None,
    seed: int | None = None,
) -> list[int]:
    """Put LoRA on q and v of the encoder's attention blocks ``blocks`` (default all); return their indices.

    Blocks are numbered in :func:`lora_targets` order (ViT: the encoder blocks; TinyViT: its 10 attention
    blocks, stage 2 first). Every parameter of the model is frozen; only the new LoRA parameters are
    trainable (see :func:`set_trainable` to train the mask decoder too). ``alpha`` defaults to ``rank``
    (scale 1). ``seed`` makes the A initialisation reproducible without touching the global RNG.

    Raises:
        UserInputError: LoRA already injected, rank below 1, block index out of range.
    """
    if is_lora_injected(sam):
        raise UserInputError("LoRA is already injected in this model")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserInputError(f"LoRA rank must be a positive integer, got {rank!r}")
    targets = lora_targets(sam)
    depth = len(targets)
    if blocks is None:
        chosen = list(range(depth))
    else:
        chosen = sorted({int(b) for b in blocks})
        bad = [b for b in chosen if not 0 <= b < depth]
        if bad or not chosen:
            raise UserInputError(f"LoRA blocks must be indices in 0..{depth - 1}, got {list(blocks)}")
    if alpha is not None and not alpha > 0:
        raise UserInputError(f"LoRA alpha must be positive, got {alpha}")
    for p in sam.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for i in chosen:
        t = targets[i]
        t.owner.qkv = LoRAQKV(t.owner.qkv, rank, alpha, generator=generator, q_rows=t.q_rows, v_rows=t.v_rows)
    return chosen


def lora_parameters(sam: Sam) -> list[nn.Parameter]:
    """The LoRA parameters (A and B of q and v in each injected block), in block order."""
    params: list[nn.Parameter] = []
    for mod in lora_modules(sam).values():
        params += [mod.lora_q_A.weight, mod.lora_q_B.weight, mod.lora_v_A.weight, mod.lora_v_B.weight]
    return params


def set_trainable(sam: Sam, train_decoder: bool) -> int:
    """Freeze everything but the LoRA parameters (and the mask decoder if ``train_decoder``).

    The prompt encoder is always frozen. Returns the number of trainable parameter elements.
    """
    for p in sam.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(sam):
        p.requires_grad_(True)
    if train_decoder:
        for p in sam.mask_decoder.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in sam.parameters() if p.requires_grad)


def lora_state_dict(sam: Sam) -> dict[str, torch.Tensor]:
    """The LoRA tensors under their names in ``sam.state_dict()`` (``...attn.qkv.lora_q_A.weight``)."""
    return {k: v for k, v in sam.state_dict().items() if ".lora_" in k}


def merge_lora(sam: Sam) -> None:
    """Fold every LoRA update into its base ``qkv`` weight."""
    for mod in lora_modules(sam).values():
        mod.merge()


def unmerge_lora(sam: Sam) -> None:
    """Take every merged LoRA update back out of its base ``qkv`` weight."""
    for mod in lora_modules(sam).values():
        mod.unmerge()


def base_state_dict(sam: Sam) -> dict[str, torch.Tensor]:
    """A plain SAM state dict (as the base model names it) with the LoRA updates folded in.

    The model itself is not changed. Without LoRA this is ``sam.state_dict()``.
    """
    state = sam.state_dict()
    modules = dict(sam.named_modules())
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        owner, _, leaf = key.rpartition(".")
        mod = modules.get(owner)
        if isinstance(mod, LoRAQKV) and leaf == "weight" and not mod.merged:
            with torch.no_grad():
                value = value + mod.delta_weight().to(value.dtype)
        out[key] = value
    return out
