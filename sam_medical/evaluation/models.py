"""The model under test: anything that answers slice requests with canvas masks.

:class:`ModelUnderTest` is the interface :func:`~sam_medical.evaluation.run.evaluate` scores; a model
that can prepare one image once and then answer several prompt sets on it (SAM: encode once, decode
each corrective click) is an :class:`InteractiveModel`. A plain function ``fn(request) -> masks`` or
``-> (masks, pred_iou)`` becomes a model with :class:`FunctionModel`, so a fixed, known model gives exact
numbers in tests. The served SAM is :class:`sam_medical.evaluation.served_sam.ServedSam`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from sam_medical.canvas.geometry import MODEL_SLICE_SIZE
from sam_medical.evaluation.slice_requests import ObjectPrompt, ObjectRef, SlicePrediction, SliceRequest


@runtime_checkable
class ModelUnderTest(Protocol):
    """Anything that predicts a batch of slices (each slice: one image, several prompts)."""

    def predict(self, requests: Sequence[SliceRequest]) -> list[SlicePrediction]: ...


class SliceSession(Protocol):
    """One slice image, prepared once (SAM: encoded), then predicted for any number of prompt sets: the
    iterative path of corrective clicks."""

    def predict(self, prompts: Sequence[ObjectPrompt], objects: Sequence[ObjectRef]) -> SlicePrediction:
        """Predict ``prompts`` (one per object of ``objects``) on the session's image."""
        ...


@runtime_checkable
class InteractiveModel(Protocol):
    """A :class:`ModelUnderTest` that can also open a :class:`SliceSession` on one image."""

    def predict(self, requests: Sequence[SliceRequest]) -> list[SlicePrediction]: ...

    def session(self, image: np.ndarray) -> SliceSession: ...


class _RepeatSession:
    """The session of a model that has none: each prediction is a new one-slice request."""

    def __init__(self, model: ModelUnderTest, image: np.ndarray) -> None:
        self.model = model
        self.image = image

    def predict(self, prompts: Sequence[ObjectPrompt], objects: Sequence[ObjectRef]) -> SlicePrediction:
        return self.model.predict([SliceRequest(self.image, list(prompts), list(objects))])[0]


def open_session(model: ModelUnderTest, image: np.ndarray) -> SliceSession:
    """``model.session(image)`` when it has sessions, else a session that asks it again each time."""
    if isinstance(model, InteractiveModel):
        return model.session(image)
    return _RepeatSession(model, image)


#: ``fn(request) -> masks`` or ``-> (masks, pred_iou)`` (see :class:`FunctionModel`).
ModelFn = Callable[[SliceRequest], Any]


class FunctionModel:
    """Wraps ``fn(request) -> masks`` or ``-> (masks, pred_iou)`` as a :class:`ModelUnderTest`.

    ``masks``: ``(P, 256, 256)`` bool (True = object), or float logits (object where > 0). Boolean masks
    are mapped back to the source resolution with nearest neighbour, exactly as the ground truth is, so
    returning the ground truth scores exactly 1. ``pred_iou``: ``(P,)`` or ``None``.
    """

    def __init__(self, fn: ModelFn, info: dict[str, Any] | None = None) -> None:
        self.fn = fn
        self.info = info or {"name": getattr(fn, "__name__", "function"), "kind": "function"}

    def predict(self, requests: Sequence[SliceRequest]) -> list[SlicePrediction]:
        out = []
        for req in requests:
            res = self.fn(req)
            masks, iou = res if isinstance(res, tuple) else (res, None)
            masks = np.asarray(masks)
            n = len(req.prompts)
            if masks.shape != (n, MODEL_SLICE_SIZE, MODEL_SLICE_SIZE):
                raise ValueError(f"the model returned masks of shape {masks.shape}, expected ({n}, 256, 256)")
            binary = masks.dtype == bool
            logits = np.where(masks, 1.0, -1.0).astype(np.float32) if binary else masks.astype(np.float32)
            pred_iou = (
                np.full(n, np.nan, np.float32) if iou is None else np.asarray(iou, np.float32).reshape(n)
            )
            out.append(SlicePrediction(logits, pred_iou, binary))
        return out


def as_model(p: ModelUnderTest | ModelFn) -> ModelUnderTest:
    """A :class:`ModelUnderTest` as is; a function wrapped in :class:`FunctionModel`."""
    if isinstance(p, ModelUnderTest):
        return p
    if callable(p):
        return FunctionModel(p)
    raise TypeError(f"not a model under test: {p!r}")
