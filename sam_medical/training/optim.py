"""The optimiser of a training run: AdamW on the trainable parameters, linear warm-up then cosine decay to
0 (``LambdaLR``), a ``GradScaler`` for fp16, and the autocast dtype (bf16 on CUDA when supported, else fp16
on CUDA, fp32 on the CPU)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from sam_medical.training.config import TrainConfig


def amp_dtype_for(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of ``precision`` (``TrainConfig.precision``) on ``device``: on CUDA, ``auto`` is
    bf16 when supported, else fp16, and ``fp32`` is None (no autocast); None (fp32) on the CPU."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``amp_dtype``, or nothing (fp32) when it is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor at optimiser step ``s``: linear warm-up ``(s+1)/warmup``, then cosine from 1 to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class Optimisation:
    """AdamW, its schedule over ``total_steps`` optimiser steps (``warmup`` of them warming up) and the
    gradient scaler (enabled for fp16 only)."""

    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    warmup: int
    total_steps: int
    lr: float

    @classmethod
    def build(
        cls, params: Iterable[torch.nn.Parameter], cfg: TrainConfig, total_steps: int, amp_dtype: Any
    ) -> Optimisation:
        """``warmup_steps=None``: 5% of ``total_steps`` (at least 1, at most ``total_steps``)."""
        optimizer = torch.optim.AdamW(list(params), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * total_steps))
        warmup = min(warmup, total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps))
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        return cls(optimizer, scheduler, scaler, warmup, total_steps, cfg.lr)

    @property
    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self) -> None:
        """One optimiser step on the accumulated (scaled) gradients, then the schedule's."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def follow_schedule_at(self, step: int) -> None:
        """After a resume: the learning rate of this run's ``lr``, warm-up and length at ``step`` (a resumed
        run may be given another ``--lr``, more ``--epochs`` or ``--max-steps``)."""
        factor = lr_lambda(self.warmup, self.total_steps)(step)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.lr
            group["lr"] = self.lr * factor
        self.scheduler.base_lrs = [self.lr for _ in self.optimizer.param_groups]
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
