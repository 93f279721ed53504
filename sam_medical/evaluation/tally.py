"""What the evaluation's case loop accumulates: per-object rows, per-volume masks and the counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sam_medical.evaluation.cases import CaseInfo
from sam_medical.evaluation.scoring import Answer, Scored
from sam_medical.evaluation.slice_requests import ObjectRef


@dataclass
class Tally:
    """What the case loop accumulates: per-object rows, per-volume entries, counts, outputs."""

    labels: Sequence[int]
    names: dict[int, str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    propagated: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[int, dict[str, int]] = field(default_factory=dict)
    mask_files: list[str] = field(default_factory=list)
    slices: int = 0
    objects: int = 0

    def __post_init__(self) -> None:
        keys = ("cases_with_label", "slices_in_files", "slices_present", "slices_scored_present")
        keys += ("slices_scored_empty", "slices_skipped_empty", "slices_not_in_files")
        self.counts = {v: dict.fromkeys(keys, 0) for v in self.labels}

    def count_case(self, case: CaseInfo, skipped: dict[int, int]) -> None:
        for v in self.labels:
            cnt = self.counts[v]
            cnt["slices_in_files"] += case.rows
            cnt["slices_not_in_files"] += case.volume_shape[2] - case.rows
            cnt["slices_skipped_empty"] += skipped[v]
            if v in case.present:
                cnt["cases_with_label"] += 1
                cnt["slices_present"] += int(case.present[v].sum())


@dataclass
class CaseMasks:
    """One case's predicted source slices per label and ``k`` (model, baseline, truth), and label volumes."""

    labels: Sequence[int]
    pred: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    base: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    truth: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    scored: dict[int, int] = field(default_factory=dict)
    volume: np.ndarray | None = None
    base_volume: np.ndarray | None = None

    def __post_init__(self) -> None:
        for d in (self.pred, self.base, self.truth):
            d.update({v: {} for v in self.labels})
        self.scored = dict.fromkeys(self.labels, 0)


def object_record(
    obj: ObjectRef,
    p: int,
    s: Scored,
    sb: Scored | None,
    fill: float,
    gt_mask: np.ndarray,
    ans: Answer,
    steps: Sequence[np.ndarray],
    names: dict[int, str],
) -> dict[str, Any]:
    """The ``slices.csv`` row of object ``p`` of a slice: model scores ``s``, baseline ``sb``, box fill,
    prompt and Dice after each step; keys starting with ``_`` stay out of the outputs."""
    record: dict[str, Any] = {
        "case": obj.case,
        "slice_index": obj.slice_index,
        "label": obj.label,
        "label_name": names.get(obj.label, ""),
        "dice": float(s.dice[p]),
        "box_fill_dice": float(fill),
        "iou": float(s.iou[p]),
        "gt_area": int(gt_mask.sum()),
        "pred_area": int(s.pred_area[p]),
        "pred_iou": float(s.pred_iou[p]),
        "prompt": ans.prompts[p].describe(),
        "gt_present": int(obj.gt_present),
        "prompt_slice": obj.prompt_slice,
        "clicks": int(ans.clicks[p]),
        "dice_steps": ";".join(f"{float(d[p]):.6f}" for d in steps),
        "_row": obj.row,
        "_steps": [float(d[p]) for d in steps],
    }
    if sb is not None:
        record.update(
            baseline_dice=float(sb.dice[p]),
            baseline_iou=float(sb.iou[p]),
            baseline_pred_area=int(sb.pred_area[p]),
            baseline_pred_iou=float(sb.pred_iou[p]),
            dice_diff=float(s.dice[p] - sb.dice[p]),
            same_as_baseline=int(np.array_equal(s.masks[p], sb.masks[p])),
        )
    return record
