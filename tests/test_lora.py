"""LoRA on q/v of the encoder: identity at init, only adapters train, adapter files, merge, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from sam_medical.adapters.files import modules_to_save, read_adapter_meta
from sam_medical.adapters.inject import (
    base_state_dict,
    inject_lora,
    is_lora_injected,
    lora_config,
    lora_parameters,
    merge_lora,
    set_trainable,
    unmerge_lora,
)
from sam_medical.adapters.layer import LoRAQKV
from sam_medical.adapters.save_and_load import load_adapter, save_adapter
from sam_medical.cli.main import main
from sam_medical.errors import UserInputError
from sam_medical.model import forward as sf
from sam_medical.model.build import build_sam, count_parameters, save_full_model

VIT_B_RANK4_LORA_PARAMS = 147_456  # SAMed's count: 12 blocks x 2 (q, v) x (4*768 + 768*4)


def _logits(sam, canvases, boxes=None) -> torch.Tensor:
    """Encoder + decoder output for the two test canvases, ``(2, 1, S/4, S/4)``."""
    if boxes is None:
        boxes = torch.tensor([[80.0, 60.0, 160.0, 140.0], [30.0, 60.0, 90.0, 140.0]])
    emb = sf.encode(sam, sf.canvas_to_input(sam, canvases))
    return sf.decode(sam, emb, sf.PromptBatch(boxes=boxes))[0]


def _train_steps(sam, canvases, steps: int = 3) -> None:
    """A few AdamW steps on a Dice-free dummy loss (BCE against two rectangles)."""
    target = torch.zeros(2, 1, 64, 64)
    target[0, :, 15:35, 20:40] = 1
    target[1, :, 15:35, 8:22] = 1
    opt = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(_logits(sam, canvases), target)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _adapter_kwargs(sam, info, train_decoder=False):
    cfg = lora_config(sam)
    return {
        "base_info": info,
        "rank": cfg["rank"],
        "alpha": cfg["alpha"],
        "blocks": cfg["blocks"],
        "image_size": info["image_size"],
        "train_decoder": train_decoder,
    }


def test_fresh_lora_is_the_identity_and_keeps_state_names(tiny_model, canvases):
    sam, _ = tiny_model
    plain_keys = set(sam.state_dict())
    with torch.no_grad():
        before = _logits(sam, canvases)
    blocks = inject_lora(sam, rank=4)
    assert blocks == [0, 1, 2, 3] and is_lora_injected(sam)
    assert lora_config(sam) == {"rank": 4, "alpha": 4.0, "blocks": [0, 1, 2, 3]}
    assert set(base_state_dict(sam)) == plain_keys  # base weights keep segment_anything's names
    assert all(not p.requires_grad for n, p in sam.named_parameters() if ".lora_" not in n)
    with torch.no_grad():
        after = _logits(sam, canvases)
    assert (after - before).abs().max() <= 1e-6
    with pytest.raises(UserInputError, match="already injected"):
        inject_lora(sam)


def test_lora_qkv_adds_low_rank_updates_to_q_and_v_only():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 24)
    lora = LoRAQKV(base, rank=2, alpha=4.0)
    assert lora.weight is base.weight and lora.scale == 2.0
    assert lora.lora_q_A.weight.shape == (2, 8) and lora.lora_q_B.weight.shape == (8, 2)
    assert lora.lora_q_A.weight.abs().sum() > 0 and lora.lora_v_B.weight.abs().sum() == 0
    with torch.no_grad():
        lora.lora_q_B.weight.normal_()
        lora.lora_v_B.weight.normal_()
    x = torch.randn(3, 5, 8)
    out = lora(x)
    ref = base(x)
    dq = 2.0 * x @ (lora.lora_q_B.weight @ lora.lora_q_A.weight).T
    dv = 2.0 * x @ (lora.lora_v_B.weight @ lora.lora_v_A.weight).T
    assert torch.allclose(out[..., :8], ref[..., :8] + dq, atol=1e-5)
    assert torch.equal(out[..., 8:16], ref[..., 8:16])  # k untouched
    assert torch.allclose(out[..., 16:], ref[..., 16:] + dv, atol=1e-5)
    original = base.weight.detach().clone()
    lora.merge()
    lora.merge()  # idempotent: no double counting
    assert torch.allclose(lora(x), out, atol=1e-5)
    lora.unmerge()
    assert torch.allclose(base.weight, original, atol=1e-6) and torch.allclose(lora(x), out, atol=1e-5)


@pytest.mark.parametrize("train_decoder", [False, True])
def test_training_changes_only_adapters_and_decoder_if_asked(tiny_model, canvases, train_decoder):
    sam, _ = tiny_model
    inject_lora(sam, rank=4, seed=0)
    n = set_trainable(sam, train_decoder=train_decoder)
    expected = sum(p.numel() for p in lora_parameters(sam)) + (
        count_parameters(sam.mask_decoder) if train_decoder else 0
    )
    assert n == expected == count_parameters(sam, trainable_only=True)
    assert not any(p.requires_grad for p in sam.prompt_encoder.parameters())
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    _train_steps(sam, canvases)
    after = sam.state_dict()
    for key, value in after.items():
        changed = not torch.equal(value, before[key])
        if ".lora_" in key:
            if "_B." in key:
                assert changed, key  # B starts at zero and must have moved
        elif key.startswith("mask_decoder.") and train_decoder:
            pass
        else:
            assert not changed, f"base weight {key} changed"
    if train_decoder:
        assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("mask_decoder."))


def test_adapter_round_trip_merge_and_full_model_export(tiny_model, canvases, tmp_path):
    sam, info = tiny_model
    inject_lora(sam, rank=4, alpha=8, blocks=[1, 3], seed=0)
    set_trainable(sam, train_decoder=True)
    _train_steps(sam, canvases)
    sam.eval()
    with torch.no_grad():
        trained = _logits(sam, canvases)

    path = tmp_path / "adapter.pt"
    meta = save_adapter(sam, path, **_adapter_kwargs(sam, info, train_decoder=True), extra={"epochs": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.pt"]
    assert meta == read_adapter_meta(path)
    assert meta["model"] == "tiny" and meta["rank"] == 4 and meta["alpha"] == 8.0 and meta["blocks"] == [1, 3]
    assert meta["train_decoder"] and meta["epochs"] == 3 and meta["version"] and meta["created"]
    assert meta["modules_to_save"] == ["mask_decoder"] == modules_to_save(meta)  # PEFT's name for it
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "sam-medical-adapter" and "decoder" in raw
    assert all(".lora_" in k for k in raw["lora"]) and len(raw["lora"]) == 2 * 4

    fresh, fresh_info = build_sam("tiny", seed=0)
    with torch.no_grad():
        untouched = _logits(fresh, canvases)
    assert (untouched - trained).abs().max() > 1e-3  # the training did change the outputs
    loaded = load_adapter(fresh, path, base_info=fresh_info)
    assert loaded["version"] == meta["version"]
    assert lora_config(fresh) == {"rank": 4, "alpha": 8.0, "blocks": [1, 3]}
    with torch.no_grad():
        assert (_logits(fresh, canvases) - trained).abs().max() <= 1e-5
        merge_lora(fresh)
        assert all(m.merged for m in fresh.image_encoder.blocks[1].attn.modules() if isinstance(m, LoRAQKV))
        assert (_logits(fresh, canvases) - trained).abs().max() <= 1e-5
        unmerge_lora(fresh)
        assert (_logits(fresh, canvases) - trained).abs().max() <= 1e-5

    # export with LoRA folded in, reload as a plain model
    full = tmp_path / "full.pt"
    save_full_model(sam, full, info)
    plain, _ = build_sam("tiny", checkpoint=full)
    assert not is_lora_injected(plain)
    with torch.no_grad():
        assert (_logits(plain, canvases) - trained).abs().max() <= 1e-5


def test_swapping_to_an_adapter_without_decoder_restores_the_base_decoder(tiny_model, canvases, tmp_path):
    sam, info = tiny_model
    base_decoder = {k: v.clone() for k, v in sam.mask_decoder.state_dict().items()}
    inject_lora(sam, seed=0)
    set_trainable(sam, train_decoder=True)
    _train_steps(sam, canvases, steps=2)
    save_adapter(sam, tmp_path / "with_dec.pt", **_adapter_kwargs(sam, info, train_decoder=True))
    save_adapter(sam, tmp_path / "lora_only.pt", **_adapter_kwargs(sam, info, train_decoder=False))

    server, server_info = build_sam("tiny", seed=0)
    load_adapter(server, tmp_path / "with_dec.pt", base_info=server_info)
    assert not torch.equal(server.mask_decoder.iou_token.weight, base_decoder["iou_token.weight"])
    merge_lora(server)
    load_adapter(server, tmp_path / "lora_only.pt", base_info=server_info)
    assert all(m.merged for m in server.modules() if isinstance(m, LoRAQKV))  # still merged, once
    state = server.mask_decoder.state_dict()
    assert all(torch.equal(state[k], base_decoder[k]) for k in base_decoder)


def test_adapters_for_other_bases_or_bad_files_are_refused(tiny_model, canvases, tmp_path):
    sam, info = tiny_model
    inject_lora(sam, rank=4, seed=0)
    path = tmp_path / "a.pt"
    save_adapter(sam, path, **_adapter_kwargs(sam, info))

    lite, lite_info = build_sam("medsam_lite", random_weights=True)
    with pytest.raises(UserInputError, match="made for base model tiny, not medsam_lite"):
        load_adapter(lite, path, base_info=lite_info)

    other_seed, other_info = build_sam("tiny", seed=1)
    with pytest.raises(UserInputError, match="seed 0, not seed 1"):
        load_adapter(other_seed, path, base_info=other_info)

    big, big_info = build_sam("tiny", image_size=512)
    with pytest.raises(UserInputError, match="input size 256"):
        load_adapter(big, path, base_info=big_info)
    with pytest.raises(UserInputError, match="input size 256"):
        load_adapter(big, path)

    rank2, rank2_info = build_sam("tiny")
    inject_lora(rank2, rank=2)
    with pytest.raises(UserInputError, match="rank 4, but the model has rank 2"):
        load_adapter(rank2, path, base_info=rank2_info)

    # adapters made on two different checkpoints of the same model
    ck_a, ck_b = tmp_path / "tiny_a.pt", tmp_path / "tiny_b.pt"
    for seed, ck in ((0, ck_a), (1, ck_b)):
        model, model_info = build_sam("tiny", seed=seed)
        save_full_model(model, ck, model_info)
    on_a, on_a_info = build_sam("tiny", checkpoint=ck_a)
    inject_lora(on_a)
    save_adapter(on_a, tmp_path / "on_a.pt", **_adapter_kwargs(on_a, on_a_info))
    on_b, on_b_info = build_sam("tiny", checkpoint=ck_b)
    with pytest.raises(UserInputError, match="checkpoint with MD5"):
        load_adapter(on_b, tmp_path / "on_a.pt", base_info=on_b_info)

    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "plain.pt").write_bytes(b"\x00" * 100)
    torch.save(sam.state_dict(), tmp_path / "model.pt")
    fresh, fresh_info = build_sam("tiny")
    for bad, message in [
        ("cut.pt", "corrupt, truncated"),
        ("plain.pt", "could not be read"),
        ("model.pt", "not a sam-medical LoRA adapter"),
        ("missing.pt", "does not exist"),
    ]:
        with pytest.raises(UserInputError, match=message):
            load_adapter(fresh, tmp_path / bad, base_info=fresh_info)
    assert not is_lora_injected(fresh)  # nothing was half-applied
    with pytest.raises(UserInputError, match="is a LoRA adapter, not a model checkpoint"):
        build_sam("tiny", checkpoint=path)


@pytest.fixture(scope="module")
def vit_b_256():
    return build_sam("vit_b", image_size=256, random_weights=True)


def test_vit_b_rank4_has_samed_parameter_count_and_a_small_file(vit_b_256, tmp_path):
    sam, info = vit_b_256
    inject_lora(sam, rank=4)
    assert sum(p.numel() for p in lora_parameters(sam)) == VIT_B_RANK4_LORA_PARAMS
    assert set_trainable(sam, train_decoder=False) == VIT_B_RANK4_LORA_PARAMS
    path = tmp_path / "vit_b_r4.pt"
    meta = save_adapter(sam, path, **_adapter_kwargs(sam, info))
    assert meta["lora_params"] == VIT_B_RANK4_LORA_PARAMS
    assert path.stat().st_size < 1_000_000


def test_describe_cli_reports_lora_counts(capsys):
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        decoder_params = count_parameters(sam_model_registry["vit_b"]().mask_decoder)
    assert main(["describe", "--model", "vit_b", "--lora-rank", "4", "--no-train-decoder"]) == 0
    out, err = capsys.readouterr()
    row = json.loads(out)
    assert out.count("\n") == 1 and "random" in err
    assert row["model"] == "vit_b" and row["image_size"] == 256 and row["random_weights"] is True
    assert row["trainable_params"] == row["lora_params"] == VIT_B_RANK4_LORA_PARAMS
    assert row["decoder_params"] == decoder_params
    assert row["total_params"] > 90_000_000

    assert main(["describe", "--model", "vit_b", "--lora-rank", "4", "--train-decoder"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["trainable_params"] == VIT_B_RANK4_LORA_PARAMS + decoder_params


def test_describe_cli_tiny_and_errors(capsys, tmp_path):
    assert (
        main(["describe", "--model", "tiny", "--lora-rank", "2", "--lora-alpha", "4", "--no-train-decoder"])
        == 0
    )
    row = json.loads(capsys.readouterr().out)
    assert row["lora_params"] == 4 * 2 * (2 * 192 + 192 * 2) == row["trainable_params"]
    assert main(["describe", "--model", "tiny", "--image-size", "100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "multiple of 16" in err and err.count("\n") == 1
    assert main(["describe", "--model", "vit_b", "--checkpoint", str(tmp_path / "none.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_modules_to_save_of_files_written_before_the_key():
    """Adapter files written before ``modules_to_save`` existed name the decoder by ``train_decoder``."""
    assert modules_to_save({"train_decoder": True}) == ["mask_decoder"]
    assert modules_to_save({"train_decoder": False}) == [] == modules_to_save({})
