"""SAM as one module from canvases and training prompts to low-resolution logits (what DDP wraps).

A training batch mixes prompts: some items have a box, some clicks, some both, with different numbers of
clicks. :func:`decode_grouped` decodes each item exactly as a user's prompt is decoded at inference time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sam_medical.model.forward import PromptBatch, canvas_to_input, decode, encode

if TYPE_CHECKING:
    from segment_anything.modeling import Sam


def decode_grouped(
    sam: Sam,
    embeddings: torch.Tensor,
    points: torch.Tensor,
    point_labels: torch.Tensor,
    box: torch.Tensor,
    has_box: torch.Tensor,
    *,
    return_iou: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode a batch whose items carry different prompts, each exactly as at inference time.

    Items are grouped by (box given, number of real clicks); each group is decoded with its clicks cut to
    their real number (no ``-1`` padding) and with ``boxes=None`` or ``points=None`` where its prompt lacks
    that part, so SAM pads exactly as it does for a user's prompt. (Every extra ``-1`` "not a point" token
    changes SAM's mask -- a model trained on padded prompts would be served unpadded ones.) The sampler
    puts an item's real clicks first (:class:`~sam_medical.prompts.TrainPromptSampler`).

    Args:
        embeddings: ``(B, C, h, h)``.
        points: ``(B, P, 2)`` canvas ``[x, y]``; ``point_labels (B, P)``, -1 padding after the real clicks;
            an item with only padding has no clicks.
        box: ``(B, 4)`` canvas ``[x0, y0, x1, y1]``; ``has_box (B,)`` bool.

    Returns:
        Low-resolution logits ``(B, 1, L, L)`` in the batch's order; with ``return_iou`` also SAM's
        predicted IoU ``(B, 1)``.
    """
    device = embeddings.device
    has_box = has_box.to(device=device, dtype=torch.bool)
    n_points = (point_labels >= 0).sum(dim=1).to(device)
    if not bool((has_box | (n_points > 0)).all()):
        raise ValueError("every item needs a box or at least one click")
    outs, ious, order = [], [], []
    for hb in (True, False):
        for n in sorted({int(v) for v in n_points.tolist()}):
            idx = torch.nonzero((has_box == hb) & (n_points == n)).flatten()
            if idx.numel() == 0:
                continue
            low, iou = decode(
                sam,
                embeddings[idx],
                PromptBatch(
                    points=points[idx.to(points.device), :n] if n else None,
                    point_labels=point_labels[idx.to(point_labels.device), :n] if n else None,
                    boxes=box[idx.to(box.device)] if hb else None,
                ),
            )
            outs.append(low)
            ious.append(iou)
            order.append(idx)
    inverse = torch.argsort(torch.cat(order))
    logits = outs[0] if len(outs) == 1 else torch.cat(outs)[inverse]
    if not return_iou:
        return logits
    return logits, (ious[0] if len(ious) == 1 else torch.cat(ious)[inverse])


def batch_keys(batch: dict[str, Any]) -> list[tuple[str, int]]:
    """``(case file uid, slice index)`` of each item of a collated batch: the feature cache's keys."""
    return [(str(c), int(k)) for c, k in zip(batch["case_uid"], batch["slice_index"].tolist(), strict=True)]


def embed(sam: Sam, image: torch.Tensor, features: Any = None, keys: Any = None) -> torch.Tensor:
    """Image embeddings ``(B, C, h, h)`` of canvases ``(B, 256, 256, 3)`` uint8; the frozen part of the
    encoder from ``features`` (a :class:`~sam_medical.training.feature_cache.FeatureCache`) when given."""
    if features is not None:
        return features.embed(sam, image, keys)
    return encode(sam, canvas_to_input(sam, image))


class PromptedSam(nn.Module):
    """SAM as one module from canvases and prompts to low-res logits (what DDP wraps).

    ``forward(image (B,256,256,3) uint8, points (B,P,2), point_labels (B,P), box (B,4), has_box (B,),
    keys)`` -> ``(B, 1, L, L)`` logits. With a :class:`~sam_medical.training.feature_cache.FeatureCache` and
    ``keys`` (one ``(case, slice index)`` per image), the frozen part of the encoder is computed once per
    slice.
    """

    def __init__(self, sam: Sam, features: Any = None) -> None:
        super().__init__()
        self.sam = sam
        self.features = features

    def forward(
        self,
        image: torch.Tensor,
        points: torch.Tensor,
        point_labels: torch.Tensor,
        box: torch.Tensor,
        has_box: torch.Tensor,
        keys: list[tuple[str, int]] | None = None,
    ) -> torch.Tensor:
        embeddings = embed(self.sam, image, self.features, keys)
        return decode_grouped(self.sam, embeddings, points, point_labels, box, has_box)
