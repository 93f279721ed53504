"""Batched, differentiable SAM forward passes on canvas tensors.

Shared by training, evaluation and serving, so that all of them see the model the same way:

* images are ``256 x 256`` canvases (:mod:`sam_medical.canvas.geometry`), uint8, 3 channels, normalised as
  the model's family says (:mod:`sam_medical.model.registry`: ImageNet mean/std for SAM, min-max to
  ``[0, 1]`` per image for LiteMedSAM);
* prompts are in canvas pixel coordinates (``x`` = column, ``y`` = row, 0..255) and are scaled by
  ``S / 256`` here, ``S`` being the model's input size (:func:`input_size`);
* low-resolution logits are ``L`` square (:func:`low_res_size`: ``S/4`` for ViT SAM, 256 for
  LiteMedSAM); :func:`logits_to_canvas` brings them to 256.

Nothing here wraps the calls in ``torch.no_grad``: callers decide (training needs the gradients).

Shapes: ``B`` images, ``N`` points per prompt set, ``P`` prompt sets for one image, ``M`` masks per prompt
(1, or 3 with ``multimask_output``), ``C`` prompt embedding width, ``h = w`` the embedding size
(``S/16`` ViT, ``S/4`` TinyViT), ``L = 4h`` the low-resolution mask size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sam_medical.canvas.geometry import MODEL_SLICE_SIZE
from sam_medical.model.registry import NORM_MINMAX, family_of

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

CANVAS_SIZE = MODEL_SLICE_SIZE


def input_size(sam: Sam) -> int:
    """``S``: the model's input size (256 native, 1024 official)."""
    return int(sam.image_encoder.img_size)


def low_res_size(sam: Sam) -> int:
    """``L``: the side of the decoder's low-resolution logits and of ``mask_inputs``."""
    return int(sam.prompt_encoder.mask_input_size[0])


def normalize(sam: Sam, x: torch.Tensor) -> torch.Tensor:
    """Float images ``(B, 3, H, W)`` holding 0-255 values -> the model's input normalisation.

    ImageNet families: ``(x - sam.pixel_mean) / sam.pixel_std``. Min-max families (LiteMedSAM, as MedSAM
    preprocesses): ``(x - min) / max(max - min, 1e-8)`` over each whole image, giving ``[0, 1]``.
    """
    if family_of(sam).normalization == NORM_MINMAX:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-8)
    return (x - sam.pixel_mean) / sam.pixel_std


def canvas_to_input(sam: Sam, canvas_u8: torch.Tensor) -> torch.Tensor:
    """Canvases ``(B, 256, 256, 3)`` or ``(B, 3, 256, 256)`` uint8 -> model input ``(B, 3, S, S)`` float.

    Normalised as the model's family says (:func:`normalize`), upsampled bilinearly when ``S != 256``,
    on the model's device.
    """
    if canvas_u8.ndim != 4:
        raise ValueError(
            f"expected canvases (B, 256, 256, 3) or (B, 3, 256, 256), got {tuple(canvas_u8.shape)}"
        )
    if canvas_u8.shape[-1] == 3 and canvas_u8.shape[1] != 3:
        x = canvas_u8.permute(0, 3, 1, 2)
    elif canvas_u8.shape[1] == 3:
        x = canvas_u8
    else:
        raise ValueError(f"expected 3 channels, got canvases of shape {tuple(canvas_u8.shape)}")
    if tuple(x.shape[-2:]) != (CANVAS_SIZE, CANVAS_SIZE):
        raise ValueError(f"expected {CANVAS_SIZE}x{CANVAS_SIZE} canvases, got {tuple(x.shape[-2:])}")
    mean = sam.pixel_mean
    x = normalize(sam, x.to(device=mean.device, dtype=mean.dtype))
    size = input_size(sam)
    if size != CANVAS_SIZE:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.contiguous()


def encode(sam: Sam, images: torch.Tensor) -> torch.Tensor:
    """Model inputs ``(B, 3, S, S)`` (from :func:`canvas_to_input`) -> image embeddings ``(B, C, h, h)``."""
    return sam.image_encoder(images)


@dataclass(frozen=True, eq=False)
class PromptBatch:
    """``P`` prompt sets for the decoder, in canvas pixels: what :func:`decode`, :func:`decode_many` and
    every engine's ``decode`` take.

    Coordinates are on the ``256 x 256`` canvas (:mod:`sam_medical.canvas.geometry`): a point is
    ``(x, y)`` = (column, row), a box ``(x0, y0, x1, y1)`` (top-left, bottom-right corners); they are scaled
    by ``S / 256`` only inside the decoder call. Every part is optional; the tensors may be on any device
    (the decoder moves them to the model's).

    Attributes:
        points: ``(P, N, 2)`` float canvas ``(x, y)``; given exactly with ``point_labels``.
        point_labels: ``(P, N)`` int, 1 foreground, 0 background, -1 padding (ignored, as in SAM).
        boxes: ``(P, 4)`` float canvas ``(x0, y0, x1, y1)``.
        mask_inputs: ``(P, 1, L, L)`` (or ``(1, 1, L, L)`` for all) low-resolution logits of a previous
            prediction.
        multimask_output: SAM's three masks per prompt set (mask tokens 1..3) instead of one (token 0).

    Raises:
        ValueError: ``points`` without ``point_labels``, or points/labels/boxes of the wrong shape.
    """

    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    mask_inputs: torch.Tensor | None = None
    multimask_output: bool = False

    def __post_init__(self) -> None:
        points, labels, boxes = self.points, self.point_labels, self.boxes
        if points is not None:
            if labels is None:
                raise ValueError("points need point_labels")
            if points.ndim != 3 or points.shape[-1] != 2 or tuple(labels.shape) != tuple(points.shape[:2]):
                raise ValueError(
                    f"points must be (P, N, 2) with labels (P, N); got {tuple(points.shape)}, {tuple(labels.shape)}"
                )
        if boxes is not None and (boxes.ndim != 2 or boxes.shape[-1] != 4):
            raise ValueError(f"boxes must be (P, 4), got {tuple(boxes.shape)}")

    @property
    def count(self) -> int:
        """``P``: the number of prompt sets (1 when there is no prompt at all)."""
        return next((t.shape[0] for t in (self.points, self.boxes, self.mask_inputs) if t is not None), 1)


def _prompt_embeddings(sam: Sam, batch: int, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse ``(batch, T, C)`` and dense ``(batch, C, h, w)`` prompt embeddings of ``prompts``, on the
    model's device, coordinates scaled by ``S / 256``."""
    device = sam.pixel_mean.device
    factor = input_size(sam) / CANVAS_SIZE
    point_arg = None
    if prompts.points is not None:
        point_arg = (prompts.points.to(device, torch.float32) * factor, prompts.point_labels.to(device))
    boxes = None if prompts.boxes is None else prompts.boxes.to(device, torch.float32) * factor
    masks = None if prompts.mask_inputs is None else prompts.mask_inputs.to(device, sam.pixel_mean.dtype)
    sparse, dense = sam.prompt_encoder(points=point_arg, boxes=boxes, masks=masks)
    if sparse.shape[0] != batch:  # no prompt at all: the encoder answers for a batch of one
        if sparse.shape[0] != 1:
            raise ValueError(f"prompts are for {sparse.shape[0]} items, expected {batch}")
        sparse = sparse.expand(batch, -1, -1)
    if dense.shape[0] != batch:
        if dense.shape[0] != 1:
            raise ValueError(f"mask inputs are for {dense.shape[0]} items, expected {batch}")
        dense = dense.expand(batch, -1, -1, -1)
    return sparse, dense


#: No prompt at all (SAM's "no mask" and padding embeddings): what :func:`decode` uses by default.
NO_PROMPT = PromptBatch()


def select_masks(
    masks: torch.Tensor, iou_pred: torch.Tensor, multimask_output: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """All four mask tokens ``(P, 4, L, L)``, ``(P, 4)`` -> as ``MaskDecoder.forward``: mask 0 alone, or masks 1..3."""
    sl = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, sl], iou_pred[:, sl]


def predict_masks_paired(
    sam: Sam,
    embeddings: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    dense_pe: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.predict_masks`` with prompt set ``b`` paired with image ``b`` (no repetition).

    The one place in ``sam_medical`` that runs the mask decoder: :func:`decode`, :func:`decode_many`
    and the exported ONNX decoder graph all call it.

    The official method repeats every image embedding once per prompt set (``P`` prompts for one image);
    here ``embeddings (B, C, h, w)``, ``sparse (B, T, C)``, ``dense (B, C, h, w)`` go through together.
    ``dense_pe (1, C, h, w)``: the embedding grid's positional encoding, when already computed (default:
    ``sam.prompt_encoder.get_dense_pe()``). ``sam`` needs only ``.prompt_encoder`` and ``.mask_decoder``.
    Returns all mask tokens: ``(B, 4, L, L)`` logits and ``(B, 4)`` IoU predictions.
    """
    dec = sam.mask_decoder
    b = embeddings.shape[0]
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
    src = embeddings + dense
    if dense_pe is None:
        dense_pe = sam.prompt_encoder.get_dense_pe()
    pos_src = dense_pe.expand(b, -1, -1, -1)
    _, c, h, w = src.shape
    hs, src = dec.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + dec.num_mask_tokens), :]
    upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack(
        [dec.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(dec.num_mask_tokens)],
        dim=1,
    )
    _, c2, h2, w2 = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(b, c2, h2 * w2)).reshape(b, -1, h2, w2)
    return masks, dec.iou_prediction_head(iou_token_out)


def decode(
    sam: Sam, embeddings: torch.Tensor, prompts: PromptBatch = NO_PROMPT
) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt set per image: ``B`` images, ``B`` prompt sets (``P == B``), one decoder pass.

    Args:
        embeddings: ``(B, C, h, w)`` from :func:`encode`.
        prompts: the :class:`PromptBatch`, prompt set ``b`` for image ``b`` (default: no prompt at all).

    Returns:
        ``low_res_logits (B, M, L, L)`` and ``iou_pred (B, M)``.
    """
    b = embeddings.shape[0]
    sparse, dense = _prompt_embeddings(sam, b, prompts)
    masks, iou = predict_masks_paired(sam, embeddings, sparse, dense)
    return select_masks(masks, iou, prompts.multimask_output)


def decode_many(sam: Sam, embedding: torch.Tensor, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """One image, ``P`` prompt sets, one decoder pass: :func:`predict_masks_paired` with the image's
    embedding expanded (not copied) to the ``P`` prompt sets, as ``MaskDecoder.forward`` repeats it.

    Args:
        embedding: ``(1, C, h, w)`` (or ``(C, h, w)``).
        prompts: the :class:`PromptBatch` of the ``P`` prompt sets.

    Returns:
        ``low_res_logits (P, M, L, L)`` and ``iou_pred (P, M)``.
    """
    if embedding.ndim == 3:
        embedding = embedding.unsqueeze(0)
    if embedding.shape[0] != 1:
        raise ValueError(f"decode_many takes the embedding of one image, got a batch of {embedding.shape[0]}")
    count = prompts.count
    sparse, dense = _prompt_embeddings(sam, count, prompts)
    masks, iou = predict_masks_paired(sam, embedding.expand(count, -1, -1, -1), sparse, dense)
    return select_masks(masks, iou, prompts.multimask_output)


def logits_to_canvas(low_res_logits: torch.Tensor) -> torch.Tensor:
    """Low-resolution logits ``(..., L, L)`` -> canvas logits ``(..., 256, 256)``, bilinear."""
    lead, (h, w) = low_res_logits.shape[:-2], low_res_logits.shape[-2:]
    if (h, w) == (CANVAS_SIZE, CANVAS_SIZE):
        return low_res_logits
    flat = low_res_logits.reshape(-1, 1, h, w)
    out = F.interpolate(flat, size=(CANVAS_SIZE, CANVAS_SIZE), mode="bilinear", align_corners=False)
    return out.reshape(*lead, CANVAS_SIZE, CANVAS_SIZE)
