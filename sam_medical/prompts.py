"""Prompts made from a mask: random ones for training, deterministic ones for evaluation.

Everything here works on a binary mask on the 256x256 canvas, ``mask: (256, 256) bool`` (any 2-D shape
works), and answers in canvas **pixel-index** coordinates: ``x`` is the column, ``y`` the row. SAM's
prompt encoder adds 0.5 to reach pixel centres, exactly as ``SliceGeometry.point_to_model`` expects, so
a prompt made here from a training mask means the same thing as a click in Slicer mapped to the canvas.

A box is ``(4,) float32 [x0, y0, x1, y1]`` with inclusive pixel indices (the tight box of a one-pixel
object is ``[x, y, x, y]``). Points are ``(n, 2) float32 [x, y]`` with ``(n,) int64`` labels: 1 foreground,
0 background, -1 padding ("not a point", which SAM's prompt encoder understands), so prompts with
different numbers of points collate into one batch.

Training (random, ``rng: numpy.random.Generator``):

* :func:`jittered_box` -- MedSAM's jittered bounding box (0-5 px at 256, i.e. 0-20 px at 1024);
* :func:`random_points` -- foreground points in the mask, background points near it;
* :class:`TrainPromptSampler` -- one prompt per item for a mode ``box`` / ``point`` / ``box+point`` /
  ``mixed``.

Evaluation (deterministic, shared by validation, ``evaluate`` and tests):

* :func:`tight_box`, :func:`interior_point` (the object pixel farthest from its boundary),
  :func:`eval_points`, :func:`eval_prompt`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from sam_medical.errors import UserInputError

PromptKind = Literal["box", "point", "box+point"]
#: What one prompt is made of: a box, clicks, or both (evaluation, validation, serving).
PROMPT_KINDS: tuple[str, ...] = ("box", "point", "box+point")
#: Training prompt modes: always one kind, or ``mixed`` (box and clicks, one kind dropped at random).
PROMPT_MODES: tuple[str, ...] = (*PROMPT_KINDS, "mixed")
EVAL_KINDS = PROMPT_KINDS
#: Names used before one vocabulary was agreed, and what they are called now.
RENAMED_MODES = {"points": "point", "both": "mixed"}


def check_prompt_mode(mode: str, option: str = "--prompt", modes: tuple[str, ...] = PROMPT_MODES) -> str:
    """``mode`` if it is one of ``modes``; a :class:`~sam_medical.errors.UserInputError` otherwise,
    naming the new word for an old one (``points`` -> ``point``, ``both`` -> ``mixed``)."""

    if mode in modes:
        return mode
    hint = f" ({mode!r} is now called {RENAMED_MODES[mode]!r})" if mode in RENAMED_MODES else ""
    raise UserInputError(f"{option} must be one of {', '.join(modes)}, got {mode!r}{hint}")


#: Background points are drawn within this margin (pixels, at 256) around the object's tight box.
BG_MARGIN = 10


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        raise ValueError("cannot make a prompt from an empty mask")
    return mask


def tight_box(mask: np.ndarray) -> np.ndarray:
    """The tight bounding box of ``mask (H, W)``: ``(4,) float32 [x0, y0, x1, y1]``, inclusive indices."""
    mask = _check_mask(mask)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def jittered_box(mask: np.ndarray, max_jitter: int, rng: np.random.Generator) -> np.ndarray:
    """MedSAM-style box: the tight box with each side moved by a random 0..``max_jitter`` pixels.

    Each of the four sides moves independently by a uniform integer offset: outward by up to
    ``max_jitter`` px, or inward by up to ``min(max_jitter, extent // 4)`` px (``extent`` is the box's
    width for x sides, height for y sides), so a jittered box always keeps the centre of its object.
    The result is clipped to the canvas ``[0, W-1] x [0, H-1]``.

    Args:
        mask: ``(H, W)`` bool, not empty.
        max_jitter: largest shift in pixels (5 at 256 matches MedSAM's 20 at 1024); 0 gives the tight box.
        rng: the random generator.

    Returns:
        ``(4,) float32 [x0, y0, x1, y1]``.
    """
    box = tight_box(mask)
    if max_jitter <= 0:
        return box
    h, w = mask.shape
    x0, y0, x1, y1 = (int(v) for v in box)
    inward_x = min(max_jitter, (x1 - x0 + 1) // 4)
    inward_y = min(max_jitter, (y1 - y0 + 1) // 4)
    # offsets measured outward: positive grows the box, negative shrinks it
    d = [int(rng.integers(-inward, max_jitter + 1)) for inward in (inward_x, inward_y, inward_x, inward_y)]
    out = np.array([x0 - d[0], y0 - d[1], x1 + d[2], y1 + d[3]], dtype=np.float32)
    out[[0, 2]] = np.clip(out[[0, 2]], 0, w - 1)
    out[[1, 3]] = np.clip(out[[1, 3]], 0, h - 1)
    return out


def _sample_pixels(candidates: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct pixels (with repetition only when fewer exist) of a bool image -> ``(n, 2)`` xy."""
    ys, xs = np.nonzero(candidates)
    idx = rng.choice(ys.size, size=n, replace=ys.size < n)
    return np.stack([xs[idx], ys[idx]], axis=1).astype(np.float32)


def random_points(
    mask: np.ndarray, n_fg: int, n_bg: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random clicks: ``n_fg`` foreground pixels of the mask, then ``n_bg`` background pixels.

    Background points are drawn from the non-mask pixels inside the tight box grown by
    :data:`BG_MARGIN` pixels (near the object, where a user would correct a leak); when that region
    holds no background pixel (the object fills it), from any non-mask pixel of the canvas.

    Returns:
        ``points (n_fg + n_bg, 2) float32 [x, y]`` and ``labels (n_fg + n_bg,) int64`` (1 then 0).
    """
    mask = _check_mask(mask)
    if n_fg < 0 or n_bg < 0:
        raise ValueError("point counts must be >= 0")
    parts = [_sample_pixels(mask, n_fg, rng)] if n_fg else []
    if n_bg:
        x0, y0, x1, y1 = (int(v) for v in tight_box(mask))
        near = np.zeros_like(mask)
        near[max(0, y0 - BG_MARGIN) : y1 + BG_MARGIN + 1, max(0, x0 - BG_MARGIN) : x1 + BG_MARGIN + 1] = True
        background = near & ~mask
        if not background.any():
            background = ~mask
        if not background.any():
            raise ValueError("the mask covers the whole canvas: no background point can be drawn")
        parts.append(_sample_pixels(background, n_bg, rng))
    points = np.concatenate(parts, axis=0) if parts else np.zeros((0, 2), np.float32)
    labels = np.array([1] * n_fg + [0] * n_bg, dtype=np.int64)
    return points, labels


@dataclass(frozen=True)
class TrainPromptSampler:
    """Makes one random training prompt per (slice, label) item.

    Modes:

    * ``"box"``: a jittered box only (points are all padding);
    * ``"point"``: 1..``num_points`` foreground and 0..``num_bg_points`` background clicks, no box;
    * ``"box+point"``: a box and clicks, always;
    * ``"mixed"``: a box and clicks; with probability ``drop_prob`` one of the two kinds, chosen at
      random, is dropped, so that the model learns each alone as well as together.

    The number of clicks varies per item (uniform in the ranges above) and is padded with label -1 to
    ``num_points + num_bg_points``, so every item has the same array shapes.

    ``__call__(mask, rng)`` returns ``dict(points (P, 2) float32, point_labels (P,) int64,
    box (4,) float32, has_box bool)``; ``box`` is zeros when ``has_box`` is false, and a prompt without
    clicks has all labels -1. ``P = num_points + num_bg_points`` (never 0).
    """

    mode: str = "box"
    box_jitter: int = 5
    num_points: int = 1
    num_bg_points: int = 0
    drop_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in PROMPT_MODES:
            raise ValueError(f"prompt mode must be one of {PROMPT_MODES}, got {self.mode!r}")
        if self.box_jitter < 0:
            raise ValueError("box_jitter must be >= 0")
        if self.num_points < 1 or self.num_bg_points < 0:
            raise ValueError("num_points must be >= 1 and num_bg_points >= 0")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError("drop_prob must be in [0, 1]")

    @property
    def max_points(self) -> int:
        """``P``: the padded number of clicks of every prompt."""
        return self.num_points + self.num_bg_points

    def __call__(self, mask: np.ndarray, rng: np.random.Generator) -> dict:
        use_box = self.mode != "point"
        use_points = self.mode != "box"
        if self.mode == "mixed" and rng.random() < self.drop_prob:
            if rng.random() < 0.5:
                use_box = False
            else:
                use_points = False
        points = np.zeros((self.max_points, 2), np.float32)
        labels = np.full((self.max_points,), -1, np.int64)
        if use_points:
            n_fg = int(rng.integers(1, self.num_points + 1))
            n_bg = int(rng.integers(0, self.num_bg_points + 1))
            pts, lab = random_points(mask, n_fg, n_bg, rng)
            points[: len(pts)] = pts
            labels[: len(lab)] = lab
        box = jittered_box(mask, self.box_jitter, rng) if use_box else np.zeros(4, np.float32)
        return {"points": points, "point_labels": labels, "box": box, "has_box": use_box}


# --- deterministic evaluation prompts ------------------------------------------------------------
def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """The object pixel farthest from the object's boundary, ``(x, y)``.

    Distances are Euclidean (``scipy.ndimage.distance_transform_edt``) to the nearest non-object pixel,
    the canvas border counting as outside. Ties go to the tied pixel closest to the tied pixels' mean,
    then to the first in row-major order, so the answer is fully deterministic. For a convex object this
    is its "centre"; for a C shape it stays inside the object where the centroid would not.
    """
    mask = _check_mask(mask)
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    ys, xs = np.nonzero(dist == dist.max())
    cy, cx = ys.mean(), xs.mean()
    best = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))  # argmin: first of equals in row-major order
    return int(xs[best]), int(ys[best])


def eval_points(mask: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` deterministic foreground clicks: :func:`interior_point` first, then ``k - 1`` other object
    pixels drawn with ``numpy.random.default_rng(seed)`` (distinct while the object has enough pixels).

    Returns:
        ``(k, 2) float32 [x, y]``.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    mask = _check_mask(mask)
    x, y = interior_point(mask)
    out = np.zeros((k, 2), np.float32)
    out[0] = (x, y)
    if k > 1:
        others = mask.copy()
        if others.sum() > 1:
            others[y, x] = False
        out[1:] = _sample_pixels(others, k - 1, np.random.default_rng(seed))
    return out


def eval_prompt(
    mask: np.ndarray, kind: str, k: int = 1, box_jitter: int = 0, seed: int = 0
) -> dict[str, np.ndarray | None]:
    """A deterministic prompt for ``mask`` of kind ``"box"``, ``"point"`` or ``"box+point"``.

    Args:
        mask: ``(H, W)`` bool, not empty.
        kind: which parts to give.
        k: number of foreground clicks for point kinds (:func:`eval_points`).
        box_jitter: 0 for the tight box, else :func:`jittered_box` seeded with ``seed``.
        seed: seeds the extra clicks and the box jitter.

    Returns:
        ``dict(points (k, 2) float32 | None, point_labels (k,) int64 | None, box (4,) float32 | None)``.
    """
    if kind not in EVAL_KINDS:
        raise ValueError(f"prompt kind must be one of {EVAL_KINDS}, got {kind!r}")
    out: dict[str, np.ndarray | None] = {"points": None, "point_labels": None, "box": None}
    if "box" in kind:
        out["box"] = (
            jittered_box(mask, box_jitter, np.random.default_rng(seed)) if box_jitter else tight_box(mask)
        )
    if "point" in kind:
        out["points"] = eval_points(mask, k, seed)
        out["point_labels"] = np.ones(k, np.int64)
    return out


def corrective_click(
    pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None
) -> tuple[int, int, int] | None:
    """The next click of a simulated user correcting ``pred`` towards ``gt`` (both ``(H, W)`` bool).

    As SAM-Med2D and nnInteractive evaluate: the largest connected error region (missed object pixels or
    leaked background pixels, inside ``valid`` when given) is found, and the click goes to its pixel
    farthest from the region's boundary (:func:`interior_point`): a foreground click (label 1) in a miss,
    a background click (label 0) in a leak.

    Returns:
        ``(x, y, label)``, or None when the prediction is already exact.
    """
    pred = np.asarray(pred, bool)
    gt = np.asarray(gt, bool)
    best: tuple[int, np.ndarray, int] | None = None
    for label, error in ((1, gt & ~pred), (0, pred & ~gt)):
        if valid is not None:
            error = error & valid
        if not error.any():
            continue
        regions, n = ndimage.label(error)
        sizes = np.bincount(regions.ravel())[1:]
        biggest = int(np.argmax(sizes)) + 1
        if best is None or sizes[biggest - 1] > best[0]:
            best = (int(sizes[biggest - 1]), regions == biggest, label)
    if best is None:
        return None
    x, y = interior_point(best[1])
    return x, y, best[2]
