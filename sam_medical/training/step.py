"""One training micro-batch: prompts in, loss out, gradients accumulated.

The loss is MONAI ``DiceCELoss(sigmoid=True)`` (SAMed's 0.8 Dice + 0.2 cross-entropy by default) on the
decoder's **low-resolution** logits ``(B, 1, L, L)`` (``L = S/4`` for ViT SAM, 256 for LiteMedSAM). The
binary canvas target ``(B, 1, 256, 256)`` is brought to ``L`` by *area averaging*: each low-res target
pixel is the fraction of its footprint covered by the object, a soft target in ``[0, 1]``, so a structure
thinner than one low-res pixel still pulls the logits up instead of vanishing as it would with
nearest-neighbour resizing. (At ``S = 1024`` the low-res grid is the canvas itself: the target is unchanged.)

:func:`build_module` makes what :func:`train_step` runs: :class:`~sam_medical.training.prompted_sam.PromptedSam`
(each item's fixed prompt from the data set, today's recipe) or, with ``click_rounds`` > 0,
:class:`~sam_medical.training.interactive_sam.InteractiveSam` (interactive training in click rounds, which
computes its own loss: Dice+CE per mask, best of three for a lone click, plus the IoU head's error).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from sam_medical.training.click_rounds import valid_region
from sam_medical.training.config import TrainConfig
from sam_medical.training.interactive_sam import InteractiveSam, ItemDiceCE
from sam_medical.training.optim import autocast
from sam_medical.training.prompted_sam import PromptedSam, batch_keys


def make_loss(cfg: TrainConfig, per_item: bool = False) -> nn.Module:
    """MONAI's Dice + binary cross-entropy on logits, weighted by ``dice_weight`` and ``ce_weight``: a
    ``DiceCELoss`` (one value for the batch), or with ``per_item`` an
    :class:`~sam_medical.training.interactive_sam.ItemDiceCE` (one per item, what click rounds score)."""
    if per_item:
        return ItemDiceCE(cfg.dice_weight, cfg.ce_weight)
    return DiceCELoss(sigmoid=True, lambda_dice=cfg.dice_weight, lambda_ce=cfg.ce_weight)


def build_module(cfg: TrainConfig, sam: nn.Module, features: Any = None) -> nn.Module:
    """The module a run trains (what DDP wraps): click rounds when ``cfg.click_rounds`` > 0, else each
    item's fixed prompt. ``features``: a :class:`~sam_medical.training.feature_cache.FeatureCache` or None."""
    if cfg.click_rounds > 0:
        return InteractiveSam(
            sam,
            make_loss(cfg, per_item=True),
            rounds=cfg.click_rounds,
            iou_weight=cfg.iou_weight,
            first_click_prob=cfg.first_click_prob,
            box_jitter=cfg.box_jitter,
            features=features,
        )
    return PromptedSam(sam, features)


def _interactive(module: nn.Module) -> bool:
    """Whether ``module`` (or the module DDP wraps) trains in click rounds."""
    return isinstance(getattr(module, "module", module), InteractiveSam)


def area_target(target: torch.Tensor, size: int) -> torch.Tensor:
    """Binary canvas target ``(B, 1, 256, 256)`` -> soft target ``(B, 1, size, size)`` by area averaging.

    Each output pixel is the covered fraction of its footprint (see the module docstring).
    """
    if target.shape[-1] == size:
        return target
    return F.interpolate(target, size=(size, size), mode="area")


def train_step(
    module: nn.Module,
    batch: dict[str, Any],
    loss_fn: nn.Module,
    scaler: torch.amp.GradScaler,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    scale: float = 1.0,
    sync: bool = True,
) -> float:
    """Forward and backward of one micro-batch; returns its (unscaled) loss.

    Args:
        module: from :func:`build_module`, or DDP around it; an
            :class:`~sam_medical.training.interactive_sam.InteractiveSam` computes its own loss (``loss_fn``
            is then unused).
        batch: a collated :class:`~sam_medical.training.dataset.NpzSliceDataset` batch: ``image (B,256,256,3)``
            uint8 canvases, ``target (B,1,256,256)``, ``points (B,P,2)`` canvas ``[x, y]``,
            ``point_labels (B,P)``, ``box (B,4)``, ``has_box (B,)``, ``valid_hw (B,2)``, ``case_uid``,
            ``slice_index``.
        scale: the loss factor, 1 / the number of micro-batches accumulated into one optimiser step.
        sync: False while accumulating under DDP (``no_sync``: the gradients are reduced on the last one).
    """
    image = batch["image"].to(device, non_blocking=True)
    target = batch["target"].to(device, non_blocking=True)
    no_sync = module.no_sync() if not sync and hasattr(module, "no_sync") else contextlib.nullcontext()
    if _interactive(module):
        valid = valid_region(batch["valid_hw"], target.shape[-1], device)[:, None]
        with no_sync:
            with autocast(device, amp_dtype):
                loss = module(image, target, valid, batch_keys(batch))
            scaler.scale(loss * scale).backward()
        return float(loss.detach())
    args = (
        image,
        batch["points"].to(device),
        batch["point_labels"].to(device),
        batch["box"].to(device),
        batch["has_box"].to(device),
        batch_keys(batch),
    )
    with no_sync:
        with autocast(device, amp_dtype):
            low = module(*args)
        low = low.float()
        loss = loss_fn(low, area_target(target, low.shape[-1]))
        scaler.scale(loss * scale).backward()
    return float(loss.detach())
