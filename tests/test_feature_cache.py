"""The frozen encoder's outputs are computed once per slice, in memory and (optionally) on disk, and
training with the cache gives exactly what training without it gives."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from test_training import write_case

from sam_medical.adapters.inject import inject_lora, lora_parameters, set_trainable
from sam_medical.model import forward as sf
from sam_medical.model.build import build_sam
from sam_medical.training.feature_cache import MODE_EMBEDDING, MODE_NONE, MODE_STEM, FeatureCache


def test_embedding_mode_caches_in_memory_and_on_disk(tiny_sam, canvases, tmp_path):
    set_trainable(tiny_sam, train_decoder=True)  # decoder only: the encoder is frozen whole
    cache = FeatureCache(tiny_sam, 64 << 20, tmp_path / "features", identity="tiny|seed0")
    assert cache.mode == MODE_EMBEDDING
    keys = [("case_a", 3), ("case_a", 4)]
    first = cache.embed(tiny_sam, canvases, keys)
    with torch.no_grad():
        want = sf.encode(tiny_sam, sf.canvas_to_input(tiny_sam, canvases))
    assert torch.equal(first, want)
    again = cache.embed(tiny_sam, canvases, keys)
    assert torch.equal(again, want) and cache.stats()["hits"] == 2

    other_run = FeatureCache(tiny_sam, 64 << 20, tmp_path / "features", identity="tiny|seed0")
    assert torch.equal(other_run.embed(tiny_sam, canvases, keys), want)
    assert other_run.stats()["disk_reads"] == 2 and other_run.stats()["misses"] == 2

    # other frozen weights get their own folder; a damaged file is recomputed, never served
    assert FeatureCache(tiny_sam, 1, tmp_path / "features", identity="other").disk != cache.disk
    for f in cache.disk.iterdir():
        f.write_bytes(b"damaged")
    third = FeatureCache(tiny_sam, 64 << 20, tmp_path / "features", identity="tiny|seed0")
    assert torch.equal(third.embed(tiny_sam, canvases, keys), want) and third.stats()["disk_reads"] == 0


def test_no_split_for_vit_with_lora_and_no_cache_without_keys(tiny_sam, canvases):
    inject_lora(tiny_sam, rank=2, seed=0)
    cache = FeatureCache(tiny_sam, 64 << 20)
    assert cache.mode == MODE_NONE
    out = cache.embed(tiny_sam, canvases, [("a", 1), ("a", 2)])
    assert out.requires_grad and cache.stats()["entries"] == 0


def test_tinyvit_stem_is_cached_and_gradients_reach_the_adapters(canvases):
    sam, _ = build_sam("medsam_lite", random_weights=True)
    inject_lora(sam, rank=2, seed=0)
    with torch.no_grad():
        for p in lora_parameters(sam):
            p.add_(0.01)
    cache = FeatureCache(sam, 256 << 20)
    assert cache.mode == MODE_STEM
    keys = [("c", 0), ("c", 1)]
    got = cache.embed(sam, canvases, keys)
    want = sf.encode(sam, sf.canvas_to_input(sam, canvases))
    assert torch.allclose(got, want, atol=1e-5)
    got.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(sam))
    cache.embed(sam, canvases, keys)
    assert cache.stats()["hits"] == 2 and cache.stats()["entries"] == 2


def test_training_with_the_cache_equals_training_without(tmp_path):
    from sam_medical.training.config import TrainConfig
    from sam_medical.training.trainer import train

    data = tmp_path / "npz"
    for i in range(3):
        write_case(data / f"c{i}.npz", 3, seed=i)
    adapters = []
    for name, mb, disk in (("off", 0, None), ("on", 512, None), ("disk", 512, tmp_path / "feat")):
        cfg = TrainConfig(
            data=str(data),
            out=str(tmp_path / name),
            model="tiny",
            random_weights=True,
            lora_rank=0,
            train_decoder=True,
            max_steps=3,
            epochs=3,
            batch_size=2,
            lr=1e-3,
            feature_cache_mb=mb,
            feature_cache_dir=str(disk) if disk else None,
        )
        summary = train(cfg, progress=False)
        adapters.append(torch.load(summary["adapter"], weights_only=True)["decoder"])
    for other in adapters[1:]:
        for k, v in adapters[0].items():
            torch.testing.assert_close(other[k], v, rtol=0, atol=1e-6)
    assert any(Path(tmp_path / "feat").rglob("*.pt"))


def test_stem_split_is_exact_for_medsam_lite():
    from sam_medical.model.medsam_lite import tinyvit_split

    sam, _ = build_sam("medsam_lite")
    stem, trunk, modules = tinyvit_split(copy.deepcopy(sam))
    x = torch.from_numpy(np.random.default_rng(0).random((1, 3, 256, 256), np.float32))
    with torch.no_grad():
        assert torch.equal(trunk(stem(x)), sam.image_encoder(x))
    assert len(modules) == 2
