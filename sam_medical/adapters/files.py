"""The adapter file and the training state (``last.pt``) formats: read, check, export.

An adapter holds what a training run changed in the base model, in PEFT's vocabulary:

* the **LoRA weights** (``"lora"``; empty when ``rank`` is 0), the A and B matrices of every
  :class:`~sam_medical.adapters.layer.LoRAQKV`;
* the **trained mask decoder** (``"decoder"``, its whole state dict), what PEFT calls
  ``modules_to_save``: present when the run trained the decoder (``meta["train_decoder"]``).

``meta["modules_to_save"]`` names the whole modules the file holds (``["mask_decoder"]`` or ``[]``);
files written before that key existed are read with it derived from ``train_decoder``.
``meta["trained_prompts"]`` names the prompt kinds the model was trained on (:data:`PROMPT_KINDS_TRAINED`
values: ``["box"]``, or ``["box", "point"]`` after click rounds); absent in files written before it.

Adapter file (``torch.save``, loadable with ``weights_only=True``)::

    {"format": "sam-medical-adapter", "format_version": 1,
     "meta": {"model", "checkpoint_md5", "weights_digest", "base", "rank", "alpha", "blocks", "image_size",
              "train_decoder", "modules_to_save", "lora_params", "version", "created", "trained_prompts",
              **extra},
     "lora": {state-dict name: tensor},
     "decoder": mask decoder state dict}          # only when train_decoder (modules_to_save)

A training run's ``last.pt`` (format :data:`TRAIN_STATE_FORMAT`, written by
:mod:`sam_medical.training.trainer`, which takes the format name from here) is accepted wherever an
adapter is: :func:`read_adapter` turns its trainable tensors and its identity (base model, rank, alpha,
blocks) into the same object, with the same checks, and :func:`export_adapter` writes it out as a plain
adapter file (what :mod:`sam_medical.adapters.store` publishes). Putting an adapter into a model, and
taking one out, is :mod:`sam_medical.adapters.save_and_load`.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from sam_medical.atomic import atomic_path
from sam_medical.errors import UserInputError, library_detail

ADAPTER_FORMAT = "sam-medical-adapter"
ADAPTER_FORMAT_VERSION = 1
#: ``format`` of a training run's ``last.pt`` (:mod:`sam_medical.training.trainer` imports it from here).
TRAIN_STATE_FORMAT = "sam-medical-train-state"
TRAIN_STATE_FORMAT_VERSION = 1
#: ``meta["converted_from"]`` of an adapter read from a training state.
CONVERTED_FROM_STATE = "training state (last.pt)"
#: The one whole module an adapter may hold besides its LoRA weights (PEFT's ``modules_to_save``).
MASK_DECODER = "mask_decoder"
#: The values ``meta["trained_prompts"]`` may list.
PROMPT_KINDS_TRAINED = ("box", "point", "mask")


def modules_to_save(meta: dict[str, Any]) -> list[str]:
    """The whole modules an adapter holds besides LoRA: ``["mask_decoder"]`` or ``[]``.

    Read from ``meta["modules_to_save"]``, or, for files written before that key, from ``train_decoder``.
    """
    if "modules_to_save" in meta:
        return list(meta["modules_to_save"])
    return [MASK_DECODER] if meta.get("train_decoder") else []


def plain_value(value: Any, where: str) -> Any:
    """``value`` as types that ``torch.load(weights_only=True)`` accepts (tuples become lists)."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, list | tuple):
        return [plain_value(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_value(v, f"{where}.{k}") for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return value.item()
    raise TypeError(f"{where} = {value!r} cannot be stored in an adapter file")


def new_version_id() -> str:
    """A sortable, unique adapter version: ``YYYYmmdd-HHMMSS-<8 hex>`` (UTC)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def adapter_object(
    *,
    base: dict[str, Any],
    rank: Any,
    alpha: Any,
    blocks: Any,
    image_size: Any,
    lora: dict[str, torch.Tensor],
    decoder: dict[str, torch.Tensor] | None,
    version: str,
    created: str,
    trained_prompts: list[str] | None = None,
) -> dict[str, Any]:
    """The adapter file's object (see the module docstring) for a base model ``base`` (its ``base_info``)."""
    meta: dict[str, Any] = {
        "model": base.get("name"),
        "checkpoint_md5": base.get("checkpoint_md5"),
        "weights_digest": base.get("weights_digest"),
        "base": base,
        "rank": rank,
        "alpha": alpha,
        "blocks": blocks,
        "image_size": image_size,
        "train_decoder": decoder is not None,
        "modules_to_save": [MASK_DECODER] if decoder is not None else [],
        "lora_params": int(sum(v.numel() for v in lora.values())),
        "version": version,
        "created": created,
    }
    if trained_prompts is not None:
        meta["trained_prompts"] = list(trained_prompts)
    obj: dict[str, Any] = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "meta": meta,
        "lora": lora,
    }
    if decoder is not None:
        obj["decoder"] = decoder
    return obj


def read_adapter(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"adapter {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserInputError(
            f"adapter {path} could not be read; it is corrupt, truncated or not a PyTorch file "
            f"({library_detail(exc)})"
        ) from None
    if isinstance(obj, dict) and obj.get("format") == TRAIN_STATE_FORMAT:
        obj = _adapter_from_train_state(obj, path)
    if not isinstance(obj, dict) or obj.get("format") != ADAPTER_FORMAT:
        raise UserInputError(f"{path} is not a sam-medical LoRA adapter file (nor a training run's last.pt)")
    if obj.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise UserInputError(
            f"adapter {path} has format version {obj.get('format_version')}; this sam-medical reads "
            f"version {ADAPTER_FORMAT_VERSION}"
        )
    meta, lora = obj.get("meta"), obj.get("lora")
    required = ("model", "rank", "alpha", "blocks", "image_size")
    if not isinstance(meta, dict) or any(k not in meta for k in required) or not isinstance(lora, dict):
        raise UserInputError(f"adapter {path} is incomplete (no metadata or no LoRA weights)")
    if not all(isinstance(v, torch.Tensor) for v in lora.values()):
        raise UserInputError(f"adapter {path} is corrupt: its LoRA entries are not all tensors")
    _check_adapter_meta(meta, path)
    _check_finite(lora, path, "LoRA weights")
    decoder = obj.get("decoder")
    if meta["rank"] == 0 and decoder is None:
        raise UserInputError(f"adapter {path} has neither LoRA weights nor a mask decoder")
    if decoder is not None:
        if not isinstance(decoder, dict) or not all(isinstance(v, torch.Tensor) for v in decoder.values()):
            raise UserInputError(f"adapter {path} is corrupt: its mask decoder entries are not all tensors")
        _check_finite(decoder, path, "mask decoder weights")
    return obj


def _adapter_from_train_state(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """The adapter object held by a training state (``last.pt``): its weights at the last step.

    The trainable tensors are split into LoRA (``...lora_...``) and mask decoder (``mask_decoder.*``)
    entries; the metadata comes from the state's ``identity`` (base model, rank, alpha, blocks). The
    version id is the file's modification time and a digest of the tensors, so reading the same file
    twice gives the same version. The result goes through every check of an adapter file.

    Raises:
        UserInputError: the state lacks its identity or tensors, holds other tensors, or its run kept a
            mask decoder that came from ``--adapter-init`` and is not stored in ``last.pt``.
    """
    identity, trainable = state.get("identity"), state.get("trainable")
    base = identity.get("base") if isinstance(identity, dict) else None
    if (
        not isinstance(base, dict)
        or not isinstance(trainable, dict)
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in trainable.items())
    ):
        raise UserInputError(
            f"training state {path} is damaged: it has no model identity or no trainable tensors to use "
            "as an adapter"
        )
    lora = {k: v for k, v in trainable.items() if ".lora_" in k}
    prefix = "mask_decoder."
    decoder = {k[len(prefix) :]: v for k, v in trainable.items() if k.startswith(prefix)}
    other = sorted(set(trainable) - set(lora) - {prefix + k for k in decoder})
    if other:
        raise UserInputError(
            f"training state {path} holds tensors that are neither LoRA nor mask decoder weights, e.g. {other[0]}"
        )
    if state.get("save_decoder") and not decoder:
        raise UserInputError(
            f"training state {path} does not hold the mask decoder its run started from (--adapter-init); "
            "use that run's adapter.pt instead"
        )
    digest = hashlib.sha256()
    for name in sorted(trainable):
        digest.update(name.encode())
        digest.update(trainable[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    mtime = path.stat().st_mtime
    obj = adapter_object(
        base=base,
        rank=identity.get("rank"),
        alpha=identity.get("alpha"),
        blocks=identity.get("blocks"),
        image_size=base.get("image_size"),
        lora=lora,
        decoder=decoder or None,
        version=time.strftime("%Y%m%d-%H%M%S", time.gmtime(mtime)) + "-" + digest.hexdigest()[:8],
        created=datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds"),
        trained_prompts=identity.get("trained_prompts"),
    )
    obj["meta"].update(converted_from=CONVERTED_FROM_STATE, epoch=state.get("epoch"), step=state.get("step"))
    return obj


def export_adapter(source: str | os.PathLike, target: str | os.PathLike) -> dict[str, Any]:
    """Write the adapter read from ``source`` (an adapter file or a training run's ``last.pt``) to
    ``target`` as a plain adapter file, atomically; return its metadata.

    Raises:
        UserInputError: ``source`` is not a readable, sound adapter or training state.
    """
    obj = read_adapter(source)
    with atomic_path(target) as tmp:
        torch.save(obj, tmp)
    return obj["meta"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_adapter_meta(meta: dict[str, Any], path: Path) -> None:
    """Refuse metadata of the wrong types or values (``rank: "abc"``, ``alpha: nan``...), naming the key."""
    problems = []
    if not isinstance(meta["model"], str) or not meta["model"]:
        problems.append(f"model {meta['model']!r} is not a model name")
    if not _is_int(meta["rank"]) or meta["rank"] < 0:
        problems.append(f"rank {meta['rank']!r} is not a whole number >= 0")
    alpha = meta["alpha"]
    if not (
        isinstance(alpha, int | float) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0
    ):
        problems.append(f"alpha {alpha!r} is not a positive number")
    blocks = meta["blocks"]
    no_lora = meta["rank"] == 0
    if (
        not isinstance(blocks, list)
        or bool(blocks) == no_lora
        or not all(_is_int(b) and b >= 0 for b in blocks)
    ):
        problems.append(
            f"blocks {blocks!r} is not "
            + ("empty, as an adapter of rank 0 has no LoRA" if no_lora else "a list of block indices")
        )
    if not _is_int(meta["image_size"]) or meta["image_size"] < 1:
        problems.append(f"image_size {meta['image_size']!r} is not a positive integer")
    if "train_decoder" in meta and not isinstance(meta["train_decoder"], bool):
        problems.append(f"train_decoder {meta['train_decoder']!r} is not true or false")
    prompts = meta.get("trained_prompts", list(PROMPT_KINDS_TRAINED))
    if not isinstance(prompts, list) or not prompts or not set(prompts) <= set(PROMPT_KINDS_TRAINED):
        problems.append(f"trained_prompts {prompts!r} is not a list of {PROMPT_KINDS_TRAINED}")
    if meta.get("version") is not None and not isinstance(meta["version"], str):
        problems.append(f"version {meta['version']!r} is not a string")
    if problems:
        raise UserInputError(f"adapter {path} has damaged metadata: {'; '.join(problems)}")


def _check_finite(tensors: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Refuse NaN or infinite values: such an adapter would turn every answer into NaN."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserInputError(
            f"adapter {path} holds NaN or infinite {what} ({len(bad)} tensors, e.g. {bad[0]}); it is refused"
        )


def read_adapter_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of the adapter file (or training run's ``last.pt``) at ``path`` (checks that it is one)."""
    return read_adapter(path)["meta"]


def check_adapter_base(meta: dict[str, Any], base_info: dict[str, Any], source: str = "adapter") -> None:
    """Refuse an adapter made for another base model than ``base_info``.

    Compares the model name, the weights' digest and the checkpoint MD5 (when both sides know them),
    random versus checkpoint weights, the seed of random weights, and the input size.
    """
    name = base_info.get("name")
    if meta["model"] != name:
        raise UserInputError(f"{source} was made for base model {meta['model']}, not {name}")
    md5_a, md5_b = meta.get("checkpoint_md5"), base_info.get("checkpoint_md5")
    if md5_a and md5_b and md5_a != md5_b:
        raise UserInputError(
            f"{source} was made for the {name} checkpoint with MD5 {md5_a}, but the loaded one has MD5 {md5_b}"
        )
    dig_a, dig_b = meta.get("weights_digest"), base_info.get("weights_digest")
    if dig_a and dig_b and dig_a != dig_b:
        raise UserInputError(
            f"{source} was made for {name} weights with digest {dig_a}, but the loaded ones have {dig_b}"
        )
    base = meta.get("base") or {}
    if "random_weights" in base and "random_weights" in base_info:
        if bool(base["random_weights"]) != bool(base_info["random_weights"]):
            made = "random" if base["random_weights"] else "checkpoint"
            raise UserInputError(
                f"{source} was made for {name} with {made} weights; the loaded model differs"
            )
        if base["random_weights"] and base.get("seed") != base_info.get("seed"):
            raise UserInputError(
                f"{source} was made for random {name} weights with seed {base.get('seed')}, "
                f"not seed {base_info.get('seed')}"
            )
    size = base_info.get("image_size")
    if size is not None and int(meta["image_size"]) != int(size):
        raise UserInputError(f"{source} was made for input size {meta['image_size']}, not {size}")
