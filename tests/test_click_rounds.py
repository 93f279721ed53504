"""Interactive training in click rounds (issue 18): where the clicks go, the mask fed back, the best of
three masks, the IoU target, and a short run that learns and records ``trained_prompts``.

The model is the ``tiny`` SAM architecture with seeded random weights; the data are bright discs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sam_medical.adapters.files import read_adapter_meta
from sam_medical.canvas.slice_file import save_npz
from sam_medical.errors import UserInputError
from sam_medical.model.build import build_sam
from sam_medical.prompts import tight_box
from sam_medical.training.click_rounds import (
    corrective_clicks,
    first_prompts,
    jittered_boxes,
    true_iou,
    valid_region,
)
from sam_medical.training.config import TrainConfig
from sam_medical.training.interactive_sam import InteractiveSam, item_losses, round_losses
from sam_medical.training.step import make_loss
from sam_medical.training.trainer import Trainer


def disc(cy: int, cx: int, r: int, size: int = 256) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _at(mask: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """``mask (B, H, W)`` at clicks ``xy (B, 2)`` -> ``(B,)``."""
    return mask[torch.arange(len(xy)), xy[:, 1].long(), xy[:, 0].long()]


def test_corrective_clicks_land_in_the_error_region():
    g = torch.Generator().manual_seed(0)
    target = disc(100, 100, 30).expand(64, -1, -1)
    # a miss only: the prediction is a smaller disc inside the object -> foreground clicks in the miss
    pred = disc(100, 100, 15).expand(64, -1, -1)
    xy, label = corrective_clicks(pred, target, generator=g)
    assert (label == 1).all() and _at(target & ~pred, xy).all()
    # a leak only: the prediction covers the object and more -> background clicks in the leak
    pred = disc(100, 100, 45).expand(64, -1, -1)
    xy, label = corrective_clicks(pred, target, generator=g)
    assert (label == 0).all() and _at(pred & ~target, xy).all()
    # both: each click's label says which error it fell in; both kinds occur (uniform over the region)
    pred = disc(100, 130, 30).expand(64, -1, -1)
    xy, label = corrective_clicks(pred, target, generator=g)
    assert torch.equal(_at(target & ~pred, xy), label == 1)
    assert torch.equal(_at(pred & ~target, xy), label == 0)
    assert 0 < int(label.sum()) < 64
    # the image region bounds the error region; an exact prediction gets a click inside the object
    valid = valid_region(torch.tensor([[256, 110]] * 64))
    xy, label = corrective_clicks(pred, target, valid, generator=g)
    assert _at(valid, xy).all() and (label == 1).all()  # the leak lies right of x = 110
    xy, label = corrective_clicks(target, target, generator=g)
    assert (label == 1).all() and _at(target, xy).all()


def test_first_prompt_is_a_click_inside_or_a_jittered_box_about_half_each():
    g = torch.Generator().manual_seed(1)
    target = torch.stack([disc(60 + i // 2, 80 + i // 3, 10 + i % 20) for i in range(200)])
    p = first_prompts(target, max_jitter=5, click_prob=0.5, generator=g)
    clicks = ~p.has_box
    assert 70 < int(clicks.sum()) < 130
    assert (p.point_labels[clicks, 0] == 1).all() and (p.point_labels[~clicks, 0] == -1).all()
    assert _at(target[clicks], p.points[clicks, 0]).all()
    assert torch.equal(p.lone_click(), clicks)
    tight = torch.stack([torch.from_numpy(tight_box(t.numpy())) for t in target])
    boxes = jittered_boxes(target, 5, g)
    outward = (boxes - tight) * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    assert (outward <= 5).all() and (outward >= -5).all() and (outward != 0).any()
    assert torch.equal(jittered_boxes(target, 0, g), tight)
    # a click added goes after the item's real clicks (a box item's first click takes slot 0)
    q = p.add_click(torch.full((200, 2), 7.0), torch.zeros(200, dtype=torch.int64))
    assert torch.equal(q.n_points, p.n_points + 1)
    assert (q.point_labels[~clicks, 0] == 0).all() and (q.point_labels[clicks, 1] == 0).all()


def test_best_of_three_loss_is_the_minimum_and_the_iou_target_is_the_true_iou():
    cfg = TrainConfig(data="d", out="o")
    loss_fn = make_loss(cfg, per_item=True)
    target = disc(128, 128, 40)[None, None].float()  # (1, 1, 256, 256)
    good = torch.where(target[0, 0] > 0, 8.0, -8.0)
    logits = torch.stack([-good, good, torch.where(disc(128, 150, 40), 8.0, -8.0)])[None]  # (1, 3, L, L)
    iou_pred = torch.tensor([[0.1, 0.5, 0.9]], requires_grad=True)
    valid = torch.ones_like(target, dtype=torch.bool)
    mask_loss, iou_loss, iou = round_losses(loss_fn, logits, iou_pred, target, valid)
    mean_loss = make_loss(cfg)
    each = torch.stack([mean_loss(logits[:, m : m + 1], target) for m in range(3)])
    assert mask_loss.item() == pytest.approx(float(each.min()), rel=1e-5)
    assert int(each.argmin()) == 1 and torch.allclose(
        item_losses(loss_fn, logits, target)[0], each, rtol=1e-5
    )
    # the IoU target: the masks' true IoU, computed here by hand
    gt = target[0, 0].numpy() > 0
    by_hand = [((m > 0) & gt).sum() / ((m > 0) | gt).sum() for m in logits[0].numpy()]
    assert iou[0].tolist() == pytest.approx(by_hand, abs=1e-6) and iou[0, 1] == 1.0
    assert float(iou_loss.detach()) == pytest.approx(float(((iou_pred.detach() - iou) ** 2).mean()), rel=1e-6)
    iou_loss.sum().backward()
    assert iou_pred.grad is not None and iou_pred.grad.abs().sum() > 0
    assert true_iou(torch.zeros(1, 1, 4, 4, dtype=torch.bool), torch.zeros(1, 1, 4, 4, dtype=torch.bool)) == 1


def test_rounds_feed_back_the_previous_mask_and_train_the_iou_head():
    sam, _ = build_sam("tiny", random_weights=True, seed=0)
    seen: list[tuple[torch.Tensor | None, bool]] = []

    def record(_module, _args, kwargs):
        masks = kwargs.get("masks")
        seen.append(
            (None if masks is None else masks.detach().clone(), masks is not None and masks.requires_grad)
        )

    sam.prompt_encoder.register_forward_pre_hook(record, with_kwargs=True)
    module = InteractiveSam(
        sam,
        make_loss(TrainConfig(data="d", out="o"), per_item=True),
        rounds=3,
        iou_weight=1.0,
        first_click_prob=0.5,
        box_jitter=5,
        generator=torch.Generator().manual_seed(0),
    )
    image = (disc(100, 120, 30).to(torch.uint8) * 200)[None, ..., None].expand(4, -1, -1, 3).contiguous()
    target = disc(100, 120, 30)[None, None].float().expand(4, -1, -1, -1)
    valid = torch.ones_like(target, dtype=torch.bool)
    loss = module(image, target, valid)
    loss.backward()
    assert [r["mask_fed_back"] for r in module.last_rounds] == [False, True, True]
    # round 1 decodes without a mask; every later decoder call gets the previous logits, detached
    with_mask = [m is not None for m, _ in seen]
    first = with_mask.index(True)
    assert first >= 1 and all(with_mask[first:]) and len(with_mask) - first >= 2
    size = sam.prompt_encoder.mask_input_size
    assert all(m.shape == (len(m), 1, *size) and not grad for m, grad in seen[first:])
    assert loss.item() == pytest.approx(np.mean([r["loss"] for r in module.last_rounds]), rel=1e-5)
    head = sam.mask_decoder.iou_prediction_head
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def _write_cases(folder: Path, n_cases: int = 4, n: int = 4) -> Path:
    yy, xx = np.mgrid[:256, :256]
    for c in range(n_cases):
        rng = np.random.default_rng(c)
        imgs = np.zeros((n, 256, 256, 3), np.uint8)
        gts = np.zeros((n, 256, 256), np.uint8)
        for row in range(n):
            img = rng.integers(0, 40, size=(256, 256)).astype(np.uint8)
            cy, cx, r = rng.integers(50, 200), rng.integers(50, 200), rng.integers(14, 30)
            d = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            gts[row][d], img[d] = 1, 220
            imgs[row] = img[..., None]
        save_npz(
            folder / f"case{c}.npz", {"imgs": imgs, "gts": gts, "slice_index": np.arange(n, dtype=np.int32)}
        )
    return folder


def test_a_short_run_in_click_rounds_learns_and_records_trained_prompts(tmp_path: Path):
    data = _write_cases(tmp_path / "npz")
    cfg = TrainConfig(
        data=str(data), out=str(tmp_path / "run"), model="tiny", random_weights=True, batch_size=4,
        val_fraction=0.25, click_rounds=3, epochs=4, max_steps=None, lr=5e-3, warmup_steps=1,
    )  # fmt: skip
    summary = Trainer(cfg, progress=False).run()
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r.get("event") == "epoch" and r["epoch"] >= 1]
    assert losses[-1] < losses[0], losses
    assert summary["best_val_dice"] > summary["initial_val_dice"], summary
    meta = read_adapter_meta(tmp_path / "run" / "adapter.pt")
    assert meta["trained_prompts"] == ["box", "point", "mask"]
    assert read_adapter_meta(tmp_path / "run" / "last.pt")["trained_prompts"] == ["box", "point", "mask"]
    assert TrainConfig(data="d", out="o").trained_prompts() == ["box", "point"]  # mixed: boxes and clicks
    assert TrainConfig(data="d", out="o", prompt="box").trained_prompts() == ["box"]


@pytest.mark.parametrize(
    "bad", [{"click_rounds": -1}, {"click_rounds": 1.5}, {"first_click_prob": 1.5}, {"iou_weight": -1.0}]
)
def test_bad_click_round_options_are_user_errors(bad: dict):
    with pytest.raises(UserInputError, match=next(iter(bad)).replace("_", "-")):
        TrainConfig(data="d", out="o", **bad).check()
