"""3D from one prompt: segment one slice, then walk up and down, prompting each slice from the last.

Volumes are ``(I, J, K)`` in stored order; slice ``k`` is ``volume[:, :, k]`` (rows ``i``, columns
``j``). The walk:

1. slice ``k0`` is segmented from the user's prompt (points and/or ROI box);
2. for each direction (``k0+1, k0+2, ...`` then ``k0-1, k0-2, ...``), slice ``k`` is prompted with the
   previous slice's mask: its bounding box grown by a margin (one voxel plus ``box_margin`` of its
   extent), optionally its interior point (the pixel farthest from its boundary,
   :func:`sam_medical.prompts.interior_point`) as a foreground click, and optionally the previous
   low-resolution logits as SAM's mask input;
3. components of the new mask that do not touch the previous mask are dropped (leaks into neighbouring
   organs; on slice ``k0``, components that hold no click and miss the box), and the walk in that direction stops, *without* keeping slice ``k``, when the mask is
   empty or smaller than ``min_area`` voxels, when its area jumps (more than ``max_growth`` times or
   less than ``min_shrink`` times the previous one), when the predicted IoU is below ``min_iou``, or
   after ``max_slices`` slices.

Any object with ``segment_slice(image_key, volume, k, fg, bg, box, mask_input) -> (mask (I, J) bool,
info with "iou")`` works as the predictor (:class:`sam_medical.inference.predictor.VolumePredictor` serves), which
is how the walk itself is tested exactly with a fixed fake predictor. A predictor whose
``encode_batch`` is above 1 (PyTorch on a GPU) also gets ``encode_ahead(image_key, volume, ks)`` calls:
the next ``encode_batch`` slices of the walk are encoded in one batch before it reaches them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy import ndimage

from sam_medical.prompts import interior_point
from sam_medical.volume.io import Volume


class SlicePredictor(Protocol):
    def segment_slice(
        self,
        image_key: str,
        volume: Volume,
        k: int,
        fg_points_ij: Any = None,
        bg_points_ij: Any = None,
        box_ij: Any = None,
        mask_input: Any = None,
    ) -> tuple[np.ndarray, dict[str, Any]]: ...


@dataclass
class PropagationOptions:
    """Stopping rules and prompts of the walk (see the module docstring).

    The defaults were measured with LiteMedSAM on the 4 sample volumes' 12 organs... (box only, the previous
    mask's box grown by one voxel, stop below predicted IoU 0.75): a box-prompted model always finds
    *something* in a box, so a wider box or an extra click carries the walk past the organ's end, and the
    predicted IoU is what drops there (``bench/propagation.py``).
    """

    max_slices: int | None = None
    min_area: int = 10
    max_growth: float = 2.0
    min_shrink: float = 0.3
    min_iou: float = 0.75
    box_margin: float = 0.0
    use_box: bool = True
    use_point: bool = False
    use_mask_input: bool = False
    keep_overlapping: bool = True

    def __post_init__(self) -> None:
        if self.max_slices is not None and self.max_slices < 0:
            raise ValueError("max_slices must be >= 0")
        if not self.use_box and not self.use_point:
            raise ValueError("propagation needs the box, the point, or both")
        if self.max_growth <= 1.0 or not 0.0 <= self.min_shrink < 1.0:
            raise ValueError("max_growth must be > 1 and min_shrink in [0, 1)")


def mask_box(mask: np.ndarray, margin: float, shape_ij: tuple[int, int]) -> tuple[int, int, int, int]:
    """Bounding box ``(i0, i1, j0, j1)`` (inclusive) of ``mask (I, J)``, grown by ``margin`` x its
    extent plus one voxel per side, clipped to the slice."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    i0, i1, j0, j1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    di = int(round(margin * (i1 - i0 + 1))) + 1
    dj = int(round(margin * (j1 - j0 + 1))) + 1
    h, w = shape_ij
    return max(0, i0 - di), min(h - 1, i1 + di), max(0, j0 - dj), min(w - 1, j1 + dj)


def keep_touching(mask: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """The connected components of ``mask`` that overlap ``previous`` dilated by one voxel."""
    if not mask.any():
        return mask
    labels, n = ndimage.label(mask)
    if n <= 1 and (mask & ndimage.binary_dilation(previous)).any():
        return mask
    touched = np.unique(labels[ndimage.binary_dilation(previous) & mask])
    touched = touched[touched > 0]
    return np.isin(labels, touched)


def keep_prompted(mask: np.ndarray, fg: Any, box: Any) -> np.ndarray:
    """The components of ``mask (I, J)`` that hold a foreground click or overlap the box ``(i0, i1, j0,
    j1)``; the whole mask when none does (the model may answer next to a click)."""
    seed = np.zeros_like(mask)
    h, w = mask.shape
    for p in fg if fg is not None else []:
        i, j = int(round(float(p[0]))), int(round(float(p[1])))
        if 0 <= i < h and 0 <= j < w:
            seed[i, j] = True
    if box is not None and len(box) == 4:
        i0, i1 = sorted(int(round(float(v))) for v in box[0:2])
        j0, j1 = sorted(int(round(float(v))) for v in box[2:4])
        seed[max(0, i0) : max(0, i1 + 1), max(0, j0) : max(0, j1 + 1)] = True
    if not (seed & mask).any():
        return mask
    labels, _ = ndimage.label(mask)
    touched = np.unique(labels[seed & mask])
    return np.isin(labels, touched[touched > 0])


def propagate(
    predictor: SlicePredictor,
    image_key: str,
    volume: Volume,
    k0: int,
    fg: Any = None,
    bg: Any = None,
    box: Any = None,
    *,
    options: PropagationOptions | None = None,
    label: int = 1,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Segment slice ``k0`` from the prompt, then propagate through the neighbouring slices.

    Args:
        predictor: see :class:`SlicePredictor`.
        image_key, volume: the volume ``(I, J, K)`` and its cache key.
        k0: the prompted slice.
        fg, bg: ``[(i, j), ...]`` clicks on slice ``k0``; box: ``(i0, i1, j0, j1)`` on slice ``k0``.
        options: stopping rules (default :class:`PropagationOptions`).
        label: the value written for the object.

    Returns:
        ``mask (I, J, K) uint8`` (``label`` inside; a transposed view of a C-ordered ``(K, J, I)``
        array, the layout :func:`sam_medical.volume.io.write_volume` writes without a copy) and ``info``: ``k0``, ``slices`` (the labelled ``k``s,
        sorted), ``stopped`` (``{"up": reason, "down": reason}``), ``per_slice`` (``k``, ``area``,
        ``iou``, ``embedding``, ``accepted``), ``embeddings`` (counts of cached/computed), ``seconds``.
    """
    opts = options or PropagationOptions()
    t0 = time.perf_counter()
    i_size, j_size, k_size = volume.shape
    out_kji = np.zeros((k_size, j_size, i_size), np.uint8)  # slice-major: a slice is contiguous
    out = out_kji.transpose(2, 1, 0)  # the (I, J, K) view returned
    log = _WalkLog()
    first, info0 = predictor.segment_slice(image_key, volume, k0, fg, bg, box, None)
    first = np.asarray(first, dtype=bool)
    if opts.keep_overlapping and first.any():
        first = keep_prompted(first, fg, box)
    stopped: dict[str, str] = {}
    if not first.any():
        log.record(k0, first, info0, False, "empty on the prompted slice")
        stopped = {"up": "empty on the prompted slice", "down": "empty on the prompted slice"}
    else:
        log.record(k0, first, info0, True)
        out[:, :, k0][first] = label
        for name, step in (("up", 1), ("down", -1)):
            walk = _Walk(predictor, image_key, volume, opts, out, label, log)
            stopped[name] = walk.run(k0, step, first, info0)
    info = {
        "k0": int(k0),
        "slices": sorted(e["k"] for e in log.per_slice if e["accepted"]),
        "stopped": stopped,
        "per_slice": sorted(log.per_slice, key=lambda e: e["k"]),
        "embeddings": log.states,
        "options": asdict(opts),
        "seconds": round(time.perf_counter() - t0, 4),
    }
    return out, info


@dataclass
class _WalkLog:
    """What the walk did per slice (``per_slice`` entries) and how each embedding was had (``states``)."""

    per_slice: list[dict[str, Any]] = field(default_factory=list)
    states: dict[str, int] = field(default_factory=dict)

    def record(
        self, k: int, mask: np.ndarray, info: dict[str, Any], accepted: bool, reason: str | None = None
    ) -> None:
        state = info.get("embedding")
        if state:
            self.states[state] = self.states.get(state, 0) + 1
        entry = {"k": int(k), "area": int(mask.sum()), "iou": round(float(info.get("iou", 0.0)), 4)}
        entry.update({"embedding": state, "accepted": accepted, "strategy": info.get("strategy")})
        if reason:
            entry["reason"] = reason
        self.per_slice.append(entry)


def stop_reason(area: int, prev_area: int, iou: float, opts: PropagationOptions) -> str | None:
    """Why the walk stops at a slice whose mask has ``area`` voxels and predicted ``iou`` (None: go on)."""
    if area == 0:
        return "empty mask"
    if area < opts.min_area:
        return f"area {area} < min_area {opts.min_area}"
    if area > opts.max_growth * prev_area:
        return f"area jumped {prev_area} -> {area} (> x{opts.max_growth:g})"
    if area < opts.min_shrink * prev_area:
        return f"area dropped {prev_area} -> {area} (< x{opts.min_shrink:g})"
    if iou < opts.min_iou:
        return f"predicted IoU {iou:.3f} < {opts.min_iou:g}"
    return None


@dataclass
class _Walk:
    """One direction of the walk: prompts slice after slice from the last accepted mask, writes ``out``."""

    predictor: SlicePredictor
    image_key: str
    volume: Volume
    opts: PropagationOptions
    out: np.ndarray
    label: int
    log: _WalkLog

    def run(self, k0: int, step: int, first: np.ndarray, info0: dict[str, Any]) -> str:
        """Walk from ``k0`` by ``step`` (+1 up, -1 down); return why it stopped."""
        opts, k_size = self.opts, self.volume.shape[2]
        prev, prev_info, prev_area = first, info0, int(first.sum())
        k, done = k0 + step, 0
        while 0 <= k < k_size:
            if opts.max_slices is not None and done >= opts.max_slices:
                return f"max_slices {opts.max_slices}"
            mask, info = self._segment(k, step, prev, prev_info)
            area = int(mask.sum())
            reason = stop_reason(area, prev_area, float(info.get("iou", 1.0)), opts)
            if reason is not None:
                self.log.record(k, mask, info, False, reason)
                return reason
            self.log.record(k, mask, info, True)
            self.out[:, :, k][mask] = self.label
            prev, prev_info, prev_area = mask, info, area
            done += 1
            k += step
        return "end of the volume"

    def _segment(
        self, k: int, step: int, prev: np.ndarray, prev_info: dict[str, Any]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Slice ``k``'s mask ``(I, J)`` bool, prompted from the previous slice's mask and answer."""
        opts = self.opts
        i_size, j_size = self.volume.shape[:2]
        box_k = mask_box(prev, opts.box_margin, (i_size, j_size)) if opts.use_box else None
        fg_k = None
        if opts.use_point:
            x, y = interior_point(prev)
            fg_k = [(y, x)]  # interior_point answers (x=j, y=i)
        mask_in = prev_info.get("low_res_logits") if opts.use_mask_input else None
        # engines that batch (a GPU) encode the slices ahead of the walk ``encode_batch`` at a time; on the
        # CPU a batch is no cheaper per slice, and the walk encodes each slice as it reaches it
        encode_ahead = getattr(self.predictor, "encode_ahead", None)
        batch = int(getattr(self.predictor, "encode_batch", 1)) if encode_ahead is not None else 1
        if batch > 1:  # a no-op while the slices ahead are cached
            encode_ahead(self.image_key, self.volume, range(k, k + step * batch, step))
        mask, info = self.predictor.segment_slice(self.image_key, self.volume, k, fg_k, None, box_k, mask_in)
        mask = np.asarray(mask, dtype=bool)
        if opts.keep_overlapping:
            mask = keep_touching(mask, prev)
        return mask, info
