"""LoRA on the query and value projections of SAM's image encoder (SAMed's recipe), written by hand.

Both encoder families compute ``q, k, v`` with one fused linear layer (``attn.qkv``), so PEFT cannot target
q and v alone. :class:`LoRAQKV` replaces that layer, keeping its weight and bias as they are (same
parameters, same state-dict names) and adding two low-rank updates to exactly the q rows and the v rows
of its output::

    qkv = x W^T + b;   qkv[q_rows] += s * B_q A_q x;   qkv[v_rows] += s * B_v A_v x;   s = alpha / r

with ``A (r, in)`` Kaiming-uniform and ``B (rows, r)`` zero, so a fresh adapter leaves the model unchanged.
Which rows are q and v is the family's business (:mod:`sam_medical.model.registry` names the function):

* ViT: q, k, v in thirds: ``12 blocks * 2 * (4*768 + 768*4) = 147,456`` parameters for ViT-B at rank 4;
* TinyViT (LiteMedSAM): interleaved head by head; 10 attention blocks, 29,696 parameters at rank 4.

The vocabulary follows PEFT: :func:`inject_lora`, :func:`save_adapter` (adapter weights only, plus the
mask decoder when it was trained), :func:`load_adapter`, :func:`merge_lora`, :func:`unmerge_lora`.

Adapter file (``torch.save``, loadable with ``weights_only=True``)::

    {"format": "sam-medical-adapter", "format_version": 1,
     "meta": {"model", "checkpoint_md5", "weights_digest", "base", "rank", "alpha", "blocks", "image_size",
              "train_decoder", "lora_params", "version", "created", **extra},
     "lora": {state-dict name: tensor},
     "decoder": mask decoder state dict}          # only when train_decoder

A training run's ``last.pt`` (format ``sam-medical-train-state``, see ``Trainer._save_state`` in
:mod:`sam_medical.training.trainer`) is accepted wherever an adapter is: :func:`_read_adapter` turns its trainable
tensors and its identity (base model, rank, alpha, blocks) into the same object, with the same checks, and
:func:`export_adapter` writes it out as a plain adapter file (what :mod:`sam_medical.adapters.store` publishes).
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from sam_medical.atomic import atomic_path
from sam_medical.errors import UserInputError, library_detail
from sam_medical.model.registry import family_of, load_callable

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

ADAPTER_FORMAT = "sam-medical-adapter"
ADAPTER_FORMAT_VERSION = 1
#: ``last.pt`` of a training run (``sam_medical.training.trainer.STATE_FORMAT``; not imported: training imports us).
TRAIN_STATE_FORMAT = "sam-medical-train-state"
#: ``meta["converted_from"]`` of an adapter read from a training state.
CONVERTED_FROM_STATE = "training state (last.pt)"
_BASE_DECODER_ATTR = "_sam_medical_base_decoder"


@dataclass(frozen=True)
class LoRATarget:
    """One attention layer LoRA adapts: ``owner.qkv`` is the fused projection; ``q_rows`` and ``v_rows``
    are the indices of its output features that are queries and values."""

    owner: nn.Module
    q_rows: Sequence[int]
    v_rows: Sequence[int]


class LoRAQKV(nn.Module):
    """A fused ``qkv`` linear layer ``in -> out`` with LoRA updates on its q rows and v rows.

    ``weight (out, in)`` and ``bias (out,)`` are the base layer's own parameters (shared, not copied),
    so the state-dict names of the base weights do not change. The adapters are ``lora_q_A``/``lora_v_A``
    (``nn.Linear(in, r)``, weight ``(r, in)``) and ``lora_q_B``/``lora_v_B`` (``nn.Linear(r, len(rows))``,
    weight ``(len(rows), r)``), all without bias. The row indices are non-persistent buffers (they come
    from the architecture, not from files).

    Input ``(..., in)``, output ``(..., out)``.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        generator: torch.Generator | None = None,
        *,
        q_rows: Sequence[int] | None = None,
        v_rows: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        dim, out = base.in_features, base.out_features
        if q_rows is None and v_rows is None:  # SAM's ViT layout: q, k, v in thirds
            if out != 3 * dim:
                raise ValueError(f"expected a fused qkv layer dim -> 3*dim, got {dim} -> {out}")
            q_rows, v_rows = range(0, dim), range(2 * dim, 3 * dim)
        q_idx = torch.as_tensor(list(q_rows), dtype=torch.long)
        v_idx = torch.as_tensor(list(v_rows), dtype=torch.long)
        if (
            not len(q_idx)
            or not len(v_idx)
            or int(torch.cat([q_idx, v_idx]).min()) < 0
            or int(torch.cat([q_idx, v_idx]).max()) >= out
            or len(set(q_idx.tolist()) | set(v_idx.tolist())) != len(q_idx) + len(v_idx)
        ):
            raise ValueError(f"q and v rows must be distinct indices in 0..{out - 1}")
        self.dim = dim
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.weight = base.weight
        self.bias = base.bias
        self.register_buffer("q_rows", q_idx, persistent=False)
        self.register_buffer("v_rows", v_idx, persistent=False)
        self.lora_q_A = nn.Linear(dim, rank, bias=False)
        self.lora_q_B = nn.Linear(rank, len(q_idx), bias=False)
        self.lora_v_A = nn.Linear(dim, rank, bias=False)
        self.lora_v_B = nn.Linear(rank, len(v_idx), bias=False)
        self.merged = False
        self.reset_lora_parameters(generator)
        self.to(device=base.weight.device, dtype=base.weight.dtype)

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return self.alpha / self.rank

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A: Kaiming-uniform (``a = sqrt(5)``, as LoRA/PEFT); B: zeros. Unmerges first."""
        self.unmerge()
        for a in (self.lora_q_A, self.lora_v_A):
            w = torch.empty(a.weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
            a.weight.copy_(w)
        nn.init.zeros_(self.lora_q_B.weight)
        nn.init.zeros_(self.lora_v_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update ``(out, in)`` that :meth:`merge` adds to ``weight`` (zero outside the q and v rows)."""
        delta = torch.zeros_like(self.weight)
        delta[self.q_rows] = (self.lora_q_B.weight @ self.lora_q_A.weight).to(delta.dtype)
        delta[self.v_rows] = (self.lora_v_B.weight @ self.lora_v_A.weight).to(delta.dtype)
        return delta * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.weight, self.bias)
        if self.merged:
            return qkv
        dq = self.lora_q_B(self.lora_q_A(x)) * self.scale
        dv = self.lora_v_B(self.lora_v_A(x)) * self.scale
        return qkv.index_add(-1, self.q_rows, dq.to(qkv.dtype)).index_add(-1, self.v_rows, dv.to(qkv.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the updates into ``weight`` (inference speed); :meth:`forward` then skips them."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the updates back out of ``weight`` (up to float rounding)."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in={self.dim}, out={self.weight.shape[0]}, q_rows={len(self.q_rows)}, "
            f"v_rows={len(self.v_rows)}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"
        )


# --- inject / inspect ---------------------------------------------------------------------------


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


# --- adapter files ------------------------------------------------------------------------------


def _plain(value: Any, where: str) -> Any:
    """``value`` as types that ``torch.load(weights_only=True)`` accepts (tuples become lists)."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return value.item()
    raise TypeError(f"{where} = {value!r} cannot be stored in an adapter file")


def new_version_id() -> str:
    """A sortable, unique adapter version: ``YYYYmmdd-HHMMSS-<8 hex>`` (UTC)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


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
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the LoRA weights (and the mask decoder if ``train_decoder``) to ``path`` atomically.

    ``rank``/``alpha``/``blocks``/``image_size`` must be those of the model (checked). ``rank`` 0 (no
    LoRA injected, ``blocks`` empty) saves a decoder-only adapter, which needs ``train_decoder``.
    ``extra`` is added to the metadata (plain values only; it may not replace the keys set here).
    Returns the metadata.
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
    obj = _adapter_object(
        base=_plain(dict(base_info), "base_info"),
        rank=given["rank"],
        alpha=alpha,
        blocks=given["blocks"],
        image_size=size,
        lora=lora,
        decoder=decoder,
        version=new_version_id(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    meta = obj["meta"]
    for key, value in (extra or {}).items():
        if key in meta:
            raise ValueError(f"save_adapter: extra key {key!r} would replace the adapter's own metadata")
        meta[str(key)] = _plain(value, f"extra.{key}")
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return meta


def _adapter_object(
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
        "lora_params": int(sum(v.numel() for v in lora.values())),
        "version": version,
        "created": created,
    }
    obj: dict[str, Any] = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "meta": meta,
        "lora": lora,
    }
    if decoder is not None:
        obj["decoder"] = decoder
    return obj


def _read_adapter(path: str | os.PathLike) -> dict[str, Any]:
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
    import hashlib

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
    obj = _adapter_object(
        base=base,
        rank=identity.get("rank"),
        alpha=identity.get("alpha"),
        blocks=identity.get("blocks"),
        image_size=base.get("image_size"),
        lora=lora,
        decoder=decoder or None,
        version=time.strftime("%Y%m%d-%H%M%S", time.gmtime(mtime)) + "-" + digest.hexdigest()[:8],
        created=datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds"),
    )
    obj["meta"].update(converted_from=CONVERTED_FROM_STATE, epoch=state.get("epoch"), step=state.get("step"))
    return obj


def export_adapter(source: str | os.PathLike, target: str | os.PathLike) -> dict[str, Any]:
    """Write the adapter read from ``source`` (an adapter file or a training run's ``last.pt``) to
    ``target`` as a plain adapter file, atomically; return its metadata.

    Raises:
        UserInputError: ``source`` is not a readable, sound adapter or training state.
    """
    obj = _read_adapter(source)
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
    return _read_adapter(path)["meta"]


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


def load_adapter(
    sam: Sam, path: str | os.PathLike, *, base_info: dict[str, Any] | None = None, inject: bool = True
) -> dict[str, Any]:
    """Load the adapter at ``path`` into ``sam``; return its metadata.

    Injects LoRA with the file's rank/alpha/blocks if the model has none (``inject=True``). When LoRA is
    already there, rank and blocks must match (alpha is taken from the file). A rank-0 adapter holds a
    mask decoder only and leaves the encoder as it is. Merged adapters are
    unmerged, replaced, and merged again. The mask decoder is replaced when the file holds one, and
    restored to the base model's decoder when it does not (so adapters can be swapped in turn).

    Raises:
        UserInputError: not an adapter / corrupt file; made for another base model, checkpoint, input
            size or rank.
    """
    obj = _read_adapter(path)
    meta = obj["meta"]
    source = f"adapter {path}"
    if base_info is not None:
        check_adapter_base(meta, base_info, source)
    size = int(sam.image_encoder.img_size)
    if int(meta["image_size"]) != size:
        raise UserInputError(
            f"{source} was made for input size {meta['image_size']}, but the model runs at {size}"
        )

    rank, alpha, blocks = int(meta["rank"]), float(meta["alpha"]), sorted(int(b) for b in meta["blocks"])
    cfg = lora_config(sam)
    if rank == 0:  # a decoder-only adapter: the encoder stays as it is
        if cfg is not None:
            raise UserInputError(f"{source} has no LoRA, but the model has LoRA of rank {cfg['rank']}")
    elif cfg is None:
        if not inject:
            raise UserInputError(f"{source}: the model has no LoRA injected")
        inject_lora(sam, rank=rank, alpha=alpha, blocks=blocks, seed=0)  # A is overwritten below
    else:
        if cfg["rank"] != rank:
            raise UserInputError(f"{source} has LoRA rank {rank}, but the model has rank {cfg['rank']}")
        if cfg["blocks"] != blocks:
            raise UserInputError(
                f"{source} adapts encoder blocks {blocks}, but the model has LoRA on {cfg['blocks']}"
            )

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
    return meta
