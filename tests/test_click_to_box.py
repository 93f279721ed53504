"""Day-one clicks (issue 17): the click-to-box strategy, its choice per model, and real LiteMedSAM clicks."""

from __future__ import annotations

import numpy as np
import pytest

from sam_medical.errors import UserInputError
from sam_medical.inference import click_to_box as c2b
from sam_medical.inference.decoding import DIRECT, CanvasPrompt, canvas_logits
from sam_medical.inference.engines import TorchEngine
from sam_medical.inference.strategies import check_click_strategy, click_strategy, decode_prompts


def _disc_image(cx: int = 128, cy: int = 128, r: int = 20) -> np.ndarray:
    """``(256, 256)`` uint8: a bright disc of radius ``r`` on a dark background."""
    yy, xx = np.mgrid[:256, :256]
    return np.where((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r, 200, 30).astype(np.uint8)


def _click(x: float, y: float, *more: tuple[float, float, int], image=None) -> CanvasPrompt:
    pts = [(x, y)] + [(a, b) for a, b, _ in more]
    labels = [1] + [lab for _, _, lab in more]
    return CanvasPrompt(
        points=np.asarray(pts, np.float32),
        point_labels=np.asarray(labels),
        strategy=c2b.CLICK_TO_BOX,
        image=image,
    )


def test_the_strategy_follows_what_the_weights_were_trained_with() -> None:
    assert click_strategy(("box",)) == c2b.CLICK_TO_BOX  # LiteMedSAM
    assert click_strategy(("box", "point", "mask")) == DIRECT  # SAM, click-trained adapters
    assert click_strategy(()) == DIRECT  # random test weights
    assert click_strategy(("box",), "direct") == DIRECT  # the setting wins when not auto
    assert click_strategy(("box", "point"), "CLICK_TO_BOX") == c2b.CLICK_TO_BOX
    with pytest.raises(UserInputError, match="click_strategy must be one of auto, direct, click_to_box"):
        check_click_strategy("boxes")


def test_registry_records_the_trained_prompts() -> None:
    from sam_medical.model.registry import get_family

    assert get_family("medsam_lite").trained_prompts == ("box",)
    assert "point" in get_family("vit_b").trained_prompts
    assert get_family("tiny").trained_prompts == ()


def test_candidates_are_centred_on_the_click_and_sized_by_the_clicked_region() -> None:
    candidates = c2b.candidate_boxes(_click(128, 128, image=_disc_image(r=20)))
    assert len(candidates) == len(c2b.SCALES) + 1  # + the region's own box: a disc fills its box well
    pad = c2b.REGION_PAD
    # the disc spans 108..148; the opening trims its one-pixel tips by up to 2 px
    np.testing.assert_allclose(candidates[-1], [108 - pad, 108 - pad, 148 + pad, 148 + pad], atol=2.01)
    boxes = candidates[:-1]
    np.testing.assert_allclose((boxes[:, 0] + boxes[:, 2]) / 2, 128, atol=0.5)
    np.testing.assert_allclose((boxes[:, 1] + boxes[:, 3]) / 2, 128, atol=0.5)
    half = (boxes[:, 2] - boxes[:, 0]) / 2
    area_half = np.sqrt(np.pi * 20 * 20) / 2  # the disc's area as a square's half-side
    np.testing.assert_allclose(sorted(half), [area_half * k for k in sorted(c2b.SCALES)], rtol=0.1)
    bigger = c2b.candidate_boxes(_click(128, 128, image=_disc_image(r=40)))[:-1]
    np.testing.assert_allclose(np.sort(bigger[:, 2] - bigger[:, 0]), 2 * np.sort(2 * half), rtol=0.1)


def test_every_candidate_holds_all_foreground_clicks_and_bg_clicks_edit_the_box() -> None:
    image = _disc_image(r=20)
    boxes = c2b.candidate_boxes(_click(128, 128, (170, 160, 1), image=image))
    for x, y in ((128, 128), (170, 160)):
        assert np.all((boxes[:, 0] <= x - c2b.CLICK_PAD + 1e-3) & (boxes[:, 2] >= x + c2b.CLICK_PAD - 1e-3))
        assert np.all((boxes[:, 1] <= y - c2b.CLICK_PAD + 1e-3) & (boxes[:, 3] >= y + c2b.CLICK_PAD - 1e-3))
    plain = c2b.candidate_boxes(_click(128, 128, image=image))
    off_centre = c2b.candidate_boxes(_click(140, 128, image=image))  # the region box does not move
    np.testing.assert_allclose(off_centre[-1], plain[-1])
    edited = c2b.candidate_boxes(_click(128, 128, (138, 128, 0), image=image))
    assert len(edited) > len(plain)
    new = [b for b in edited if not any(np.allclose(b, p) for p in plain)]
    assert new and all(not (b[0] <= 138 <= b[2] and b[1] <= 128 <= b[3]) for b in new)  # bg click excluded
    assert all(b[0] <= 128 <= b[2] and b[1] <= 128 <= b[3] for b in new)  # the fg click kept


def test_the_chooser_rejects_masks_that_miss_a_click_or_cover_a_background_click() -> None:
    logits = -np.ones((3, 256, 256), np.float32)
    logits[0, 100:160, 100:160] = 1  # holds the fg click and the bg click
    logits[1, 120:140, 120:140] = 1  # holds the fg click only
    logits[2, 0:10, 0:10] = 1  # misses the fg click
    boxes = np.asarray([[90, 90, 170, 170], [110, 110, 150, 150], [0, 0, 20, 20]], np.float32)
    iou = np.asarray([0.9, 0.5, 0.99], np.float32)
    prompt = _click(130, 130, (150, 150, 0))
    best, keep = c2b._choose(logits, iou, boxes, prompt)
    assert best == 1 and keep[130, 130] and not keep[150, 150] and keep.sum() == 400


def test_click_to_box_decodes_boxes_and_keeps_only_the_clicked_component(tiny_sam, canvases) -> None:
    engine = TorchEngine(tiny_sam)
    from sam_medical.model import forward as sf

    emb = engine.encode(sf.canvas_to_input(tiny_sam, canvases[:1]))
    calls: list[int] = []
    real = engine.decode

    def counting(embedding, batch):
        calls.append(0 if batch.boxes is None else len(batch.boxes))
        assert batch.points is None  # a box-only model never gets the clicks
        return real(embedding, batch)

    engine.decode = counting  # type: ignore[method-assign]
    prompt = _click(120, 100, image=canvases[0, ..., 0].numpy())  # inside the disc
    (out,) = decode_prompts(engine, emb, [prompt], "auto")
    assert out.strategy == c2b.CLICK_TO_BOX and out.box is not None and out.box.shape == (4,)
    assert calls[0] == len(c2b.candidate_boxes(prompt))  # one batched decode of every candidate
    assert out.candidates == sum(calls)
    mask = canvas_logits(out) > 0
    if mask.any():  # whatever it kept is one piece holding the click
        from scipy import ndimage

        assert mask[100, 120] and ndimage.label(mask)[1] == 1


def test_one_click_on_a_real_model_finds_the_organ_where_a_direct_click_finds_nothing() -> None:
    """Base LiteMedSAM (trained with boxes only) on the bundled phantom's liver, through the served predictor."""
    from sam_medical.inference.predictor import VolumePredictor
    from sam_medical.metrics import dice
    from sam_medical.model.build import build_sam
    from sam_medical.prompts import interior_point
    from sam_medical.quickstart.samples import make_phantom
    from sam_medical.volume.io import Volume

    sam, _ = build_sam("medsam_lite")
    sam.eval()
    image, label, meta = make_phantom(0)
    volume = Volume(image, tuple(meta["spacing"]), tuple(meta["origin"]), tuple(meta["direction"]))
    ks = np.flatnonzero((label == 1).sum((0, 1)))
    k = int(ks[len(ks) // 2])
    gt = label[:, :, k] == 1
    x, y = interior_point(gt)  # x = j, y = i
    scores = {}
    for strategy in (c2b.CLICK_TO_BOX, DIRECT):
        pred = VolumePredictor(sam, "base", click_strategy=strategy)
        mask, info = pred.segment_slice("phantom", volume, k, [(y, x)], [])
        assert info["strategy"] == strategy
        scores[strategy] = dice(mask, gt)
    assert scores[c2b.CLICK_TO_BOX] >= 0.8, scores
    assert scores[DIRECT] < 0.1, scores
