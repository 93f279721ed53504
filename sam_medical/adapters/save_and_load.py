"""Save an adapter from a model, and load one into a model (PEFT's ``save_and_load``).

:func:`save_adapter` writes what a run trained: the LoRA weights of the injected
:class:`~sam_medical.adapters.layer.LoRAQKV` layers and, when the mask decoder was trained, the whole
mask decoder (PEFT's ``modules_to_save``). :func:`load_adapter` puts both back into a model, injecting
LoRA first when the model has none, and restores the base model's own decoder when a later adapter
holds none. The file format is :mod:`sam_medical.adapters.files`.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import torch

from sam_medical.adapters import files
from sam_medical.adapters.inject import (
    inject_lora,
    lora_config,
    lora_modules,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)
from sam_medical.atomic import atomic_path
from sam_medical.errors import UserInputError

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

#: Attribute of a model holding its base mask decoder's state dict once an adapter replaced it.
_BASE_DECODER_ATTR = "_sam_medical_base_decoder"


def save_adapter(
    sam: Sam,
    path: str | os.PathLike,
    *,
    base_info: dict[str, Any],
    rank: int,
    alpha: float | None,
    blocks: list[int] | tuple[int, ...],
    image_size: int,
    train_decoder: bool,
    trained_prompts: list[str] | tuple[str, ...] = ("box",),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the LoRA weights (and the mask decoder, ``modules_to_save``, if ``train_decoder``) to ``path`` atomically.

    ``rank``/``alpha``/``blocks``/``image_size`` must be those of the model (checked). ``rank`` 0 (no
    LoRA injected, ``blocks`` empty) saves a decoder-only adapter, which needs ``train_decoder``.
    ``trained_prompts``: what the model was trained on, ``["box"]`` or ``["box", "point"]`` (serving reads it).
    ``extra`` is added to the metadata (plain values, never replacing keys set here). Returns the metadata.
    """
    cfg = lora_config(sam)
    alpha = float(rank if alpha is None else alpha) if rank else 1.0
    given = {"rank": int(rank), "alpha": alpha, "blocks": sorted(int(b) for b in blocks)}
    if cfg is None:
        if given["rank"] != 0 or given["blocks"]:
            raise ValueError("save_adapter: the model has no LoRA injected")
        if not train_decoder:
            raise ValueError("save_adapter: an adapter without LoRA must hold the mask decoder")
    elif given != {"rank": cfg["rank"], "alpha": cfg["alpha"], "blocks": cfg["blocks"]}:
        raise ValueError(f"save_adapter: arguments {given} do not match the injected LoRA {cfg}")
    size = int(sam.image_encoder.img_size)
    if int(image_size) != size:
        raise ValueError(f"save_adapter: image_size {image_size} but the model runs at {size}")

    lora = {k: v.detach().cpu().clone() for k, v in lora_state_dict(sam).items()}
    decoder = (
        {k: v.detach().cpu().clone() for k, v in sam.mask_decoder.state_dict().items()}
        if train_decoder
        else None
    )
    obj = files.adapter_object(
        base=files.plain_value(dict(base_info), "base_info"),
        rank=given["rank"],
        alpha=alpha,
        blocks=given["blocks"],
        image_size=size,
        lora=lora,
        decoder=decoder,
        version=files.new_version_id(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        trained_prompts=list(trained_prompts),
    )
    meta = obj["meta"]
    for key, value in (extra or {}).items():
        if key in meta:
            raise ValueError(f"save_adapter: extra key {key!r} would replace the adapter's own metadata")
        meta[str(key)] = files.plain_value(value, f"extra.{key}")
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return meta


def load_adapter(
    sam: Sam, path: str | os.PathLike, *, base_info: dict[str, Any] | None = None, inject: bool = True
) -> dict[str, Any]:
    """Load the adapter at ``path`` into ``sam``; return its metadata.

    Injects LoRA with the file's rank/alpha/blocks if the model has none (``inject=True``). When LoRA is
    already there, rank and blocks must match (alpha is taken from the file). A rank-0 adapter holds a
    mask decoder only and leaves the encoder as it is. Merged adapters are
    unmerged, replaced, and merged again. The mask decoder (``modules_to_save``) is replaced when the
    file holds one, and restored to the base model's decoder when it does not (so adapters can be
    swapped in turn).

    Raises:
        UserInputError: not an adapter / corrupt file; made for another base model, checkpoint, input
            size or rank.
    """
    obj = files.read_adapter(path)
    meta = obj["meta"]
    source = f"adapter {path}"
    if base_info is not None:
        files.check_adapter_base(meta, base_info, source)
    size = int(sam.image_encoder.img_size)
    if int(meta["image_size"]) != size:
        raise UserInputError(
            f"{source} was made for input size {meta['image_size']}, but the model runs at {size}"
        )
    _fit_lora(sam, meta, source, inject)
    _check_tensors_fit(sam, obj, source)
    _copy_weights(sam, obj["lora"], obj.get("decoder"), float(meta["alpha"]))
    return meta


def _fit_lora(sam: Sam, meta: dict[str, Any], source: str, inject: bool) -> None:
    """Make ``sam``'s LoRA match the adapter's rank and blocks: inject it when absent, refuse a mismatch."""
    rank, alpha, blocks = int(meta["rank"]), float(meta["alpha"]), sorted(int(b) for b in meta["blocks"])
    cfg = lora_config(sam)
    if rank == 0:  # a decoder-only adapter: the encoder stays as it is
        if cfg is not None:
            raise UserInputError(f"{source} has no LoRA, but the model has LoRA of rank {cfg['rank']}")
    elif cfg is None:
        if not inject:
            raise UserInputError(f"{source}: the model has no LoRA injected")
        inject_lora(sam, rank=rank, alpha=alpha, blocks=blocks, seed=0)  # A is overwritten later
    else:
        if cfg["rank"] != rank:
            raise UserInputError(f"{source} has LoRA rank {rank}, but the model has rank {cfg['rank']}")
        if cfg["blocks"] != blocks:
            raise UserInputError(
                f"{source} adapts encoder blocks {blocks}, but the model has LoRA on {cfg['blocks']}"
            )


def _check_tensors_fit(sam: Sam, obj: dict[str, Any], source: str) -> None:
    """Refuse LoRA entries or a mask decoder whose names or shapes differ from the model's."""
    current = lora_state_dict(sam)
    lora = obj["lora"]
    bad = sorted(set(current) ^ set(lora)) + [
        k for k in current if k in lora and tuple(lora[k].shape) != tuple(current[k].shape)
    ]
    if bad:
        raise UserInputError(
            f"{source} is corrupt or does not fit this model: LoRA entries differ, e.g. {bad[:3]}"
        )
    decoder = obj.get("decoder")
    if decoder is not None:
        want = sam.mask_decoder.state_dict()
        if (
            not isinstance(decoder, dict)
            or set(decoder) != set(want)
            or any(
                not isinstance(decoder[k], torch.Tensor) or decoder[k].shape != want[k].shape for k in want
            )
        ):
            raise UserInputError(f"{source} holds a mask decoder that does not fit this model")


def _copy_weights(
    sam: Sam,
    lora: dict[str, torch.Tensor],
    decoder: dict[str, torch.Tensor] | None,
    alpha: float,
) -> None:
    """Copy the (checked) LoRA tensors and mask decoder into ``sam``; keep it merged if it was.

    Without a decoder in the adapter, the base model's decoder (kept aside the first time an adapter
    replaced it) is put back.
    """
    mods = lora_modules(sam)
    was_merged = any(m.merged for m in mods.values())
    unmerge_lora(sam)
    for m in mods.values():
        m.alpha = alpha
    params = dict(sam.named_parameters())
    with torch.no_grad():
        for key, value in lora.items():
            params[key].copy_(value)
        if decoder is not None:
            if not hasattr(sam, _BASE_DECODER_ATTR):
                base = {k: v.detach().clone() for k, v in sam.mask_decoder.state_dict().items()}
                object.__setattr__(sam, _BASE_DECODER_ATTR, base)
            sam.mask_decoder.load_state_dict(decoder, strict=True)
        elif hasattr(sam, _BASE_DECODER_ATTR):
            sam.mask_decoder.load_state_dict(getattr(sam, _BASE_DECODER_ATTR), strict=True)
    if was_merged:
        merge_lora(sam)
