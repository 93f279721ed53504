"""What a training run achieved, said plainly: the verdict, Dice per label, the paired gain, the publish rule.

* **Learned** means that some epoch's validation Dice was *strictly* higher than the starting model's
  (epoch 0, validated before the first step): then ``best_epoch > 0`` and ``adapter.pt`` is that epoch's.
  Otherwise the run learned nothing and ``adapter.pt`` is the starting model, whatever the loss did; the
  verdict says so in words: ``nothing learned: best epoch 0, validation Dice 0.941 -> 0.941``.
* **Per label**: the best adapter's validation Dice of each label value, under its name
  (:mod:`sam_medical.volume.label_names`).
* **Paired gain**: the starting model and the best adapter are scored item by item on the same
  validation items and prompts (:func:`sam_medical.training.validation.item_dices`; an item's Dice is the mean over
  the prompt kinds validated), and the differences are tested with a one-sided Wilcoxon signed-rank
  test (best > start).
* **Publishing** (:func:`publish_decision`): ``if_better`` publishes only a gain of at least a margin
  that, when there are enough paired items, is also significant; ``always`` publishes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sam_medical.adapters.save_and_load import load_adapter
from sam_medical.errors import UserInputError
from sam_medical.metrics import paired_comparison
from sam_medical.model.build import build_sam
from sam_medical.training.config import TrainConfig
from sam_medical.training.distributed import DistInfo, barrier, gather_lists
from sam_medical.training.validation import ItemDice, Validation, item_dices
from sam_medical.volume.label_names import files_label_names, label_key

#: A validation gain below this (Dice) is within noise: the default publish margin, named in verdicts.
NOISE_MARGIN = 0.005
#: Default significance level of the publish test.
DEFAULT_ALPHA = 0.05
#: Fewer paired validation items than this: no test (the margin alone decides).
DEFAULT_MIN_ITEMS = 6
PAIRED_TEST = "one-sided Wilcoxon signed-rank (best adapter > starting model), zero differences dropped"

ItemKey = tuple[str, int, int]


def item_means(items: Sequence[ItemDice]) -> dict[ItemKey, float]:
    """``{(case, slice index, label): Dice}``, the mean over the prompt kinds of each item (NaN dropped)."""
    sums: dict[ItemKey, list[float]] = {}
    for it in items:
        if math.isfinite(it.dice):
            sums.setdefault((it.case, it.slice_index, it.label), []).append(it.dice)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def per_label(means: Mapping[ItemKey, float], by_value: Mapping[int, str]) -> dict[str, float]:
    """Mean Dice per label value, keyed by the label's name (``label N`` without one), in value order."""
    groups: dict[int, list[float]] = {}
    for (_, _, label), dice in means.items():
        groups.setdefault(label, []).append(dice)
    return {label_key(v, by_value): sum(d) / len(d) for v, d in sorted(groups.items())}


def paired_gain(start: Mapping[ItemKey, float], best: Mapping[ItemKey, float]) -> dict[str, Any]:
    """The paired comparison of the best adapter with the starting model over the items both scored."""
    keys = sorted(set(start) & set(best))
    a, b = [best[k] for k in keys], [start[k] for k in keys]
    out = paired_comparison(a, b, alternative="greater")
    out["mean_initial"] = sum(b) / len(b) if b else None
    out["mean_best"] = sum(a) / len(a) if a else None
    out["test"] = PAIRED_TEST
    return out


def verdict(
    *,
    initial: float | None,
    best: float | None,
    best_epoch: int,
    final: float | None,
    stopped_early: bool,
    steps: int,
    val_on_train: bool,
    paired: Mapping[str, Any] | None = None,
) -> tuple[bool, str]:
    """``(learned, one sentence)``: did any epoch beat the starting model's validation Dice, and by how much."""

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    learned = best_epoch > 0 and initial is not None and best is not None and best > initial
    details: list[str] = []
    if learned:
        gain = float(best) - float(initial)  # type: ignore[arg-type]
        details.append(f"+{gain:.4f}")
        if paired and paired.get("wilcoxon_p") is not None:
            details.append(f"one-sided Wilcoxon p = {paired['wilcoxon_p']:.3g} over {paired['n']} items")
        if gain < NOISE_MARGIN:
            details.append(f"a gain below {NOISE_MARGIN} is within noise")
        if stopped_early:
            details.append(f"stopped early at step {steps}")
    else:
        if final is not None:
            details.append(f"last epoch {f(final)}; no epoch beat the starting model")
        elif stopped_early:
            details.append(f"stopped at step {steps}, before the first epoch was validated")
        else:
            details.append("no epoch was validated")
        details.append("adapter.pt is the starting model")
    if val_on_train:
        details.append("validated on the training cases")
    word = "learned" if learned else "nothing learned"
    return (
        learned,
        f"{word}: best epoch {best_epoch}, validation Dice {f(initial)} -> {f(best)} ({'; '.join(details)})",
    )


def score_start_and_best(
    config: TrainConfig, adapter: Path, validation: Validation, dist: DistInfo, *, score_start: bool
) -> tuple[dict[ItemKey, float] | None, dict[ItemKey, float]]:
    """Per-item validation Dice of the starting model (base + ``--adapter-init``; when ``score_start``)
    and of ``adapter`` (the best), on ``validation``'s items: one freshly built model in eval mode, scored
    as the starting model, then with ``adapter`` loaded (the trained model is not touched).

    ``validation.features``: a :class:`~sam_medical.training.feature_cache.FeatureCache` whose entries hold
    what the base encoder computes (embedding mode only: a stem cache's trunk belongs to the trained
    model), or None. Under DDP each rank scores its share and the items are gathered on every rank.
    """
    barrier(dist)  # rank 0 may still be writing the last best adapter
    model, base_info = build_sam(config.model, **config.model_kwargs())
    if config.adapter_init:
        load_adapter(model, config.adapter_init, base_info=base_info)

    def score() -> dict[ItemKey, float]:
        model.to(validation.device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return item_means(gather_lists(item_dices(model, validation), dist))

    with torch.no_grad():
        start_means = score() if score_start else None
        load_adapter(model, adapter, base_info=base_info)
        best_means = score()
    return start_means, best_means


def run_outcome(
    config: TrainConfig,
    *,
    adapter: Path,
    case_files: Sequence[Path],
    validation: Validation,
    dist: DistInfo,
    initial: float | None,
    best: float,
    best_epoch: int,
    final: float | None,
    stopped_early: bool,
    steps: int,
    val_on_train: bool,
) -> dict[str, Any]:
    """The summary's outcome fields: ``learned``, ``verdict``, ``val_dice_gain``, ``label_names``,
    ``val_dice_per_label``, ``initial_val_dice_per_label`` and ``paired`` (the best adapter against the
    starting model item by item, both scored again by :func:`score_start_and_best` on ``validation``).
    """
    by_value = files_label_names(case_files)
    start = best_items = None
    if adapter.is_file() or dist.distributed:
        start, best_items = score_start_and_best(
            config, adapter, validation, dist, score_start=best_epoch > 0
        )
    paired = paired_gain(start, best_items) if start is not None and best_items is not None else None
    learned, text = verdict(
        initial=initial,
        best=best,
        best_epoch=max(best_epoch, 0),
        final=final,
        stopped_early=stopped_early,
        steps=steps,
        val_on_train=val_on_train,
        paired=paired,
    )
    return {
        "learned": learned,
        "verdict": text,
        "val_dice_gain": best - initial if initial is not None else None,
        "label_names": {str(v): n for v, n in by_value.items()},
        "val_dice_per_label": per_label(best_items, by_value) if best_items else {},
        "initial_val_dice_per_label": per_label(start if start is not None else best_items or {}, by_value),
        "paired": paired,
    }


# --- publishing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishRule:
    """When ``publish=if_better`` publishes: a validation Dice gain of at least ``margin`` and, with at
    least ``min_items`` paired validation items, a one-sided Wilcoxon p-value below ``alpha``."""

    margin: float = NOISE_MARGIN
    alpha: float = DEFAULT_ALPHA
    min_items: int = DEFAULT_MIN_ITEMS

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin) and 0.0 <= self.margin <= 1.0):
            raise UserInputError(f"publish_margin must be in [0, 1], got {self.margin}")
        if not (math.isfinite(self.alpha) and 0.0 < self.alpha <= 1.0):
            raise UserInputError(f"publish_alpha must be in (0, 1], got {self.alpha}")
        if self.min_items < 1:
            raise UserInputError(f"publish_min_items must be >= 1, got {self.min_items}")


def publish_decision(summary: Mapping[str, Any], policy: str, rule: PublishRule) -> dict[str, Any]:
    """Whether a run's adapter is published, why, and the numbers (for the train status).

    ``summary``: the run's summary (:func:`sam_medical.training.trainer.train`). The gain is the paired mean
    difference over the validation items when the summary has one (``paired``), else best minus initial
    validation Dice. ``policy``: ``if_better`` or ``always``.

    Returns:
        ``{"published", "reason", "policy", "gain", "initial", "best", "margin", "alpha", "min_items",
        "n", "p_value", "test"}``.
    """
    initial, best = summary.get("initial_val_dice"), summary.get("best_val_dice")
    paired = summary.get("paired") or None
    learned = bool(summary.get("learned", int(summary.get("best_epoch") or 0) > 0))
    if paired and paired.get("mean_diff") is not None:
        gain, n, p = float(paired["mean_diff"]), int(paired["n"]), paired.get("wilcoxon_p")
    else:
        gain = float(best) - float(initial) if best is not None and initial is not None else 0.0
        n, p = int(summary.get("val_items") or 0), None
    out: dict[str, Any] = {
        "policy": policy,
        "gain": gain,
        "initial": initial,
        "best": best,
        "n": n,
        "p_value": p,
        "test": PAIRED_TEST if p is not None else None,
        **asdict(rule),
    }
    numbers = f"validation Dice {_f(initial)} -> {_f(best)} ({gain:+.4f} over {n} items"
    numbers += f", one-sided Wilcoxon p = {p:.3g})" if p is not None else ")"
    if policy == "always":
        return {**out, "published": True, "reason": f"published (publish=always): {numbers}"}
    if not learned:
        why = f"nothing learned, no epoch beat the starting model: {numbers}"
    elif gain < rule.margin:
        why = f"the gain is below the margin {rule.margin} (publish_margin): {numbers}"
    elif n >= rule.min_items and (p is None or p >= rule.alpha):
        why = f"the gain is not significant at alpha {rule.alpha} (publish_alpha): {numbers}"
    else:
        test = (
            f"significant at alpha {rule.alpha}"
            if n >= rule.min_items
            else f"no significance test with fewer than {rule.min_items} items (publish_min_items)"
        )
        return {
            **out,
            "published": True,
            "reason": f"published: the gain is at least the margin {rule.margin} and {test}: {numbers}",
        }
    return {**out, "published": False, "reason": f"not published: {why}; publish=always publishes anyway"}


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.4f}"
