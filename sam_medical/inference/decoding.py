"""From canvas prompts to one mask each: the multimask rule, the choice among SAM's three masks, batching.

Serving (:class:`~sam_medical.inference.predictor.VolumePredictor`) and evaluation decode through
:func:`sam_medical.inference.strategies.decode_prompts`; the engines (:mod:`sam_medical.inference.engines`) run the decoder itself.

Conventions:

* prompts are on the ``256 x 256`` canvas (:mod:`sam_medical.canvas.geometry`): a point is ``(x, y)`` =
  (column, row), a box ``(x0, y0, x1, y1)``, both in canvas pixels; point labels are 1 (foreground) or
  0 (background);
* ``L`` is the side of the low-resolution logits (:func:`sam_medical.model.forward.low_res_size`), ``C``
  the embedding width and ``h x w`` the embedding grid; ``P`` prompts, ``M`` masks per prompt (1 or 3);
* the multimask rule (:data:`MULTIMASK_RULES`, the ``multimask`` setting everywhere):
  ``"auto"``: SAM's three masks only for a lone click (one point, no box, no mask input), the app's
  served rule; ``"on"``: three masks for every prompt; ``"off"``: SAM's single-mask output (as trained).
  Of three masks, :func:`choose_mask` keeps the one with the highest predicted IoU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sam_medical.errors import UserInputError
from sam_medical.model.forward import CANVAS_SIZE, PromptBatch, logits_to_canvas

if TYPE_CHECKING:
    from sam_medical.inference.engines import Engine

#: Values of the ``multimask`` setting (see the module docstring).
MULTIMASK_RULES: tuple[str, ...] = ("auto", "on", "off")
#: Older spellings still accepted: booleans and the app's former ``--conf multimask false``.
_MULTIMASK_ALIASES = {"true": "on", "false": "off"}
#: The decoding strategy of a prompt: decode it as it is.
DIRECT = "direct"


def check_multimask(value: Any, option: str = "multimask") -> str:
    """The rule name of ``value``: one of :data:`MULTIMASK_RULES` (any case), or ``True`` -> ``"on"``,
    ``False`` -> ``"off"`` (also the strings ``"true"``/``"false"``).

    Raises:
        UserInputError: anything else, naming ``option`` and listing the rules.
    """
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).strip().lower()
    text = _MULTIMASK_ALIASES.get(text, text)
    if text not in MULTIMASK_RULES:
        raise UserInputError(f"{option} must be one of {', '.join(MULTIMASK_RULES)}, got {value!r}")
    return text


@dataclass(frozen=True)
class CanvasPrompt:
    """One prompt on one canvas.

    Attributes:
        points: ``(N, 2)`` float canvas ``(x, y)``, or None.
        point_labels: ``(N,)`` int, 1 foreground / 0 background; given exactly when ``points`` is.
        box: ``(4,)`` canvas ``(x0, y0, x1, y1)``, or None.
        mask_input: ``(1, 1, L, L)`` torch logits of an earlier prediction, or None.
        strategy: how to decode it (a key of :data:`sam_medical.inference.strategies.STRATEGIES`;
            :data:`DIRECT` by default).
        image: ``(256, 256)`` canvas intensities (0-255) of the slice, for strategies that read the image
            (:mod:`sam_medical.inference.click_to_box`), or None.
    """

    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask_input: torch.Tensor | None = None
    strategy: str = DIRECT
    image: np.ndarray | None = None

    @property
    def n_points(self) -> int:
        return 0 if self.points is None else len(self.points)

    def is_lone_click(self) -> bool:
        """One point, no box, no mask input: the prompt SAM answers with three masks under ``"auto"``."""
        return self.n_points == 1 and self.box is None and self.mask_input is None


@dataclass
class Decoded:
    """The answer to one :class:`CanvasPrompt`.

    Attributes:
        low_res_logits: ``(1, 1, L, L)`` float32 CPU tensor (e.g. a later prompt's ``mask_input``).
        iou: the decoder's predicted IoU of that mask.
        multimask: whether it was chosen among SAM's three masks.
        strategy: the strategy that decoded it (:data:`DIRECT`, or ``"click_to_box"``).
        box: ``(4,)`` canvas box prompt that produced the mask when a strategy chose one, else None.
        candidates: how many prompts the strategy decoded to answer this one (1 for :data:`DIRECT`).
    """

    low_res_logits: torch.Tensor
    iou: float
    multimask: bool
    strategy: str = DIRECT
    box: np.ndarray | None = None
    candidates: int = 1


def wants_multimask(rule: str, prompt: CanvasPrompt) -> bool:
    """Whether ``prompt`` is decoded to three masks under ``rule`` (one of :data:`MULTIMASK_RULES`)."""
    return rule == "on" or (rule == "auto" and prompt.is_lone_click())


def choose_mask(low_res: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one mask per prompt: ``low_res (P, M, L, L)``, ``iou (P, M)`` -> ``(P, 1, L, L)``, ``(P,)``.

    ``M == 1`` passes through; otherwise the mask with the highest predicted IoU (the first one on ties).
    """
    if low_res.shape[1] == 1:
        return low_res, iou[:, 0]
    best = iou.argmax(dim=1)
    rows = torch.arange(low_res.shape[0], device=low_res.device)
    return low_res[rows, best].unsqueeze(1), iou[rows, best]


def stack_prompts(prompts: Sequence[CanvasPrompt], multimask_output: bool) -> PromptBatch:
    """Prompts of one shape (the same parts, the same number of points) -> one ``Engine.decode``
    :class:`~sam_medical.model.forward.PromptBatch`: ``points (P, N, 2)`` float32 and ``point_labels (P, N)``
    int64, ``boxes (P, 4)`` float32, ``mask_inputs (P, 1, L, L)`` float32, all on the CPU, canvas pixels."""
    first = prompts[0]
    parts: dict[str, torch.Tensor] = {}
    if first.points is not None:
        points = np.stack([np.asarray(p.points, np.float32).reshape(-1, 2) for p in prompts])
        labels = np.stack([np.asarray(p.point_labels, np.int64).reshape(-1) for p in prompts])
        if labels.shape != points.shape[:2]:
            raise ValueError(f"point_labels {labels.shape[1:]} do not match points {points.shape[1:]}")
        parts["points"] = torch.from_numpy(points)
        parts["point_labels"] = torch.from_numpy(labels)
    if first.box is not None:
        parts["boxes"] = torch.from_numpy(
            np.stack([np.asarray(p.box, np.float32).reshape(4) for p in prompts])
        )
    if first.mask_input is not None:
        parts["mask_inputs"] = torch.cat([p.mask_input.float().cpu() for p in prompts])
    return PromptBatch(**parts, multimask_output=multimask_output)


def decode_direct(
    engine: Engine, embedding: torch.Tensor, prompts: Sequence[CanvasPrompt], rule: str, batch: int
) -> list[Decoded]:
    """The :data:`DIRECT` strategy: each prompt as it is, prompts of one shape (box or not, number of
    points, mask input or not, multimask or not) in one ``engine.decode`` call per ``batch`` of them."""
    groups: dict[tuple[bool, int, bool, bool], list[int]] = {}
    for i, p in enumerate(prompts):
        key = (p.box is not None, p.n_points, p.mask_input is not None, wants_multimask(rule, p))
        groups.setdefault(key, []).append(i)
    out: list[Decoded | None] = [None] * len(prompts)
    step = max(1, int(batch))
    with torch.inference_mode():
        for (_, _, _, multi), idx in groups.items():
            for start in range(0, len(idx), step):
                chunk = idx[start : start + step]
                low, iou = engine.decode(embedding, stack_prompts([prompts[i] for i in chunk], multi))
                low, iou = choose_mask(low.float().cpu(), iou.float().cpu())
                for row, i in enumerate(chunk):
                    out[i] = Decoded(low[row : row + 1].clone(), float(iou[row]), multi, DIRECT)
    return [d for d in out if d is not None]


def canvas_logits(decoded: Decoded | Sequence[Decoded]) -> np.ndarray:
    """Canvas logits of one answer ``(256, 256)``, or of several ``(P, 256, 256)``, float32 (bilinear from
    the low-resolution logits, :func:`sam_medical.model.forward.logits_to_canvas`; mask = logits > 0)."""
    if isinstance(decoded, Decoded):
        return logits_to_canvas(decoded.low_res_logits)[0, 0].float().numpy()
    if not decoded:
        return np.zeros((0, CANVAS_SIZE, CANVAS_SIZE), np.float32)
    low = torch.cat([d.low_res_logits for d in decoded])[:, 0]  # (P, L, L)
    return logits_to_canvas(low).float().numpy()
