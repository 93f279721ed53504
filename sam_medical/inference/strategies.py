"""Decoding strategies: how a canvas prompt becomes a mask, and :func:`decode_prompts`, the one entry point.

* :data:`~sam_medical.inference.decoding.DIRECT` (:func:`~sam_medical.inference.decoding.decode_direct`):
  the prompt as it is, SAM's answer under the ``multimask`` rule;
* :data:`~sam_medical.inference.click_to_box.CLICK_TO_BOX`: clicks answered with a box-only model's box
  skill (the click-to-box search).

Which strategy a model's clicks get is recorded, never guessed: :func:`click_strategy` reads the prompts
the weights were trained with (the registry's ``trained_prompts``, or an adapter's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from sam_medical.errors import UserInputError
from sam_medical.inference.click_to_box import CLICK_TO_BOX, decode_click_to_box
from sam_medical.inference.decoding import DIRECT, CanvasPrompt, Decoded, check_multimask, decode_direct

if TYPE_CHECKING:
    from sam_medical.inference.engines import Engine

#: ``strategy name -> function(engine, embedding, prompts, rule, batch) -> [Decoded]`` (answers in order).
STRATEGIES: dict[str, Callable[[Any, torch.Tensor, Sequence[CanvasPrompt], str, int], list[Decoded]]] = {
    DIRECT: decode_direct,
    CLICK_TO_BOX: decode_click_to_box,
}
#: Values of the ``click_strategy`` setting: ``auto`` follows the model's training prompts.
CLICK_STRATEGIES: tuple[str, ...] = ("auto", DIRECT, CLICK_TO_BOX)


def check_click_strategy(value: Any, option: str = "click_strategy") -> str:
    """``value`` (any case) if it is one of :data:`CLICK_STRATEGIES`, else a :class:`UserInputError`."""
    text = str(value).strip().lower()
    if text not in CLICK_STRATEGIES:
        raise UserInputError(f"{option} must be one of {', '.join(CLICK_STRATEGIES)}, got {value!r}")
    return text


def click_strategy(trained_prompts: Iterable[str], setting: str = "auto") -> str:
    """The strategy for clicks on a model trained with ``trained_prompts`` (e.g. ``("box",)``).

    ``auto``: :data:`CLICK_TO_BOX` for a model trained with boxes but never with points (LiteMedSAM, a
    box-only adapter), :data:`DIRECT` otherwise (SAM, click-trained adapters, untrained test models).
    Any other ``setting`` (:data:`CLICK_STRATEGIES`) is returned as it is.
    """
    setting = check_click_strategy(setting)
    if setting != "auto":
        return setting
    kinds = {str(k).strip().lower() for k in trained_prompts}
    return CLICK_TO_BOX if "box" in kinds and "point" not in kinds else DIRECT


def weights_trained_prompts(
    family_prompts: Iterable[str], random_weights: bool, adapter_meta: dict[str, Any] | None = None
) -> tuple[str, ...]:
    """The prompt kinds the served weights learned: an adapter's recorded ``trained_prompts``, else its
    model family's ``family_prompts`` (none for random weights). Serving and evaluation both ask this."""
    if adapter_meta is not None and adapter_meta.get("trained_prompts"):
        return tuple(str(k) for k in adapter_meta["trained_prompts"])
    return () if random_weights else tuple(family_prompts)


def decode_prompts(
    engine: Engine,
    embedding: torch.Tensor,
    prompts: Sequence[CanvasPrompt],
    multimask: str = "auto",
    batch: int = 32,
) -> list[Decoded]:
    """Decode ``prompts`` on one image: one :class:`Decoded` per prompt, in the prompts' order.

    Args:
        engine: runs the decoder (:class:`~sam_medical.inference.engines.Engine`: torch, ONNX, OpenVINO).
        embedding: ``(1, C, h, w)`` float32, the image's embedding from ``engine.encode``.
        prompts: canvas prompts (see :class:`CanvasPrompt`); each is decoded by its ``strategy``.
        multimask: the rule (:func:`check_multimask` values).
        batch: at most this many prompts per ``engine.decode`` call.
    """
    rule = check_multimask(multimask)
    by_strategy: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        if p.strategy not in STRATEGIES:
            raise ValueError(f"unknown decoding strategy {p.strategy!r}; known: {', '.join(STRATEGIES)}")
        by_strategy.setdefault(p.strategy, []).append(i)
    out: list[Decoded | None] = [None] * len(prompts)
    for name, idx in by_strategy.items():
        for i, d in zip(
            idx, STRATEGIES[name](engine, embedding, [prompts[i] for i in idx], rule, batch), strict=True
        ):
            out[i] = d
    return [d for d in out if d is not None]
