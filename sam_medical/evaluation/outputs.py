"""What an evaluation writes besides the summary and the report: ``slices.csv``, predicted label
volumes (``--save-masks``), and plain JSON values for ``summary.json``."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from sam_medical.atomic import atomic_path
from sam_medical.evaluation.cases import CaseInfo
from sam_medical.volume.io import Volume, write_volume

#: Columns of ``slices.csv`` (baseline columns are appended when comparing).
CSV_COLUMNS = (
    "case",
    "slice_index",
    "label",
    "label_name",
    "dice",
    "box_fill_dice",
    "iou",
    "gt_area",
    "pred_area",
    "pred_iou",
    "prompt",
    "gt_present",
    "prompt_slice",
    "clicks",
    "dice_steps",
)
BASELINE_COLUMNS = (
    "baseline_dice",
    "baseline_iou",
    "baseline_pred_area",
    "baseline_pred_iou",
    "dice_diff",
    "same_as_baseline",
)
#: Text columns of ``slices.csv`` (the others are numbers).
_TEXT_COLUMNS = ("case", "prompt", "label_name", "dice_steps")


def write_csv(path: Path, rows: list[dict[str, Any]], with_baseline: bool) -> None:
    """``slices.csv``, atomically. Floats are written in full precision; NaN as ``nan``."""
    columns = list(CSV_COLUMNS) + (list(BASELINE_COLUMNS) if with_baseline else [])
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            for r in rows:
                writer.writerow([_cell(r[c]) for c in columns])


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read ``slices.csv`` back with numeric columns as numbers."""
    ints = {
        "slice_index",
        "label",
        "gt_area",
        "pred_area",
        "gt_present",
        "prompt_slice",
        "clicks",
        "baseline_pred_area",
        "same_as_baseline",
    }
    out = []
    with open(path, newline="") as fh:
        for rec in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for k, v in rec.items():
                if k in _TEXT_COLUMNS:
                    row[k] = v
                elif k in ints:
                    row[k] = int(v)
                else:
                    row[k] = float(v)
            out.append(row)
    return out


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return value


def save_masks(out_dir: Path, case: CaseInfo, mask_vol: np.ndarray, base_vol: np.ndarray | None) -> list[str]:
    """Write the predicted label volume(s) with the source geometry (``write_volume``)."""
    ref = Volume(array=mask_vol, spacing=case.spacing, origin=case.origin, direction=case.direction)
    paths = [write_volume(mask_vol, ref, out_dir / "masks" / f"{case.name}.nii.gz")]
    if base_vol is not None:
        paths.append(write_volume(base_vol, ref, out_dir / "masks" / f"{case.name}_baseline.nii.gz"))
    return [str(p) for p in paths]


def jsonable(obj: Any) -> Any:
    """Plain JSON values: NaN/inf -> None, numpy -> Python, paths -> str, private keys dropped."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, str | int | bool) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return str(obj)
    return str(obj)
