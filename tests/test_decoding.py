"""sam_medical.inference.decoding: the multimask rule, the choice among three masks, batched decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_medical.errors import UserInputError
from sam_medical.inference.decoding import (
    MULTIMASK_RULES,
    CanvasPrompt,
    canvas_logits,
    check_multimask,
    choose_mask,
)
from sam_medical.inference.engines import TorchEngine
from sam_medical.inference.strategies import decode_prompts
from sam_medical.model import forward as sf


def test_choose_mask_picks_the_highest_predicted_iou_and_passes_one_mask_through() -> None:
    low = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    iou = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]])
    best, best_iou = choose_mask(low, iou)
    assert best.shape == (2, 1, 4, 4) and best_iou.shape == (2,)
    assert torch.equal(best[0, 0], low[0, 1]) and torch.equal(best[1, 0], low[1, 0])
    assert best_iou.tolist() == pytest.approx([0.9, 0.7])
    one, one_iou = choose_mask(low[:, :1], iou[:, :1])
    assert torch.equal(one, low[:, :1]) and one_iou.tolist() == pytest.approx([0.1, 0.7])


def test_check_multimask_names_and_compatibility() -> None:
    assert MULTIMASK_RULES == ("auto", "on", "off")
    assert [check_multimask(v) for v in ("auto", "ON", " off ", True, False, "false")] == [
        "auto",
        "on",
        "off",
        "on",
        "off",
        "off",
    ]
    for bad in ("sometimes", 3, None):
        with pytest.raises(UserInputError, match="auto, on, off"):
            check_multimask(bad, option="--multimask")


class _Recorder:
    """An engine answering 3 masks whose best is mask 2, recording each call's prompt shapes."""

    name = "recorder"
    encode_batch = 1

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, ...], int, bool]] = []

    def decode(self, embedding, prompts):
        multimask_output = prompts.multimask_output
        names = ("points", "point_labels", "boxes", "mask_inputs")
        kwargs = {k: getattr(prompts, k) for k in names if getattr(prompts, k) is not None}
        p = next(iter(kwargs.values())).shape[0]
        self.calls.append((tuple(sorted(kwargs)), p, multimask_output))
        m = 3 if multimask_output else 1
        # every row's logits hold its first point's x (or box x0), so answers can be matched to prompts
        first = kwargs["points"][:, 0, 0] if "points" in kwargs else kwargs["boxes"][:, 0]
        low = first.view(p, 1, 1, 1).expand(p, m, 4, 4) + torch.arange(m).view(1, m, 1, 1) * 1000
        iou = torch.tensor([0.1, 0.2, 0.9][:m] if m == 3 else [0.5]).expand(p, m)
        return low.float(), iou


def _click(x: float, label: int = 1) -> CanvasPrompt:
    return CanvasPrompt(points=np.array([[x, 5.0]]), point_labels=np.array([label]))


def test_auto_rule_three_masks_only_for_a_lone_click_and_answers_in_order() -> None:
    box = np.array([1.0, 2.0, 30.0, 40.0])
    prompts = [
        _click(7.0),
        CanvasPrompt(points=np.array([[8.0, 5.0]]), point_labels=np.array([1]), box=box),
        _click(9.0, label=0),
        CanvasPrompt(box=np.array([11.0, 2.0, 30.0, 40.0])),
        CanvasPrompt(points=np.array([[12.0, 5.0], [3.0, 3.0]]), point_labels=np.array([1, 0])),
    ]
    engine = _Recorder()
    out = decode_prompts(engine, torch.zeros(1, 8, 4, 4), prompts, multimask="auto", batch=32)
    assert [d.multimask for d in out] == [True, False, True, False, False]
    assert [float(d.low_res_logits[0, 0, 0, 0]) for d in out] == [2007.0, 8.0, 2009.0, 11.0, 12.0]
    assert [d.iou for d in out] == pytest.approx([0.9, 0.5, 0.9, 0.5, 0.5])
    assert all(d.low_res_logits.shape == (1, 1, 4, 4) and d.strategy == "direct" for d in out)
    lone = [c for c in engine.calls if c[2]]
    assert lone == [(("point_labels", "points"), 2, True)]  # both lone clicks in one call
    assert len(engine.calls) == 4
    on = _Recorder()
    decode_prompts(on, torch.zeros(1, 8, 4, 4), prompts, multimask="on")
    assert all(c[2] for c in on.calls)
    off = _Recorder()
    decode_prompts(off, torch.zeros(1, 8, 4, 4), prompts, multimask="off", batch=1)
    assert not any(c[2] for c in off.calls) and len(off.calls) == 5


def test_decode_prompts_equals_engine_decode_on_the_tiny_model(tiny_sam, canvases) -> None:
    engine = TorchEngine(tiny_sam)
    emb = engine.encode(sf.canvas_to_input(tiny_sam, canvases[:1]))
    low_size = sf.low_res_size(tiny_sam)
    prev = torch.randn(1, 1, low_size, low_size, generator=torch.Generator().manual_seed(0))
    prompts = [
        _click(100.0),
        CanvasPrompt(box=np.array([20.0, 30.0, 200.0, 180.0])),
        CanvasPrompt(box=np.array([50.0, 60.0, 120.0, 140.0]), mask_input=prev),
        _click(140.0),
    ]
    out = decode_prompts(engine, emb, prompts, multimask="auto", batch=1)
    for p, d in zip(prompts, out, strict=True):
        kw = {}
        if p.points is not None:
            kw = {
                "points": torch.tensor(p.points[None], dtype=torch.float32),
                "point_labels": torch.tensor([[1]]),
            }
        if p.box is not None:
            kw["boxes"] = torch.tensor(p.box[None], dtype=torch.float32)
        if p.mask_input is not None:
            kw["mask_inputs"] = p.mask_input
        low, iou = engine.decode(emb, sf.PromptBatch(**kw, multimask_output=d.multimask))
        best = int(iou[0].argmax())
        assert torch.allclose(d.low_res_logits, low[:, best : best + 1], atol=1e-5)
        assert d.iou == pytest.approx(float(iou[0, best]), abs=1e-5)
    assert canvas_logits(out[0]).shape == (256, 256)
    many = canvas_logits(out)
    assert many.shape == (4, 256, 256) and np.allclose(many[1], canvas_logits(out[1]))
