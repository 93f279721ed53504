"""Verification of an exported engine against the PyTorch model it was exported from.

:func:`verify_engine` runs the engine, with the very session settings it serves with, on two test canvases
(batch 2) and eight prompts per canvas; its masks must agree with the PyTorch model's (Dice of logits > 0
at least :data:`MIN_DICE` each, :func:`sam_medical.metrics.dice`) and its embeddings must lie within
:data:`EMBEDDING_TOLERANCE`. An export that disagrees is refused (:class:`ExportMismatch`), never served
or cached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sam_medical.inference.onnx_export import ExportError, ExportMismatch
from sam_medical.metrics import dice
from sam_medical.model import forward as sf

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

#: Each verification mask must agree with PyTorch's at least this well (Dice of logits > 0).
MIN_DICE = 0.995
#: Largest embedding difference accepted, relative to ``max(1, max |embedding|)``.
EMBEDDING_TOLERANCE = 1e-3


def verification_canvases() -> torch.Tensor:
    """Two ``(256, 256, 3)`` uint8 test canvases: a grey ramp, and a bright disc and a dark block on noise."""
    ramp = torch.arange(256, dtype=torch.uint8)
    first = ramp[:, None] // 2 + ramp[None, :] // 2
    g = torch.Generator().manual_seed(0)
    second = torch.randint(20, 70, (256, 256), generator=g, dtype=torch.int64)
    yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    second[((yy - 110) ** 2 + (xx - 130) ** 2) < 45**2] += 150
    second[(yy > 170) & (yy < 230) & (xx > 30) & (xx < 90)] = 5
    both = torch.stack([first.to(torch.int64), second]).clamp(0, 255).to(torch.uint8)
    return both[..., None].expand(-1, -1, -1, 3).contiguous()


def verification_prompts() -> list[tuple[str, dict[str, Any], bool]]:
    """``(name, decode keyword arguments, multimask)`` in canvas pixels: box, clicks, box + click,
    several prompt sets at once, and SAM's three-mask output. (A mask-input prompt is added by
    :func:`verify_engine` from the box's logits.)"""
    box = torch.tensor([[85.0, 65.0, 175.0, 155.0]])
    fg = torch.tensor([[[130.0, 110.0]]])
    one = torch.tensor([[1]])
    return [
        ("box", {"boxes": box}, False),
        ("click", {"points": fg, "point_labels": one}, False),
        ("click_multimask", {"points": fg, "point_labels": one}, True),
        (
            "clicks_fg_bg",
            {
                "points": torch.tensor([[[130.0, 110.0], [60.0, 200.0]]]),
                "point_labels": torch.tensor([[1, 0]]),
            },
            False,
        ),
        ("box_click", {"boxes": box, "points": fg, "point_labels": one}, False),
        (
            "two_prompt_sets",
            {"boxes": torch.tensor([[85.0, 65.0, 175.0, 155.0], [25.0, 165.0, 95.0, 235.0]])},
            False,
        ),
    ]


def verify_engine(engine: Any, sam: Sam) -> dict[str, Any]:
    """Compare ``engine`` end to end (its encoder and its decoder) with the PyTorch model ``sam``.

    Two test canvases are encoded as one batch of 2 by each; every :func:`verification_prompts` prompt,
    plus the box's logits as a mask input, is decoded on each embedding. Returns the figures:
    ``embedding_max_abs``, ``embedding_rel``, ``logits_max_abs``, ``min_dice``, ``masks``.

    Raises:
        ExportMismatch: a mask with Dice below :data:`MIN_DICE`, or embeddings beyond
            :data:`EMBEDDING_TOLERANCE`.
    """
    images = sf.canvas_to_input(sam, verification_canvases())
    with torch.inference_mode():
        ref_emb = sf.encode(sam, images).float().cpu()
    got_emb = engine.encode(images).float().cpu()
    if got_emb.shape != ref_emb.shape:
        raise ExportMismatch(
            f"the exported encoder gives {tuple(got_emb.shape)}, PyTorch {tuple(ref_emb.shape)}"
        )
    emb_abs = float((got_emb - ref_emb).abs().max())
    emb_rel = emb_abs / max(1.0, float(ref_emb.abs().max()))
    dices: dict[str, float] = {}
    logits_abs = 0.0
    with torch.inference_mode():
        for b in range(len(images)):
            ref_e, got_e = ref_emb[b : b + 1], got_emb[b : b + 1]
            prompts = verification_prompts()
            box_logits, _ = sf.decode_many(sam, ref_e, sf.PromptBatch(**prompts[0][1]))
            prompts.append(("box_mask_input", {**prompts[0][1], "mask_inputs": box_logits}, False))
            for name, kwargs, multimask in prompts:
                batch = sf.PromptBatch(**kwargs, multimask_output=multimask)
                ref, _ = sf.decode_many(sam, ref_e, batch)
                got, _ = engine.decode(got_e, batch)
                ref, got = ref.float().cpu(), got.float().cpu()
                logits_abs = max(logits_abs, float((ref - got).abs().max()))
                for p in range(ref.shape[0]):
                    for m in range(ref.shape[1]):
                        dices[f"canvas{b}/{name}/{p}/{m}"] = dice(ref[p, m] > 0, got[p, m] > 0)
    worst = min(dices, key=dices.get)
    report = {
        "embedding_max_abs": emb_abs,
        "embedding_rel": emb_rel,
        "logits_max_abs": logits_abs,
        "min_dice": dices[worst],
        "masks": len(dices),
        "min_dice_required": MIN_DICE,
        "embedding_tolerance": EMBEDDING_TOLERANCE,
    }
    if emb_rel > EMBEDDING_TOLERANCE or dices[worst] < MIN_DICE:
        raise ExportMismatch(
            f"the exported model disagrees with PyTorch (embedding difference {emb_rel:.2e} relative, "
            f"tolerance {EMBEDDING_TOLERANCE:g}; worst mask Dice {dices[worst]:.4f} on {worst}, "
            f"required {MIN_DICE}); it is not served"
        )
    return report


def warm_up(engine: Any, sam: Sam) -> None:
    """One encode and decode (first-run allocations now, not at the first click); outputs must be finite."""
    images = sf.canvas_to_input(sam, verification_canvases()[:1])
    emb = engine.encode(images)
    low, iou = engine.decode(
        emb, sf.PromptBatch(points=torch.tensor([[[128.0, 128.0]]]), point_labels=torch.tensor([[1]]))
    )
    if not (torch.isfinite(emb).all() and torch.isfinite(low).all() and torch.isfinite(iou).all()):
        raise ExportError("the cached export gives NaN or infinite outputs")
