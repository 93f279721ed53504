"""A streaming dataset over the ``.npz`` slice files (format: docs/ARCHITECTURE.md).

One item is one slice x one label value present in that slice, with a binary target. A multi-label
slice therefore yields one item per organ; an empty slice (kept by ``preprocess --keep-empty``) yields
none, since a prompt needs an object.

Memory stays bounded whatever the number of cases:

* at construction only each file's ``gts`` is read, to build the index ``(case, row, label)``, and then
  dropped;
* a case's ``imgs``/``gts`` are loaded on demand and kept in a small LRU cache of ``cache_size`` cases;
* :class:`CaseGroupedSampler` visits the items case by case (case order and slice order shuffled,
  seeded per epoch) so that the cache is hit, and splits the order between DDP ranks.

With ``DataLoader(num_workers=n)`` each worker holds its own cache: at most ``n * cache_size`` cases.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from sam_medical.canvas.geometry import MODEL_SLICE_SIZE
from sam_medical.canvas.slice_file import load_npz
from sam_medical.errors import UserInputError
from sam_medical.prompts import TrainPromptSampler, eval_points, tight_box


def list_npz(files_or_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The ``.npz`` slice files of a folder (sorted, not recursive), or the given list of files.

    Raises:
        UserInputError: the folder does not exist or holds no ``.npz`` file, or a listed file is missing.
    """
    if isinstance(files_or_dir, (str, os.PathLike)):
        root = Path(files_or_dir)
        if root.is_dir():
            files = sorted(p for p in root.glob("*.npz") if p.is_file())
            if not files:
                raise UserInputError(
                    f"no .npz slice files in {root}: run `sam-medical preprocess` to make them first"
                )
            return files
        if not root.exists():
            raise UserInputError(f"data path {root} does not exist")
        files = [root]
    else:
        files = [Path(p) for p in files_or_dir]
    if not files:
        raise UserInputError("no .npz slice files given")
    for f in files:
        if not f.is_file():
            raise UserInputError(f"slice file {f} does not exist")
        if f.suffix != ".npz":
            raise UserInputError(f"{f} is not an .npz slice file")
    return files


def case_name(path: str | os.PathLike) -> str:
    """A case's name: its file name without ``.npz``."""
    return Path(path).name.removesuffix(".npz")


def split_cases(files: Sequence[Path], val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Split slice files into training and validation **by volume** (never by slice).

    ``round(val_fraction * n)`` cases, at least 1 and at most ``n - 1``, drawn with ``seed``, go to
    validation; ``val_fraction == 0`` gives an empty validation list. Both lists keep sorted order.

    Raises:
        UserInputError: ``val_fraction`` outside ``[0, 1)``, or ``> 0`` with fewer than 2 cases (a case
            cannot be both trained on and used to measure generalisation).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserInputError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    files = sorted(Path(f) for f in files)
    if val_fraction == 0:
        return files, []
    if len(files) < 2:
        raise UserInputError(
            f"a validation split needs at least 2 cases (volumes), got {len(files)}; add cases or pass "
            "--val-fraction 0 (validation then runs on the training case)"
        )
    n_val = min(len(files) - 1, max(1, round(val_fraction * len(files))))
    order = np.random.default_rng(seed).permutation(len(files))
    val_idx = set(order[:n_val].tolist())
    train = [f for i, f in enumerate(files) if i not in val_idx]
    val = [f for i, f in enumerate(files) if i in val_idx]
    return train, val


@dataclass(frozen=True)
class _Case:
    path: Path
    name: str
    slice_index: np.ndarray  # (N,) int
    valid_hw: tuple[int, int]  # (h, w) on the canvas before padding
    uid: str = ""  # identifies the file's content: path, size and modification time


def file_uid(path: Path) -> str:
    """A short id of a file's identity and version (real path, size, mtime): caches keyed by it miss when
    the file is replaced."""
    st = path.stat()
    return hashlib.sha1(f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


class NpzSliceDataset(Dataset):
    """Items ``(slice, label value)`` of a set of ``.npz`` slice files.

    Args:
        files_or_dir: a folder of ``.npz`` files, one file, or a list of files.
        label_values: keep only these label values (default: every non-zero value).
        cases: keep only these case names (file names without ``.npz``).
        prompt_sampler: makes the random training prompt of an item.
        deterministic_seed: ``None`` for training (random prompts, fresh each time an item is read);
            an int for validation: item ``i`` gets the tight box and
            :func:`~sam_medical.prompts.eval_points` seeded with ``deterministic_seed + i`` (the interior
            point first, ``prompt_sampler.num_points`` clicks in all), identical on every read.
        cache_size: how many cases' arrays the LRU cache holds (>= 1).
        seed: seeds the random training prompts (with the epoch, see :meth:`set_epoch`, and the item index).

    Each item is a dict:

    * ``image``: ``(256, 256, 3)`` uint8 tensor, the canvas slice;
    * ``target``: ``(1, 256, 256)`` float32 tensor, 1 where the slice holds ``label``;
    * ``points (P, 2)`` float32 ``[x, y]`` canvas pixels, ``point_labels (P,)`` int64 (1/0, -1 padding),
      ``box (4,)`` float32 ``[x0, y0, x1, y1]``, ``has_box`` bool;
    * ``valid_hw``: ``(2,)`` int64, the canvas region ``[:h, :w]`` holding the image (the rest is padding);
    * ``case`` str, ``case_uid`` str (the file's identity, :func:`file_uid`), ``slice_index`` int (``k`` in
      the source volume), ``label`` int, ``index`` int.

    Raises:
        UserInputError: no files, an unreadable file, or no labelled slice (for the chosen labels).
    """

    def __init__(
        self,
        files_or_dir: str | os.PathLike | Sequence[str | os.PathLike],
        label_values: Sequence[int] | None = None,
        cases: Sequence[str] | None = None,
        prompt_sampler: TrainPromptSampler | None = None,
        deterministic_seed: int | None = None,
        cache_size: int = 2,
        seed: int = 0,
    ) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be >= 1")
        files = list_npz(files_or_dir)
        if cases is not None:
            wanted = set(cases)
            files = [f for f in files if case_name(f) in wanted]
            if not files:
                raise UserInputError(f"none of the cases {sorted(wanted)} is among the slice files")
        self.prompt_sampler = prompt_sampler or TrainPromptSampler()
        self.deterministic_seed = deterministic_seed
        self.cache_size = cache_size
        self.seed = seed
        self.label_values = None if label_values is None else sorted({int(v) for v in label_values})
        self.cases: list[_Case] = []
        index: list[tuple[int, int, int]] = []
        for path in files:
            arrays = load_npz(path, keys=("gts", "slice_index", "resized_shape"))
            gts = arrays["gts"]
            if gts.ndim != 3 or gts.shape[1:] != (MODEL_SLICE_SIZE, MODEL_SLICE_SIZE):
                raise UserInputError(f"{path}: gts must be (N, 256, 256), got {gts.shape}")
            n = gts.shape[0]
            slice_index = np.asarray(arrays.get("slice_index", np.arange(n)), np.int64)
            valid = arrays.get("resized_shape", np.array([MODEL_SLICE_SIZE, MODEL_SLICE_SIZE]))
            case_idx = len(self.cases)
            for row in range(n):
                present = np.flatnonzero(np.bincount(gts[row].ravel(), minlength=256))
                for value in present:
                    if value == 0 or (self.label_values is not None and value not in self.label_values):
                        continue
                    index.append((case_idx, row, int(value)))
            self.cases.append(
                _Case(path, case_name(path), slice_index, (int(valid[0]), int(valid[1])), file_uid(path))
            )
            del gts, arrays
        if not index:
            what = f"label values {self.label_values}" if self.label_values is not None else "any label"
            raise UserInputError(
                f"no labelled slice in {len(files)} slice file(s) ({files[0].parent}): none holds {what}"
            )
        self._index = np.asarray(index, dtype=np.int64)  # (items, 3): case, row, label
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.cache_loads = 0  # how many times a case was read from disk (for tests and logs)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Training prompts of item ``i`` are drawn from ``default_rng([seed, epoch, i])``: new ones each
        epoch, the same ones when a run is repeated or resumed."""
        self.epoch = int(epoch)

    def __getstate__(self) -> dict:
        """Pickled for DataLoader workers without the cached arrays (each worker fills its own cache)."""
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state

    # --- index --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    @property
    def case_names(self) -> list[str]:
        return [c.name for c in self.cases]

    def item_case(self, i: int) -> int:
        """The case number (position in :attr:`cases`) of item ``i``."""
        return int(self._index[i, 0])

    def item_key(self, i: int) -> tuple[str, int, int]:
        """``(case name, slice_index k, label value)`` of item ``i``."""
        c, row, label = (int(v) for v in self._index[i])
        return self.cases[c].name, int(self.cases[c].slice_index[row]), label

    def items_per_case(self) -> list[np.ndarray]:
        """For each case, the item numbers that belong to it (ascending)."""
        return [np.flatnonzero(self._index[:, 0] == c) for c in range(len(self.cases))]

    def labels_present(self) -> list[int]:
        """The label values that have at least one item."""
        return sorted({int(v) for v in np.unique(self._index[:, 2])})

    # --- loading ------------------------------------------------------------------------------
    def _case_arrays(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """``(imgs (N,256,256,3) uint8, gts (N,256,256) uint8)`` of case ``c``, through the LRU cache."""
        hit = self._cache.get(c)
        if hit is not None:
            self._cache.move_to_end(c)
            return hit
        arrays = load_npz(self.cases[c].path, keys=("imgs", "gts"))
        imgs, gts = arrays["imgs"], arrays["gts"]
        if imgs.shape != (gts.shape[0], MODEL_SLICE_SIZE, MODEL_SLICE_SIZE, 3) or imgs.dtype != np.uint8:
            raise UserInputError(
                f"{self.cases[c].path}: imgs must be (N, 256, 256, 3) uint8 matching gts, got "
                f"{imgs.shape} {imgs.dtype}"
            )
        self._cache[c] = (imgs, gts)
        self.cache_loads += 1
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return imgs, gts

    def __getitem__(self, i: int) -> dict:
        c, row, label = (int(v) for v in self._index[i])
        imgs, gts = self._case_arrays(c)
        mask = gts[row] == label
        if self.deterministic_seed is None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            prompt = self.prompt_sampler(mask, rng)
        else:
            k = self.prompt_sampler.num_points
            pts = eval_points(mask, k, self.deterministic_seed + i)
            prompt = {
                "points": pts,
                "point_labels": np.ones(k, np.int64),
                "box": tight_box(mask),
                "has_box": True,
            }
        case = self.cases[c]
        return {
            "image": torch.from_numpy(np.array(imgs[row], copy=True)),
            "target": torch.from_numpy(mask.astype(np.float32))[None],
            "points": torch.from_numpy(prompt["points"]),
            "point_labels": torch.from_numpy(prompt["point_labels"]),
            "box": torch.from_numpy(prompt["box"]),
            "has_box": bool(prompt["has_box"]),
            "valid_hw": torch.tensor(case.valid_hw, dtype=torch.int64),
            "case": case.name,
            "case_uid": case.uid,
            "slice_index": int(case.slice_index[row]),
            "label": label,
            "index": int(i),
        }


class CaseGroupedSampler(Sampler[int]):
    """Visits the items of a :class:`NpzSliceDataset` case by case, so its LRU cache is hit.

    With ``shuffle`` the case order and the order of items within each case are shuffled with
    ``random.Random(seed + epoch)`` (call :meth:`set_epoch` each epoch, as with
    ``DistributedSampler``); without, items come in index order.

    DDP: the whole order is padded (by repeating its start) to a multiple of ``world_size`` and rank
    ``r`` takes the ``r``-th contiguous chunk, so every rank runs the same number of steps and each
    sees whole runs of a case.
    """

    def __init__(
        self,
        dataset: NpzSliceDataset,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} for world size {world_size}")
        self.groups = dataset.items_per_case()
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0
        self.total = sum(len(g) for g in self.groups)
        self.num_samples = math.ceil(self.total / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; ``start`` skips this rank's first ``start`` items (to resume a run
        in the middle of an epoch without reading what it already consumed)."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} outside 0..{self.num_samples}")
        self.epoch = int(epoch)
        self.start = int(start)

    def full_order(self) -> list[int]:
        """The order of all items for this epoch, before the split between ranks."""
        if not self.shuffle:
            return sorted(int(i) for g in self.groups for i in g)
        rng = random.Random(self.seed + self.epoch)
        case_order = list(range(len(self.groups)))
        rng.shuffle(case_order)
        order: list[int] = []
        for c in case_order:
            items = [int(i) for i in self.groups[c]]
            rng.shuffle(items)
            order.extend(items)
        return order

    def __iter__(self) -> Iterator[int]:
        order = self.full_order()
        padded_len = self.num_samples * self.world_size
        while len(order) < padded_len:
            order.extend(order[: padded_len - len(order)])
        first = self.rank * self.num_samples
        return iter(order[first + self.start : first + self.num_samples])

    def __len__(self) -> int:
        return self.num_samples - self.start
