"""A run's ``summary.json``: the numbers (steps, items, cases, device, config) and the outcome
(:func:`sam_medical.training.outcome.run_outcome`: the verdict, Dice per label, the paired gain)."""

from __future__ import annotations

from typing import Any, NamedTuple

from sam_medical.atomic import write_json_atomic
from sam_medical.training.config import TrainConfig
from sam_medical.training.distributed import DistInfo
from sam_medical.training.loaders import RunData
from sam_medical.training.outcome import run_outcome
from sam_medical.training.run_folder import RunFolder
from sam_medical.training.state import RunProgress
from sam_medical.training.validation import Validation


class Facts(NamedTuple):
    """What the trainer knows of a run beyond its config, data and progress."""

    total_steps: int
    steps_per_epoch: int
    trainable_params: int
    base_info: dict[str, Any]


def summary_numbers(
    cfg: TrainConfig,
    st: RunProgress,
    data: RunData,
    folder: RunFolder,
    facts: Facts,
    *,
    stop_reason: str | None,
    final: dict[str, float] | None,
    seconds: float,
) -> dict[str, Any]:
    """Everything of the summary but the outcome (the device, AMP and world size are added by the caller)."""
    return {
        "initial_val_dice": st.initial_val_dice,
        "best_val_dice": st.best_val_dice,
        "best_epoch": st.best_epoch,
        "final_val_dice": final["mean"] if final else None,
        "epochs": st.epoch,
        "epochs_planned": cfg.epochs,
        "steps": st.step,
        "steps_planned": facts.total_steps,
        "steps_per_epoch": facts.steps_per_epoch,
        "trainable_params": facts.trainable_params,
        "seconds": round(seconds, 3),
        "stopped_early": stop_reason is not None,
        "stop_reason": stop_reason,
        "train_cases": data.train_ds.case_names,
        "val_cases": data.val_cases,
        "val_on_train": data.val_on_train,
        "val_kinds": cfg.val_kinds(),
        "train_items": len(data.train_ds),
        "val_items": data.val_items,
        "labels": data.train_ds.labels_present(),
        "adapter": str(folder.adapter) if folder.adapter.is_file() else None,
        "base": facts.base_info,
    }


def write_summary(
    cfg: TrainConfig,
    st: RunProgress,
    data: RunData,
    folder: RunFolder,
    facts: Facts,
    *,
    dist: DistInfo,
    validation: Validation,
    stop_reason: str | None,
    final: dict[str, float] | None,
    seconds: float,
) -> dict[str, Any]:
    """The summary; rank 0 also writes it to ``summary.json``. ``validation``: how the starting model and
    the best adapter are scored again (:func:`sam_medical.training.outcome.run_outcome`)."""
    summary = summary_numbers(
        cfg, st, data, folder, facts, stop_reason=stop_reason, final=final, seconds=seconds
    )
    amp_dtype = validation.amp_dtype
    summary["device"] = str(validation.device)
    summary["amp"] = str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"
    summary["world_size"] = dist.world_size
    summary["config"] = cfg.to_dict()
    cases = data.train_ds.cases + ([] if data.val_on_train else data.val_ds.cases)
    summary |= run_outcome(
        cfg,
        adapter=folder.adapter,
        case_files=[c.path for c in cases],
        validation=validation,
        dist=dist,
        initial=st.initial_val_dice,
        best=st.best_val_dice,
        best_epoch=st.best_epoch,
        final=final["mean"] if final else None,
        stopped_early=stop_reason is not None,
        steps=st.step,
        val_on_train=data.val_on_train,
    )
    if dist.is_main:
        write_json_atomic(folder.summary, summary)
    return summary
