"""3D propagation: the walk is checked exactly with a fixed fake predictor, then smoke-run on tiny SAM."""

from __future__ import annotations

import numpy as np
import pytest

from sam_medical.inference.predictor import VolumePredictor
from sam_medical.inference.propagation import PropagationOptions, keep_touching, mask_box, propagate
from sam_medical.volume.io import Volume

SHAPE = (48, 64, 24)  # (I, J, K)


def sphere(center=(24, 30, 10), radius=6.5, shape=SHAPE) -> np.ndarray:
    ii, jj, kk = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return ((ii - center[0]) ** 2 + (jj - center[1]) ** 2 + ((kk - center[2]) * 1.0) ** 2) <= radius**2


def volume_of(mask: np.ndarray) -> Volume:
    arr = np.where(mask, 60.0, -900.0).astype(np.float32)
    return Volume(arr, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


class FakePredictor:
    """Answers with the ground-truth components that the prompt touches (box overlap or point inside),
    plus a separate distractor blob that a real model might leak into; records every call."""

    def __init__(self, truth: np.ndarray, distractor: np.ndarray | None = None, iou: dict | None = None):
        self.truth = truth
        self.distractor = distractor
        self.iou = iou or {}
        self.calls: list[dict] = []

    def segment_slice(self, image_key, volume, k, fg=None, bg=None, box=None, mask_input=None):
        self.calls.append({"k": k, "fg": fg, "box": box, "mask_input": mask_input})
        gt = self.truth[:, :, k]
        hit = np.zeros_like(gt)
        if box is not None:
            i0, i1, j0, j1 = box
            hit[min(i0, i1) : max(i0, i1) + 1, min(j0, j1) : max(j0, j1) + 1] = True
        for i, j in fg or []:
            hit[int(i), int(j)] = True
        mask = gt.copy() if (gt & hit).any() else np.zeros_like(gt)
        if self.distractor is not None and mask.any():
            mask |= self.distractor[:, :, k]
        return mask, {"iou": self.iou.get(k, 0.9), "embedding": "computed", "low_res_logits": f"logits{k}"}


def test_walk_recovers_the_object_and_stops_where_it_ends():
    truth = sphere()
    distractor = np.zeros(SHAPE, bool)
    distractor[2:6, 55:60, :] = True  # never touches the sphere: must be dropped
    fake = FakePredictor(truth, distractor)
    box0 = (20, 28, 26, 34)
    clicks = PropagationOptions(box_margin=0.1, use_point=True, min_iou=0.0)
    out, info = propagate(fake, "v", volume_of(truth), 10, [(24, 30)], None, box0, label=3, options=clicks)
    assert out.dtype == np.uint8 and out.shape == SHAPE
    assert set(np.unique(out)) == {0, 3}
    np.testing.assert_array_equal(out > 0, truth)  # exactly the object: slices 4..16, no distractor
    assert info["slices"] == list(range(4, 17))
    assert info["stopped"] == {"up": "empty mask", "down": "empty mask"}
    assert fake.calls[0] == {"k": 10, "fg": [(24, 30)], "box": box0, "mask_input": None}
    # each slice is prompted from the previous slice's mask: its grown box and its interior point
    for call in fake.calls[1:]:
        k = call["k"]
        prev = truth[:, :, k - 1] if k > 10 else truth[:, :, k + 1]
        assert call["box"] == mask_box(prev, 0.1, SHAPE[:2])
        ((i, j),) = call["fg"]
        assert prev[i, j]
        assert call["mask_input"] is None  # off by default
    # walked 11..17 up (17 empty) and 9..3 down (3 empty): nothing beyond the stops
    assert sorted(c["k"] for c in fake.calls) == list(range(3, 18))


def test_default_walk_prompts_with_the_previous_tight_box_only_and_stops_on_low_iou():
    """The measured defaults for a box-prompted model (LiteMedSAM): no click, the previous mask's box grown
    by one voxel, and a walk that ends where SAM's predicted IoU falls below 0.75."""
    truth = sphere()
    fake = FakePredictor(truth, iou={14: 0.7})
    out, info = propagate(fake, "v", volume_of(truth), 10, None, None, (20, 28, 26, 34))
    for call in fake.calls[1:]:
        k = call["k"]
        prev = truth[:, :, k - 1] if k > 10 else truth[:, :, k + 1]
        assert call["fg"] is None and call["box"] == mask_box(prev, 0.0, SHAPE[:2])
    assert info["stopped"]["up"].startswith("predicted IoU 0.700")
    assert info["slices"][-1] == 13 and info["stopped"]["down"] == "empty mask"


def test_max_slices_and_mask_input():
    truth = sphere()
    fake = FakePredictor(truth)
    out, info = propagate(
        fake,
        "v",
        volume_of(truth),
        10,
        [(24, 30)],
        options=PropagationOptions(max_slices=2, use_mask_input=True),
    )
    assert info["slices"] == [8, 9, 10, 11, 12]
    assert info["stopped"] == {"up": "max_slices 2", "down": "max_slices 2"}
    assert np.flatnonzero(out.any(axis=(0, 1))).tolist() == [8, 9, 10, 11, 12]
    by_k = {c["k"]: c["mask_input"] for c in fake.calls}
    assert by_k[11] == "logits10" and by_k[12] == "logits11" and by_k[9] == "logits10"


def test_area_jump_and_low_iou_stop_the_walk():
    truth = sphere()
    truth[:, :, 13] = False
    truth[14:34, 16:44, 13] = True  # an implausible jump in area at k=13 (touching the object)
    fake = FakePredictor(truth, iou={7: 0.05})
    out, info = propagate(
        fake, "v", volume_of(truth), 10, [(24, 30)], options=PropagationOptions(min_iou=0.2)
    )
    assert info["slices"] == [8, 9, 10, 11, 12]
    assert info["stopped"]["up"].startswith("area jumped")
    assert info["stopped"]["down"].startswith("predicted IoU 0.050")
    assert not out[:, :, 13].any() and not out[:, :, 7].any()
    rejected = {e["k"]: e["accepted"] for e in info["per_slice"]}
    assert rejected[13] is False and rejected[7] is False


def test_shrinking_below_min_area_stops():
    truth = sphere()
    out, info = propagate(
        FakePredictor(truth), "v", volume_of(truth), 10, [(24, 30)], options=PropagationOptions(min_area=60)
    )
    areas = truth.sum(axis=(0, 1))
    kept = [k for k in range(SHAPE[2]) if out[:, :, k].any()]
    assert kept == info["slices"] and all(areas[k] >= 60 for k in kept)
    assert "min_area" in info["stopped"]["up"] and "min_area" in info["stopped"]["down"]


def test_empty_first_slice_gives_an_empty_volume():
    truth = sphere()
    out, info = propagate(FakePredictor(truth), "v", volume_of(truth), 10, [(2, 2)])
    assert not out.any() and info["slices"] == []
    assert info["stopped"]["up"] == "empty on the prompted slice"


def test_helpers():
    m = np.zeros((10, 10), bool)
    m[4:6, 3:8] = True
    assert mask_box(m, 0.0, (10, 10)) == (3, 6, 2, 8)
    assert mask_box(m, 0.5, (10, 10)) == (2, 7, 0, 9)
    other = np.zeros_like(m)
    other[0, 0] = True
    np.testing.assert_array_equal(keep_touching(m | other, m), m)


@pytest.mark.parametrize("use_mask_input", [False, True])
def test_smoke_with_the_tiny_model(tiny_sam, use_mask_input):
    truth = sphere(shape=(48, 64, 12), center=(24, 30, 6), radius=5.0)
    vol = volume_of(truth)
    pred = VolumePredictor(tiny_sam, "v1")
    opts = PropagationOptions(max_slices=3, use_mask_input=use_mask_input)
    out, info = propagate(pred, "vol", vol, 6, [(24, 30)], None, (19, 29, 25, 35), options=opts)
    assert out.shape == vol.shape and out.dtype == np.uint8
    labelled = np.flatnonzero(out.any(axis=(0, 1))).tolist()
    assert labelled == info["slices"]
    if labelled:  # a contiguous run around the prompted slice, at most 3 each way
        assert 6 in labelled and labelled == list(range(labelled[0], labelled[-1] + 1))
        assert labelled[0] >= 3 and labelled[-1] <= 9
    assert sum(info["embeddings"].values()) == len(info["per_slice"])


def test_a_batching_predictor_encodes_ahead_of_the_walk():
    """On a GPU (``encode_batch`` > 1) the walk asks for the next slices' embeddings in batches, in the
    direction it walks; a predictor without batching is never asked."""

    class Batching(FakePredictor):
        encode_batch = 4

        def encode_ahead(self, image_key, volume, ks):
            self.ahead.append(list(ks))
            return 0

    truth = sphere()
    fake = Batching(truth)
    fake.ahead = []
    propagate(
        fake,
        "v",
        volume_of(truth),
        10,
        [(24, 30)],
        None,
        (20, 28, 26, 34),
        options=PropagationOptions(min_iou=0.0),
    )
    assert fake.ahead[0] == [11, 12, 13, 14] and [9, 8, 7, 6] in fake.ahead
    assert all(len(ks) == 4 for ks in fake.ahead)
    assert not hasattr(FakePredictor(truth), "encode_ahead")
