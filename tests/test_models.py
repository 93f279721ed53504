"""Model building, checkpoint loading/validation, 256-native resizing, and the shared forward helpers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sam_medical.errors import UserInputError
from sam_medical.model import build as models
from sam_medical.model import forward as sf
from sam_medical.model.build import ARCHITECTURES, build_sam, construct_sam, save_full_model
from sam_medical.model.checkpoints import md5_file


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- building --------------------------------------------------------------------------------


def test_tiny_is_deterministic_and_leaves_the_global_rng_alone(tiny_model):
    sam, info = tiny_model
    assert info == {
        "name": "tiny",
        "image_size": 256,
        "checkpoint": None,
        "checkpoint_md5": None,
        "weights_digest": None,
        "random_weights": True,
        "seed": 0,
    }
    assert not sam.training and sam.device.type == "cpu"
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    again, _ = build_sam("tiny", seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # build_sam did not consume the global RNG
    assert _same_state(sam, again)
    other, _ = build_sam("tiny", seed=1)
    assert not _same_state(sam, other)


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_official_architectures_match_segment_anything_registry(name):
    from segment_anything import sam_model_registry

    with torch.device("meta"):  # shapes only, no memory, no time
        ours = construct_sam(ARCHITECTURES[name], 1024)
        ref = sam_model_registry[name]()
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes


def test_image_size_sets_encoder_prompt_and_mask_sizes():
    sam, info = build_sam("tiny", image_size=512)
    assert info["image_size"] == 512 and sam.image_encoder.img_size == 512
    assert sam.image_encoder.pos_embed.shape == (1, 32, 32, 192)
    assert sam.prompt_encoder.image_embedding_size == (32, 32)
    assert sam.prompt_encoder.input_image_size == (512, 512)
    for bad in (250, 0, 32, "256"):
        with pytest.raises(UserInputError, match="image size"):
            build_sam("tiny", image_size=bad)
    with pytest.raises(UserInputError, match="unknown model"):
        build_sam("vit_x")


def test_official_model_is_never_silently_random(tmp_path):
    with pytest.raises(UserInputError, match="downloading is off"):
        build_sam("vit_b", cache_dir=tmp_path, download=False)
    with pytest.raises(UserInputError, match="either a checkpoint or random"):
        build_sam("vit_b", checkpoint=tmp_path / "x.pth", random_weights=True)


# --- checkpoints -----------------------------------------------------------------------------


def test_full_model_round_trip_at_another_size(tiny_model, tmp_path, canvases):
    sam, info = tiny_model
    path = tmp_path / "tiny_full.pt"
    save_full_model(sam, path, info)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny_full.pt"]
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "sam-medical-model" and raw["config"]["name"] == "tiny"

    again, info2 = build_sam("tiny", checkpoint=path, seed=7)  # the seed does not matter with weights
    assert info2["checkpoint_md5"] == md5_file(path) and not info2["random_weights"]
    assert _same_state(sam, again)
    with torch.no_grad():
        x = sf.canvas_to_input(sam, canvases[:1])
        assert torch.equal(sf.encode(sam, x), sf.encode(again, x))

    big, _ = build_sam("tiny", image_size=512, checkpoint=path)
    assert big.image_encoder.pos_embed.shape == (1, 32, 32, 192)
    assert big.image_encoder.blocks[1].attn.rel_pos_h.shape == (63, 64)  # global block: 2*32-1
    assert big.image_encoder.blocks[0].attn.rel_pos_h.shape == (15, 64)  # window 8 kept

    with pytest.raises(UserInputError, match="holds a tiny model, not medsam_lite"):
        build_sam("medsam_lite", checkpoint=path)


def test_bad_checkpoints_are_user_errors(tiny_sam, tmp_path):
    state = tiny_sam.state_dict()

    dropped = dict(state)
    for k in list(dropped)[:12]:
        del dropped[k]
    torch.save(dropped, tmp_path / "missing.pth")
    with pytest.raises(UserInputError, match=r"is not a SAM tiny checkpoint: 12 missing keys e\.g\. "):
        build_sam("tiny", checkpoint=tmp_path / "missing.pth")

    reshaped = dict(state)
    reshaped["mask_decoder.iou_token.weight"] = torch.zeros(1, 64)
    reshaped["extra.weight"] = torch.zeros(2)
    torch.save({"model": reshaped}, tmp_path / "shapes.pth")
    with pytest.raises(
        UserInputError, match=r"1 unexpected keys .*1 shape mismatches e\.g\. mask_decoder\.iou_token"
    ):
        build_sam("tiny", checkpoint=tmp_path / "shapes.pth")

    torch.save(state, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match="corrupt, truncated"):
        build_sam("tiny", checkpoint=tmp_path / "truncated.pth")

    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(UserInputError, match="could not be read"):
        build_sam("tiny", checkpoint=tmp_path / "text.pth")

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(UserInputError, match="does not hold a model state dict"):
        build_sam("tiny", checkpoint=tmp_path / "list.pth")

    # DistributedDataParallel prefixes are accepted
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "ddp.pth")
    loaded, _ = build_sam("tiny", checkpoint=tmp_path / "ddp.pth")
    assert _same_state(loaded, tiny_sam)


def test_resize_pos_embed_follows_a_smooth_field():
    # A smooth field sampled at the 64x64 pixel centres, resized to 16x16, must match the field at the
    # 16x16 centres: the resize keeps positions where they are (no half-pixel shift).
    def field(n: int) -> torch.Tensor:
        c = (torch.arange(n) + 0.5) / n
        y, x = torch.meshgrid(c, c, indexing="ij")
        return torch.stack([torch.sin(2 * math.pi * x) * y, torch.cos(math.pi * y) + x], dim=-1)[None]

    out = models.resize_pos_embed(field(64), 16)
    assert out.shape == (1, 16, 16, 2)
    assert (out - field(16)).abs().max() < 0.02
    up = models.resize_pos_embed(field(16), 64)
    assert (up[:, 4:-4, 4:-4] - field(64)[:, 4:-4, 4:-4]).abs().max() < 0.05


def test_vit_b_256_native_from_a_1024_state_dict(tmp_path):
    from segment_anything import sam_model_registry

    src_sam, _ = build_sam("vit_b", random_weights=True, seed=1)
    state = src_sam.state_dict()
    del src_sam
    g = torch.Generator().manual_seed(0)
    state["image_encoder.pos_embed"] = torch.randn(1, 64, 64, 768, generator=g)
    for i in (2, 5, 8, 11):
        for ax in "hw":
            state[f"image_encoder.blocks.{i}.attn.rel_pos_{ax}"] = torch.randn(127, 64, generator=g)
    with torch.device("meta"):
        official = sam_model_registry["vit_b"]().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in official.items()}
    path = tmp_path / "vit_b_1024_random.pth"
    torch.save(state, path)

    sam, info = build_sam("vit_b", image_size=256, checkpoint=path)
    assert info["checkpoint_md5"] == md5_file(path) and not info["random_weights"]
    enc = sam.image_encoder
    assert enc.pos_embed.shape == (1, 16, 16, 768)
    assert torch.allclose(enc.pos_embed, models.resize_pos_embed(state["image_encoder.pos_embed"], 16))
    expected_rel = F.interpolate(
        state["image_encoder.blocks.2.attn.rel_pos_h"].t()[None], size=31, mode="linear"
    )[0].t()
    assert enc.blocks[2].attn.rel_pos_h.shape == (31, 64)
    assert torch.allclose(enc.blocks[2].attn.rel_pos_h, expected_rel)
    assert torch.equal(
        enc.blocks[0].attn.rel_pos_w, state["image_encoder.blocks.0.attn.rel_pos_w"]
    )  # window 14
    assert enc.blocks[0].attn.rel_pos_w.shape == (27, 64)
    assert torch.equal(enc.patch_embed.proj.weight, state["image_encoder.patch_embed.proj.weight"])
    del state
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 256, 256, generator=g))
    assert out.shape == (1, 256, 16, 16) and torch.isfinite(out).all()


# --- sam_forward -----------------------------------------------------------------------------


def test_canvas_to_input_layouts_normalisation_and_upsampling(tiny_sam, canvases):
    x = sf.canvas_to_input(tiny_sam, canvases)
    assert x.shape == (2, 3, 256, 256) and x.dtype == torch.float32
    assert torch.equal(x, sf.canvas_to_input(tiny_sam, canvases.permute(0, 3, 1, 2)))
    expected = (canvases[0, 5, 7, 0].float() - tiny_sam.pixel_mean[:, 0, 0]) / tiny_sam.pixel_std[:, 0, 0]
    assert torch.allclose(x[0, :, 5, 7], expected)
    big, _ = build_sam("tiny", image_size=512)
    assert sf.canvas_to_input(big, canvases).shape == (2, 3, 512, 512)
    # a horizontal ramp (value = column) upsampled x2: column j holds the canvas at (j + 0.5) / 2 - 0.5
    ramp = torch.arange(256).to(torch.uint8).expand(1, 256, 256)[..., None].expand(-1, -1, -1, 3)
    xb = sf.canvas_to_input(big, ramp) * big.pixel_std + big.pixel_mean
    cols = torch.arange(2, 510).float()
    assert torch.allclose(xb[0, 0, 100, 2:510], (cols + 0.5) / 2 - 0.5, atol=1e-3)
    with pytest.raises(ValueError):
        sf.canvas_to_input(tiny_sam, canvases[:, :128])


@pytest.mark.parametrize("size", [256, 512])
def test_decode_matches_segment_anything_forward(size, canvases):
    """Our canvas-space encode+decode gives SAM's own ``Sam.forward`` low-res logits (scaled prompts)."""
    sam, _ = build_sam("tiny", image_size=size)
    factor = size / 256
    points = torch.tensor([[[120.0, 100.0], [10.0, 250.0]], [[60.0, 100.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0], [1, -1]])
    boxes = torch.tensor([[80.0, 60.0, 160.0, 140.0], [30.0, 60.0, 90.0, 140.0]])
    with torch.no_grad():
        emb = sf.encode(sam, sf.canvas_to_input(sam, canvases))
        assert emb.shape == (2, 128, size // 16, size // 16)
        for multimask in (False, True):
            ours, iou = sf.decode(
                sam,
                emb,
                sf.PromptBatch(points=points, point_labels=labels, boxes=boxes, multimask_output=multimask),
            )
            m = 3 if multimask else 1
            assert ours.shape == (2, m, size // 4, size // 4) and iou.shape == (2, m)
            images = F.interpolate(canvases.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear")
            batched = [
                {
                    "image": images[i],
                    "original_size": (size, size),
                    "point_coords": points[i : i + 1] * factor,
                    "point_labels": labels[i : i + 1],
                    "boxes": boxes[i : i + 1] * factor,
                }
                for i in range(2)
            ]
            ref = sam(batched, multimask_output=multimask)
            for i in range(2):
                assert torch.allclose(ours[i], ref[i]["low_res_logits"][0], atol=1e-4)
                assert torch.allclose(iou[i], ref[i]["iou_predictions"][0], atol=1e-5)


def test_decode_and_decode_many_agree(tiny_sam, canvases):
    sam = tiny_sam
    g = torch.Generator().manual_seed(3)
    p = 3
    points = torch.randint(0, 256, (p, 4, 2), generator=g).float()
    labels = torch.tensor([[1, 1, 0, -1], [1, 0, -1, -1], [0, 1, 1, 1]])
    boxes = torch.tensor([[10.0, 20, 200, 180], [50, 50, 60, 70], [0, 0, 255, 255]])
    masks = torch.randn(p, 1, 64, 64, generator=g)
    with torch.no_grad():
        emb = sf.encode(sam, sf.canvas_to_input(sam, canvases))
        prompt_sets = [
            {"points": points, "point_labels": labels},
            {"boxes": boxes},
            {"points": points, "point_labels": labels, "boxes": boxes, "mask_inputs": masks},
            {"boxes": boxes, "multimask_output": True},
        ]
        for kw in prompt_sets:
            for i in range(2):  # image i, P prompt sets: decode_many vs decode on a repeated embedding
                many, many_iou = sf.decode_many(sam, emb[i : i + 1], sf.PromptBatch(**kw))
                one, one_iou = sf.decode(sam, emb[i : i + 1].expand(p, -1, -1, -1), sf.PromptBatch(**kw))
                assert many.shape == one.shape == (p, 3 if kw.get("multimask_output") else 1, 64, 64)
                assert (many - one).abs().max() <= 1e-5 and (many_iou - one_iou).abs().max() <= 1e-5
        # mixed batch: decode pairs prompt b with image b
        both, _ = sf.decode(sam, emb, sf.PromptBatch(boxes=boxes[:2]))
        first, _ = sf.decode_many(sam, emb[0], sf.PromptBatch(boxes=boxes[:1]))
        second, _ = sf.decode_many(sam, emb[1], sf.PromptBatch(boxes=boxes[1:2]))
        assert torch.allclose(both, torch.cat([first, second]), atol=1e-5)
        assert not torch.allclose(
            first, sf.decode_many(sam, emb[1], sf.PromptBatch(boxes=boxes[:1]))[0], atol=1e-3
        )
        # no prompt at all still gives one mask per image
        bare, _ = sf.decode(sam, emb)
        assert bare.shape == (2, 1, 64, 64)


def test_logits_to_canvas():
    low = torch.zeros(2, 3, 64, 64)
    low[..., :32, :] = 4.0
    up = sf.logits_to_canvas(low)
    assert up.shape == (2, 3, 256, 256)
    assert torch.all(up[..., :126, :] == 4.0) and torch.all(up[..., 130:, :] == 0.0)
    same = torch.randn(1, 256, 256)
    assert torch.equal(sf.logits_to_canvas(same), same)  # S = 1024: already canvas-sized
