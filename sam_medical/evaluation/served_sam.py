"""The model under test as the app serves it: one engine, one decode function, one multimask rule.

:class:`ServedSam` encodes each canvas once with the served engine (PyTorch, ONNX Runtime or OpenVINO,
:func:`sam_medical.inference.runtime.build_engine`) into an embedding cache keyed like the served
predictor's, and decodes every prompt with :func:`sam_medical.inference.decoding.decode_prompts` under
the served ``multimask`` rule: exactly the path a click in Slicer takes from an embedding to a mask.
3D propagation (:mod:`sam_medical.evaluation.propagated`) walks through the same engine and cache with
the served :class:`~sam_medical.inference.predictor.VolumePredictor`.

Coordinates: prompts are canvas ``(x, y)`` pixels (:mod:`sam_medical.evaluation.slice_requests`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sam_medical.adapters.inject import merge_lora
from sam_medical.adapters.save_and_load import load_adapter
from sam_medical.evaluation.config import ModelSpec
from sam_medical.evaluation.outputs import jsonable
from sam_medical.evaluation.slice_requests import ObjectPrompt, ObjectRef, SlicePrediction, SliceRequest
from sam_medical.inference.caches import EmbeddingCache
from sam_medical.inference.decoding import DIRECT, CanvasPrompt, canvas_logits, check_multimask
from sam_medical.inference.engines import Engine, TorchEngine
from sam_medical.inference.export_cache import adapter_identity
from sam_medical.inference.runtime import build_engine
from sam_medical.inference.strategies import click_strategy as click_strategy_for
from sam_medical.inference.strategies import decode_prompts, weights_trained_prompts
from sam_medical.model import forward as sf
from sam_medical.model.build import build_sam
from sam_medical.model.registry import get_family

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

#: Bytes of embeddings kept per model (each slice is encoded once; 3D propagation reuses them).
EMBEDDING_CACHE_BYTES = 512 << 20


class ServedSam:
    """SAM on canvases through the served engine and :func:`decode_prompts` (see the module docstring).

    Args:
        sam: the model (eval mode, any adapter loaded), on its device; it normalises the canvases.
        engine: what runs encoder and decoder (default: :class:`TorchEngine` over ``sam``).
        batch_prompts: at most this many prompts per decoder call.
        multimask: the served rule (``auto``, ``on``, ``off``; booleans mean ``on``/``off``).
        click_strategy: how prompts with clicks are decoded (``direct`` or ``click_to_box``, resolved as
            served by :func:`~sam_medical.inference.strategies.click_strategy`).
        info: describes the model for the summary and the report.
        cache: the embedding cache (default: :data:`EMBEDDING_CACHE_BYTES`); keys are
            ``(case, row)``-based, see :meth:`embedding_key`.
    """

    def __init__(
        self,
        sam: Sam,
        engine: Engine | None = None,
        *,
        batch_prompts: int = 32,
        multimask: str | bool = "auto",
        info: dict[str, Any] | None = None,
        cache: EmbeddingCache | None = None,
        click_strategy: str = DIRECT,
    ) -> None:
        self.sam = sam
        self.engine: Engine = engine if engine is not None else TorchEngine(sam)
        self.batch_prompts = int(batch_prompts)
        self.multimask = check_multimask(multimask)
        self.click_strategy = str(click_strategy)
        self.info = info or {}
        self.cache = cache if cache is not None else EmbeddingCache(EMBEDDING_CACHE_BYTES)

    @staticmethod
    def embedding_key(case: str, row: int) -> tuple[str, int]:
        """The cache key of row ``row`` of case ``case``'s canvases."""
        return (str(case), int(row))

    def encode(self, canvases: np.ndarray) -> torch.Tensor:
        """``(B, 256, 256, 3)`` uint8 canvases -> ``(B, C, h, w)`` float32 embeddings, one engine call."""
        with torch.inference_mode():
            return self.engine.encode(sf.canvas_to_input(self.sam, torch.from_numpy(canvases)))

    def embeddings(self, requests: Sequence[SliceRequest]) -> list[torch.Tensor]:
        """Each request's image embedding ``(1, C, h, w)``: from the cache, the others in one encode."""
        keys = [
            self.embedding_key(r.objects[0].case, r.objects[0].row) if r.objects else None for r in requests
        ]
        out: list[torch.Tensor | None] = [self.cache.get(k) if k is not None else None for k in keys]
        todo = [i for i, e in enumerate(out) if e is None]
        if todo:
            emb = self.encode(np.stack([requests[i].image for i in todo]))
            for n, i in enumerate(todo):
                out[i] = emb[n : n + 1] if len(todo) == 1 else emb[n : n + 1].clone()
                if keys[i] is not None:
                    self.cache.put(keys[i], out[i])
        return [e for e in out if e is not None]

    def predict(self, requests: Sequence[SliceRequest]) -> list[SlicePrediction]:
        """Each request's prompts decoded on its image's embedding."""
        if not requests:
            return []
        embeddings = self.embeddings(requests)
        return [self.decode(e, r.prompts, r.image) for e, r in zip(embeddings, requests, strict=True)]

    def session(self, image: np.ndarray, objects: Sequence[ObjectRef] = ()) -> _ServedSession:
        """Encode ``image`` once (or take it from the cache); the session decodes any prompts on it."""
        return _ServedSession(self, self.embeddings([SliceRequest(image, [], list(objects))])[0], image)

    def decode(
        self, embedding: torch.Tensor, prompts: Sequence[ObjectPrompt], image: np.ndarray | None = None
    ) -> SlicePrediction:
        """``prompts`` on one image ``embedding (1, C, h, w)`` (:func:`decode_prompts`), in their order;
        prompts with clicks get :attr:`click_strategy` and the canvas ``image (256, 256, 3)`` uint8."""
        gray = image[..., 0] if image is not None and self.click_strategy != DIRECT else None
        canvas = [
            CanvasPrompt(
                p.points,
                p.point_labels,
                p.box,
                strategy=DIRECT if p.points is None else self.click_strategy,
                image=gray,
            )
            for p in prompts
        ]
        decoded = decode_prompts(self.engine, embedding, canvas, self.multimask, self.batch_prompts)
        ious = np.asarray([d.iou for d in decoded], np.float32)
        return SlicePrediction(canvas_logits(decoded), ious)


class _ServedSession:
    """A slice session of :class:`ServedSam`: one embedding, decoded for any prompts."""

    def __init__(self, owner: ServedSam, embedding: torch.Tensor, image: np.ndarray) -> None:
        self.owner = owner
        self.embedding = embedding
        self.image = image

    def predict(self, prompts: Sequence[ObjectPrompt], objects: Sequence[ObjectRef]) -> SlicePrediction:
        return self.owner.decode(self.embedding, prompts, self.image)


def build_served_sam(
    spec: ModelSpec,
    *,
    device: torch.device,
    runtime: str = "auto",
    export_dir: str | Path,
    batch_prompts: int = 32,
    multimask: str | bool = "auto",
    click_strategy: str = "auto",
) -> ServedSam:
    """Build ``spec``'s SAM (:func:`~sam_medical.model.build.build_sam`), load its adapter (which refuses an
    adapter made for another base model) and merge it as the app does, and run it on ``runtime`` as served (an export is verified
    against PyTorch and cached in ``export_dir``); ``info`` describes it for the report."""
    sam, base_info = build_sam(
        spec.name,
        image_size=spec.image_size,
        checkpoint=spec.checkpoint,
        random_weights=spec.random_weights,
        seed=spec.seed,
    )
    info: dict[str, Any] = {"kind": "sam", **base_info, "adapter": None}
    identity = None
    meta = None
    if spec.adapter is not None:
        meta = load_adapter(sam, spec.adapter, base_info=base_info)
        merge_lora(sam)  # as served: the LoRA updates folded into the weights (what an export holds)
        info["adapter"] = {"path": str(Path(spec.adapter).resolve()), **jsonable(meta)}
        identity = adapter_identity(spec.adapter, str(meta.get("version") or Path(spec.adapter).name))
    sam.to(device).eval()
    engine = build_engine(
        sam, runtime, base_info=base_info, adapter=identity, device=device, export_dir=export_dir
    )
    info["device"] = str(device)
    info["multimask"] = check_multimask(multimask)
    trained = weights_trained_prompts(get_family(spec.name).trained_prompts, spec.random_weights, meta)
    info["click_strategy"] = strategy = click_strategy_for(trained, click_strategy)
    info["runtime"] = jsonable(engine.describe())
    return ServedSam(
        sam, engine, batch_prompts=batch_prompts, multimask=multimask, info=info, click_strategy=strategy
    )
