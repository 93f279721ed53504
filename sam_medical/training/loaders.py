"""The data of a training run: the split by volume, the datasets and their loaders.

Training items are read case by case (:class:`~sam_medical.training.dataset.CaseGroupedSampler`) with
random prompts (:class:`~sam_medical.prompts.TrainPromptSampler`); validation items get deterministic
prompts and, with ``val_max_items``, are evenly spaced. Under DDP rank ``r`` reads its share of the
case-grouped order and scores validation items ``r, r + W, ...`` (contiguous runs would balance worse
across cases).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, Subset

from sam_medical.errors import UserInputError
from sam_medical.prompts import TrainPromptSampler
from sam_medical.training.config import TrainConfig
from sam_medical.training.dataset import CaseGroupedSampler, NpzSliceDataset, list_npz, split_cases
from sam_medical.training.distributed import DistInfo


@dataclass
class RunData:
    """Datasets, sampler and loaders of one run, and how many micro-batches an epoch has."""

    train_ds: NpzSliceDataset
    val_ds: NpzSliceDataset
    train_sampler: CaseGroupedSampler
    train_loader: DataLoader
    val_loader: DataLoader
    val_items: int  #: validation items of all ranks together
    val_on_train: bool  #: no held-out volume: validation runs on the training volumes
    micro_per_epoch: int  #: micro-batches per epoch on this rank

    @property
    def val_cases(self) -> list[str]:
        return [] if self.val_on_train else self.val_ds.case_names

    def layout(self, world_size: int, batch_size: int) -> dict[str, Any]:
        """What the position in an interrupted epoch depends on (``last.pt``'s layout keys)."""
        return {
            "train_cases": self.train_ds.case_names,
            "train_items": len(self.train_ds),
            "world_size": world_size,
            "batch_size": batch_size,
        }


def _evenly_spaced(n: int, most: int | None) -> list[int]:
    if most is None or n <= most:
        return list(range(n))
    step = n / most
    return [int(i * step) for i in range(most)]


def build_data(cfg: TrainConfig, dist: DistInfo, pin_memory: bool) -> RunData:
    """Read the slice files of ``cfg.data`` and split them (bad data is found before the model is built).

    Raises:
        UserInputError: no slice file, no label to train on, unreadable validation cases.
    """
    files = list_npz(cfg.data)
    train_files, val_files = split_cases(files, cfg.val_fraction, cfg.seed)
    sampler = TrainPromptSampler(cfg.prompt, cfg.box_jitter, cfg.num_points, cfg.num_bg_points, cfg.drop_prob)
    # click rounds draw their own prompts; their "point" validation is one click (the interior point)
    val_sampler = TrainPromptSampler(cfg.prompt, cfg.box_jitter, 1, 0) if cfg.click_rounds else sampler
    train_ds = NpzSliceDataset(
        train_files, cfg.label_values, prompt_sampler=sampler, cache_size=cfg.cache_size, seed=cfg.seed
    )
    try:
        val_ds = NpzSliceDataset(
            val_files or train_files,
            cfg.label_values,
            prompt_sampler=val_sampler,
            deterministic_seed=cfg.seed,
            cache_size=cfg.cache_size,
        )
    except UserInputError as exc:
        raise UserInputError(f"validation cases {[f.name for f in val_files]}: {exc}") from None
    val_index = _evenly_spaced(len(val_ds), cfg.val_max_items)
    val_items = Subset(val_ds, val_index[dist.rank :: dist.world_size])
    train_sampler = CaseGroupedSampler(
        train_ds, shuffle=True, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size
    )
    train_loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=train_sampler,
        num_workers=cfg.workers,
        pin_memory=pin_memory,
    )
    val_loader = DataLoader(
        val_items, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers, pin_memory=pin_memory
    )
    return RunData(
        train_ds,
        val_ds,
        train_sampler,
        train_loader,
        val_loader,
        val_items=len(val_index),
        val_on_train=not val_files,
        micro_per_epoch=math.ceil(len(train_sampler) / cfg.batch_size),
    )
