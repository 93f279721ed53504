"""The LoRA layer: :class:`LoRAQKV` wraps an attention block's fused ``qkv`` projection (SAMed's recipe).

Both encoder families compute ``q, k, v`` with one fused linear layer (``attn.qkv``), so PEFT cannot target
q and v alone. :class:`LoRAQKV` replaces that layer, keeping its weight and bias as they are (same
parameters, same state-dict names) and adding two low-rank updates to exactly the q rows and the v rows
of its output::

    qkv = x W^T + b;   qkv[q_rows] += s * B_q A_q x;   qkv[v_rows] += s * B_v A_v x;   s = alpha / r

with ``A (r, in)`` Kaiming-uniform and ``B (rows, r)`` zero, so a fresh adapter leaves the model unchanged.
Which rows are q and v is the family's business (:class:`LoRATarget`, made by the function that
:mod:`sam_medical.model.registry` names for each family):

* ViT: q, k, v in thirds: ``12 blocks * 2 * (4*768 + 768*4) = 147,456`` parameters for ViT-B at rank 4;
* TinyViT (LiteMedSAM): interleaved head by head; 10 attention blocks, 29,696 parameters at rank 4.

This module is PEFT's ``tuners/lora/layer.py``; the model-level operations are in
:mod:`sam_medical.adapters.inject`, the files in :mod:`sam_medical.adapters.files`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LoRATarget:
    """One attention layer LoRA adapts: ``owner.qkv`` is the fused projection; ``q_rows`` and ``v_rows``
    are the indices of its output features that are queries and values."""

    owner: nn.Module
    q_rows: Sequence[int]
    v_rows: Sequence[int]


class LoRAQKV(nn.Module):
    """A fused ``qkv`` linear layer ``in -> out`` with LoRA updates on its q rows and v rows.

    ``weight (out, in)`` and ``bias (out,)`` are the base layer's own parameters (shared, not copied),
    so the state-dict names of the base weights do not change. The adapters are ``lora_q_A``/``lora_v_A``
    (``nn.Linear(in, r)``, weight ``(r, in)``) and ``lora_q_B``/``lora_v_B`` (``nn.Linear(r, len(rows))``,
    weight ``(len(rows), r)``), all without bias. The row indices are non-persistent buffers (they come
    from the architecture, not from files).

    Input ``(..., in)``, output ``(..., out)``.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        generator: torch.Generator | None = None,
        *,
        q_rows: Sequence[int] | None = None,
        v_rows: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        dim, out = base.in_features, base.out_features
        if q_rows is None and v_rows is None:  # SAM's ViT layout: q, k, v in thirds
            if out != 3 * dim:
                raise ValueError(f"expected a fused qkv layer dim -> 3*dim, got {dim} -> {out}")
            q_rows, v_rows = range(0, dim), range(2 * dim, 3 * dim)
        q_idx = torch.as_tensor(list(q_rows), dtype=torch.long)
        v_idx = torch.as_tensor(list(v_rows), dtype=torch.long)
        if (
            not len(q_idx)
            or not len(v_idx)
            or int(torch.cat([q_idx, v_idx]).min()) < 0
            or int(torch.cat([q_idx, v_idx]).max()) >= out
            or len(set(q_idx.tolist()) | set(v_idx.tolist())) != len(q_idx) + len(v_idx)
        ):
            raise ValueError(f"q and v rows must be distinct indices in 0..{out - 1}")
        self.dim = dim
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.weight = base.weight
        self.bias = base.bias
        self.register_buffer("q_rows", q_idx, persistent=False)
        self.register_buffer("v_rows", v_idx, persistent=False)
        self.lora_q_A = nn.Linear(dim, rank, bias=False)
        self.lora_q_B = nn.Linear(rank, len(q_idx), bias=False)
        self.lora_v_A = nn.Linear(dim, rank, bias=False)
        self.lora_v_B = nn.Linear(rank, len(v_idx), bias=False)
        self.merged = False
        self.reset_lora_parameters(generator)
        self.to(device=base.weight.device, dtype=base.weight.dtype)

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return self.alpha / self.rank

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A: Kaiming-uniform (``a = sqrt(5)``, as LoRA/PEFT); B: zeros. Unmerges first."""
        self.unmerge()
        for a in (self.lora_q_A, self.lora_v_A):
            w = torch.empty(a.weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
            a.weight.copy_(w)
        nn.init.zeros_(self.lora_q_B.weight)
        nn.init.zeros_(self.lora_v_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update ``(out, in)`` that :meth:`merge` adds to ``weight`` (zero outside the q and v rows)."""
        delta = torch.zeros_like(self.weight)
        delta[self.q_rows] = (self.lora_q_B.weight @ self.lora_q_A.weight).to(delta.dtype)
        delta[self.v_rows] = (self.lora_v_B.weight @ self.lora_v_A.weight).to(delta.dtype)
        return delta * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.weight, self.bias)
        if self.merged:
            return qkv
        dq = self.lora_q_B(self.lora_q_A(x)) * self.scale
        dv = self.lora_v_B(self.lora_v_A(x)) * self.scale
        return qkv.index_add(-1, self.q_rows, dq.to(qkv.dtype)).index_add(-1, self.v_rows, dv.to(qkv.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the updates into ``weight`` (inference speed); :meth:`forward` then skips them."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the updates back out of ``weight`` (up to float rounding)."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in={self.dim}, out={self.weight.shape[0]}, q_rows={len(self.q_rows)}, "
            f"v_rows={len(self.v_rows)}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"
        )
