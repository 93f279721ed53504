"""``sam_2d``: one click (or ROI) on one slice -> that slice's mask, at interactive speed.

Slicer shows its point panel for ``"type": "deepgrow"``, and with ``"dimension": 2`` it sends the points
of the current slice plus ``slice = k`` and keeps only slice ``k`` of the answer. The slice is ``slice``
when given, else the ``k`` of the last foreground point, else the middle of the ROI's ``k`` range.
Points on other slices are ignored (the plugin sends every point when the current slice is 0). The
answer is a label volume of the input's exact geometry, ``1`` inside the mask, nonzero only on slice
``k``. After answering, the slices are encoded in the background: the ``prefetch_slices`` nearest
neighbours first, then the rest of the volume from its centre outwards, within the embedding cache's
budget (:func:`prefetch_order`); a click always stops a background encode it would wait for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from sam_medical.errors import UserInputError
from sam_medical.inference.predictor import VolumePredictor
from sam_medical.inference.volume_slices import centre_out, check_slice_index, neighbours
from sam_medical.volume.io import Volume

from ..served_model import ServedModel
from .base import SamInferTask, parse_int, parse_points, parse_roi, task_description


def prompt_for_slice(
    request: dict[str, Any], shape: tuple[int, int, int], k: int | None
) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]], tuple[int, int, int, int] | None]:
    """``(k, foreground [(i, j)], background [(i, j)], box (i0, i1, j0, j1) or None)`` for one slice.

    ``k`` None: the last foreground point's slice, else the last background point's, else the ROI's middle.

    Raises:
        UserInputError: points or ROI outside the volume, slice out of range, no prompt on the slice.
    """
    fg = parse_points(request.get("foreground"), "foreground", shape)
    bg = parse_points(request.get("background"), "background", shape)
    roi = parse_roi(request.get("roi"), shape)
    if k is None:
        with_k = [p for p in fg if p[2] is not None] or [p for p in bg if p[2] is not None]
        if with_k:
            k = with_k[-1][2]
        elif roi is not None:
            k = (roi[4] + roi[5]) // 2
        else:
            raise UserInputError(
                "no prompt: click a foreground/background point [i, j, k] or place an ROI [i0, i1, j0, j1, k0, k1]"
            )
    k = check_slice_index(k, shape[2])
    fg_k = [(i, j) for i, j, kk in fg if kk is None or kk == k]
    bg_k = [(i, j) for i, j, kk in bg if kk is None or kk == k]
    box = (roi[0], roi[1], roi[2], roi[3]) if roi is not None else None
    if not fg_k and not bg_k and box is None:
        raise UserInputError(
            f"no prompt on slice {k}: none of the points is on it ({len(fg)} foreground, {len(bg)} background "
            "points elsewhere) and there is no ROI"
        )
    return k, fg_k, bg_k, box


def prefetch_order(k: int, count: int, depth: int) -> list[int]:
    """The slices to encode after a click on ``k``: its ``count`` nearest neighbours, then every other
    slice from the centre outwards (nothing when ``count`` is 0: background encoding is off)."""
    if count <= 0:
        return []
    near = neighbours(k, count, depth)
    seen = {k, *near}
    return near + [s for s in centre_out(depth) if s not in seen]


class Sam2D(SamInferTask):
    """Per-slice interactive SAM (see the module docstring)."""

    def __init__(self, served: ServedModel) -> None:
        super().__init__(
            served,
            dimension=2,
            description=task_description(
                served, "LoRA-adaptable; one slice per click: foreground/background points and/or an ROI box"
            ),
            config={},
        )

    def segment(
        self, request: dict[str, Any], predictor: VolumePredictor, image_key: str, volume: Volume
    ) -> tuple[np.ndarray, dict[str, Any], Callable[[], None] | None]:
        t0 = time.perf_counter()
        shape = volume.shape
        slice_param = request.get("slice")
        k = parse_int(slice_param, "slice") if slice_param not in (None, "") else None
        k, fg, bg, box = prompt_for_slice(request, shape, k)
        t1 = time.perf_counter()
        mask, info = predictor.segment_slice(image_key, volume, k, fg, bg, box)
        t2 = time.perf_counter()
        out_kji = np.zeros(shape[::-1], np.uint8)  # slice-major: written without a transposed copy
        out_kji[k] = mask.T
        out = out_kji.transpose(2, 1, 0)  # (I, J, K) view
        timings = dict(info["timings"])
        timings.pop("total", None)
        timings["parse"] = t1 - t0
        timings["map_back"] = timings.get("map_back", 0.0) + time.perf_counter() - t2
        extra = {
            "slice": k,
            "embedding": info["embedding"],
            "iou": round(info["iou"], 4),
            "strategy": info["strategy"],
            "candidates": info["candidates"],
            "prompt": {
                "foreground": [list(p) for p in fg],
                "background": [list(p) for p in bg],
                "box": info["box_ij"],
            },
            "mask_voxels": int(mask.sum()),
            "timings": timings,
        }
        count = self.served.config.prefetch_slices

        def prefetch() -> None:
            if count:
                predictor.prefetch(image_key, volume, prefetch_order(k, count, shape[2]))

        return out, extra, prefetch
