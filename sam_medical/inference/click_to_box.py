"""Day-one clicks for a box-only model: the click-to-box search (the ``click_to_box`` decoding strategy).

LiteMedSAM was trained with box prompts only: decoded directly, one click gives Dice ~0.01 on every real
data set. This strategy answers clicks with the model's box skill instead, with no training:

1. **Size from the image.** Around the first foreground click the canvas intensities are smoothed
   (Gaussian, :data:`SMOOTH_SIGMA` px); the pixels within :data:`INTENSITY_TOLERANCE` grey levels of the
   click's median are opened (:data:`OPENING` iterations, which cuts thin leaks) and the connected region
   holding the click is kept. Its area and its bounding box's aspect give a size ``s`` and an aspect ``a``
   (clipped to :data:`ASPECT_RANGE`). This costs a few milliseconds, not a decoder call.
2. **Candidates.** Click-centred boxes of half-width ``s k sqrt(a)`` and half-height ``s k / sqrt(a)``
   for each ``k`` of :data:`SCALES`, each grown to hold every foreground click with :data:`CLICK_PAD` px
   to spare. A prompt that comes with a box (a box plus corrective clicks) starts from that box instead.
   Every background click inside a candidate adds its four edits: one side moved just past the click.
   The region's own bounding box (grown by :data:`REGION_PAD`) is a candidate too, when the region fills
   at least :data:`REGION_MIN_FILL` of it: it is right when the click is far from the object's centre
   (a crescent-shaped organ), and wrong when the region leaked into a neighbour of similar intensity.
3. **One batched decode** of all candidates through the engine (torch, ONNX Runtime or OpenVINO).
4. **Chooser.** Per candidate the connected components of ``logits > 0`` that hold a foreground click
   are kept; a candidate is valid when they hold every foreground click, cover no background click and
   have at least :data:`MIN_AREA` pixels. The valid candidate with the highest predicted IoU wins (ties:
   the smaller box); with none valid, the highest predicted IoU overall. A box-only model has never seen
   points, so clicks filter and place boxes; they are never given to the decoder.

Measured on base LiteMedSAM (``docs/findings/click_to_box_search.md``): predicted IoU beat every geometric
and stability chooser; three scales are worth ~0.05 Dice over one on the sarcoma CT and MR.

Coordinates: canvas pixels of the ``256 x 256`` canvas, points ``(x, y)`` = (column, row), boxes
``(x0, y0, x1, y1)`` inclusive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage

from sam_medical.inference.decoding import CanvasPrompt, Decoded, decode_direct
from sam_medical.model.forward import CANVAS_SIZE, logits_to_canvas

if TYPE_CHECKING:
    from sam_medical.inference.engines import Engine

#: The strategy's name (a key of :data:`sam_medical.inference.decoding.STRATEGIES`).
CLICK_TO_BOX = "click_to_box"
#: Grey levels (of the 0-255 canvas) around the click's median that count as the clicked region.
INTENSITY_TOLERANCE = 24.0
#: Gaussian sigma (canvas px) applied before thresholding.
SMOOTH_SIGMA = 1.0
#: Binary opening iterations that cut thin leaks of the region.
OPENING = 2
#: Candidate sizes relative to the region's size (one decode each).
SCALES: tuple[float, ...] = (2**-0.5, 1.0, 2**0.5)
#: Also a candidate: the clicked region's bounding box grown by :data:`REGION_PAD` px.
REGION_BOX = True
REGION_PAD = 2.0
#: ... only when the region fills at least this share of its box (a leaked region is sparse in its box).
REGION_MIN_FILL = 0.7
#: Width / height range of the candidates.
ASPECT_RANGE = (0.5, 2.0)
#: Half-size range of the candidates, canvas px.
HALF_SIZE_RANGE = (4.0, 90.0)
#: Space kept between a foreground click and the side of a box grown to hold it, px.
CLICK_PAD = 4.0
#: Fewest pixels of a valid candidate's kept component.
MIN_AREA = 20
#: Re-prompt once with the chosen mask's tight box grown by :data:`REFINE_MARGIN` px (one more decode).
REFINE = True
#: MedSAM's box jitter at 256: the margin of the refining box, px.
REFINE_MARGIN = 5.0
#: The refined mask is kept only when its Dice with the chosen one is at least this (and it is valid).
REFINE_AGREE = 0.6


def clicked_region(image: np.ndarray, x: int, y: int) -> np.ndarray:
    """The region of similar intensity around the click ``(x, y)``: ``(256, 256)`` bool.

    Args:
        image: ``(256, 256)`` canvas intensities (0-255; e.g. channel 0 of the uint8 canvas).
    """
    smooth = ndimage.gaussian_filter(np.asarray(image, np.float32), SMOOTH_SIGMA)
    ref = float(np.median(smooth[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3]))
    near = np.abs(smooth - ref) <= INTENSITY_TOLERANCE
    region = _component(ndimage.binary_opening(near, iterations=OPENING), [(x, y)])
    if not region.any():  # the opening removed the click's own pixel: a thin structure
        region = _component(near, [(x, y)])
    if not region.any():
        region = np.zeros_like(near)
        region[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3] = True
    return region


def _component(mask: np.ndarray, clicks: Sequence[tuple[int, int]]) -> np.ndarray:
    """The connected components of ``mask (H, W)`` that hold any of ``clicks`` ``[(x, y), ...]``."""
    hit = [(x, y) for x, y in clicks if mask[y, x]]
    if not hit:
        return np.zeros_like(mask, dtype=bool)
    labels, _ = ndimage.label(mask)
    return np.isin(labels, [labels[y, x] for x, y in hit])


def _clip_box(box: Sequence[float]) -> np.ndarray:
    top = float(CANVAS_SIZE - 1)
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([max(0.0, x0), max(0.0, y0), min(top, x1), min(top, y1)], np.float32)


def _grow_to_hold(box: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """``box`` grown so that every foreground click ``fg (N, 2)`` lies :data:`CLICK_PAD` px inside it."""
    lo = np.minimum(box[:2], fg.min(0) - CLICK_PAD)
    hi = np.maximum(box[2:], fg.max(0) + CLICK_PAD)
    return _clip_box([*lo, *hi])


def _edits(box: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> list[np.ndarray]:
    """``box`` and, for each background click inside it, the box with one side moved just past it; edits
    thinner than 2 px or losing a foreground click are dropped."""
    out = [box]
    for x, y in bg:
        if not (box[0] <= x <= box[2] and box[1] <= y <= box[3]):
            continue
        x0, y0, x1, y1 = box
        for edit in ([x + 1, y0, x1, y1], [x0, y0, x - 1, y1], [x0, y + 1, x1, y1], [x0, y0, x1, y - 1]):
            b = _clip_box(edit)
            holds = len(fg) == 0 or bool(np.all((fg >= b[:2]) & (fg <= b[2:])))
            if b[2] - b[0] >= 2 and b[3] - b[1] >= 2 and holds:
                out.append(b)
    return out


def candidate_boxes(prompt: CanvasPrompt) -> np.ndarray:
    """The candidate boxes ``(K, 4)`` of a click prompt (see the module docstring), duplicates dropped.

    Needs ``prompt.image`` unless the prompt has a box; foreground clicks are ``prompt.points`` with label 1.
    """
    points = np.asarray(prompt.points, np.float32).reshape(-1, 2)
    labels = np.asarray(prompt.point_labels).reshape(-1)
    fg, bg = points[labels == 1], points[labels != 1]
    if prompt.box is not None:
        bases = [_clip_box(prompt.box)]
    else:
        if prompt.image is None:
            raise ValueError("the click_to_box strategy needs the canvas image of a click prompt")
        x, y = (int(round(v)) for v in np.clip(fg[0], 0, CANVAS_SIZE - 1))
        region = clicked_region(prompt.image, x, y)
        rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
        aspect = float(np.clip((cols[-1] - cols[0] + 1) / (rows[-1] - rows[0] + 1), *ASPECT_RANGE))
        size = float(np.sqrt(region.sum()) / 2)
        bases = []
        for k in SCALES:
            s = float(np.clip(size * k, *HALF_SIZE_RANGE))
            hw, hh = s * np.sqrt(aspect), s / np.sqrt(aspect)
            bases.append(_clip_box([x - hw, y - hh, x + hw, y + hh]))
        fill = float(region.sum()) / float((cols[-1] - cols[0] + 1) * (rows[-1] - rows[0] + 1))
        if REGION_BOX and fill >= REGION_MIN_FILL:  # the region's box, unless the region leaked
            pad = REGION_PAD
            bases.append(_clip_box([cols[0] - pad, rows[0] - pad, cols[-1] + pad, rows[-1] + pad]))
    boxes = [e for b in bases for e in _edits(_grow_to_hold(b, fg) if len(fg) else b, fg, bg)]
    unique = {tuple(np.round(b, 1)): b for b in boxes}
    return np.stack(list(unique.values()))


def _clicks(prompt: CanvasPrompt) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Foreground and background clicks of ``prompt`` as integer canvas ``(x, y)``."""
    points = np.clip(np.rint(np.asarray(prompt.points).reshape(-1, 2)), 0, CANVAS_SIZE - 1).astype(int)
    labels = np.asarray(prompt.point_labels).reshape(-1)
    fg = [(int(x), int(y)) for (x, y), lab in zip(points, labels, strict=True) if lab == 1]
    bg = [(int(x), int(y)) for (x, y), lab in zip(points, labels, strict=True) if lab != 1]
    return fg, bg


def _valid(comp: np.ndarray, fg: list[tuple[int, int]], bg: list[tuple[int, int]]) -> bool:
    """A kept component is valid: enough pixels, every foreground click in it, no background click."""
    return bool(
        comp.sum() >= MIN_AREA and all(comp[y, x] for x, y in fg) and not any(comp[y, x] for x, y in bg)
    )


def _choose(
    logits: np.ndarray, iou: np.ndarray, boxes: np.ndarray, prompt: CanvasPrompt
) -> tuple[int, np.ndarray]:
    """The chosen candidate's index and its kept component ``(256, 256)`` bool (module docstring, step 4).

    Args:
        logits: ``(K, 256, 256)`` canvas logits of the candidates; ``iou``: ``(K,)`` predicted IoU.
    """
    fg, bg = _clicks(prompt)
    comps = [_component(m, fg) if fg else m for m in logits > 0]
    valid = [_valid(c, fg, bg) for c in comps]
    pool = [i for i, ok in enumerate(valid) if ok] or list(range(len(comps)))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    best = min(pool, key=lambda i: (-float(iou[i]), float(area[i])))
    return best, comps[best]


def _keep_only(low_res: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
    """``low_res (1, 1, L, L)`` logits with every pixel outside ``keep (256, 256)`` pushed to <= -1."""
    keep_t = torch.from_numpy(keep)[None, None].float()
    if low_res.shape[-1] != CANVAS_SIZE:
        keep_t = torch.nn.functional.interpolate(keep_t, size=low_res.shape[-2:], mode="nearest")
    return torch.where(keep_t > 0, low_res, torch.clamp(low_res, max=-1.0))


def _refine(
    engine: Engine,
    embedding: torch.Tensor,
    prompt: CanvasPrompt,
    chosen: Decoded,
    keep: np.ndarray,
    rule: str,
) -> tuple[Decoded, np.ndarray] | None:
    """One re-prompt with the tight box of ``keep (256, 256)`` grown by :data:`REFINE_MARGIN`: its answer
    and kept component, or None when that is not valid or strays from ``keep`` (:data:`REFINE_AGREE`)."""
    if not keep.any():
        return None
    rows, cols = np.flatnonzero(keep.any(1)), np.flatnonzero(keep.any(0))
    m = REFINE_MARGIN
    box = _clip_box([cols[0] - m, rows[0] - m, cols[-1] + m, rows[-1] + m])
    (answer,) = decode_direct(engine, embedding, [CanvasPrompt(box=box)], rule, 1)
    fg, bg = _clicks(prompt)
    mask = logits_to_canvas(answer.low_res_logits[:, 0])[0].numpy() > 0
    comp = _component(mask, fg) if fg else mask
    overlap = 2.0 * float((comp & keep).sum()) / float(comp.sum() + keep.sum())
    if not _valid(comp, fg, bg) or overlap < REFINE_AGREE:
        return None
    answer.box = box
    return answer, comp


def decode_click_to_box(
    engine: Engine, embedding: torch.Tensor, prompts: Sequence[CanvasPrompt], rule: str, batch: int
) -> list[Decoded]:
    """The :data:`CLICK_TO_BOX` strategy (module docstring): each prompt's candidate boxes decoded in
    batches of ``batch``, one :class:`Decoded` per prompt whose ``box`` is the box that made the mask.
    Prompts without points are decoded as they are (a box alone is what the model knows)."""
    out: list[Decoded] = []
    for prompt in prompts:
        if prompt.n_points == 0:
            out.extend(decode_direct(engine, embedding, [prompt], rule, batch))
            continue
        boxes = candidate_boxes(prompt)
        answers = decode_direct(engine, embedding, [CanvasPrompt(box=b) for b in boxes], rule, batch)
        low = torch.cat([a.low_res_logits for a in answers])  # (K, 1, L, L)
        iou = np.asarray([a.iou for a in answers], np.float32)
        best, keep = _choose(logits_to_canvas(low[:, 0]).numpy(), iou, boxes, prompt)
        chosen = answers[best]
        chosen.box = boxes[best]
        refined = _refine(engine, embedding, prompt, chosen, keep, rule) if REFINE else None
        if refined is not None:
            chosen, keep = refined
        chosen.low_res_logits = _keep_only(chosen.low_res_logits, keep)
        chosen.strategy = CLICK_TO_BOX
        chosen.candidates = len(boxes) + (1 if REFINE and keep.any() else 0)
        out.append(chosen)
    return out
