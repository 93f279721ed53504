"""A volume's slices as the model sees them, and voxel prompts checked and mapped onto the canvas.

* :class:`PreparedVolume`: a volume ``(I, J, K)`` (stored IJK order) with its intensity window resolved
  once; slice ``k`` (``volume[:, :, k]``, height ``I``, width ``J``) becomes a ``256 x 256 x 3`` uint8
  canvas exactly as training's preprocessing makes it.
* Prompts arrive in voxel indices: clicks ``(i, j)``, an ROI ``(i0, i1, j0, j1)``. They are checked
  (:class:`UserInputError` with a message for the user) and mapped to a
  :class:`~sam_medical.inference.decoding.CanvasPrompt`: click ``(i, j)`` -> canvas ``(x, y)`` =
  ``SliceGeometry.point_to_model(i, j)``, ROI -> canvas box ``(x0, y0, x1, y1)``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sam_medical.canvas.geometry import SliceGeometry
from sam_medical.errors import UserInputError
from sam_medical.inference.decoding import CanvasPrompt
from sam_medical.volume.intensity import IntensityWindow, resolve_window
from sam_medical.volume.io import Volume

# --- prepared volumes ------------------------------------------------------------------------------


@dataclass
class PreparedVolume:
    """A volume with its intensity window resolved once; makes canvases on demand.

    ``volume.array`` is ``(I, J, K)``; :meth:`canvas` returns slice ``k`` as a ``(256, 256, 3)`` uint8
    canvas, exactly as :func:`sam_medical.canvas.preprocess.volume_to_slices` makes training slices.
    """

    image_key: str
    volume: Volume
    window: IntensityWindow
    geometry: SliceGeometry

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.volume.shape

    def canvas(self, k: int) -> np.ndarray:
        """Slice ``k`` -> ``(256, 256, 3)`` uint8 canvas (windowed, resized, zero-padded)."""
        kji = self.volume.array.transpose(2, 1, 0)  # contiguous (K, J, I) view
        return self.geometry.image_to_model(self.window.apply(kji[int(k)].T))


class PreparedVolumes:
    """Thread-safe LRU of :class:`PreparedVolume` by image key (the last ``keep``): the window of a
    volume is resolved once (:func:`~sam_medical.volume.intensity.resolve_window`: ``modality`` and
    ``window_name`` as :func:`~sam_medical.volume.intensity.window_options` gives them)."""

    def __init__(self, modality: str, window_name: str | None, keep: int = 16) -> None:
        self.modality, self.window_name, self.keep = modality, window_name, int(keep)
        self._data: OrderedDict[str, PreparedVolume] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image_key: str, volume: Volume) -> PreparedVolume:
        """``volume`` prepared (the remembered one when it is the same object under ``image_key``)."""
        with self._lock:
            prep = self._data.get(image_key)
            if prep is not None and prep.volume is volume:
                self._data.move_to_end(image_key)
                return prep
        i_size, j_size, _ = volume.shape
        window = resolve_window(volume.array, self.modality, self.window_name)
        prep = PreparedVolume(image_key, volume, window, SliceGeometry(i_size, j_size))
        with self._lock:
            self._data[image_key] = prep
            while len(self._data) > self.keep:
                self._data.popitem(last=False)
        return prep


# --- prompt checks ---------------------------------------------------------------------------------


def as_points(points: Iterable[Sequence[float]] | None, what: str) -> np.ndarray:
    """``[(i, j), ...]`` -> ``(N, 2)`` float64 (extra coordinates, e.g. ``k``, are refused)."""
    if points is None:
        return np.zeros((0, 2), np.float64)
    try:
        arr = np.asarray([[float(v) for v in p] for p in points], dtype=np.float64)
    except (TypeError, ValueError):
        raise UserInputError(f"{what} points must be lists of numbers [i, j], got {points!r}") from None
    if arr.size == 0:
        return np.zeros((0, 2), np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise UserInputError(f"{what} points must be [i, j] pairs, got {points!r}")
    if not np.isfinite(arr).all():
        raise UserInputError(f"{what} points must be finite numbers, got {points!r}")
    return arr


def check_slice_index(k: Any, depth: int) -> int:
    """``k`` as an int in ``0..depth-1``, else :class:`UserInputError`."""
    try:
        kk = int(k)
        if kk != float(k):
            raise ValueError
    except (TypeError, ValueError):
        raise UserInputError(f"slice index must be an integer, got {k!r}") from None
    if not 0 <= kk < depth:
        raise UserInputError(f"slice {kk} is outside the volume: it has {depth} slices (0..{depth - 1})")
    return kk


def check_points_inside(points: np.ndarray, shape_ij: tuple[int, int], what: str) -> None:
    """Refuse points outside ``0..I-1 x 0..J-1`` with a message naming the first offender."""
    h, w = shape_ij
    bad = (points[:, 0] < 0) | (points[:, 0] > h - 1) | (points[:, 1] < 0) | (points[:, 1] > w - 1)
    if bad.any():
        i, j = points[np.flatnonzero(bad)[0]]
        raise UserInputError(
            f"{what} point [i={i:g}, j={j:g}] is outside the slice: i must be in 0..{h - 1} and j in 0..{w - 1}"
        )


def clip_box(box_ij: Sequence[float], shape_ij: tuple[int, int]) -> tuple[int, int, int, int]:
    """ROI ``(i0, i1, j0, j1)`` in any order -> ordered, rounded and clipped to the slice.

    Raises:
        UserInputError: malformed, or entirely outside the slice.
    """
    try:
        vals = [float(v) for v in box_ij]
    except (TypeError, ValueError):
        raise UserInputError(f"box must be 4 numbers [i0, i1, j0, j1], got {box_ij!r}") from None
    if len(vals) != 4 or not np.isfinite(vals).all():
        raise UserInputError(f"box must be 4 finite numbers [i0, i1, j0, j1], got {box_ij!r}")
    h, w = shape_ij
    i0, i1 = sorted(vals[0:2])
    j0, j1 = sorted(vals[2:4])
    if i1 < 0 or i0 > h - 1 or j1 < 0 or j0 > w - 1:
        raise UserInputError(
            f"box i {i0:g}..{i1:g}, j {j0:g}..{j1:g} is entirely outside the slice (i 0..{h - 1}, j 0..{w - 1})"
        )
    ci0, ci1 = int(round(max(0.0, i0))), int(round(min(h - 1.0, i1)))
    cj0, cj1 = int(round(max(0.0, j0))), int(round(min(w - 1.0, j1)))
    return ci0, ci1, cj0, cj1


def check_prompts(
    shape: tuple[int, int, int],
    k: Any,
    fg_points_ij: Iterable[Sequence[float]] | None,
    bg_points_ij: Iterable[Sequence[float]] | None,
    box_ij: Sequence[float] | None,
    mask_input: torch.Tensor | None = None,
    low_size: int = 0,
) -> tuple[int, np.ndarray, np.ndarray, tuple[int, int, int, int] | None]:
    """Prompts on slice ``k`` of a volume of ``shape`` ``(I, J, K)`` -> ``(k, fg (N, 2), bg (N, 2), box)``:
    points ``(i, j)`` checked inside the slice, the box ``(i0, i1, j0, j1)`` clipped (None when absent);
    ``mask_input``, when given, must be ``(1, 1, low_size, low_size)`` logits.

    Raises:
        UserInputError: slice out of range, a point outside the slice, a box entirely outside, no prompt.
        ValueError: a ``mask_input`` of another shape.
    """
    if mask_input is not None and tuple(mask_input.shape) != (1, 1, low_size, low_size):
        raise ValueError(f"mask_input must be (1, 1, {low_size}, {low_size}), got {tuple(mask_input.shape)}")
    i_size, j_size, k_size = shape
    k = check_slice_index(k, k_size)
    fg = as_points(fg_points_ij, "foreground")
    bg = as_points(bg_points_ij, "background")
    check_points_inside(fg, (i_size, j_size), "foreground")
    check_points_inside(bg, (i_size, j_size), "background")
    box = clip_box(box_ij, (i_size, j_size)) if box_ij is not None and len(box_ij) else None
    if not len(fg) and not len(bg) and box is None:
        raise UserInputError(
            f"no prompt for slice {k}: give at least one foreground/background point [i, j, {k}] or an ROI"
        )
    return k, fg, bg, box


def canvas_prompt(
    geom: SliceGeometry,
    fg: np.ndarray,
    bg: np.ndarray,
    box: tuple[int, int, int, int] | None,
    mask_input: torch.Tensor | None,
) -> CanvasPrompt:
    """Voxel prompts on one slice -> a :class:`CanvasPrompt`: clicks ``fg``, ``bg`` ``(N, 2)`` ``(i, j)``
    become canvas ``(x, y)`` with labels 1 / 0 (foreground first), the box ``(i0, i1, j0, j1)`` becomes
    canvas ``(x0, y0, x1, y1)`` (:class:`SliceGeometry`)."""
    points = labels = None
    if len(fg) or len(bg):
        points = np.asarray([geom.point_to_model(i, j) for i, j in np.concatenate([fg, bg])], np.float32)
        labels = np.asarray([1] * len(fg) + [0] * len(bg), np.int64)
    canvas_box = np.asarray(geom.box_to_model(*box), np.float32) if box is not None else None
    return CanvasPrompt(points=points, point_labels=labels, box=canvas_box, mask_input=mask_input)


def centre_out(depth: int) -> list[int]:
    """Every slice index of a volume of ``depth`` slices, the centre first, then outwards:
    ``c, c+1, c-1, c+2, ...`` with ``c = depth // 2``."""
    if depth <= 0:
        return []
    centre = depth // 2
    return [centre, *neighbours(centre, depth - 1, depth)]


def neighbours(k: int, count: int, depth: int) -> list[int]:
    """Up to ``count`` slice indices nearest to ``k`` inside ``0..depth-1``: ``k+1, k-1, k+2, k-2, ...``."""
    out: list[int] = []
    step = 1
    while len(out) < count and step < depth:
        for cand in (k + step, k - step):
            if 0 <= cand < depth and len(out) < count:
                out.append(cand)
        step += 1
    return out
