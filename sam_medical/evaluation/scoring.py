"""Scoring one slice's answer, and asking a model with corrective clicks.

* **Resolution.** Metrics are computed at the **source slice resolution** ``(I, J)``: predicted canvas
  logits are mapped back with :meth:`SliceGeometry.logits_from_model` (bilinear, threshold at 0, what the
  served model returns to Slicer); hard masks of a function model, like the ground truth, with
  :meth:`SliceGeometry.label_from_model` (nearest).
* **Per object:** Dice and IoU (:func:`sam_medical.metrics.dice_iou`, both empty = 1), areas in source
  pixels, and SAM's own IoU estimate.
* **Per volume:** 3D Dice of the slices stacked at their ``k`` and HD95 in mm
  (:func:`sam_medical.metrics.hd95_mm`, the file's spacing); an empty prediction has no HD95.
* **Corrective clicks** (``PromptSettings.refine = N``): each object gets N more clicks after its first
  prompt, each at the centre of the largest error region of the current prediction on the canvas
  (:func:`sam_medical.prompts.corrective_click`), decoded with the first prompt and every click so far
  (no mask input), on one session per slice (the image prepared once). An exact prediction gets no more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam_medical.canvas.geometry import MODEL_SLICE_SIZE, SliceGeometry
from sam_medical.evaluation.models import ModelUnderTest, SliceSession, open_session
from sam_medical.evaluation.slice_requests import ObjectPrompt, SlicePrediction, SliceRequest
from sam_medical.metrics import dice_iou, hd95_mm
from sam_medical.prompts import corrective_click


@dataclass
class Scored:
    """Per-object results of one model on one slice, and the slice's source-resolution masks."""

    dice: np.ndarray
    iou: np.ndarray
    pred_area: np.ndarray
    pred_iou: np.ndarray
    masks: np.ndarray  # (P, H, W) bool
    label_map: np.ndarray | None  # (H, W) uint8: overlaps go to the highest logit


def score_slice(
    pred: SlicePrediction, gt_masks: np.ndarray, labels: Sequence[int], geom: SliceGeometry, want_map: bool
) -> Scored:
    """Map the prediction back to the source slice, threshold at 0, and score it against ``gt_masks``."""
    n = gt_masks.shape[0]
    if pred.logits.shape != (n, MODEL_SLICE_SIZE, MODEL_SLICE_SIZE):
        raise ValueError(f"prediction has shape {pred.logits.shape}, expected ({n}, 256, 256)")
    if pred.binary:
        src = np.stack(
            [geom.label_from_model(pred.logits[p] > 0).astype(np.float32) * 2 - 1 for p in range(n)]
        )
    else:
        src = np.stack([geom.logits_from_model(pred.logits[p]) for p in range(n)])
    masks = src > 0
    dice, iou = dice_iou(masks, gt_masks)
    label_map = None
    if want_map:
        best = src.argmax(axis=0)
        hit = np.take_along_axis(src, best[None], 0)[0] > 0
        label_map = np.where(hit, np.asarray(labels, np.uint8)[best], 0).astype(np.uint8)
    return Scored(
        dice, iou, masks.reshape(n, -1).sum(1), np.asarray(pred.pred_iou, np.float64), masks, label_map
    )


@dataclass
class Answer:
    """A model's answer to one slice request: the ``final`` prediction, the prediction after each step
    (``steps[0]``: the first prompt; ``steps[i]``: after corrective click ``i``), the final ``prompts``
    (with their clicks) and the number of corrective ``clicks`` per object ``(P,)``."""

    final: SlicePrediction
    steps: list[SlicePrediction]
    prompts: list[ObjectPrompt]
    clicks: np.ndarray


def refine(
    session: SliceSession,
    request: SliceRequest,
    first: SlicePrediction,
    gt: np.ndarray,
    valid: np.ndarray,
    rounds: int,
) -> Answer:
    """``rounds`` corrective clicks per object after ``first`` (see the module docstring).

    Args:
        session: the slice's session (its image prepared once).
        request: the slice and its objects' first prompts.
        first: the prediction of the first prompts.
        gt: ``(P, 256, 256)`` bool, each object's ground truth on the canvas.
        valid: ``(256, 256)`` bool, the canvas region holding the image (clicks go only there).
        rounds: corrective clicks per object; an object whose prediction is exact gets no more.
    """
    prompts = list(request.prompts)
    clicks = np.zeros(len(prompts), np.int64)
    steps = [first]
    current = first
    active = list(range(len(prompts)))
    for _ in range(rounds):
        clicked = []
        for p in active:
            click = corrective_click(current.logits[p] > 0, gt[p], valid)
            if click is not None:
                prompts[p] = prompts[p].with_click(*click)
                clicks[p] += 1
                clicked.append(p)
        active = clicked
        if active:
            out = session.predict([prompts[p] for p in active], [request.objects[p] for p in active])
            logits, ious = current.logits.copy(), current.pred_iou.copy()
            logits[active], ious[active] = out.logits, out.pred_iou
            current = SlicePrediction(logits, ious, out.binary)
        steps.append(current)
    return Answer(current, steps, prompts, clicks)


def answer_requests(
    model: ModelUnderTest,
    requests: Sequence[SliceRequest],
    gts: Sequence[np.ndarray],
    valid: np.ndarray,
    rounds: int,
) -> list[Answer]:
    """The model's answers to ``requests``: one batched call without corrective clicks, else one
    session per slice (:func:`refine`). ``gts``: per request, ``(P, 256, 256)`` bool canvas ground truth."""
    if rounds == 0:
        preds = model.predict(requests)
        if len(preds) != len(requests):
            raise ValueError("the model must answer every request")
        return [
            Answer(pred, [pred], list(req.prompts), np.zeros(len(req.prompts), np.int64))
            for req, pred in zip(requests, preds, strict=True)
        ]
    answers = []
    for req, gt in zip(requests, gts, strict=True):
        session = open_session(model, req.image)
        answers.append(refine(session, req, session.predict(req.prompts, req.objects), gt, valid, rounds))
    return answers


def box_fill_dice(prompts: Sequence[ObjectPrompt], gt_masks: np.ndarray, geom: SliceGeometry) -> np.ndarray:
    """The Dice of each prompt's rectangle, filled, against ``gt_masks (P, H, W)`` at the source resolution
    (mapped back with nearest neighbour, like a hard mask); NaN for a prompt without a box."""
    out = np.full(len(prompts), np.nan)
    boxed = [i for i, p in enumerate(prompts) if p.box is not None]
    if boxed:
        fills = np.stack([geom.label_from_model(prompts[i].box_mask()) > 0 for i in boxed])
        out[boxed] = dice_iou(fills, gt_masks[boxed])[0]
    return out


def volume_scores(
    pred: dict[int, np.ndarray],
    gt: dict[int, np.ndarray],
    shape_hw: tuple[int, int],
    spacing: Sequence[float],
) -> dict[str, Any]:
    """3D Dice and HD95 (mm) of slices stacked at their ``k``: ``pred``/``gt`` map ``k`` -> ``(H, W)`` bool.

    The arrays are cropped to the bounding box of prediction and ground truth together, which changes
    neither Dice nor the surface distances (everything outside is empty in both).
    """
    ks = sorted(k for k in set(pred) | set(gt) if (k in pred and pred[k].any()) or (k in gt and gt[k].any()))
    pred_vox = int(sum(int(m.sum()) for m in pred.values()))
    gt_vox = int(sum(int(m.sum()) for m in gt.values()))
    out: dict[str, Any] = {"gt_voxels": gt_vox, "pred_voxels": pred_vox, "dice_3d": None, "hd95_mm": None}
    if not ks:
        return out
    k0, k1 = ks[0], ks[-1]
    empty = np.zeros(shape_hw, bool)
    union = np.zeros(shape_hw, bool)
    for k in ks:
        union |= pred.get(k, empty) | gt.get(k, empty)
    rows, cols = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
    i0, i1, j0, j1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    shape = (i1 - i0, j1 - j0, k1 - k0 + 1)
    p = np.zeros(shape, np.float64)
    g = np.zeros(shape, np.float64)
    for k in ks:
        if k in pred:
            p[:, :, k - k0] = pred[k][i0:i1, j0:j1]
        if k in gt:
            g[:, :, k - k0] = gt[k][i0:i1, j0:j1]
    out["dice_3d"] = float(dice_iou(p[None], g[None])[0][0])
    if pred_vox and gt_vox:
        out["hd95_mm"] = hd95_mm(p, g, spacing)
    return out
