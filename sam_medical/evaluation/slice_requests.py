"""What the model under test is asked and what it answers: one slice, the prompts of its objects, masks.

Coordinates: prompts are on the 256x256 canvas (:mod:`sam_medical.canvas.geometry`), ``x`` = column
``j``, ``y`` = row ``i``, pixel indices; boxes are ``[x0, y0, x1, y1]`` inclusive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sam_medical.canvas.geometry import MODEL_SLICE_SIZE


@dataclass(frozen=True)
class ObjectPrompt:
    """One object's prompt on the canvas: ``box (4,) [x0, y0, x1, y1]`` and/or ``points (k, 2) [x, y]``
    with ``point_labels (k,)`` (1 = foreground)."""

    box: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None

    def describe(self) -> str:
        """Compact text for the CSV, e.g. ``box=10,20,30,40;points=15,25 40,50;labels=1,0`` (the labels
        only when a click is a background click)."""
        parts = []
        if self.box is not None:
            parts.append("box=" + ",".join(f"{v:g}" for v in np.asarray(self.box).tolist()))
        if self.points is not None:
            parts.append("points=" + " ".join(f"{x:g},{y:g}" for x, y in np.asarray(self.points).tolist()))
            labels = np.asarray(self.point_labels).tolist() if self.point_labels is not None else []
            if any(v != 1 for v in labels):
                parts.append("labels=" + ",".join(str(int(v)) for v in labels))
        return ";".join(parts)

    def with_click(self, x: int, y: int, label: int) -> ObjectPrompt:
        """This prompt with one more click ``(x, y)`` of ``label`` (1 foreground, 0 background)."""
        pts = np.zeros((0, 2), np.float32) if self.points is None else np.asarray(self.points, np.float32)
        lab = np.zeros(0, np.int64) if self.point_labels is None else np.asarray(self.point_labels, np.int64)
        return ObjectPrompt(
            self.box,
            np.concatenate([pts, np.array([[x, y]], np.float32)]),
            np.concatenate([lab, np.array([label], np.int64)]),
        )

    def box_mask(self) -> np.ndarray | None:
        """The prompt rectangle filled on the canvas, ``(256, 256)`` bool (inclusive pixel indices), or None."""
        if self.box is None:
            return None
        x0, y0, x1, y1 = (int(round(float(v))) for v in np.asarray(self.box))
        mask = np.zeros((MODEL_SLICE_SIZE, MODEL_SLICE_SIZE), bool)
        mask[max(0, y0) : y1 + 1, max(0, x0) : x1 + 1] = True
        return mask


@dataclass(frozen=True)
class ObjectRef:
    """Which object a prompt is for: file ``case``, its ``row`` in the file, source ``slice_index`` ``k``,
    ``label`` value; ``gt_present`` false for an empty slice scored under ``include_empty``, whose
    prompt comes from slice ``prompt_slice``."""

    case: str
    row: int
    slice_index: int
    label: int
    gt_present: bool = True
    prompt_slice: int = -1


@dataclass
class SliceRequest:
    """One slice and the prompts of its objects. ``image``: ``(256, 256, 3)`` uint8 canvas."""

    image: np.ndarray
    prompts: list[ObjectPrompt]
    objects: list[ObjectRef]


@dataclass
class SlicePrediction:
    """``logits (P, 256, 256)`` float32 canvas logits (object where > 0) and ``pred_iou (P,)`` (NaN when
    the predictor has no estimate), in the order of the request's prompts. ``binary``: the logits only
    encode a hard mask (+1 / -1); it is then mapped back to the source slice with nearest neighbour,
    like the ground truth, instead of bilinearly."""

    logits: np.ndarray
    pred_iou: np.ndarray
    binary: bool = False
