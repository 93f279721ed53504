"""The serving predictor: embedding cache, click mapping, windowing as in training, prefetch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_medical.canvas.geometry import SliceGeometry
from sam_medical.canvas.preprocess import PreprocessOptions, volume_to_slices
from sam_medical.errors import UserInputError
from sam_medical.inference.caches import EmbeddingCache, VolumeCache
from sam_medical.inference.engines import TorchEngine
from sam_medical.inference.predictor import VolumePredictor
from sam_medical.inference.volume_slices import clip_box, neighbours
from sam_medical.model import forward as sam_forward
from sam_medical.volume.intensity import window_options
from sam_medical.volume.io import Volume, write_volume

I_SIZE, J_SIZE, K_SIZE = 40, 100, 6  # not square: an x/y swap cannot go unnoticed


def ct_volume() -> Volume:
    """``(40, 100, 6)`` CT-like volume: air around a soft-tissue block with a bright ellipse."""
    arr = np.full((K_SIZE, J_SIZE, I_SIZE), -1000.0, np.float32)  # (K, J, I), C-ordered
    arr[:, 10:90, 5:35] = 40.0
    jj, ii = np.meshgrid(np.arange(J_SIZE), np.arange(I_SIZE), indexing="ij")
    arr[:, ((jj - 60) / 15.0) ** 2 + ((ii - 20) / 8.0) ** 2 < 1] = 200.0
    arr += np.arange(K_SIZE, dtype=np.float32)[:, None, None]
    return Volume(arr.transpose(2, 1, 0), (0.8, 0.8, 2.5), (1.0, 2.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


@pytest.fixture
def volume() -> Volume:
    return ct_volume()


@pytest.fixture
def encoder_calls(tiny_sam):
    """A list that grows by one at every forward pass of the image encoder."""
    calls: list[int] = []
    tiny_sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    return calls


# --- cache ---------------------------------------------------------------------------------------


def test_cache_is_byte_bounded_and_lru():
    t = torch.zeros(256)  # 1 KiB each
    cache = EmbeddingCache(max_bytes=3 * 1024)
    for k in range(3):
        assert cache.put(("img", k, "v1"), t.clone())
    assert cache.get(("img", 0, "v1")) is not None  # 0 is now the most recently used
    cache.put(("img", 3, "v1"), t.clone())  # evicts 1, the least recently used
    assert ("img", 1, "v1") not in cache
    assert all(("img", k, "v1") in cache for k in (0, 2, 3))
    stats = cache.stats()
    assert stats["bytes"] == 3 * 1024 <= stats["max_bytes"]
    assert (stats["entries"], stats["hits"], stats["evictions"]) == (3, 1, 1)
    assert cache.get(("img", 1, "v1")) is None and cache.stats()["misses"] == 1
    assert not cache.put(("big", 0, "v1"), torch.zeros(1024))  # 4 KiB alone does not fit
    assert cache.stats()["bytes"] == 3 * 1024
    assert cache.discard_version("v1") == 3 and cache.stats()["bytes"] == 0
    cache.put(("img", 0, "v1"), t)
    cache.clear()
    assert cache.stats() == {
        "hits": 0,
        "misses": 0,
        "evictions": 0,
        "entries": 0,
        "bytes": 0,
        "max_bytes": 3072,
    }


def test_second_click_is_cached_and_skips_the_encoder(tiny_sam, volume, encoder_calls):
    pred = VolumePredictor(tiny_sam, "v1", EmbeddingCache(64 << 20))
    mask, info = pred.segment_slice("vol", volume, 2, [(20, 60)], [])
    assert info["embedding"] == "computed" and len(encoder_calls) == 1
    mask2, info2 = pred.segment_slice("vol", volume, 2, [(20, 60)], [(3, 3)])
    assert info2["embedding"] == "cached" and len(encoder_calls) == 1
    assert pred.cache.stats()["hits"] == 1
    # the result has the slice's geometry
    assert mask.shape == (I_SIZE, J_SIZE) and mask.dtype == bool
    assert info["low_res_logits"].shape == (1, 1, 64, 64)
    assert set(info["timings"]) >= {"encode", "decode", "total"} and np.isfinite(info["iou"])
    # another slice needs the encoder again
    _, info3 = pred.segment_slice("vol", volume, 3, None, None, (0, 10, 0, 10))
    assert info3["embedding"] == "computed" and len(encoder_calls) == 2


def test_version_change_invalidates(tiny_sam, volume, encoder_calls):
    cache = EmbeddingCache(64 << 20)
    VolumePredictor(tiny_sam, "v1", cache).segment_slice("vol", volume, 1, [(20, 60)])
    _, info = VolumePredictor(tiny_sam, "v2", cache).segment_slice("vol", volume, 1, [(20, 60)])
    assert info["embedding"] == "computed" and len(encoder_calls) == 2
    assert cache.discard_version("v1") == 1 and len(cache) == 1
    # another image key (a replaced file) is another entry too
    _, info = VolumePredictor(tiny_sam, "v2", cache).segment_slice("other", volume, 1, [(20, 60)])
    assert info["embedding"] == "computed"


def test_embedding_equals_direct_encoding_of_the_training_canvas(tiny_sam, volume):
    """Serving windows and resizes exactly as preprocessing does for training."""
    label = Volume(np.zeros(volume.shape, np.uint8), volume.spacing, volume.origin, volume.direction)
    label.array[15:25, 50:70, :] = 1
    slices = volume_to_slices(volume, label, PreprocessOptions())
    pred = VolumePredictor(tiny_sam, "v1")
    k = 4
    row = int(np.flatnonzero(slices.slice_index == k)[0])
    np.testing.assert_array_equal(pred.prepare("vol", volume).canvas(k), slices.imgs[row])
    emb, state = pred.embed("vol", volume, k)
    with torch.inference_mode():
        ref = sam_forward.encode(
            tiny_sam, sam_forward.canvas_to_input(tiny_sam, torch.from_numpy(slices.imgs[row : row + 1]))
        )
    torch.testing.assert_close(emb, ref)
    assert state == "computed" and pred.prepare("vol", volume).window.name == "abdomen"


def _disc_decoder(recorded: list):
    """A stand-in for ``sam_forward.decode_many``: logits positive in a disc of radius 3 canvas pixels
    around the first point (or the box centre), so the whole mapping back to voxels can be checked."""

    def fake(sam, embedding, prompts):
        points, point_labels, boxes = prompts.points, prompts.point_labels, prompts.boxes
        recorded.append({"points": points, "labels": point_labels, "boxes": boxes})
        size = sam_forward.input_size(sam) // 4
        if points is not None:
            x, y = points[0, 0].tolist()
        else:
            x0, y0, x1, y1 = boxes[0].tolist()
            x, y = (x0 + x1) / 2, (y0 + y1) / 2
        scale = size / 256.0  # canvas pixel -> low-res pixel
        yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
        d2 = (xx - (x + 0.5) * scale) ** 2 + (yy - (y + 0.5) * scale) ** 2
        logits = (3.0 * scale) ** 2 - d2  # > 0 inside the disc
        return logits[None, None].float(), torch.ones(1, 1)

    return fake


def test_a_click_lands_where_it_was_made(tiny_sam, volume, monkeypatch):
    recorded: list = []
    monkeypatch.setattr(sam_forward, "decode_many", _disc_decoder(recorded))
    pred = VolumePredictor(tiny_sam, "v1")
    geom = SliceGeometry(I_SIZE, J_SIZE)
    for i, j in [(5, 80), (30, 12), (20, 50)]:
        mask, _ = pred.segment_slice("vol", volume, 0, [(i, j)], [(1, 2)])
        pts, labels = recorded[-1]["points"], recorded[-1]["labels"]
        assert pts[0, 0].tolist() == pytest.approx(list(geom.point_to_model(i, j)))
        assert pts[0, 1].tolist() == pytest.approx(list(geom.point_to_model(1, 2)))
        assert labels.tolist() == [[1, 0]]
        assert mask[i, j], f"click ({i}, {j}) not inside its own mask"
        ii, jj = np.nonzero(mask)
        assert abs(ii.mean() - i) < 1.5 and abs(jj.mean() - j) < 1.5
    # an ROI box (given in any order) maps with x from j and y from i
    mask, info = pred.segment_slice("vol", volume, 0, None, None, (30, 10, 90, 60))
    assert recorded[-1]["points"] is None
    assert recorded[-1]["boxes"][0].tolist() == pytest.approx(list(geom.box_to_model(10, 30, 60, 90)))
    assert info["box_ij"] == [10, 30, 60, 90]
    ii, jj = np.nonzero(mask)
    assert abs(ii.mean() - 20) < 1.5 and abs(jj.mean() - 75) < 1.5


def test_bad_prompts_are_refused(tiny_sam, volume):
    pred = VolumePredictor(tiny_sam, "v1")
    with pytest.raises(UserInputError, match="outside the slice"):
        pred.segment_slice("vol", volume, 0, [(I_SIZE, 5)])
    with pytest.raises(UserInputError, match="outside the slice"):
        pred.segment_slice("vol", volume, 0, None, [(5, -1)])
    with pytest.raises(UserInputError, match="slice 6 is outside the volume"):
        pred.segment_slice("vol", volume, K_SIZE, [(5, 5)])
    with pytest.raises(UserInputError, match="no prompt"):
        pred.segment_slice("vol", volume, 0, [], [])
    with pytest.raises(UserInputError, match="entirely outside"):
        pred.segment_slice("vol", volume, 0, None, None, (50, 60, 0, 10))
    assert clip_box((-5, 100, 99, 3), (I_SIZE, J_SIZE)) == (0, I_SIZE - 1, 3, J_SIZE - 1)


def test_prefetch_encodes_neighbours_in_the_background(tiny_sam, volume, encoder_calls):
    pred = VolumePredictor(tiny_sam, "v1")
    pred.segment_slice("vol", volume, 2, [(20, 60)])
    assert pred.prefetch("vol", volume, neighbours(2, 3, K_SIZE)) == 3
    assert pred.prefetch_idle(timeout=30)
    assert len(encoder_calls) == 4 and pred.stats()["prefetch"]["encoded"] == 3
    for k in (3, 1, 4):
        _, info = pred.segment_slice("vol", volume, k, [(20, 60)])
        assert info["embedding"] == "cached"
    assert pred.prefetch("vol", volume, [2, 3, 99]) == 0  # cached or outside: nothing to do
    pred.close()


def test_neighbours_and_window_options():
    assert neighbours(0, 3, 10) == [1, 2, 3]
    assert neighbours(5, 4, 10) == [6, 4, 7, 3]
    assert neighbours(0, 4, 2) == [1]
    assert window_options("auto") == ("auto", None)
    assert window_options("bone") == ("ct", "bone")
    assert window_options("40,400") == ("ct", "40,400")
    assert window_options("MR") == ("mr", None)
    with pytest.raises(UserInputError, match="unknown window"):
        window_options("brain")


def test_volume_cache_follows_the_file(tmp_path, volume):
    path = tmp_path / "a.nrrd"
    write_volume(volume.array, volume, path)
    cache = VolumeCache(max_bytes=1 << 30)
    key, vol, state = cache.load(path)
    assert state == "loaded" and vol.shape == volume.shape
    key2, vol2, state2 = cache.load(path)
    assert (key2, state2) == (key, "cached") and vol2 is vol
    arr = volume.array.copy()
    arr[0, 0, 0] = 999
    import os
    import time

    time.sleep(0.01)
    write_volume(arr, volume, path)
    os.utime(path, ns=(time.time_ns(), time.time_ns()))
    key3, vol3, state3 = cache.load(path)
    assert key3 != key and state3 == "loaded" and vol3.array[0, 0, 0] == 999
    with pytest.raises(UserInputError, match="not found"):
        cache.load(tmp_path / "missing.nrrd")
    (tmp_path / "bad.nrrd").write_bytes(b"NRRD0004\ngarbage")
    with pytest.raises(UserInputError):
        cache.load(tmp_path / "bad.nrrd")


def test_the_latest_prefetch_wins_over_a_full_queue(tiny_sam, volume):
    """The user moves on: slices queued by earlier clicks are dropped, the latest ones are encoded."""
    import time

    pred = VolumePredictor(tiny_sam, "v1", prefetch_queue=3)
    real = pred._encode

    def slow(prep, k):
        time.sleep(0.1)
        return real(prep, k)

    pred._encode = slow
    assert pred.prefetch("vol", volume, [0, 1, 2]) == 3
    assert pred.prefetch("vol", volume, [3, 4, 5]) == 3  # the queue had no room left without the drop
    assert pred.prefetch_idle(timeout=30)
    assert all(pred.cache_key("vol", k) in pred.cache for k in (3, 4, 5))
    stats = pred.stats()["prefetch"]
    assert stats["cancelled"] >= 2 and stats["dropped"] == 0 and stats["encoded"] <= 4
    pred.close()
    assert pred.prefetch("vol", volume, [0]) == 0  # closed for good


class BatchingEngine(TorchEngine):
    """The PyTorch engine, batching ``encode_batch`` images per call (as on a GPU), counting its calls."""

    def __init__(self, sam, encode_batch: int) -> None:
        super().__init__(sam, encode_batch=encode_batch)
        self.batches: list[int] = []

    def encode(self, images):
        self.batches.append(len(images))
        return super().encode(images)


def test_prefetch_stays_within_the_cache_budget(tiny_sam, volume):
    emb_bytes = 4 * tiny_sam.prompt_encoder.embed_dim * 16 * 16  # fp32 (C, 16, 16)
    pred = VolumePredictor(tiny_sam, "v1", EmbeddingCache(3 * emb_bytes))
    assert pred.prefetch_room() == 2  # three embeddings fit: the clicked slice and two neighbours
    pred.segment_slice("vol", volume, 2, [(20, 60)])
    assert pred.prefetch("vol", volume, neighbours(2, 4, K_SIZE)) == 2
    assert pred.prefetch_idle(timeout=30)
    assert pred.cache.stats()["evictions"] == 0 and pred.stats()["prefetch"]["dropped"] == 2
    assert [k for k in range(K_SIZE) if pred.cache_key("vol", k) in pred.cache] == [1, 2, 3]


def test_batched_encodes_give_the_same_embeddings(tiny_sam, volume):
    engine = BatchingEngine(tiny_sam, encode_batch=3)
    pred = VolumePredictor(tiny_sam, "v1", engine=engine)
    assert pred.encode_batch == 3
    assert pred.encode_ahead("vol", volume, [0, 1, 2, 3, 99]) == 4
    assert engine.batches == [3, 1]
    one = VolumePredictor(tiny_sam, "v1")
    for k in range(4):
        batched = pred.cache.peek(pred.cache_key("vol", k))
        single, _ = one.embed("vol", volume, k)
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    assert pred.encode_ahead("vol", volume, [1, 2]) == 0  # cached: nothing to do
    # the prefetch worker batches too
    pred.prefetch("vol", volume, [4, 5])
    assert pred.prefetch_idle(timeout=30)
    assert engine.batches[2:] in ([2], [1, 1])  # one batch unless the worker took the first job alone
