"""Training and evaluation prompts made from canvas masks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sam_medical.prompts import (
    BG_MARGIN,
    TrainPromptSampler,
    eval_points,
    eval_prompt,
    interior_point,
    jittered_box,
    random_points,
    tight_box,
)


def _rect(y0: int, y1: int, x0: int, x1: int, size: int = 256) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


def _disc(cy: int, cx: int, r: float, size: int = 256) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_tight_box_is_inclusive_pixel_indices():
    m = _rect(10, 20, 30, 45)
    np.testing.assert_array_equal(tight_box(m), [30, 10, 45, 20])
    one = np.zeros((256, 256), bool)
    one[7, 9] = True
    np.testing.assert_array_equal(tight_box(one), [9, 7, 9, 7])
    with pytest.raises(ValueError, match="empty"):
        tight_box(np.zeros((256, 256), bool))


def test_jittered_box_zero_jitter_is_tight_and_contains_mask():
    m = _disc(100, 60, 12)
    box = jittered_box(m, 0, np.random.default_rng(0))
    np.testing.assert_array_equal(box, tight_box(m))
    ys, xs = np.nonzero(m)
    assert box[0] <= xs.min() and box[2] >= xs.max() and box[1] <= ys.min() and box[3] >= ys.max()


def test_jittered_box_bounded_varied_and_clipped():
    m = _rect(50, 90, 40, 120)  # 41 rows x 81 cols
    tight = tight_box(m)
    rng = np.random.default_rng(1)
    boxes = np.stack([jittered_box(m, 5, rng) for _ in range(400)])
    outward = np.stack(
        [tight[0] - boxes[:, 0], tight[1] - boxes[:, 1], boxes[:, 2] - tight[2], boxes[:, 3] - tight[3]], 1
    )
    assert outward.max() <= 5 and outward.min() >= -5
    assert outward.max() == 5 and outward.min() == -5  # both directions actually happen
    assert len({tuple(b) for b in boxes}) > 100
    assert np.all(boxes == np.round(boxes))
    # a tiny object: inward moves are limited so the box keeps its centre
    small = _rect(100, 103, 100, 103)
    for _ in range(200):
        b = jittered_box(small, 5, rng)
        assert b[0] <= 101 and b[2] >= 102 and b[1] <= 101 and b[3] >= 102
    # touching the canvas corner: clipped to [0, 255]
    corner = _rect(0, 10, 245, 255)
    for _ in range(100):
        b = jittered_box(corner, 5, rng)
        assert b.min() >= 0 and b.max() <= 255


def test_random_points_labels_and_regions():
    m = _disc(128, 128, 20)
    rng = np.random.default_rng(2)
    for _ in range(50):
        pts, lab = random_points(m, 3, 2, rng)
        assert pts.shape == (5, 2) and pts.dtype == np.float32
        np.testing.assert_array_equal(lab, [1, 1, 1, 0, 0])
        xs, ys = pts[:, 0].astype(int), pts[:, 1].astype(int)
        assert m[ys[:3], xs[:3]].all()
        assert not m[ys[3:], xs[3:]].any()
        x0, y0, x1, y1 = tight_box(m)
        assert np.all(xs[3:] >= x0 - BG_MARGIN) and np.all(xs[3:] <= x1 + BG_MARGIN)
        assert np.all(ys[3:] >= y0 - BG_MARGIN) and np.all(ys[3:] <= y1 + BG_MARGIN)


def test_sampler_modes_shapes_and_drop():
    m = _disc(80, 150, 15)
    rng = np.random.default_rng(3)
    s = TrainPromptSampler("box", box_jitter=5, num_points=2, num_bg_points=1)
    p = s(m, rng)
    assert p["has_box"] and p["points"].shape == (3, 2) and np.all(p["point_labels"] == -1)

    s = TrainPromptSampler("point", num_points=3, num_bg_points=2)
    counts = set()
    for _ in range(100):
        p = s(m, rng)
        assert not p["has_box"] and np.all(p["box"] == 0) and p["points"].shape == (5, 2)
        lab = p["point_labels"]
        n_fg, n_bg = int((lab == 1).sum()), int((lab == 0).sum())
        assert 1 <= n_fg <= 3 and 0 <= n_bg <= 2
        # layout: fg, then bg, then padding
        np.testing.assert_array_equal(lab, [1] * n_fg + [0] * n_bg + [-1] * (5 - n_fg - n_bg))
        xs, ys = p["points"][lab == 1].astype(int).T
        assert m[ys, xs].all()
        counts.add((n_fg, n_bg))
    assert len(counts) == 9

    s = TrainPromptSampler("mixed", num_points=1, drop_prob=0.5)
    kinds = {"box": 0, "points": 0, "both": 0}
    for _ in range(600):
        p = s(m, rng)
        has_pts = bool((p["point_labels"] >= 0).any())
        assert p["has_box"] or has_pts
        kinds["both" if p["has_box"] and has_pts else "box" if p["has_box"] else "points"] += 1
    # expected 150 / 150 / 300
    assert 100 < kinds["box"] < 200 and 100 < kinds["points"] < 200 and 240 < kinds["both"] < 360

    s = TrainPromptSampler("mixed", drop_prob=0.0)
    p = s(m, rng)
    assert p["has_box"] and (p["point_labels"] == 1).any()
    with pytest.raises(ValueError):
        TrainPromptSampler("scribble")


def test_sampler_is_deterministic_for_a_seed():
    m = _disc(80, 150, 15)
    s = TrainPromptSampler("mixed", num_points=3, num_bg_points=1)
    a = [s(m, np.random.default_rng(7)) for _ in range(3)]
    b = [s(m, np.random.default_rng(7)) for _ in range(3)]
    for x, y in zip(a, b, strict=True):
        for k in ("points", "point_labels", "box"):
            np.testing.assert_array_equal(x[k], y[k])


def test_interior_point_is_farthest_from_boundary():
    # C shape: the centroid is outside the object, the interior point must not be
    m = _rect(60, 200, 60, 200) & ~_rect(90, 170, 100, 200)
    x, y = interior_point(m)
    assert m[y, x]
    dist = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    assert dist[y, x] == dist.max()
    # a disc: its centre
    assert interior_point(_disc(100, 140, 10)) == (140, 100)
    # an even-sized square: ties broken deterministically, near the middle
    sq = _rect(10, 19, 30, 39)
    assert interior_point(sq) == interior_point(sq.copy())
    x, y = interior_point(sq)
    assert x in (34, 35) and y in (14, 15)
    # the canvas border counts as outside
    edge = _rect(0, 40, 0, 5)
    x, y = interior_point(edge)
    assert 2 <= x <= 3


def test_eval_points_and_prompt_deterministic():
    m = _disc(128, 100, 25)
    p1 = eval_points(m, 4, seed=3)
    p2 = eval_points(m, 4, seed=3)
    np.testing.assert_array_equal(p1, p2)
    assert tuple(p1[0].astype(int)) == interior_point(m)
    assert m[p1[:, 1].astype(int), p1[:, 0].astype(int)].all()
    assert len({tuple(p) for p in p1}) == 4
    assert not np.array_equal(eval_points(m, 4, seed=4), p1)

    box = eval_prompt(m, "box")
    assert box["points"] is None and box["point_labels"] is None
    np.testing.assert_array_equal(box["box"], tight_box(m))
    pt = eval_prompt(m, "point", k=2, seed=5)
    assert pt["box"] is None and pt["points"].shape == (2, 2)
    np.testing.assert_array_equal(pt["point_labels"], [1, 1])
    both = eval_prompt(m, "box+point", k=1, box_jitter=5, seed=9)
    np.testing.assert_array_equal(both["box"], eval_prompt(m, "box", box_jitter=5, seed=9)["box"])
    assert np.abs(both["box"] - tight_box(m)).max() <= 5
    with pytest.raises(ValueError):
        eval_prompt(m, "scribble")


def test_one_prompt_vocabulary_and_old_names_are_explained():
    from sam_medical.errors import UserInputError
    from sam_medical.prompts import PROMPT_KINDS, PROMPT_MODES, check_prompt_mode

    assert PROMPT_KINDS == ("box", "point", "box+point") and PROMPT_MODES == (*PROMPT_KINDS, "mixed")
    for mode in PROMPT_MODES:
        assert check_prompt_mode(mode) == mode
    with pytest.raises(UserInputError, match="'both' is now called 'mixed'"):
        check_prompt_mode("both")
    with pytest.raises(UserInputError, match="'points' is now called 'point'"):
        check_prompt_mode("points", "--conf prompt")
    s = TrainPromptSampler("box+point", num_points=2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = s(np.pad(np.ones((8, 8), bool), 20), rng)
        assert p["has_box"] and (p["point_labels"] == 1).any()
