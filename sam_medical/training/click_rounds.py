"""The prompts of interactive training (issue 18), drawn in vectorised torch on the batch's device.

As SAM / SAM 2 train: each item starts with a jittered box or one click drawn uniformly inside the
object (:func:`first_prompts`), then every later round adds one corrective click drawn uniformly in the
error region of the previous prediction (:func:`corrective_clicks`): a missed object pixel gives a
foreground click (label 1), a leaked background pixel a background click (label 0).

Everything here works on whole batches with no Python loop over items and no host synchronisation, so
the clicks are drawn where the masks are (CPU or CUDA). Conventions: canvases are ``256 x 256``; masks
are ``(B, H, W)`` bool; a point is canvas ``(x, y)`` = (column, row); a box is ``(x0, y0, x1, y1)`` with
inclusive pixel indices, as :func:`sam_medical.prompts.tight_box`. ``generator``: a ``torch.Generator``
on the masks' device, or None for the device's global generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoundPrompts:
    """The prompt of every item of a batch at one round.

    Attributes:
        points: ``(B, K, 2)`` float32 canvas ``(x, y)``; each item's real clicks first, then padding.
        point_labels: ``(B, K)`` int64: 1 foreground, 0 background, -1 padding.
        boxes: ``(B, 4)`` float32 canvas ``(x0, y0, x1, y1)`` (zeros where ``has_box`` is False).
        has_box: ``(B,)`` bool.
    """

    points: torch.Tensor
    point_labels: torch.Tensor
    boxes: torch.Tensor
    has_box: torch.Tensor

    @property
    def n_points(self) -> torch.Tensor:
        """``(B,)`` int64: the number of real clicks of each item."""
        return (self.point_labels >= 0).sum(dim=1)

    def lone_click(self) -> torch.Tensor:
        """``(B,)`` bool: the prompt is one click and nothing else (SAM answers it with three masks)."""
        return ~self.has_box & (self.n_points == 1)

    def add_click(self, xy: torch.Tensor, label: torch.Tensor) -> RoundPrompts:
        """A new prompt with click ``xy (B, 2)`` of ``label (B,)`` added after each item's real clicks."""
        b = xy.shape[0]
        n = self.n_points
        points = torch.cat([self.points, self.points.new_zeros(b, 1, 2)], dim=1)
        labels = torch.cat([self.point_labels, self.point_labels.new_full((b, 1), -1)], dim=1)
        rows = torch.arange(b, device=xy.device)
        points[rows, n] = xy.to(points.dtype)
        labels[rows, n] = label.to(labels.dtype)
        return RoundPrompts(points, labels, self.boxes, self.has_box)


def valid_region(valid_hw: torch.Tensor, size: int = 256, device: torch.device | None = None) -> torch.Tensor:
    """``(B, size, size)`` bool: True on each canvas's image region ``[:h, :w]`` (``valid_hw (B, 2)``)."""
    hw = valid_hw.to(device or valid_hw.device)
    idx = torch.arange(size, device=hw.device)
    rows = idx[None, :, None] < hw[:, 0, None, None]
    cols = idx[None, None, :] < hw[:, 1, None, None]
    return rows & cols


def uniform_pixel(region: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One pixel drawn uniformly among the True pixels of each ``region (B, H, W)`` -> ``(B, 2)`` float
    ``(x, y)``. (Each pixel gets a uniform random key; the largest key among the region's pixels wins.)
    An empty region gives an arbitrary pixel: callers check ``region.any``."""
    b, h, w = region.shape
    keys = torch.rand(b, h * w, device=region.device, generator=generator)
    flat = keys.masked_fill(~region.reshape(b, h * w), -1.0).argmax(dim=1)
    return torch.stack([flat % w, flat // w], dim=1).to(torch.float32)


def tight_boxes(target: torch.Tensor) -> torch.Tensor:
    """The tight box of each non-empty ``target (B, H, W)`` -> ``(B, 4)`` float32 ``(x0, y0, x1, y1)``."""
    _, h, w = target.shape
    rows, cols = target.any(dim=2), target.any(dim=1)  # (B, H), (B, W)
    ys = torch.arange(h, device=target.device)
    xs = torch.arange(w, device=target.device)
    y0 = torch.where(rows, ys, h).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1)
    x0 = torch.where(cols, xs, w).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).to(torch.float32)


def jittered_boxes(
    target: torch.Tensor, max_jitter: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """MedSAM-style boxes, as :func:`sam_medical.prompts.jittered_box` draws them, for a whole batch.

    Each side of the tight box moves by a uniform integer: outward up to ``max_jitter`` px, or inward up
    to ``min(max_jitter, extent // 4)`` px, so the box keeps its object's centre; clipped to the canvas.
    ``target (B, H, W)`` bool, non-empty -> ``(B, 4)`` float32.
    """
    box = tight_boxes(target)
    if max_jitter <= 0:
        return box
    _, h, w = target.shape
    extent = torch.stack([box[:, 2] - box[:, 0] + 1, box[:, 3] - box[:, 1] + 1], dim=1)  # (B, 2) w, h
    inward = torch.clamp(torch.div(extent, 4, rounding_mode="floor"), max=max_jitter).repeat(1, 2)
    u = torch.rand(box.shape, device=box.device, generator=generator)
    outward = torch.floor(u * (max_jitter + inward + 1)) - inward  # uniform in [-inward, max_jitter]
    out = box + outward * torch.tensor([-1.0, -1.0, 1.0, 1.0], device=box.device)
    limit = torch.tensor([w - 1, h - 1, w - 1, h - 1], dtype=out.dtype, device=out.device)
    return torch.minimum(out.clamp_min(0), limit)


def first_prompts(
    target: torch.Tensor,
    *,
    max_jitter: int,
    click_prob: float,
    generator: torch.Generator | None = None,
) -> RoundPrompts:
    """Round 1: each item gets one foreground click drawn uniformly inside its object (probability
    ``click_prob``), or else a jittered box. ``target (B, H, W)`` bool, each non-empty."""
    b = target.shape[0]
    device = target.device
    use_click = torch.rand(b, device=device, generator=generator) < click_prob
    click = uniform_pixel(target, generator)
    boxes = jittered_boxes(target, max_jitter, generator) * (~use_click)[:, None]
    labels = torch.where(use_click, 1, -1).to(torch.int64)[:, None]
    return RoundPrompts(click[:, None, :], labels, boxes, ~use_click)


def corrective_clicks(
    pred: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next click of each item: drawn uniformly in the error region of ``pred`` (all ``(B, H, W)``
    bool; inside ``valid`` when given), label 1 where it falls in a miss (``target & ~pred``), 0 in a leak
    (``pred & ~target``). An item already exact gets a foreground click uniformly inside its object.

    Returns:
        ``xy (B, 2)`` float32 canvas ``(x, y)`` and ``labels (B,)`` int64.
    """
    miss = target & ~pred
    error = miss | (pred & ~target)
    if valid is not None:
        error = error & valid
    exact = ~error.flatten(1).any(dim=1)
    region = torch.where(exact[:, None, None], target, error)
    xy = uniform_pixel(region, generator)
    b = xy.shape[0]
    rows = torch.arange(b, device=xy.device)
    hit_miss = miss[rows, xy[:, 1].long(), xy[:, 0].long()]
    labels = (hit_miss | exact).to(torch.int64)
    return xy, labels


def true_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of masks ``pred (B, M, H, W)`` bool with ``target (B, 1, H, W)`` bool -> ``(B, M)`` float32
    (1 where both are empty)."""
    inter = (pred & target).flatten(2).sum(dim=2).float()
    union = (pred | target).flatten(2).sum(dim=2).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
