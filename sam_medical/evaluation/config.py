"""What an evaluation is asked to do: prompts, the models to build, data, outputs and runtime options.

Plain dataclasses checked on construction (:class:`~sam_medical.errors.UserInputError` names the CLI
option at fault). The runtime and the multimask rule are checked by the served code's own checks
(:func:`sam_medical.inference.engines.check_runtime`, :func:`sam_medical.inference.decoding.check_multimask`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sam_medical.errors import UserInputError
from sam_medical.inference.decoding import check_multimask
from sam_medical.inference.engines import check_runtime
from sam_medical.inference.strategies import check_click_strategy
from sam_medical.model.checkpoints import default_cache_dir
from sam_medical.prompts import EVAL_KINDS

#: Most corrective clicks per object (``--refine``).
MAX_REFINE = 20


@dataclass(frozen=True)
class PromptSettings:
    """How each object is prompted. ``kind``: ``box``, ``point`` or ``box+point``; ``points``: number of
    foreground clicks for point kinds; ``box_jitter``: 0 = tight box, else pixels at 256; ``seed``: base
    seed of the per-object seeds (jitter and extra clicks); ``refine``: corrective clicks after the first
    prompt (see the module docstring)."""

    kind: str = "box"
    points: int = 1
    box_jitter: int = 0
    seed: int = 0
    refine: int = 0

    def __post_init__(self) -> None:
        if self.kind not in EVAL_KINDS:
            raise UserInputError(f"--prompt must be one of {', '.join(EVAL_KINDS)}, got {self.kind!r}")
        if self.points < 1:
            raise UserInputError(f"--points must be at least 1, got {self.points}")
        if self.box_jitter < 0:
            raise UserInputError(f"--box-jitter must be >= 0, got {self.box_jitter}")
        if self.seed < 0:
            raise UserInputError(f"--seed must be >= 0, got {self.seed}")
        if (
            isinstance(self.refine, bool)
            or not isinstance(self.refine, int)
            or not 0 <= self.refine <= MAX_REFINE
        ):
            raise UserInputError(
                f"--refine must be a whole number from 0 to {MAX_REFINE}, got {self.refine!r}"
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "points": self.points if "point" in self.kind else None,
            "box_jitter": self.box_jitter if "box" in self.kind else None,
            "seed": self.seed,
            "refine": self.refine,
            "refine_rule": (
                "after the first prompt, each click goes to the centre of the largest error region (foreground "
                "in a miss, background in a leak; prompts.corrective_click on the canvas), decoded with the "
                "first prompt and all clicks so far; no mask input"
                if self.refine
                else None
            ),
            "coordinates": "256x256 canvas pixel indices (x = column j, y = row i)",
            "per_object_seed": "SeedSequence([seed, crc32(case), slice_index, label])",
            "point_rule": "first point: object pixel farthest from the boundary; others: seeded object pixels",
        }


@dataclass(frozen=True)
class ModelSpec:
    """A model to build: ``build_sam(name, image_size, checkpoint, random_weights, seed)`` plus an adapter."""

    name: str = "tiny"
    checkpoint: str | None = None
    random_weights: bool = False
    adapter: str | None = None
    image_size: int = 256
    seed: int = 0


@dataclass
class EvalConfig:
    """Everything :func:`evaluate` needs.

    ``data``: a folder of ``.npz`` files, one file, or a list of files. ``out_dir``: where slices.csv,
    summary.json, report.html (and masks/) go. ``model`` / ``baseline``: what to build when no scorer
    is passed to :func:`~sam_medical.evaluation.run.evaluate`. ``labels``: label values or names to score
    (``None``: all present). ``runtime``: what runs a built model, as served (``auto``, ``torch``, ``onnx``,
    ``openvino``); ``export_dir``: the cache of verified exports (``None``: the user cache,
    :func:`default_export_dir`). ``multimask``: the served rule picking among SAM's three masks (``auto``:
    three masks only for a lone click; ``on``; ``off``; ``True``/``False`` mean ``on``/``off``).
    ``click_strategy``: how clicks are decoded, as served (``auto``: by the weights' ``trained_prompts``,
    :func:`sam_medical.inference.strategies.click_strategy`; ``direct``; ``click_to_box``).
    ``propagate``: also score ``sam_3d`` (one prompt per object, propagated through the file's slices).
    """

    data: str | os.PathLike | Sequence[str | os.PathLike]
    out_dir: str | os.PathLike
    prompt: PromptSettings = field(default_factory=PromptSettings)
    model: ModelSpec | None = field(default_factory=ModelSpec)
    baseline: ModelSpec | None = None
    labels: tuple[int | str, ...] | None = None
    include_empty: bool = False
    save_masks: bool = False
    device: str = "auto"
    batch_prompts: int = 32
    batch_images: int = 0
    multimask: str | bool = "auto"
    click_strategy: str = "auto"
    runtime: str = "auto"
    export_dir: str | os.PathLike | None = None
    propagate: bool = False
    report: bool = True
    progress: bool = False
    examples_per_label: int = 3
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_prompts < 1:
            raise UserInputError(f"--batch-prompts must be at least 1, got {self.batch_prompts}")
        if self.batch_images < 0:
            raise UserInputError(f"--batch-images must be >= 0 (0: automatic), got {self.batch_images}")
        self.multimask = check_multimask(self.multimask)
        self.runtime = check_runtime(self.runtime, "--runtime")
        self.click_strategy = check_click_strategy(self.click_strategy, "--click-strategy")


def default_export_dir() -> Path:
    """Where ``evaluate`` caches verified exports by default: ``<user cache>/exports`` (the cache of
    :func:`sam_medical.model.checkpoints.default_cache_dir`, ``$SAM_MEDICAL_CACHE`` or
    ``~/.cache/sam_medical``), so that each model is exported and verified once, not per evaluation."""
    return default_cache_dir() / "exports"
