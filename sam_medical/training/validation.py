"""Validation Dice of a model on deterministic prompts, per prompt kind and per item.

Each image is encoded once (its frozen part from a
:class:`~sam_medical.training.feature_cache.FeatureCache` when given) and decoded once per kind
(``"box"``: the tight box; ``"point"``: the clicks, interior point first; ``"box+point"``: both; a lone
click of a model trained in click rounds is answered as served, best of three masks by predicted IoU).
Predictions are ``logits_to_canvas(low_res) > 0`` on the 256 canvas, zero outside the image region of the
canvas (``valid_hw``); the Dice of each item comes from :func:`sam_medical.metrics.batch_dice` (MONAI's
``DiceMetric``: NaN for an empty target, left out of the means).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sam_medical.inference.decoding import choose_mask
from sam_medical.metrics import batch_dice
from sam_medical.model.forward import PromptBatch, decode, logits_to_canvas
from sam_medical.training.click_rounds import valid_region
from sam_medical.training.distributed import DistInfo, sum_over_ranks
from sam_medical.training.optim import autocast
from sam_medical.training.prompted_sam import batch_keys, embed

if TYPE_CHECKING:
    from segment_anything.modeling import Sam


@dataclass(frozen=True)
class Validation:
    """What a validation pass scores and how: the ``loader`` of validation items, the prompt ``kinds``, the
    ``device``, the autocast dtype (None: fp32), a feature cache for the frozen encoder (or None) and
    ``lone_click_multimask``: a prompt of one click and nothing else is answered as served (SAM's three
    masks, the one with the highest predicted IoU), for models trained in click rounds."""

    loader: Any
    kinds: list[str]
    device: torch.device
    amp_dtype: torch.dtype | None = None
    features: Any = None
    lone_click_multimask: bool = False


@dataclass(frozen=True)
class ItemDice:
    """The validation Dice of one item (slice x label value) for one prompt kind (NaN: empty target)."""

    case: str
    slice_index: int
    label: int
    kind: str
    dice: float


def _decode_kind(
    sam: Sam, emb: torch.Tensor, batch: dict[str, Any], kind: str, lone_click_multimask: bool
) -> torch.Tensor:
    """Low-res logits ``(B, 1, L, L)`` of the batch's deterministic prompt of ``kind``; a lone click (one
    click per item, no box) with ``lone_click_multimask`` as served: three masks, the best predicted IoU."""
    use_points = "point" in kind
    lone = lone_click_multimask and kind == "point" and batch["points"].shape[1] == 1
    low, iou = decode(
        sam,
        emb,
        PromptBatch(
            points=batch["points"] if use_points else None,
            point_labels=batch["point_labels"] if use_points else None,
            boxes=batch["box"] if "box" in kind else None,
            multimask_output=lone,
        ),
    )
    return choose_mask(low, iou)[0] if lone else low


@torch.no_grad()
def _batch_dices(sam: Sam, v: Validation) -> Iterator[tuple[dict[str, Any], str, torch.Tensor]]:
    """``(batch, kind, per-item Dice (B,))`` for every batch of ``v.loader`` and every prompt kind (see the
    module docstring). The model is in eval mode meanwhile."""
    device, features = v.device, v.features
    was_training = sam.training
    sam.eval()
    try:
        for batch in v.loader:
            image = batch["image"].to(device, non_blocking=True)
            target = batch["target"].to(device)
            valid = valid_region(batch["valid_hw"], target.shape[-1], device)[:, None]
            with autocast(device, v.amp_dtype):
                emb = embed(sam, image, features, batch_keys(batch) if features is not None else None)
                for kind in v.kinds:
                    low = _decode_kind(sam, emb, batch, kind, v.lone_click_multimask)
                    pred = (logits_to_canvas(low.float()) > 0) & valid
                    yield batch, kind, batch_dice(pred, target)  # (B,), NaN for empty targets
    finally:
        sam.train(was_training)


def dice_sums(sam: Sam, v: Validation) -> dict[str, tuple[float, int]]:
    """Sum and count of per-item Dice, per prompt kind, over ``v.loader`` (deterministic prompts).

    Sums rather than means so that DDP ranks can add theirs (MONAI's own ``aggregate`` would gather across
    ranks by itself, which only works when every rank validates). :func:`item_dices` gives the same values
    item by item.
    """
    sums = {k: [0.0, 0] for k in v.kinds}
    for _, kind, per_item in _batch_dices(sam, v):
        ok = ~torch.isnan(per_item)
        sums[kind][0] += float(per_item[ok].sum())
        sums[kind][1] += int(ok.sum())
    return {k: (total, int(n)) for k, (total, n) in sums.items()}


def item_dices(sam: Sam, v: Validation) -> list[ItemDice]:
    """The Dice of every item of ``v.loader`` for every prompt kind, item by item (what :func:`dice_sums`
    adds up): per-label means and paired tests before/after training are made from these."""
    out: list[ItemDice] = []
    for batch, kind, per_item in _batch_dices(sam, v):
        keys = zip(batch["case"], batch["slice_index"].tolist(), batch["label"].tolist(), strict=True)
        for (case, k, label), dice in zip(keys, per_item.tolist(), strict=True):
            out.append(ItemDice(str(case), int(k), int(label), kind, float(dice)))
    return out


def mean_dice(sums: dict[str, tuple[float, int]]) -> dict[str, float]:
    """``{kind: mean Dice}`` plus ``"mean"``, the mean over kinds (0 for a kind with no item)."""
    out = {k: (s / n if n else 0.0) for k, (s, n) in sums.items()}
    out["mean"] = float(sum(out.values()) / len(out))
    return out


def validate(sam: Sam, v: Validation, dist: DistInfo | None = None) -> dict[str, float]:
    """Mean Dice per prompt kind over ``v.loader``, plus ``"mean"``. Under DDP (``dist``) each rank scores
    its share of the items and the sums are added over ranks."""
    sums = dice_sums(sam, v)
    if dist is not None and dist.distributed:
        values = sum_over_ranks([x for k in v.kinds for x in sums[k]], dist, v.device)
        sums = {k: (values[2 * i], int(values[2 * i + 1])) for i, k in enumerate(v.kinds)}
    return mean_dice(sums)
