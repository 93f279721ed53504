"""A run's progress and its resumable state ``last.pt``: what it holds, how it is written, checked and read.

``last.pt`` (``torch.save``, loadable with ``weights_only=True``; format name from
:mod:`sam_medical.adapters.files`, which also reads it as an adapter) holds the trainable tensors, the
optimiser, scheduler and scaler states, the :class:`RunProgress`, what the run was made of (``identity``:
base model, LoRA rank/alpha/blocks, whether the decoder trains; the data and batch layout) and the RNG
states.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sam_medical.adapters.files import TRAIN_STATE_FORMAT as STATE_FORMAT
from sam_medical.adapters.files import TRAIN_STATE_FORMAT_VERSION as STATE_FORMAT_VERSION
from sam_medical.atomic import atomic_path
from sam_medical.errors import UserInputError
from sam_medical.training.optim import Optimisation

_NUMBER = (int, float)
#: What ``last.pt`` must hold for a resume, and of which types (see :func:`save_state`).
STATE_KEYS: dict[str, tuple[type, ...]] = {
    "identity": (dict,),
    "trainable": (dict,),
    "optimizer": (dict,),
    "scheduler": (dict,),
    "scaler": (dict,),
    "epoch": (int,),
    "micro_done": (int,),
    "epoch_loss_sum": _NUMBER,
    "epoch_loss_count": (int,),
    "step": (int,),
    "initial_val_dice": (*_NUMBER, type(None)),
    "best_val_dice": _NUMBER,
    "best_epoch": (int,),
    "elapsed": _NUMBER,
    "train_cases": (list,),
    "train_items": (int,),
    "world_size": (int,),
    "batch_size": (int,),
    "history": (str,),
    "torch_rng": (torch.Tensor,),
}
#: Set to 1 to make every rank write ``rank{r}_lora_sha.txt`` (hash of its trainable tensors at the
#: start and the end): the check that DDP ranks end with identical adapters.
DEBUG_HASH_ENV = "SAM_MEDICAL_DEBUG_RANK_HASH"
#: The identity keys a resumed run must share with the run that wrote ``last.pt``.
IDENTITY_KEYS = ("base", "rank", "alpha", "blocks", "train_decoder")
#: The data layout keys: when one differs, an interrupted epoch restarts instead of continuing.
LAYOUT_KEYS = ("train_cases", "train_items", "world_size", "batch_size")


@dataclass
class RunProgress:
    """Where a run stands (saved in ``last.pt``, restored on resume)."""

    epoch: int = 0  #: last epoch begun (1-based); 0 = nothing trained yet
    micro_done: int = 0  #: micro-batches of ``epoch`` already consumed (when stopped mid-epoch)
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    step: int = 0  #: optimiser steps taken
    initial_val_dice: float | None = None  #: the starting model's validation Dice (epoch 0)
    best_val_dice: float = -1.0
    best_epoch: int = -1
    elapsed: float = 0.0  #: seconds trained before this process (a resumed run adds its own)
    history: list[dict[str, Any]] = field(default_factory=list)  #: the epoch records
    save_decoder: bool = False  #: the adapters written hold the mask decoder

    def start_epoch(self) -> None:
        self.epoch += 1
        self.epoch_loss_sum, self.epoch_loss_count = 0.0, 0

    def to_state(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["history"] = json.dumps(self.history)
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunProgress:
        values = {f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state}
        values["history"] = json.loads(state["history"])
        return cls(**values)


def trainable_state(sam: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, detached CPU copies."""
    return {n: p.detach().cpu().clone() for n, p in sam.named_parameters() if p.requires_grad}


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names and raw bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_rank_hash(out: Path, rank: int, tag: str, sam: nn.Module) -> None:
    """With ``SAM_MEDICAL_DEBUG_RANK_HASH=1``: append ``tag`` and the hash of the trainable tensors to
    ``out/rank{rank}_lora_sha.txt``."""
    if os.environ.get(DEBUG_HASH_ENV) == "1":
        with open(out / f"rank{rank}_lora_sha.txt", "a") as f:
            f.write(f"{tag} {tensors_sha256(trainable_state(sam))}\n")


def save_state(
    path: Path,
    *,
    identity: dict[str, Any],
    layout: dict[str, Any],
    sam: nn.Module,
    optim: Optimisation,
    progress: RunProgress,
    elapsed: float,
) -> None:
    """Write ``last.pt`` atomically. ``layout``: the :data:`LAYOUT_KEYS` of this run; ``elapsed``: the
    seconds trained so far, this process included."""
    state = {
        "format": STATE_FORMAT,
        "format_version": STATE_FORMAT_VERSION,
        "identity": identity,
        "trainable": trainable_state(sam),
        **optim.state_dict(),
        **progress.to_state(),
        "elapsed": elapsed,
        **layout,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def check_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse a training state that lacks a key or holds a value of the wrong type (a damaged file).

    Raises:
        UserInputError: naming the missing or damaged keys.
    """
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise UserInputError(f"cannot resume: {path} is incomplete (missing {', '.join(missing)})")
    bad = [
        k for k, types in STATE_KEYS.items() if isinstance(state[k], bool) or not isinstance(state[k], types)
    ]
    if "trainable" not in bad and not all(isinstance(v, torch.Tensor) for v in state["trainable"].values()):
        bad.append("trainable")
    if bad:
        raise UserInputError(
            f"cannot resume: {path} is damaged (wrong values for {', '.join(sorted(set(bad)))})"
        )
    try:
        json.loads(state["history"])
    except ValueError:
        raise UserInputError(f"cannot resume: {path} is damaged (unreadable history)") from None


def read_state(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """``last.pt``, checked (:func:`check_state`) and made by a run of this ``identity``.

    Raises:
        UserInputError: unreadable, not a training state, damaged, or made with another identity.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserInputError(f"cannot resume: {path} could not be read ({type(exc).__name__})") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserInputError(f"cannot resume: {path} is not a sam-medical training state")
    check_state(state, path)
    saved = state["identity"]
    for key in IDENTITY_KEYS:
        if saved.get(key) != identity.get(key):
            raise UserInputError(
                f"cannot resume from {path}: it was made with {key} = {saved.get(key)}, "
                f"but this run has {key} = {identity.get(key)}"
            )
    return state


def restore_state(state: dict[str, Any], path: Path, sam: nn.Module, optim: Optimisation) -> None:
    """Put the trainable tensors, the optimiser's state and the RNG states of ``state`` back.

    Raises:
        UserInputError: the tensors or the optimiser state do not fit this model; a damaged RNG state.
    """
    params = dict(sam.named_parameters())
    trainable = state["trainable"]
    if set(trainable) != {n for n, p in params.items() if p.requires_grad}:
        raise UserInputError(f"cannot resume from {path}: its trainable tensors do not fit this model")
    try:
        with torch.no_grad():
            for name, value in trainable.items():
                params[name].copy_(value)
        optim.load_state_dict(state)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise UserInputError(
            f"cannot resume from {path}: its optimiser or model state does not fit this run "
            f"({type(exc).__name__})"
        ) from None
    try:
        torch.set_rng_state(state["torch_rng"])
    except (TypeError, RuntimeError):
        raise UserInputError(f"cannot resume from {path}: its random state is damaged") from None
    if torch.cuda.is_available() and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])
