"""``sam_3d``: a prompt on one slice -> the object through the neighbouring slices (propagation).

``"dimension": 3``: Slicer sends every point (all slices) and no ``slice``. The prompted slice is
``slice`` when given, else the ``k`` of the last foreground point, else the middle of the ROI's ``k``
range; the points on that slice and the ROI's ``i``/``j`` extent prompt it, then
:func:`sam_medical.inference.propagation.propagate` walks up and down. The answer is the whole label volume.

Model config (Slicer's options table): ``max_slices`` (per direction, 0 = no limit), ``min_iou``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sam_medical.errors import UserInputError
from sam_medical.inference.predictor import VolumePredictor
from sam_medical.inference.propagation import PropagationOptions, propagate
from sam_medical.volume.io import Volume

from ..served_model import ServedModel
from .base import SamInferTask, parse_int, task_description
from .sam_2d import prompt_for_slice


class Sam3D(SamInferTask):
    """One prompt, propagated through the volume (see the module docstring)."""

    def __init__(self, served: ServedModel) -> None:
        super().__init__(
            served,
            dimension=3,
            description=task_description(
                served, "in 3D: a prompt on one slice, propagated slice by slice up and down"
            ),
            config={"max_slices": 0, "min_iou": 0.0},
        )

    def segment(
        self, request: dict[str, Any], predictor: VolumePredictor, image_key: str, volume: Volume
    ) -> tuple[np.ndarray, dict[str, Any], Callable[[], None] | None]:
        shape = volume.shape
        slice_param = request.get("slice")
        k = parse_int(slice_param, "slice") if slice_param not in (None, "") else None
        k, fg, bg, box = prompt_for_slice(request, shape, k)
        max_slices = parse_int(request.get("max_slices", 0) or 0, "max_slices")
        if max_slices < 0:
            raise UserInputError(f"max_slices must be >= 0, got {max_slices}")
        try:
            min_iou = float(request.get("min_iou", 0.0) or 0.0)
        except (TypeError, ValueError):
            raise UserInputError(f"min_iou must be a number, got {request.get('min_iou')!r}") from None
        if not -1.0 <= min_iou <= 1.0:  # also refuses NaN
            raise UserInputError(f"min_iou must be a number in [-1, 1], got {request.get('min_iou')!r}")
        options = PropagationOptions(max_slices=max_slices or None, min_iou=min_iou)
        out, info = propagate(predictor, image_key, volume, k, fg, bg, box, options=options)
        extra = {
            "slice": k,
            "slices": info["slices"],
            "stopped": info["stopped"],
            "embedding": next((e["embedding"] for e in info["per_slice"] if e["k"] == k), None),
            "embeddings": info["embeddings"],
            "strategy": next((e["strategy"] for e in info["per_slice"] if e["k"] == k), None),
            "prompt": {"foreground": [list(p) for p in fg], "background": [list(p) for p in bg], "box": box},
            "mask_voxels": int(np.count_nonzero(out)),
            "timings": {"propagation": info["seconds"]},
        }
        return out, extra, None
