"""The one place where masks are scored: Dice, IoU, HD95 and the paired test between two sets of scores.

Conventions (each caller keeps the one it had):

* :func:`dice`: two boolean masks of any shape (numpy or torch); both empty -> 1.0 (they agree).
* :func:`dice_iou`: ``P`` masks scored one by one with MONAI (``ignore_empty=False``): both empty -> 1.0;
  an empty target with a non-empty prediction -> 0.0. Used by evaluation for slices and volumes.
* :func:`batch_dice`: torch, MONAI ``DiceMetric`` semantics (``ignore_empty=True``): an empty target -> NaN,
  whatever the prediction. Used by training's validation.
* :func:`paired_comparison`: ``model - baseline`` per item, wins/losses/ties and a Wilcoxon signed-rank test.

MONAI and SciPy are imported inside the functions that use them: importing this module stays cheap for
the CLI's ``--help`` and for the app's start.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: Paired Dice differences smaller than this (in absolute value) are ties.
TIE_TOLERANCE = 1e-3


def dice(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Dice of two boolean masks of the same shape (numpy or torch); two empty masks agree: 1.0."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dice and IoU ``(P,)`` float64 of ``P`` binary masks ``(P, *spatial)`` (2D slices or 3D volumes).

    MONAI's ``compute_dice``/``compute_iou`` with ``ignore_empty=False``: prediction and target both
    empty -> 1.0; one of them empty -> 0.0.
    """
    from monai.metrics import compute_dice, compute_iou  # heavy: keeps `--help` fast

    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float64)[:, None])
    g = torch.from_numpy(np.ascontiguousarray(gt, dtype=np.float64)[:, None])
    d = compute_dice(p, g, include_background=True, ignore_empty=False)[:, 0]
    i = compute_iou(p, g, include_background=True, ignore_empty=False)[:, 0]
    return d.double().numpy(), i.double().numpy()


def hd95_mm(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float | None:
    """95th-percentile Hausdorff distance in mm of two non-empty binary masks ``(*spatial)``.

    ``spacing``: mm per voxel along each spatial axis. ``None`` when MONAI answers a non-finite value.
    """
    from monai.metrics import compute_hausdorff_distance  # heavy: keeps `--help` fast

    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float64))[None, None]
    g = torch.from_numpy(np.ascontiguousarray(gt, dtype=np.float64))[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(
            p, g, include_background=True, percentile=95, spacing=[float(s) for s in spacing]
        )
    value = float(hd[0, 0])
    return value if math.isfinite(value) else None


def batch_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-item Dice ``(B,)`` of masks ``pred``, ``target`` ``(B, 1, H, W)`` (bool or 0/1 float, any device).

    MONAI ``DiceMetric(include_background=True, reduction="none")``: an empty target gives NaN.
    """
    from monai.metrics import DiceMetric  # heavy: keeps `--help` fast

    metric = DiceMetric(include_background=True, reduction="none")
    return metric(y_pred=pred.float(), y=target.float()).flatten()


def paired_comparison(
    model: Sequence[float],
    baseline: Sequence[float],
    tol: float = TIE_TOLERANCE,
    alternative: str = "two-sided",
) -> dict[str, Any]:
    """Paired per-item comparison of ``model - baseline`` scores (Dice).

    Returns ``n``, ``mean_diff``, ``median_diff``, ``wins``/``losses``/``ties`` (``|diff| < tol``),
    ``tie_tolerance``, ``n_nonzero``, ``wilcoxon_statistic``, ``wilcoxon_p``, ``test`` and sometimes
    ``note``. The test is ``scipy.stats.wilcoxon`` with ``zero_method="wilcox"`` (zero differences are
    dropped); ``alternative`` is ``"two-sided"``, or ``"greater"``: the model is better. All differences
    zero: no test, p = 1.

    Raises:
        ValueError: the two sequences differ in length.
    """
    from scipy.stats import wilcoxon  # heavy: keeps `--help` fast

    a, b = np.asarray(model, np.float64), np.asarray(baseline, np.float64)
    if a.shape != b.shape:
        raise ValueError("paired comparison needs the same number of values")
    d = a - b
    n = int(d.size)
    out: dict[str, Any] = {
        "n": n,
        "mean_diff": float(d.mean()) if n else None,
        "median_diff": float(np.median(d)) if n else None,
        "wins": int((d >= tol).sum()),
        "losses": int((d <= -tol).sum()),
        "ties": int((np.abs(d) < tol).sum()),
        "tie_tolerance": tol,
        "n_nonzero": int((d != 0).sum()),
        "wilcoxon_statistic": None,
        "wilcoxon_p": None,
        "test": f"{alternative} Wilcoxon signed-rank, zero_method='wilcox'",
    }
    if n == 0:
        out["note"] = "no paired values"
    elif out["n_nonzero"] == 0:
        out["wilcoxon_p"] = 1.0
        out["note"] = "all differences are zero: no test, p = 1"
    else:
        with warnings.catch_warnings():  # small samples: scipy warns that the p-value is exact or approximate
            warnings.simplefilter("ignore")
            res = wilcoxon(d, zero_method="wilcox", alternative=alternative)
        out["wilcoxon_statistic"] = float(res.statistic)
        out["wilcoxon_p"] = float(res.pvalue)
    return out
