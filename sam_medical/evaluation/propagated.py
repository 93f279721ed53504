"""``--propagate``: score ``sam_3d``, one prompt per object propagated through the slices of the file.

What is scored, per case and label (an *object*):

1. the prompted slice is the file's slice where the label's ground truth is largest (lower ``k`` on
   ties); its prompt is the 2D evaluation's prompt of that slice (same kind, seed and jitter,
   :func:`~sam_medical.evaluation.cases.make_prompt`), mapped from the canvas to source voxels
   ``(i, j)`` (:meth:`SliceGeometry.point_from_model`), as a click in Slicer arrives;
2. :func:`sam_medical.inference.propagation.propagate` walks up and down from it with the served
   :class:`~sam_medical.inference.predictor.VolumePredictor` (same engine, multimask rule and embedding
   cache as the 2D scoring) and the app's ``sam_3d`` defaults (no slice limit, ``min_iou`` 0);
3. the 3D Dice and HD95 of the walk's mask against the label's ground truth
   (:func:`~sam_medical.evaluation.scoring.volume_scores`).

**Which slices:** the walk and the metrics see only the slices present in the ``.npz`` file, in ``k``
order (a file from ``preprocess`` holds the labelled slices; ``--dataset --include-empty`` keeps every
slice). Slices absent from the file are neither walked nor scored: a leak onto them is not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sam_medical.canvas.geometry import SliceGeometry
from sam_medical.evaluation.cases import CaseInfo, make_prompt, object_seed
from sam_medical.evaluation.config import PromptSettings
from sam_medical.evaluation.scoring import volume_scores
from sam_medical.evaluation.served_sam import ServedSam
from sam_medical.evaluation.summary import describe
from sam_medical.inference.predictor import VolumePredictor
from sam_medical.inference.propagation import PropagationOptions, propagate
from sam_medical.inference.volume_slices import PreparedVolume
from sam_medical.volume.io import Volume

#: What the report and ``summary.json`` say about the slices the 3D Dice covers.
SLICES_SCORED = (
    "3D Dice and HD95 over the slices present in the .npz file (walked in k order); slices absent from the "
    "file are neither walked nor scored"
)


def app_options() -> PropagationOptions:
    """The app's ``sam_3d`` defaults: its config ``max_slices 0`` (no limit) and ``min_iou 0.0``."""
    return PropagationOptions(max_slices=None, min_iou=0.0)


@dataclass
class FileCanvases(PreparedVolume):
    """A slice file as a prepared volume: slice ``k`` of the walk is the file's ``k``-th slice in ``k``
    order, its canvas the file's ``imgs`` row (already windowed and resized; ``window`` is unused)."""

    canvases: np.ndarray | None = None  # (N, 256, 256, 3) uint8, in walk order

    def canvas(self, k: int) -> np.ndarray:
        return self.canvases[int(k)]


class FilePredictor(VolumePredictor):
    """The served predictor on one file's canvases, sharing :class:`ServedSam`'s engine and cache."""

    def __init__(self, served: ServedSam, case: str, rows: np.ndarray, canvases: FileCanvases) -> None:
        super().__init__(
            served.sam,
            "evaluation",
            served.cache,
            multimask=served.multimask,
            click_strategy=served.click_strategy,
            decode_threads=None,
            engine=served.engine,
        )
        self.case, self.rows, self.canvases = case, rows, canvases

    def prepare(self, image_key: str, volume: Volume) -> PreparedVolume:
        return self.canvases

    def cache_key(self, image_key: str, k: int) -> Any:
        """The 2D scoring's key of the same slice: each slice is encoded once for both."""
        return ServedSam.embedding_key(self.case, int(self.rows[int(k)]))


def prompt_slice(gts: np.ndarray, label: int, order: np.ndarray) -> int:
    """Position in ``order`` of the row whose canvas ground truth holds most of ``label`` (first on ties)."""
    areas = (gts[order] == label).reshape(len(order), -1).sum(axis=1)
    return int(np.argmax(areas))


def source_prompt(prompt: Any, geom: SliceGeometry) -> tuple[list, list, list | None]:
    """A canvas prompt as ``sam_3d`` takes it: foreground and background clicks ``[(i, j)]`` and the box
    ``(i0, i1, j0, j1)`` in source voxels."""
    fg: list = []
    bg: list = []
    if prompt.points is not None:
        for (x, y), lab in zip(np.asarray(prompt.points), np.asarray(prompt.point_labels), strict=True):
            (fg if int(lab) == 1 else bg).append(geom.point_from_model(float(x), float(y)))
    box = None
    if prompt.box is not None:
        x0, y0, x1, y1 = (float(v) for v in prompt.box)
        (i0, j0), (i1, j1) = geom.point_from_model(x0, y0), geom.point_from_model(x1, y1)
        box = [round(i0), round(i1), round(j0), round(j1)]
    return fg, bg, box


def propagate_case(
    served: ServedSam,
    case: CaseInfo,
    imgs: np.ndarray,
    gts: np.ndarray,
    labels: Sequence[int],
    settings: PromptSettings,
    keep_masks: bool = False,
) -> list[dict[str, Any]]:
    """One entry per label of ``labels`` present in ``case``: the walk and its 3D scores; with
    ``keep_masks``, also ``_mask``: the walk's ``(I, J, N)`` bool mask over the file's slices in ``k``
    order (not written to the outputs)."""
    geom = case.geometry
    order = np.argsort(case.slice_index, kind="stable")
    canvases = FileCanvases(case.name, None, None, geom, canvases=imgs[order])  # type: ignore[arg-type]
    predictor = FilePredictor(served, case.name, order, canvases)
    stack = np.broadcast_to(np.zeros((), np.uint8), (geom.height, geom.width, len(order)))
    volume = Volume(stack, case.spacing, case.origin, case.direction)
    out = []
    for v in labels:
        if v not in case.present:
            continue
        pos = prompt_slice(gts, v, order)
        row, k0 = int(order[pos]), int(case.slice_index[order[pos]])
        prompt = make_prompt(gts[row] == v, settings, object_seed(settings.seed, case.name, k0, v))
        fg, bg, box = source_prompt(prompt, geom)
        mask, info = propagate(
            predictor, case.name, volume, pos, fg or None, bg or None, box, options=app_options()
        )
        ks = case.slice_index[order]
        pred = {int(ks[p]): mask[:, :, p] > 0 for p in range(len(order))}
        truth = {int(ks[p]): geom.label_from_model(gts[order[p]]) == v for p in range(len(order))}
        entry = {"case": case.name, "label": int(v), "prompt_slice": k0, "prompt": prompt.describe()}
        entry.update(volume_scores(pred, truth, (geom.height, geom.width), case.spacing))
        entry["slices_walked"] = [int(ks[p]) for p in info["slices"]]
        entry["stopped"] = info["stopped"]
        if keep_masks:
            entry["_mask"] = mask > 0
        out.append(entry)
    return out


def propagation_summary(entries: list[dict[str, Any]], labels: Sequence[int]) -> dict[str, Any]:
    """``summary.json``'s ``propagation``: the 3D Dice per object, per label and over all objects."""
    return {
        "task": "sam_3d: one prompt per object on its largest slice, propagated up and down "
        "(sam_medical.inference.propagation.propagate with the served predictor)",
        "slices_scored": SLICES_SCORED,
        "options": asdict(app_options()),
        "volume_dice": describe(e["dice_3d"] for e in entries),
        "per_label": {str(v): describe(e["dice_3d"] for e in entries if e["label"] == v) for v in labels},
        "objects": entries,
    }
