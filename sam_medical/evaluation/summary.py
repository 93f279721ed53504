"""``summary.json``'s numbers: aggregates per label and overall, the comparison, and the policy in words.

* **Per label:** mean, median, sample standard deviation (``ddof=1``), n, min, max and a **t-based**
  95% confidence interval of the mean (``mean +- t(0.975, n-1) * sd / sqrt(n)``, not clipped).
* **Comparison:** paired per object, ``model - baseline`` Dice (:func:`sam_medical.metrics.paired_comparison`).
* **Box-fill reference:** every prompt with a box is also scored as a prediction itself (the rectangle,
  filled); on compact objects that already scores 0.7-0.9, so a box-prompted model that does not beat
  it adds nothing, and the summary says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from sam_medical.evaluation.cases import CaseInfo, dataset_label_names
from sam_medical.evaluation.config import EvalConfig
from sam_medical.metrics import TIE_TOLERANCE, paired_comparison


def describe(values: Iterable[float]) -> dict[str, Any]:
    """n, mean, median, sample sd (ddof=1), min, max, and the t-based 95% CI of the mean (NaN/None dropped)."""
    from scipy import stats  # heavy; loaded only when a report or test is made

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    n = int(v.size)
    if n == 0:
        return {"n": 0, "mean": None, "median": None, "std": None, "min": None, "max": None, "ci95": None}
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else None
    ci = None
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
        ci = [mean - half, mean + half]
    return {
        "n": n,
        "mean": mean,
        "median": float(np.median(v)),
        "std": std,
        "min": float(v.min()),
        "max": float(v.max()),
        "ci95": ci,
    }


def summarize(
    rows: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
    labels: Sequence[int],
    counts: dict[int, dict[str, int]],
    config: EvalConfig,
    cases: Sequence[CaseInfo],
) -> dict[str, Any]:
    """Aggregates per label and overall from the per-object rows and per-volume entries."""
    compare = bool(rows) and "baseline_dice" in rows[0]
    names = dataset_label_names(cases)
    comparison: dict[str, Any] | None = {"per_label": {}} if compare else None
    per_label = {
        str(v): label_entry(v, rows, volumes, counts[v], config, names.get(v), comparison) for v in labels
    }
    overall = overall_entry(rows, volumes, [per_label[str(v)] for v in labels], config, comparison)
    return {
        "format": "sam-medical-evaluation",
        "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": {
            "files": [str(c.path) for c in cases],
            "cases": len(cases),
            "geometry_source": sorted({c.geometry_source for c in cases}),
            **config.extra.get("data", {}),
        },
        "labels": [int(v) for v in labels],
        "label_names": {str(v): names[v] for v in labels if v in names},
        "prompt": config.prompt.as_dict(),
        "policy": policy_dict(config.include_empty),
        "per_label": per_label,
        "overall": overall,
        "volumes": volumes,
        "comparison": comparison,
        "box_fill": box_fill_verdict(overall),
        **{k: val for k, val in config.extra.items() if k != "data"},
    }


def label_entry(
    v: int,
    rows: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
    counts: dict[str, int],
    config: EvalConfig,
    name: str | None,
    comparison: dict[str, Any] | None,
) -> dict[str, Any]:
    """Label ``v``'s aggregates; with a baseline, its paired comparison goes to ``comparison["per_label"]``."""
    present = [r for r in rows if r["label"] == v and r["gt_present"]]
    empty = [r for r in rows if r["label"] == v and not r["gt_present"]]
    vols = [e for e in volumes if e["label"] == v]
    entry: dict[str, Any] = {
        "name": name,
        "slice_dice": describe(r["dice"] for r in present),
        "slice_iou": describe(r["iou"] for r in present),
        "volume_dice": describe(e["dice_3d"] for e in vols),
        "hd95_mm": describe(e["hd95_mm"] for e in vols),
        "volumes": len(vols),
        "volumes_without_hd95": sum(1 for e in vols if e["hd95_mm"] is None),
        "counts": dict(counts),
        **_box_fill_and_steps(present, config.prompt.refine),
    }
    if config.include_empty:
        entry["empty_slices"] = {
            "n": len(empty),
            "predicted_empty": sum(1 for r in empty if r["pred_area"] == 0),
            "with_false_positive": sum(1 for r in empty if r["pred_area"] > 0),
            "mean_false_positive_area": (float(np.mean([r["pred_area"] for r in empty])) if empty else None),
        }
        entry["slice_dice_all"] = describe(r["dice"] for r in present + empty)
    if comparison is not None:
        entry["baseline_slice_dice"] = describe(r["baseline_dice"] for r in present)
        entry["baseline_volume_dice"] = describe(e["baseline_dice_3d"] for e in vols)
        entry["baseline_hd95_mm"] = describe(e["baseline_hd95_mm"] for e in vols)
        comparison["per_label"][str(v)] = paired_comparison(
            [r["dice"] for r in present], [r["baseline_dice"] for r in present]
        )
    return entry


def overall_entry(
    rows: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
    label_entries: Sequence[dict[str, Any]],
    config: EvalConfig,
    comparison: dict[str, Any] | None,
) -> dict[str, Any]:
    """Aggregates over every label; with a baseline, fills ``comparison``'s overall and volume tests."""
    present_all = [r for r in rows if r["gt_present"]]
    label_means = [e["slice_dice"]["mean"] for e in label_entries if e["slice_dice"]["mean"] is not None]
    overall: dict[str, Any] = {
        "slice_dice": describe(r["dice"] for r in present_all),
        "slice_iou": describe(r["iou"] for r in present_all),
        "slice_dice_mean_of_labels": float(np.mean(label_means)) if label_means else None,
        "volume_dice": describe(e["dice_3d"] for e in volumes),
        "hd95_mm": describe(e["hd95_mm"] for e in volumes),
        "objects_scored": len(rows),
        "objects_present": len(present_all),
        **_box_fill_and_steps(present_all, config.prompt.refine),
    }
    if comparison is not None:
        overall["baseline_slice_dice"] = describe(r["baseline_dice"] for r in present_all)
        overall["baseline_volume_dice"] = describe(e["baseline_dice_3d"] for e in volumes)
        comparison["overall"] = paired_comparison(
            [r["dice"] for r in present_all], [r["baseline_dice"] for r in present_all]
        )
        comparison["difference"] = "model - baseline (per object, slices where the label is present)"
        paired_vol = [e for e in volumes if e["dice_3d"] is not None and e["baseline_dice_3d"] is not None]
        comparison["volumes"] = paired_comparison(
            [e["dice_3d"] for e in paired_vol], [e["baseline_dice_3d"] for e in paired_vol]
        )
    return overall


def _box_fill_and_steps(present: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """The box-fill reference of ``present`` rows (``box_fill_slice_dice``, and ``vs_box_fill``: the
    paired model - box-fill comparison) when their prompts have a box; the mean Dice after each step
    (``refine_curve``) when there were corrective clicks."""
    out: dict[str, Any] = {}
    boxed = [r for r in present if math.isfinite(r["box_fill_dice"])]
    if boxed:
        out["box_fill_slice_dice"] = describe(r["box_fill_dice"] for r in boxed)
        out["vs_box_fill"] = paired_comparison(
            [r["dice"] for r in boxed], [r["box_fill_dice"] for r in boxed]
        )
    if rounds and present:
        out["refine_curve"] = [float(np.mean([r["_steps"][i] for r in present])) for i in range(rounds + 1)]
    return out


def box_fill_verdict(overall: dict[str, Any]) -> dict[str, Any] | None:
    """What the model adds over the box-fill reference, in numbers and one sentence (None: no box)."""
    vs = overall.get("vs_box_fill")
    if not vs or vs["mean_diff"] is None:
        return None
    model, fill = overall["slice_dice"]["mean"], overall["box_fill_slice_dice"]["mean"]
    gain = vs["mean_diff"]
    adds = gain >= TIE_TOLERANCE and vs["wins"] > vs["losses"]
    text = (
        f"box-fill reference: the prompt rectangle itself scores slice Dice {fill:.3f}; the model "
        f"{model:.3f} ({gain:+.3f}; better on {vs['wins']}, worse on {vs['losses']} of {vs['n']} objects)"
    )
    text += "" if adds else ": the model does not beat its own prompt box, so it adds nothing here"
    return {
        "model_slice_dice": model,
        "box_fill_slice_dice": fill,
        "gain": gain,
        "model_adds": adds,
        "verdict": text,
    }


def same_as_baseline(
    comparison: dict[str, Any],
    rows: list[dict[str, Any]],
    model: dict[str, Any],
    baseline: dict[str, Any] | None,
) -> dict[str, Any]:
    """Whether the model equals its baseline (every paired difference a tie, or identical predictions),
    with a sentence saying so and, when the adapter's own metadata tells, why."""
    overall = comparison["overall"]
    identical = sum(int(r.get("same_as_baseline", 0)) for r in rows if r["gt_present"])
    n = overall["n"]
    same = n > 0 and (overall["ties"] == n or identical == n)
    out: dict[str, Any] = {"same_as_baseline": same, "identical_predictions": identical, "verdict": None}
    if not same:
        return out
    text = (
        f"the model equals the baseline: all {n} paired objects are ties (|diff| < {overall['tie_tolerance']}), "
        f"{identical} with identical predictions"
    )
    adapter = (model or {}).get("adapter") or {}
    if adapter.get("epoch") == 0:
        text += (
            "; its adapter was saved at epoch 0 of its training, i.e. it is the model that training started "
            "from: that run learned nothing"
        )
    elif (baseline or {}).get("adapter") and (baseline or {}).get("adapter", {}).get(
        "version"
    ) == adapter.get("version"):
        text += "; both carry the same adapter version"
    out["verdict"] = text
    return out


def policy_dict(include_empty: bool) -> dict[str, Any]:
    """The metric and empty-slice policy, in words and flags, for ``summary.json`` and the report."""
    if include_empty:
        empty = (
            "Slices where the label is present are scored with their own prompt. In a case holding the label, "
            "every other slice of the file is also scored, prompted with the prompt of the nearest slice (by k, "
            "lower k on ties) where the label is present; there dice = iou = 1 if the prediction is empty, else 0. "
            "Those are reported apart (empty_slices, slice_dice_all); slice_dice stays over present slices. 3D Dice "
            "and HD95 include their false positives. Slices absent from the file count as empty in prediction and "
            "ground truth."
        )
    else:
        empty = (
            "Only slices where the label is present are scored (a prompt needs an object). Slices of the file "
            "without the label are skipped and counted (slices_skipped_empty). 3D Dice and HD95 stack the scored "
            "slices: false positives on slices without the label are not counted, so they are optimistic; "
            "use --include-empty to count them."
        )
    return {
        "include_empty": bool(include_empty),
        "empty_slices": empty,
        "objects": "each label value present in a slice is one object (all its components), with one prompt",
        "resolution": "source slice (I, J): predicted canvas logits mapped back bilinearly "
        "(SliceGeometry.logits_from_model), object where logit > 0; hard masks from a function "
        "predictor are mapped back with nearest neighbour, like the ground truth",
        "ground_truth": "the file's gts mapped back to the source slice, nearest neighbour "
        "(SliceGeometry.label_from_model)",
        "slice_metrics": "MONAI compute_dice / compute_iou, ignore_empty=False",
        "volume_metrics": "MONAI compute_dice on the predicted slices stacked at slice_index; "
        "compute_hausdorff_distance(percentile=95, spacing=file spacing), symmetric, in mm; "
        "no HD95 when the prediction is empty",
        "aggregates": "mean, median, sample sd (ddof=1), t-based 95% CI of the mean (not clipped)",
        "saved_masks": "--save-masks: one label volume per case with the source geometry; where objects of "
        "two labels overlap, the label with the higher logit wins; slices not scored are 0",
        "comparison": f"paired per object: model - baseline Dice; tie when |diff| < {TIE_TOLERANCE}; "
        "two-sided Wilcoxon signed-rank (zero differences dropped; all zero: p = 1)",
        "box_fill": "with a box prompt, the Dice of the prompt rectangle itself, filled and mapped back like a "
        "hard mask, on the same objects (box_fill_dice): on compact objects a filled box already scores "
        "0.7-0.9, so a box-prompted model that does not beat it adds nothing",
    }
