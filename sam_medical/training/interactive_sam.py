"""Interactive training, as SAM trains (issue 18): several prompt rounds per item, one module DDP wraps.

For each batch the image embeddings are computed once, then ``rounds`` decoder rounds run on them:

1. the first prompt is a jittered box or one click drawn uniformly inside the object, about half each
   (:func:`sam_medical.training.click_rounds.first_prompts`);
2. each next round adds one click drawn uniformly in the error region of the previous prediction (a miss:
   foreground, a leak: background; :func:`~sam_medical.training.click_rounds.corrective_clicks`), and the
   previous low-resolution logits go back in, detached, as the mask prompt;
3. a lone click asks for SAM's three masks (mask tokens 1..3) and only the best (minimum-loss) mask's
   loss is backpropagated; the mask fed back and clicked on is the one the served rule picks (the highest
   predicted IoU, :func:`sam_medical.inference.decoding.choose_mask`);
4. the IoU head learns the true IoU of every mask it scored (MSE, weight ``iou_weight``).

The loss of a round is the mean over items of MONAI's Dice+CE of the mask (on the low-resolution logits
against the area-averaged target, :func:`sam_medical.training.step.area_target`) plus ``iou_weight`` times
the IoU error; the loss of the batch is the mean over rounds. Prompts are decoded through
:func:`sam_medical.model.forward.decode` (hence ``predict_masks_paired``), each group of items of one
shape (box or not, number of clicks) as a user's prompt of that shape is decoded at serving time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from sam_medical.inference.decoding import choose_mask
from sam_medical.model.forward import PromptBatch, decode, logits_to_canvas
from sam_medical.training.click_rounds import RoundPrompts, corrective_clicks, first_prompts, true_iou
from sam_medical.training.prompted_sam import embed

if TYPE_CHECKING:
    from segment_anything.modeling import Sam


class ItemDiceCE(nn.Module):
    """MONAI's ``DiceCELoss(sigmoid=True)`` per item: ``(N, 1, L, L)`` logits and targets -> ``(N,)``.

    ``lambda_dice`` x MONAI's ``DiceLoss(sigmoid=True, reduction="none")`` plus ``lambda_ce`` x the mean
    binary cross-entropy of the item. (``DiceCELoss`` itself reduces over the batch only.) Every item has
    as many pixels, so the mean over items is ``DiceCELoss``'s value.
    """

    def __init__(self, lambda_dice: float, lambda_ce: float) -> None:
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, reduction="none")
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dice = self.dice(logits, target).flatten(1).mean(dim=1)
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(dim=1)
        return self.lambda_dice * dice + self.lambda_ce * ce


def item_losses(loss_fn: nn.Module, logits: torch.Tensor, soft_target: torch.Tensor) -> torch.Tensor:
    """Per-mask loss ``(n, M)`` of logits ``(n, M, L, L)`` against ``soft_target (n, 1, L, L)``; each mask
    is scored as its own item by ``loss_fn`` (an :class:`ItemDiceCE`)."""
    n, m, size, _ = logits.shape
    flat = logits.reshape(n * m, 1, size, size)
    target = soft_target.expand(n, m, size, size).reshape(n * m, 1, size, size)
    return loss_fn(flat, target).reshape(n, m)


def round_losses(
    loss_fn: nn.Module,
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The losses of one group of items at one round.

    Args:
        logits: ``(n, M, L, L)`` low-resolution logits (``M`` = 3 for a lone click, else 1), float32.
        iou_pred: ``(n, M)`` the IoU head's predictions.
        target: ``(n, 1, 256, 256)`` float 0/1 canvas target; ``valid (n, 1, 256, 256)`` bool image region.

    Returns:
        ``mask_loss (n,)``: the minimum over the ``M`` masks of the Dice+CE loss; ``iou_loss (n,)``: the
        mean over masks of ``(iou_pred - true IoU)^2``; ``iou (n, M)``: the true IoU of each mask on the
        canvas (``logits_to_canvas(logits) > 0`` inside ``valid``), without gradient.
    """
    per_mask = item_losses(loss_fn, logits, F.interpolate(target, size=logits.shape[-2:], mode="area"))
    with torch.no_grad():
        pred = (logits_to_canvas(logits.detach()) > 0) & valid
        iou = true_iou(pred, target > 0.5)
    iou_loss = ((iou_pred.float() - iou) ** 2).mean(dim=1)
    return per_mask.min(dim=1).values, iou_loss, iou


def decode_groups(
    sam: Sam, embeddings: torch.Tensor, prompts: RoundPrompts, mask_inputs: torch.Tensor | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(idx, logits (n, M, L, L), iou_pred (n, M))`` per group of items with one prompt shape.

    Clicks are cut to the group's real number (no ``-1`` padding), ``boxes`` given only where the group
    has a box, ``mask_inputs (B, 1, L, L)`` (or None) fed back; a lone click gets three masks.
    """
    n_points = prompts.n_points
    has_box = prompts.has_box
    for hb in (True, False):
        for n in torch.unique(n_points[has_box == hb]).tolist():
            idx = torch.nonzero((has_box == hb) & (n_points == n)).flatten()
            batch = PromptBatch(
                points=prompts.points[idx, :n] if n else None,
                point_labels=prompts.point_labels[idx, :n] if n else None,
                boxes=prompts.boxes[idx] if hb else None,
                mask_inputs=None if mask_inputs is None else mask_inputs[idx],
                multimask_output=not hb and n == 1,
            )
            logits, iou_pred = decode(sam, embeddings[idx], batch)
            yield idx, logits, iou_pred


class InteractiveSam(nn.Module):
    """SAM trained in click rounds: ``forward(image, target, valid, keys)`` -> the batch's loss (a scalar).

    ``image (B, 256, 256, 3)`` uint8 canvases, ``target (B, 1, 256, 256)`` float 0/1, ``valid (B, 1, 256,
    256)`` bool (the image region), ``keys``: one ``(case, slice index)`` per image for the feature cache.
    ``loss_fn``: an :class:`ItemDiceCE`. After a forward, ``last_rounds``
    holds per round ``{"loss", "iou", "mask_fed_back"}`` (plain floats and bools, for logs and tests).
    """

    def __init__(
        self,
        sam: Sam,
        loss_fn: nn.Module,
        *,
        rounds: int,
        iou_weight: float,
        first_click_prob: float,
        box_jitter: int,
        features: Any = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.sam = sam
        self.loss_fn = loss_fn
        self.rounds, self.iou_weight = rounds, iou_weight
        self.first_click_prob, self.box_jitter = first_click_prob, box_jitter
        self.features = features
        self.generator = generator
        self.last_rounds: list[dict[str, Any]] = []

    def forward(
        self,
        image: torch.Tensor,
        target: torch.Tensor,
        valid: torch.Tensor,
        keys: list[tuple[str, int]] | None = None,
    ) -> torch.Tensor:
        embeddings = embed(self.sam, image, self.features, keys)
        mask = target[:, 0] > 0.5
        prompts = first_prompts(
            mask, max_jitter=self.box_jitter, click_prob=self.first_click_prob, generator=self.generator
        )
        fed_back: torch.Tensor | None = None
        total = embeddings.new_zeros((), dtype=torch.float32)
        self.last_rounds = []
        for r in range(self.rounds):
            if r:
                pred = logits_to_canvas(fed_back)[:, 0] > 0
                xy, label = corrective_clicks(pred, mask, valid[:, 0], self.generator)
                prompts = prompts.add_click(xy, label)
            loss, chosen, iou = self._round(embeddings, prompts, fed_back, target, valid)
            self.last_rounds.append(
                {
                    "loss": float(loss.detach()),
                    "iou": float(iou.mean()),
                    "mask_fed_back": fed_back is not None,
                }
            )
            total = total + loss
            fed_back = chosen
        return total / self.rounds

    def _round(
        self,
        embeddings: torch.Tensor,
        prompts: RoundPrompts,
        mask_inputs: torch.Tensor | None,
        target: torch.Tensor,
        valid: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One round: ``(mean loss over items, chosen logits (B, 1, L, L) detached, chosen true IoU (B,))``."""
        b = embeddings.shape[0]
        loss_sum = embeddings.new_zeros((), dtype=torch.float32)
        chosen: torch.Tensor | None = None
        chosen_iou = torch.zeros(b, device=embeddings.device)
        for idx, logits, iou_pred in decode_groups(self.sam, embeddings, prompts, mask_inputs):
            logits = logits.float()
            mask_loss, iou_loss, iou = round_losses(self.loss_fn, logits, iou_pred, target[idx], valid[idx])
            loss_sum = loss_sum + (mask_loss + self.iou_weight * iou_loss).sum()
            pick, _ = choose_mask(logits.detach(), iou_pred.detach())
            if chosen is None:
                chosen = logits.new_zeros((b, 1, *logits.shape[-2:]))
            chosen[idx] = pick
            best = iou_pred.detach().argmax(dim=1)
            chosen_iou[idx] = iou[torch.arange(len(idx), device=iou.device), best]
        assert chosen is not None  # every item has a prompt
        return loss_sum / b, chosen, chosen_iou
