"""The slices drawn in the report: per label the best, median and worst (and with a baseline the
largest gain and loss), predicted again (deterministically) to draw image, masks and prompt."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam_medical.canvas.slice_file import load_npz
from sam_medical.evaluation.cases import CaseInfo, case_requests, dataset_label_names, valid_canvas
from sam_medical.evaluation.config import EvalConfig
from sam_medical.evaluation.models import ModelUnderTest
from sam_medical.evaluation.scoring import answer_requests
from sam_medical.evaluation.slice_requests import ObjectPrompt
from sam_medical.volume.label_names import label_display

#: ``(image (256, 256), pred, baseline pred | None, final prompt, gt)`` of one drawn object, canvas.
_Drawn = tuple[np.ndarray, np.ndarray, np.ndarray | None, ObjectPrompt, np.ndarray]


@dataclass
class Example:
    """One slice drawn in the report: canvas image, masks and prompt, cropped to the valid region."""

    title: str
    kind: str
    case: str
    slice_index: int
    label: int
    dice: float
    image: np.ndarray  # (h, w) uint8
    gt: np.ndarray  # (h, w) bool
    pred: np.ndarray  # (h, w) bool
    baseline: np.ndarray | None
    prompt: ObjectPrompt
    aspect: float = 1.0
    baseline_dice: float | None = None
    label_name: str = ""
    box_fill_dice: float | None = None


def pick_examples(rows: list[dict[str, Any]], labels: Sequence[int], compare: bool) -> list[tuple[str, dict]]:
    """Per label: the best, median and worst slice by Dice (present slices); with a baseline, also the
    largest gain and the largest loss. Ties broken by case, then slice index."""
    picks: list[tuple[str, dict]] = []
    for v in labels:
        present = sorted(
            (r for r in rows if r["label"] == v and r["gt_present"]),
            key=lambda r: (-r["dice"], r["case"], r["slice_index"]),
        )
        if not present:
            continue
        chosen = [("best", present[0]), ("median", present[len(present) // 2]), ("worst", present[-1])]
        if compare:
            by_diff = sorted(present, key=lambda r: (-r["dice_diff"], r["case"], r["slice_index"]))
            chosen += [("largest gain", by_diff[0]), ("largest loss", by_diff[-1])]
        seen = set()
        for kind, r in chosen:
            key = (r["case"], r["slice_index"], kind)
            if key not in seen:
                seen.add(key)
                picks.append((kind, r))
    return picks


def collect_examples(
    rows: list[dict[str, Any]],
    cases: Sequence[CaseInfo],
    labels: Sequence[int],
    model: ModelUnderTest,
    base: ModelUnderTest | None,
    config: EvalConfig,
) -> list[Example]:
    """Predict the picked slices again (deterministic) to draw them; one file read per case."""
    picks = pick_examples(rows, labels, base is not None)
    by_case: dict[str, list[tuple[str, dict]]] = {}
    for kind, r in picks:
        by_case.setdefault(r["case"], []).append((kind, r))
    case_of = {c.name: c for c in cases}
    names = dataset_label_names(cases)
    drawn: dict[tuple[str, int, int], _Drawn] = {}
    for name, items in by_case.items():
        only = {(r["_row"], r["label"]) for _, r in items}
        drawn.update(_draw_case(case_of[name], labels, only, model, base, config))
    out = []
    for kind, r in picks:
        key = (r["case"], r["_row"], r["label"])
        if key in drawn:
            out.append(_example(kind, r, case_of[r["case"]], drawn[key], names))
    return out


def _draw_case(
    case: CaseInfo,
    labels: Sequence[int],
    only: set[tuple[int, int]],
    model: ModelUnderTest,
    base: ModelUnderTest | None,
    config: EvalConfig,
) -> dict[tuple[str, int, int], _Drawn]:
    """The objects ``only`` (``(row, label)``) of one case, predicted again, keyed ``(case, row, label)``."""
    arrays = load_npz(case.path, keys=("imgs", "gts"))
    requests, _ = case_requests(case, arrays["imgs"], arrays["gts"], labels, config.prompt, False, only)
    valid = valid_canvas(case.geometry)
    rounds = config.prompt.refine
    drawn: dict[tuple[str, int, int], _Drawn] = {}
    for req in requests:
        gt = np.stack([arrays["gts"][o.row] == o.label for o in req.objects])
        ans = answer_requests(model, [req], [gt], valid, rounds)[0]
        bans = answer_requests(base, [req], [gt], valid, rounds)[0] if base is not None else None
        for p, obj in enumerate(req.objects):
            drawn[(case.name, obj.row, obj.label)] = (
                req.image[:, :, 0],
                ans.final.logits[p] > 0,
                bans.final.logits[p] > 0 if bans is not None else None,
                ans.prompts[p],
                gt[p],
            )
    return drawn


def _example(kind: str, r: dict[str, Any], case: CaseInfo, drawn: _Drawn, names: dict[int, str]) -> Example:
    """One :class:`Example`, cropped to the canvas region holding the image, with its pixel aspect."""
    image, pred, bpred, prompt, gt = drawn
    hh, ww = case.geometry.resized_shape
    sp_i, sp_j = case.spacing[0] * case.geometry.height / hh, case.spacing[1] * case.geometry.width / ww
    return Example(
        title=f"{label_display(r['label'], names)} {kind}: {r['case']} k={r['slice_index']}",
        kind=kind,
        case=r["case"],
        slice_index=r["slice_index"],
        label=r["label"],
        dice=r["dice"],
        image=image[:hh, :ww],
        gt=gt[:hh, :ww],
        pred=pred[:hh, :ww],
        baseline=None if bpred is None else bpred[:hh, :ww],
        prompt=prompt,
        aspect=float(sp_i / sp_j),
        baseline_dice=r.get("baseline_dice"),
        label_name=names.get(r["label"], ""),
        box_fill_dice=r["box_fill_dice"] if math.isfinite(r["box_fill_dice"]) else None,
    )
