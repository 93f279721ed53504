"""sam_medical.metrics: the conventions each caller relies on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import wilcoxon

from sam_medical.metrics import TIE_TOLERANCE, batch_dice, dice, dice_iou, hd95_mm, paired_comparison


def _square(size: int, r0: int, c0: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[r0 : r0 + side, c0 : c0 + side] = True
    return m


def test_dice_numpy_and_torch_agree_and_empty_pair_is_one() -> None:
    a, b = _square(20, 2, 2, 10), _square(20, 2, 7, 10)  # overlap 10 x 5
    assert dice(a, b) == pytest.approx(2 * 50 / 200)
    assert dice(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(0.5)
    empty = np.zeros((20, 20), bool)
    assert dice(empty, empty) == 1.0
    assert dice(a, empty) == 0.0


def test_dice_iou_per_mask_with_monai_empty_convention() -> None:
    a, b = _square(20, 2, 2, 10), _square(20, 2, 7, 10)
    empty = np.zeros((20, 20), bool)
    d, i = dice_iou(np.stack([a, empty, a]), np.stack([b, empty, empty]))
    assert d == pytest.approx([0.5, 1.0, 0.0])
    assert i == pytest.approx([50 / 150, 1.0, 0.0])
    assert dice(a, b) == pytest.approx(d[0])
    d3, _ = dice_iou(np.stack([a, b], -1)[None], np.stack([a, a], -1)[None])  # a 3D volume
    assert d3[0] == pytest.approx(2 * 150 / 400)


def test_batch_dice_is_nan_for_an_empty_target() -> None:
    a, b = _square(16, 0, 0, 8), _square(16, 0, 4, 8)
    pred = torch.from_numpy(np.stack([a, a]))[:, None]
    target = torch.from_numpy(np.stack([b, np.zeros_like(b)]))[:, None]
    out = batch_dice(pred, target)
    assert out.shape == (2,)
    assert float(out[0]) == pytest.approx(0.5)
    assert math.isnan(float(out[1]))


def test_hd95_of_shifted_squares_in_mm() -> None:
    a, b = _square(30, 5, 5, 10), _square(30, 5, 8, 10)
    assert hd95_mm(a, b, (1.0, 2.0)) == pytest.approx(6.0)


def test_paired_comparison_counts_and_matches_scipy() -> None:
    model = [0.9, 0.8, 0.7, 0.95, 0.6]
    base = [0.85, 0.8, 0.75, 0.5, 0.55]
    out = paired_comparison(model, base)
    assert (out["wins"], out["losses"], out["ties"]) == (3, 1, 1)
    ref = wilcoxon(np.subtract(model, base), zero_method="wilcox")
    assert out["wilcoxon_p"] == pytest.approx(ref.pvalue)
    assert out["tie_tolerance"] == TIE_TOLERANCE
    greater = paired_comparison(model, base, alternative="greater")
    assert greater["wilcoxon_p"] < out["wilcoxon_p"]
    same = paired_comparison([0.5, 0.5], [0.5, 0.5])
    assert same["wilcoxon_p"] == 1.0 and same["wilcoxon_statistic"] is None
    with pytest.raises(ValueError):
        paired_comparison([1.0], [1.0, 2.0])
