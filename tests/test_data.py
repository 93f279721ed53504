"""The streaming slice dataset, its case-grouped sampler and the split by volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sam_medical.canvas.slice_file import save_npz
from sam_medical.errors import UserInputError
from sam_medical.prompts import TrainPromptSampler, interior_point, tight_box
from sam_medical.training.dataset import CaseGroupedSampler, NpzSliceDataset, split_cases


def write_case(
    path: Path, labels_per_slice: list[tuple[int, ...]], *, seed: int = 0, valid_hw=(256, 200)
) -> Path:
    """A synthetic slice file: slice ``n`` holds a bright disc (label 1) and/or a grey square (label 2)
    as listed in ``labels_per_slice[n]``, on a dark noisy background. An empty tuple is a negative slice."""
    rng = np.random.default_rng(seed)
    n = len(labels_per_slice)
    imgs = np.zeros((n, 256, 256, 3), np.uint8)
    gts = np.zeros((n, 256, 256), np.uint8)
    yy, xx = np.mgrid[:256, :256]
    for row, present in enumerate(labels_per_slice):
        img = rng.integers(0, 40, size=(256, 256)).astype(np.uint8)
        if 1 in present:
            cy, cx, r = rng.integers(60, 120), rng.integers(50, 150), rng.integers(12, 25)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            gts[row][disc] = 1
            img[disc] = 220
        if 2 in present:
            y0, x0 = rng.integers(150, 200), rng.integers(40, 140)
            gts[row, y0 : y0 + 30, x0 : x0 + 30] = 2
            img[y0 : y0 + 30, x0 : x0 + 30] = 130
        img[:, valid_hw[1] :] = 0
        img[valid_hw[0] :, :] = 0
        imgs[row] = img[..., None]
    save_npz(
        path,
        {
            "imgs": imgs,
            "gts": gts,
            "slice_index": np.arange(10, 10 + n, dtype=np.int32),
            "resized_shape": np.asarray(valid_hw, np.int64),
            "label_values": np.asarray(sorted({v for p in labels_per_slice for v in p}), np.int64),
        },
    )
    return path


@pytest.fixture
def npz_dir(tmp_path: Path) -> Path:
    d = tmp_path / "npz"
    write_case(d / "a.npz", [(1,), (1, 2), (), (2,)], seed=1)  # 4 items
    write_case(d / "b.npz", [(1, 2), (1, 2)], seed=2)  # 4 items
    write_case(d / "c.npz", [(2,), (), (1,)], seed=3)  # 2 items
    return d


def test_index_one_item_per_slice_and_label(npz_dir: Path):
    ds = NpzSliceDataset(npz_dir)
    assert len(ds) == 10
    assert ds.case_names == ["a", "b", "c"]
    keys = [ds.item_key(i) for i in range(len(ds))]
    assert keys == [
        ("a", 10, 1), ("a", 11, 1), ("a", 11, 2), ("a", 13, 2),
        ("b", 10, 1), ("b", 10, 2), ("b", 11, 1), ("b", 11, 2),
        ("c", 10, 2), ("c", 12, 1),
    ]  # fmt: skip
    assert ds.cache_loads == 0  # construction reads gts only, loads no case into the cache
    item = ds[2]
    assert item["image"].shape == (256, 256, 3) and item["image"].dtype == torch.uint8
    assert item["target"].shape == (1, 256, 256) and item["target"].dtype == torch.float32
    assert set(item["target"].unique().tolist()) == {0.0, 1.0}
    assert (item["case"], item["slice_index"], item["label"]) == ("a", 11, 2)
    # the binary target is exactly this label's pixels, bright-grey square of 30x30
    assert int(item["target"].sum()) == 900
    assert item["valid_hw"].tolist() == [256, 200]

    only2 = NpzSliceDataset(npz_dir, label_values=[2], cases=["a", "c"])
    assert [only2.item_key(i) for i in range(len(only2))] == [("a", 11, 2), ("a", 13, 2), ("c", 10, 2)]


def test_train_prompts_fit_target_and_collate(npz_dir: Path):
    sampler = TrainPromptSampler("mixed", box_jitter=5, num_points=2, num_bg_points=1)
    ds = NpzSliceDataset(npz_dir, prompt_sampler=sampler, seed=0)
    batch = next(iter(DataLoader(ds, batch_size=4, sampler=CaseGroupedSampler(ds, seed=0))))
    assert batch["image"].shape == (4, 256, 256, 3)
    assert batch["points"].shape == (4, 3, 2) and batch["point_labels"].shape == (4, 3)
    assert batch["box"].shape == (4, 4) and batch["has_box"].dtype == torch.bool
    for b in range(4):
        target = batch["target"][b, 0].numpy() > 0
        lab = batch["point_labels"][b]
        fg = batch["points"][b][lab == 1].long()
        assert target[fg[:, 1], fg[:, 0]].all()
        bg = batch["points"][b][lab == 0].long()
        assert not target[bg[:, 1], bg[:, 0]].any()
        if batch["has_box"][b]:
            assert torch.all((batch["box"][b] - torch.from_numpy(tight_box(target))).abs() <= 5)
    # same seed and epoch: same prompts; another epoch: other prompts
    a = [ds[i]["box"] for i in range(len(ds))]
    assert all(torch.equal(x, ds[i]["box"]) for i, x in enumerate(a))
    ds.set_epoch(1)
    assert not all(torch.equal(x, ds[i]["box"]) for i, x in enumerate(a))


def test_validation_prompts_are_deterministic(npz_dir: Path):
    ds = NpzSliceDataset(
        npz_dir, prompt_sampler=TrainPromptSampler("point", num_points=3), deterministic_seed=5
    )
    for i in range(len(ds)):
        x, y = ds[i], ds[i]
        assert torch.equal(x["points"], y["points"]) and torch.equal(x["box"], y["box"])
        target = x["target"][0].numpy() > 0
        assert tuple(x["points"][0].long().tolist()) == interior_point(target)
        assert x["points"].shape == (3, 2) and x["point_labels"].tolist() == [1, 1, 1]
        assert x["has_box"] and torch.equal(x["box"], torch.from_numpy(tight_box(target)))


def test_cache_is_bounded_and_hit_by_grouped_sampler(tmp_path: Path):
    d = tmp_path / "many"
    for c in range(6):
        write_case(d / f"case{c}.npz", [(1,), (1, 2), (2,)], seed=c)
    ds = NpzSliceDataset(d, cache_size=2)
    sampler = CaseGroupedSampler(ds, shuffle=True, seed=3)
    seen_sizes = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(ds)))
        for i in order:
            ds[i]
            seen_sizes.append(len(ds._cache))
    assert max(seen_sizes) == 2
    # grouped: each case read once per epoch (epochs may share the boundary case)
    assert ds.cache_loads <= 2 * 6
    # random access (no grouping) misses far more often
    ds2 = NpzSliceDataset(d, cache_size=2)
    for i in np.random.default_rng(0).permutation(len(ds2)).tolist() * 2:
        ds2[i]
        assert len(ds2._cache) <= 2
    assert ds2.cache_loads > ds.cache_loads


def test_grouped_sampler_epochs_and_ranks(npz_dir: Path):
    ds = NpzSliceDataset(npz_dir)
    s = CaseGroupedSampler(ds, seed=0)
    orders = []
    for e in range(4):
        s.set_epoch(e)
        order = list(s)
        # items of a case are contiguous
        cases = [ds.item_case(i) for i in order]
        assert len([c for j, c in enumerate(cases) if j == 0 or c != cases[j - 1]]) == 3
        orders.append(order)
    assert len({tuple(o) for o in orders}) > 1
    s.set_epoch(2)
    assert list(s) == orders[2]  # seeded per epoch
    # ranks: equal lengths, disjoint cover (with padding from the start of the order)
    parts = []
    for r in range(3):
        sr = CaseGroupedSampler(ds, seed=0, rank=r, world_size=3)
        sr.set_epoch(1)
        parts.append(list(sr))
    assert [len(p) for p in parts] == [4, 4, 4]
    flat = sum(parts, [])
    assert set(flat) == set(range(10)) and flat[:10] == orders[1] and flat[10:] == orders[1][:2]
    assert list(CaseGroupedSampler(ds, shuffle=False)) == list(range(10))


def test_split_by_volume(npz_dir: Path, tmp_path: Path):
    files = sorted(npz_dir.glob("*.npz"))
    train, val = split_cases(files, 0.34, seed=0)
    assert len(val) == 1 and len(train) == 2 and not set(train) & set(val)
    assert set(train) | set(val) == set(files)
    assert split_cases(files, 0.34, seed=0) == (train, val)
    assert {tuple(split_cases(files, 0.34, seed=s)[1]) for s in range(20)} == {(f,) for f in files}
    assert split_cases(files, 0.0, seed=0) == (files, [])
    assert len(split_cases(files, 0.9, seed=0)[0]) == 1  # at least one training case
    with pytest.raises(UserInputError, match="at least 2 cases"):
        split_cases(files[:1], 0.2, seed=0)
    with pytest.raises(UserInputError):
        split_cases(files, 1.0, seed=0)
    # the datasets built from the split share no case
    tr = NpzSliceDataset(train)
    va = NpzSliceDataset(val, deterministic_seed=0)
    assert not set(tr.case_names) & set(va.case_names)


def test_user_errors(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserInputError, match="no .npz slice files"):
        NpzSliceDataset(empty)
    with pytest.raises(UserInputError, match="does not exist"):
        NpzSliceDataset(tmp_path / "missing")
    neg = tmp_path / "neg"
    write_case(neg / "x.npz", [(), ()])
    with pytest.raises(UserInputError, match="no labelled slice"):
        NpzSliceDataset(neg)
    pos = tmp_path / "pos"
    write_case(pos / "x.npz", [(1,)])
    with pytest.raises(UserInputError, match=r"label values \[7\]"):
        NpzSliceDataset(pos, label_values=[7])
    bad = pos / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UserInputError, match="cannot read"):
        NpzSliceDataset(pos)


def test_workers_get_an_empty_cache(npz_dir: Path):
    import pickle

    ds = NpzSliceDataset(npz_dir, cache_size=2)
    ds[0]
    assert len(ds._cache) == 1
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone._cache) == 0 and len(clone) == len(ds)
    assert torch.equal(clone[0]["target"], ds[0]["target"])
    batches = list(DataLoader(ds, batch_size=5, num_workers=2, sampler=CaseGroupedSampler(ds, shuffle=False)))
    assert sum(len(b["label"]) for b in batches) == len(ds)
