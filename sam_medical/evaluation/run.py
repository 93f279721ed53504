"""Batch slice evaluation: Dice per slice and per volume, aggregates, before/after comparison.

What is scored
--------------
The input is a set of ``.npz`` slice files (docs/ARCHITECTURE.md), one per volume. Each **label value
present in a slice is its own object**: it gets one deterministic prompt (:mod:`sam_medical.prompts`:
tight box, optionally jittered; the interior point farthest from the boundary, plus seeded extra
points; or both) made from that label's mask on the 256 canvas, and one predicted mask.

* **Resolution.** Metrics are computed at the **source slice resolution** ``(I, J)``: the predicted
  canvas logits are mapped back with :meth:`SliceGeometry.logits_from_model` (bilinear, threshold at
  0, exactly what the served model returns to Slicer), and the ground truth is the file's ``gts``
  mapped back with :meth:`SliceGeometry.label_from_model` (nearest). Areas are source pixels.
* **Per slice and object:** ``dice`` and ``iou`` (MONAI ``compute_dice`` / ``compute_iou``,
  ``ignore_empty=False``), ``gt_area``, ``pred_area``, ``pred_iou`` (SAM's own IoU estimate).
* **Per volume and label:** 3D Dice of the predicted slices stacked at their ``slice_index``, and HD95
  in mm (MONAI ``compute_hausdorff_distance``, ``percentile=95``, the file's voxel spacing; symmetric:
  the larger of the two directed 95th percentiles). An empty prediction has Dice 0 and no HD95
  (reported as ``null`` and counted).
* **Per label:** mean, median, sample standard deviation (``ddof=1``), n, min, max and a **t-based**
  95% confidence interval of the mean (``mean +- t(0.975, n-1) * sd / sqrt(n)``, not clipped).

Empty-slice policy (always written to ``summary.json``)
-------------------------------------------------------
* Default: only slices where the label is present are scored (a prompt needs an object). Slices of
  the file without that label are skipped and counted. 3D Dice / HD95 then see no false positive on
  slices without the label: they are optimistic, and say so.
* ``include_empty``: in a case that holds the label, every other slice of the file (slices with other
  labels only, negatives kept by ``preprocess --keep-empty``) is scored too, prompted with the prompt of
  the **nearest slice where the label is present** (by ``k``, lower ``k`` on ties), as slice-to-slice
  propagation would carry it. Such a slice has ``dice = iou = 1`` if the prediction is empty, else 0.
  They are reported apart (``empty_slices``); the headline slice Dice stays over present slices; the
  3D Dice and HD95 include their false positives. Slices absent from the file count as empty in both
  prediction and ground truth (``evaluate --dataset --include-empty`` keeps every slice).

Prompts are seeded per object from ``(seed, crc32(case), slice_index, label)``, so they do not depend on
the order of evaluation, and the baseline of a comparison gets exactly the same prompts.

The box-fill reference
----------------------
Every prompt with a box is also scored as a prediction itself: the prompt rectangle, filled, mapped back
to the source slice like a hard mask (``box_fill_dice``; per label ``box_fill_slice_dice``, and the paired
comparison ``vs_box_fill``). On compact objects a filled box already scores 0.7-0.9, so a box-prompted
model that does not beat it adds nothing; the report and the command line say so.

Corrective clicks (``PromptSettings.refine``)
---------------------------------------------
With ``refine = N``, each object gets N more clicks after its first prompt, as SAM-Med2D and nnInteractive
report "N+1-click Dice": each click goes to the centre of the largest error region of the current
prediction on the canvas (:func:`sam_medical.prompts.corrective_click`; foreground in a miss, background
in a leak, inside the image region), and the object is decoded again with its first prompt and every click
so far (no mask input). An exact prediction gets no further click. ``dice`` is the Dice after the last
click; ``dice_steps`` the Dice after each step (the first prompt, then each click). The image is encoded
once per slice for all steps (:meth:`InteractivePredictor.session`).

Label names
-----------
The ``.npz`` files' label names (:mod:`sam_medical.volume.label_names`) name the labels in the CSV
(``label_name``), ``summary.json`` (``label_names``, ``per_label[v]["name"]``), the report and the command
line; ``EvalConfig.labels`` may name labels instead of giving their values.

Speed: each slice image is encoded once and all of its objects' prompts go through the mask decoder in
one :func:`sam_medical.model.forward.decode_many` call (in chunks of ``batch_prompts``). Cases are
streamed one at a time; only per-object numbers and the current case's masks are held in memory.

Testing: :func:`evaluate` takes any :class:`Predictor`, or a plain function ``fn(request) -> masks`` or
``-> (masks, pred_iou)`` (see :class:`FunctionPredictor`), so a fixed, known predictor gives exact numbers.
A predictor without sessions is simply asked again, with the new prompts, at each corrective click.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from sam_medical.atomic import atomic_path, write_json_atomic
from sam_medical.canvas.geometry import MODEL_SLICE_SIZE, SliceGeometry
from sam_medical.canvas.slice_file import load_npz
from sam_medical.errors import UserInputError
from sam_medical.prompts import EVAL_KINDS, corrective_click, eval_prompt
from sam_medical.volume.label_names import label_display, merge_value_names, npz_label_names, resolve_labels

#: |model dice - baseline dice| below this is a tie.
TIE_TOLERANCE = 1e-3
#: Most corrective clicks per object (``--refine``).
MAX_REFINE = 20
#: Columns of ``slices.csv`` (baseline columns are appended when comparing).
CSV_COLUMNS = (
    "case",
    "slice_index",
    "label",
    "label_name",
    "dice",
    "box_fill_dice",
    "iou",
    "gt_area",
    "pred_area",
    "pred_iou",
    "prompt",
    "gt_present",
    "prompt_slice",
    "clicks",
    "dice_steps",
)
BASELINE_COLUMNS = (
    "baseline_dice",
    "baseline_iou",
    "baseline_pred_area",
    "baseline_pred_iou",
    "dice_diff",
    "same_as_baseline",
)
#: Text columns of ``slices.csv`` (the others are numbers).
_TEXT_COLUMNS = ("case", "prompt", "label_name", "dice_steps")
_META_KEYS = (
    "gts",
    "slice_index",
    "volume_shape",
    "slice_shape",
    "resized_shape",
    "spacing",
    "origin",
    "direction",
    "label_values",
    "label_names",
    "meta",
)


# --- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSettings:
    """How each object is prompted. ``kind``: ``box``, ``point`` or ``box+point``; ``points``: number of
    foreground clicks for point kinds; ``box_jitter``: 0 = tight box, else pixels at 256; ``seed``: base
    seed of the per-object seeds (jitter and extra clicks); ``refine``: corrective clicks after the first
    prompt (see the module docstring)."""

    kind: str = "box"
    points: int = 1
    box_jitter: int = 0
    seed: int = 0
    refine: int = 0

    def __post_init__(self) -> None:
        if self.kind not in EVAL_KINDS:
            raise UserInputError(f"--prompt must be one of {', '.join(EVAL_KINDS)}, got {self.kind!r}")
        if self.points < 1:
            raise UserInputError(f"--points must be at least 1, got {self.points}")
        if self.box_jitter < 0:
            raise UserInputError(f"--box-jitter must be >= 0, got {self.box_jitter}")
        if self.seed < 0:
            raise UserInputError(f"--seed must be >= 0, got {self.seed}")
        if (
            isinstance(self.refine, bool)
            or not isinstance(self.refine, int)
            or not 0 <= self.refine <= MAX_REFINE
        ):
            raise UserInputError(
                f"--refine must be a whole number from 0 to {MAX_REFINE}, got {self.refine!r}"
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "points": self.points if "point" in self.kind else None,
            "box_jitter": self.box_jitter if "box" in self.kind else None,
            "seed": self.seed,
            "refine": self.refine,
            "refine_rule": (
                "after the first prompt, each click goes to the centre of the largest error region (foreground "
                "in a miss, background in a leak; prompts.corrective_click on the canvas), decoded with the "
                "first prompt and all clicks so far; no mask input"
                if self.refine
                else None
            ),
            "coordinates": "256x256 canvas pixel indices (x = column j, y = row i)",
            "per_object_seed": "SeedSequence([seed, crc32(case), slice_index, label])",
            "point_rule": "first point: object pixel farthest from the boundary; others: seeded object pixels",
        }


@dataclass(frozen=True)
class ModelSpec:
    """A model to build: ``build_sam(name, image_size, checkpoint, random_weights, seed)`` plus an adapter."""

    name: str = "tiny"
    checkpoint: str | None = None
    random_weights: bool = False
    adapter: str | None = None
    image_size: int = 256
    seed: int = 0


@dataclass
class EvalConfig:
    """Everything :func:`evaluate` needs.

    ``data``: a folder of ``.npz`` files, one file, or a list of files. ``out_dir``: where slices.csv,
    summary.json, report.html (and masks/) go. ``model`` / ``baseline``: what to build when no predictor
    is passed to :func:`evaluate`. ``labels``: label values or names to score (``None``: all present).
    """

    data: str | os.PathLike | Sequence[str | os.PathLike]
    out_dir: str | os.PathLike
    prompt: PromptSettings = field(default_factory=PromptSettings)
    model: ModelSpec | None = field(default_factory=ModelSpec)
    baseline: ModelSpec | None = None
    labels: tuple[int | str, ...] | None = None
    include_empty: bool = False
    save_masks: bool = False
    device: str = "auto"
    batch_prompts: int = 32
    batch_images: int = 0
    multimask: bool = False
    report: bool = True
    progress: bool = False
    examples_per_label: int = 3
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_prompts < 1:
            raise UserInputError(f"--batch-prompts must be at least 1, got {self.batch_prompts}")
        if self.batch_images < 0:
            raise UserInputError(f"--batch-images must be >= 0 (0: automatic), got {self.batch_images}")


# --- the predictor interface -----------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectPrompt:
    """One object's prompt on the canvas: ``box (4,) [x0, y0, x1, y1]`` and/or ``points (k, 2) [x, y]``
    with ``point_labels (k,)`` (1 = foreground)."""

    box: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None

    def describe(self) -> str:
        """Compact text for the CSV, e.g. ``box=10,20,30,40;points=15,25 40,50;labels=1,0`` (the labels
        only when a click is a background click)."""
        parts = []
        if self.box is not None:
            parts.append("box=" + ",".join(f"{v:g}" for v in np.asarray(self.box).tolist()))
        if self.points is not None:
            parts.append("points=" + " ".join(f"{x:g},{y:g}" for x, y in np.asarray(self.points).tolist()))
            labels = np.asarray(self.point_labels).tolist() if self.point_labels is not None else []
            if any(v != 1 for v in labels):
                parts.append("labels=" + ",".join(str(int(v)) for v in labels))
        return ";".join(parts)

    def with_click(self, x: int, y: int, label: int) -> ObjectPrompt:
        """This prompt with one more click ``(x, y)`` of ``label`` (1 foreground, 0 background)."""
        pts = np.zeros((0, 2), np.float32) if self.points is None else np.asarray(self.points, np.float32)
        lab = np.zeros(0, np.int64) if self.point_labels is None else np.asarray(self.point_labels, np.int64)
        return ObjectPrompt(
            self.box,
            np.concatenate([pts, np.array([[x, y]], np.float32)]),
            np.concatenate([lab, np.array([label], np.int64)]),
        )

    def box_mask(self) -> np.ndarray | None:
        """The prompt rectangle filled on the canvas, ``(256, 256)`` bool (inclusive pixel indices), or None."""
        if self.box is None:
            return None
        x0, y0, x1, y1 = (int(round(float(v))) for v in np.asarray(self.box))
        mask = np.zeros((MODEL_SLICE_SIZE, MODEL_SLICE_SIZE), bool)
        mask[max(0, y0) : y1 + 1, max(0, x0) : x1 + 1] = True
        return mask


@dataclass(frozen=True)
class ObjectRef:
    """Which object a prompt is for: file ``case``, its ``row`` in the file, source ``slice_index`` ``k``,
    ``label`` value; ``gt_present`` false for an empty slice scored under ``include_empty``, whose
    prompt comes from slice ``prompt_slice``."""

    case: str
    row: int
    slice_index: int
    label: int
    gt_present: bool = True
    prompt_slice: int = -1


@dataclass
class SliceRequest:
    """One slice and the prompts of its objects. ``image``: ``(256, 256, 3)`` uint8 canvas."""

    image: np.ndarray
    prompts: list[ObjectPrompt]
    objects: list[ObjectRef]


@dataclass
class SlicePrediction:
    """``logits (P, 256, 256)`` float32 canvas logits (object where > 0) and ``pred_iou (P,)`` (NaN when
    the predictor has no estimate), in the order of the request's prompts. ``binary``: the logits only
    encode a hard mask (+1 / -1); it is then mapped back to the source slice with nearest neighbour,
    like the ground truth, instead of bilinearly."""

    logits: np.ndarray
    pred_iou: np.ndarray
    binary: bool = False


@runtime_checkable
class Predictor(Protocol):
    """Anything that predicts a batch of slices (each slice: one image, several prompts)."""

    def predict(self, requests: Sequence[SliceRequest]) -> list[SlicePrediction]: ...


class SliceSession(Protocol):
    """One slice image, prepared once (SAM: encoded), then predicted for any number of prompt sets: the
    iterative path of corrective clicks."""

    def predict(self, prompts: Sequence[ObjectPrompt], objects: Sequence[ObjectRef]) -> SlicePrediction:
        """Predict ``prompts`` (one per object of ``objects``) on the session's image."""
        ...


@runtime_checkable
class InteractivePredictor(Protocol):
    """A :class:`Predictor` that can also open a :class:`SliceSession` on one image."""

    def predict(self, requests: Sequence[SliceRequest]) -> list[SlicePrediction]: ...

    def session(self, image: np.ndarray) -> SliceSession: ...


class _RepeatSession:
    """The session of a predictor that has none: each prediction is a new one-slice request."""

    def __init__(self, predictor: Predictor, image: np.ndarray) -> None:
        self.predictor = predictor
        self.image = image

    def predict(self, prompts: Sequence[ObjectPrompt], objects: Sequence[ObjectRef]) -> SlicePrediction:
        return self.predictor.predict([SliceRequest(self.image, list(prompts), list(objects))])[0]


def open_session(predictor: Predictor, image: np.ndarray) -> SliceSession:
    """``predictor.session(image)`` when it has sessions, else a session that asks it again each time."""
    if isinstance(predictor, InteractivePredictor):
        return predictor.session(image)
    return _RepeatSession(predictor, image)


PredictFn = Callable[[SliceRequest], Any]


class FunctionPredictor:
    """Wraps ``fn(request) -> masks`` or ``-> (masks, pred_iou)`` as a :class:`Predictor`.

    ``masks``: ``(P, 256, 256)`` bool (True = object), or float logits (object where > 0). Boolean masks
    are mapped back to the source resolution with nearest neighbour, exactly as the ground truth is, so
    returning the ground truth scores exactly 1. ``pred_iou``: ``(P,)`` or ``None``.
    """

    def __init__(self, fn: PredictFn, info: dict[str, Any] | None = None) -> None:
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
                raise ValueError(f"predictor returned masks of shape {masks.shape}, expected ({n}, 256, 256)")
            binary = masks.dtype == bool
            logits = np.where(masks, 1.0, -1.0).astype(np.float32) if binary else masks.astype(np.float32)
            pred_iou = (
                np.full(n, np.nan, np.float32) if iou is None else np.asarray(iou, np.float32).reshape(n)
            )
            out.append(SlicePrediction(logits, pred_iou, binary))
        return out


def as_predictor(p: Predictor | PredictFn) -> Predictor:
    """A :class:`Predictor` as is; a function wrapped in :class:`FunctionPredictor`."""
    if isinstance(p, Predictor):
        return p
    if callable(p):
        return FunctionPredictor(p)
    raise TypeError(f"not a predictor: {p!r}")


class SamSlicePredictor:
    """SAM on canvases: each image encoded once, its prompts decoded together (chunks of ``batch_prompts``).

    ``multimask``: ask for SAM's 3 masks and keep the one with the highest predicted IoU (SAM's advice
    for a single ambiguous click); otherwise the single-mask output, as in training.
    """

    def __init__(
        self, sam: Any, *, batch_prompts: int = 32, multimask: bool = False, info: dict | None = None
    ):
        self.sam = sam
        self.batch_prompts = int(batch_prompts)
        self.multimask = bool(multimask)
        self.info = info or {}

    def predict(self, requests: Sequence[SliceRequest]) -> list[SlicePrediction]:
        import torch

        from sam_medical.model.forward import canvas_to_input, encode

        if not requests:
            return []
        with torch.inference_mode():
            canvases = torch.from_numpy(np.stack([r.image for r in requests]))
            embeddings = encode(self.sam, canvas_to_input(self.sam, canvases))
            return [self.decode(embeddings[i : i + 1], req.prompts) for i, req in enumerate(requests)]

    def session(self, image: np.ndarray) -> SliceSession:
        """Encode ``image`` once; the session decodes any prompts on that embedding."""
        import torch

        from sam_medical.model.forward import canvas_to_input, encode

        with torch.inference_mode():
            embedding = encode(self.sam, canvas_to_input(self.sam, torch.from_numpy(image[None])))
        return _SamSession(self, embedding)

    def decode(self, embedding: Any, prompts: Sequence[ObjectPrompt]) -> SlicePrediction:
        """Decode ``prompts`` on one image ``embedding (1, C, h, h)``: prompts of the same shape (box or
        not, number of clicks) together, in chunks of ``batch_prompts``; answers in the prompts' order."""
        import torch

        from sam_medical.model.forward import decode_many, logits_to_canvas

        device = self.sam.pixel_mean.device
        n = len(prompts)
        logits = np.zeros((n, MODEL_SLICE_SIZE, MODEL_SLICE_SIZE), np.float32)
        ious = np.zeros(n, np.float32)
        groups: dict[tuple[bool, int], list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault((p.box is not None, -1 if p.points is None else len(p.points)), []).append(i)
        with torch.inference_mode():
            for idx in groups.values():
                for start in range(0, len(idx), self.batch_prompts):
                    chunk = idx[start : start + self.batch_prompts]
                    kwargs = _prompt_tensors([prompts[i] for i in chunk], device)
                    low, iou = decode_many(self.sam, embedding, multimask_output=self.multimask, **kwargs)
                    if self.multimask:
                        best = iou.argmax(dim=1)
                        rows = torch.arange(low.shape[0], device=low.device)
                        low, iou = low[rows, best], iou[rows, best]
                    else:
                        low, iou = low[:, 0], iou[:, 0]
                    logits[chunk] = logits_to_canvas(low).float().cpu().numpy()
                    ious[chunk] = iou.float().cpu().numpy()
        return SlicePrediction(logits, ious)


class _SamSession:
    """A :class:`SliceSession` of :class:`SamSlicePredictor`: one cached embedding."""

    def __init__(self, owner: SamSlicePredictor, embedding: Any) -> None:
        self.owner = owner
        self.embedding = embedding

    def predict(self, prompts: Sequence[ObjectPrompt], objects: Sequence[ObjectRef]) -> SlicePrediction:
        return self.owner.decode(self.embedding, prompts)


def _prompt_tensors(prompts: Sequence[ObjectPrompt], device: Any) -> dict[str, Any]:
    """Stack prompts of the same kind into ``decode_many``'s ``points``, ``point_labels``, ``boxes``."""
    import torch

    has_box = {p.box is not None for p in prompts}
    n_points = {None if p.points is None else len(p.points) for p in prompts}
    if len(has_box) != 1 or len(n_points) != 1:
        raise ValueError("prompts decoded together must all have the same parts and number of points")
    kwargs: dict[str, Any] = {}
    if prompts[0].box is not None:
        kwargs["boxes"] = torch.from_numpy(np.stack([p.box for p in prompts]).astype(np.float32)).to(device)
    if prompts[0].points is not None:
        kwargs["points"] = torch.from_numpy(np.stack([p.points for p in prompts]).astype(np.float32)).to(
            device
        )
        kwargs["point_labels"] = torch.from_numpy(
            np.stack([p.point_labels for p in prompts]).astype(np.int64)
        ).to(device)
    return kwargs


def build_model_predictor(
    spec: ModelSpec, *, device: str = "cpu", batch_prompts: int = 32, multimask: bool = False
) -> SamSlicePredictor:
    """Build ``spec``'s SAM (``models.build_sam``), load its adapter (``lora.load_adapter``, which refuses
    an adapter made for another base model), move it to ``device``; ``info`` describes it for the report."""
    from sam_medical.adapters.lora import load_adapter
    from sam_medical.model.build import build_sam

    sam, base_info = build_sam(
        spec.name,
        image_size=spec.image_size,
        checkpoint=spec.checkpoint,
        random_weights=spec.random_weights,
        seed=spec.seed,
    )
    info: dict[str, Any] = {"kind": "sam", **base_info, "adapter": None}
    if spec.adapter is not None:
        meta = load_adapter(sam, spec.adapter, base_info=base_info)
        info["adapter"] = {"path": str(Path(spec.adapter).resolve()), **_jsonable(meta)}
    sam.to(device).eval()
    info["device"] = str(device)
    info["multimask"] = bool(multimask)
    return SamSlicePredictor(sam, batch_prompts=batch_prompts, multimask=multimask, info=info)


# --- the data --------------------------------------------------------------------------------------


@dataclass
class CaseInfo:
    """What the scan of one ``.npz`` file found (``imgs`` is not read until the case is evaluated)."""

    name: str
    path: Path
    rows: int
    slice_index: np.ndarray
    volume_shape: tuple[int, int, int]
    geometry: SliceGeometry
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    present: dict[int, np.ndarray]  # label -> bool (rows,)
    geometry_source: str = "npz"
    label_names: dict[int, str] = field(default_factory=dict)  # value -> name, as the file records them


def list_slice_files(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The ``.npz`` files of a folder (sorted, not recursive), one file, or a list of files.

    :func:`sam_medical.training.dataset.list_npz`, plus a check that no two files share a case name.
    """
    from sam_medical.training.dataset import list_npz

    files = list_npz(data)
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise UserInputError("two slice files have the same case name")
    return files


def scan_case(path: Path) -> CaseInfo:
    """Read a file's ``gts`` and geometry, check them, and find which rows hold which label."""
    arrays = load_npz(path, keys=_META_KEYS)
    gts = arrays["gts"]
    if gts.ndim != 3 or gts.shape[1:] != (MODEL_SLICE_SIZE, MODEL_SLICE_SIZE) or gts.shape[0] == 0:
        raise UserInputError(f"{path}: gts must be (N, 256, 256) with N >= 1, got {gts.shape}")
    if gts.dtype.kind not in "iub":
        raise UserInputError(f"{path}: gts must hold integer label values, got {gts.dtype}")
    n = gts.shape[0]
    name = path.name[: -len(".npz")]
    if "slice_shape" in arrays and "volume_shape" in arrays:
        h, w = (int(v) for v in np.asarray(arrays["slice_shape"]).reshape(-1)[:2])
        volume_shape = tuple(int(v) for v in np.asarray(arrays["volume_shape"]).reshape(-1))
        slice_index = np.asarray(arrays.get("slice_index", np.arange(n)), np.int64).reshape(-1)
        spacing = tuple(float(v) for v in np.asarray(arrays.get("spacing", (1.0, 1.0, 1.0))).reshape(-1))
        origin = tuple(float(v) for v in np.asarray(arrays.get("origin", (0.0, 0.0, 0.0))).reshape(-1))
        direction = tuple(float(v) for v in np.asarray(arrays.get("direction", np.eye(3))).reshape(-1))
        source = "npz"
    else:  # a foreign MedSAM-style file: the canvas is the only geometry there is
        h = w = MODEL_SLICE_SIZE
        volume_shape = (h, w, n)
        slice_index = np.arange(n, dtype=np.int64)
        spacing, origin, direction = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).reshape(-1).tolist())
        source = "canvas (no map-back metadata in the file)"
    if len(volume_shape) != 3 or (h, w) != volume_shape[:2] or len(spacing) != 3 or len(direction) != 9:
        raise UserInputError(f"{path}: inconsistent geometry metadata (slice {h}x{w}, volume {volume_shape})")
    if slice_index.shape != (n,) or slice_index.min() < 0 or slice_index.max() >= volume_shape[2]:
        raise UserInputError(f"{path}: slice_index must give one k in 0..{volume_shape[2] - 1} per slice")
    if len(set(slice_index.tolist())) != n:
        raise UserInputError(f"{path}: slice_index repeats a slice")
    if min(spacing) <= 0:
        raise UserInputError(f"{path}: spacing must be positive, got {list(spacing)}")
    geom = SliceGeometry(h, w)
    if "resized_shape" in arrays and tuple(int(v) for v in arrays["resized_shape"]) != geom.resized_shape:
        raise UserInputError(
            f"{path}: resized_shape {arrays['resized_shape'].tolist()} does not match the slice shape {h}x{w} "
            f"(expected {list(geom.resized_shape)}); the file was not made by sam-medical preprocess"
        )
    flat = gts.reshape(n, -1)
    present = {int(v): (flat == v).any(axis=1) for v in np.unique(gts) if v != 0}
    if not present:
        raise UserInputError(f"{path} has no labels: every slice's ground truth is empty")
    return CaseInfo(
        name,
        path,
        n,
        slice_index,
        volume_shape,
        geom,
        spacing,
        origin,
        direction,
        present,
        source,
        npz_label_names(arrays),
    )


def dataset_label_names(cases: Sequence[CaseInfo]) -> dict[int, str]:
    """``{value: name}`` of the files (:func:`sam_medical.volume.label_names.merge_value_names`: they must agree)."""
    return merge_value_names([(c.path.name, c.label_names) for c in cases])


def scan_dataset(
    files: Sequence[Path], labels: Sequence[int | str] | None
) -> tuple[list[CaseInfo], list[int]]:
    """Scan every file (fail fast on a bad one) and resolve the labels to score (values, or names the
    files define) to label values."""
    cases = [scan_case(f) for f in files]
    found = sorted({v for c in cases for v in c.present})
    if labels is None:
        return cases, found
    labels = resolve_labels(labels, dataset_label_names(cases), found)
    unknown = sorted(set(labels) - set(found))
    if unknown:
        raise UserInputError(f"label values {unknown} do not occur in the data; present values: {found}")
    return cases, sorted(set(labels))


def object_seed(seed: int, case: str, slice_index: int, label: int) -> int:
    """The per-object prompt seed: independent of evaluation order and shared with a baseline."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(case.encode()), int(slice_index), int(label)])
    return int(ss.generate_state(1)[0])


def make_prompt(mask: np.ndarray, settings: PromptSettings, seed: int) -> ObjectPrompt:
    """The deterministic prompt of a canvas mask (:func:`sam_medical.prompts.eval_prompt`)."""
    p = eval_prompt(mask, settings.kind, k=settings.points, box_jitter=settings.box_jitter, seed=seed)
    return ObjectPrompt(p["box"], p["points"], p["point_labels"])


def nearest_rows(present: np.ndarray, slice_index: np.ndarray) -> np.ndarray:
    """For each row, the row holding the label whose ``k`` is nearest (lower ``k`` on ties); -1 if none."""
    rows = np.flatnonzero(present)
    out = np.full(present.shape[0], -1, np.int64)
    if rows.size == 0:
        return out
    ks = slice_index[rows]
    order = np.lexsort((ks,))
    rows, ks = rows[order], ks[order]
    for r in range(present.shape[0]):
        dist = np.abs(ks - slice_index[r])
        out[r] = rows[int(np.argmin(dist))]  # first minimum = lower k
    return out


def case_requests(
    case: CaseInfo,
    imgs: np.ndarray | None,
    gts: np.ndarray,
    labels: Sequence[int],
    settings: PromptSettings,
    include_empty: bool,
    only: set[tuple[int, int]] | None = None,
) -> tuple[list[SliceRequest], dict[int, int]]:
    """The requests of one case (one per row with at least one object) and, per label, the number of
    rows skipped because the label is absent and not scored. ``only``: restrict to ``(row, label)``."""
    nearest = (
        {v: nearest_rows(case.present[v], case.slice_index) for v in labels if v in case.present}
        if include_empty
        else {}
    )
    prompt_cache: dict[tuple[int, int], ObjectPrompt] = {}

    def prompt_of(row: int, label: int) -> ObjectPrompt:
        key = (row, label)
        if key not in prompt_cache:
            seed = object_seed(settings.seed, case.name, int(case.slice_index[row]), label)
            prompt_cache[key] = make_prompt(gts[row] == label, settings, seed)
        return prompt_cache[key]

    requests: list[SliceRequest] = []
    skipped = dict.fromkeys(labels, 0)
    for row in range(case.rows):
        prompts, objects = [], []
        for v in labels:
            present = v in case.present and bool(case.present[v][row])
            if present:
                src = row
            elif include_empty and v in nearest:
                src = int(nearest[v][row])
            else:
                skipped[v] += 1
                continue
            if only is not None and (row, v) not in only:
                continue
            prompts.append(prompt_of(src, v))
            objects.append(
                ObjectRef(case.name, row, int(case.slice_index[row]), v, present, int(case.slice_index[src]))
            )
        if objects:
            image = imgs[row] if imgs is not None else np.zeros((MODEL_SLICE_SIZE,) * 2 + (3,), np.uint8)
            requests.append(SliceRequest(image, prompts, objects))
    return requests, skipped


# --- metrics ---------------------------------------------------------------------------------------


def slice_scores(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dice and IoU of ``P`` binary masks ``(P, H, W)`` with MONAI (``ignore_empty=False``: both empty = 1)."""
    import torch
    from monai.metrics import compute_dice, compute_iou

    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float64)[:, None])
    g = torch.from_numpy(np.ascontiguousarray(gt, dtype=np.float64)[:, None])
    dice = compute_dice(p, g, include_background=True, ignore_empty=False)[:, 0]
    iou = compute_iou(p, g, include_background=True, ignore_empty=False)[:, 0]
    return dice.double().numpy(), iou.double().numpy()


def volume_scores(
    pred: dict[int, np.ndarray],
    gt: dict[int, np.ndarray],
    shape_hw: tuple[int, int],
    spacing: Sequence[float],
) -> dict[str, Any]:
    """3D Dice and HD95 (mm) of slices stacked at their ``k``: ``pred``/``gt`` map ``k`` -> ``(H, W)`` bool.

    The arrays are cropped to the bounding box of prediction and ground truth together, which changes
    neither Dice nor the surface distances (everything outside is empty in both).
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    ks = sorted(k for k in set(pred) | set(gt) if (k in pred and pred[k].any()) or (k in gt and gt[k].any()))
    pred_vox = int(sum(int(m.sum()) for m in pred.values()))
    gt_vox = int(sum(int(m.sum()) for m in gt.values()))
    out: dict[str, Any] = {"gt_voxels": gt_vox, "pred_voxels": pred_vox, "dice_3d": None, "hd95_mm": None}
    if not ks:
        return out
    k0, k1 = ks[0], ks[-1]
    empty = np.zeros(shape_hw, bool)
    union = np.zeros(shape_hw, bool)
    for k in ks:
        union |= pred.get(k, empty) | gt.get(k, empty)
    rows, cols = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
    i0, i1, j0, j1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    shape = (i1 - i0, j1 - j0, k1 - k0 + 1)
    p = np.zeros(shape, np.float64)
    g = np.zeros(shape, np.float64)
    for k in ks:
        if k in pred:
            p[:, :, k - k0] = pred[k][i0:i1, j0:j1]
        if k in gt:
            g[:, :, k - k0] = gt[k][i0:i1, j0:j1]
    pt, gtt = torch.from_numpy(p)[None, None], torch.from_numpy(g)[None, None]
    out["dice_3d"] = float(compute_dice(pt, gtt, include_background=True, ignore_empty=False)[0, 0])
    if pred_vox and gt_vox:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hd = compute_hausdorff_distance(
                pt, gtt, include_background=True, percentile=95, spacing=[float(s) for s in spacing]
            )
        value = float(hd[0, 0])
        out["hd95_mm"] = value if math.isfinite(value) else None
    return out


def describe(values: Iterable[float]) -> dict[str, Any]:
    """n, mean, median, sample sd (ddof=1), min, max, and the t-based 95% CI of the mean (NaN/None dropped)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    n = int(v.size)
    if n == 0:
        return {"n": 0, "mean": None, "median": None, "std": None, "min": None, "max": None, "ci95": None}
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else None
    ci = None
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
        ci = [mean - half, mean + half]
    return {
        "n": n,
        "mean": mean,
        "median": float(np.median(v)),
        "std": std,
        "min": float(v.min()),
        "max": float(v.max()),
        "ci95": ci,
    }


def paired_comparison(
    model: Sequence[float],
    baseline: Sequence[float],
    tol: float = TIE_TOLERANCE,
    alternative: str = "two-sided",
) -> dict:
    """Paired per-object comparison of ``model - baseline`` Dice: mean/median difference, wins, losses,
    ties (``|diff| < tol``), and a Wilcoxon signed-rank test (``scipy.stats.wilcoxon``,
    ``zero_method="wilcox"``: zero differences are dropped; ``alternative`` ``"two-sided"``, or
    ``"greater"``: the model is better). All differences zero: no test, p = 1."""
    from scipy.stats import wilcoxon

    a, b = np.asarray(model, np.float64), np.asarray(baseline, np.float64)
    if a.shape != b.shape:
        raise ValueError("paired comparison needs the same number of values")
    d = a - b
    n = int(d.size)
    out: dict[str, Any] = {
        "n": n,
        "mean_diff": float(d.mean()) if n else None,
        "median_diff": float(np.median(d)) if n else None,
        "wins": int((d >= tol).sum()),
        "losses": int((d <= -tol).sum()),
        "ties": int((np.abs(d) < tol).sum()),
        "tie_tolerance": tol,
        "n_nonzero": int((d != 0).sum()),
        "wilcoxon_statistic": None,
        "wilcoxon_p": None,
        "test": f"{alternative} Wilcoxon signed-rank, zero_method='wilcox'",
    }
    if n == 0:
        out["note"] = "no paired values"
    elif out["n_nonzero"] == 0:
        out["wilcoxon_p"] = 1.0
        out["note"] = "all differences are zero: no test, p = 1"
    else:
        with warnings.catch_warnings():  # small samples: scipy warns that the p-value is exact or approximate
            warnings.simplefilter("ignore")
            res = wilcoxon(d, zero_method="wilcox", alternative=alternative)
        out["wilcoxon_statistic"] = float(res.statistic)
        out["wilcoxon_p"] = float(res.pvalue)
    return out


# --- the evaluation --------------------------------------------------------------------------------


@dataclass
class _Scored:
    """Per-object results of one predictor on one slice, and the slice's source-resolution masks."""

    dice: np.ndarray
    iou: np.ndarray
    pred_area: np.ndarray
    pred_iou: np.ndarray
    masks: np.ndarray  # (P, H, W) bool
    label_map: np.ndarray | None  # (H, W) uint8: overlaps go to the highest logit


def score_slice(
    pred: SlicePrediction, gt_masks: np.ndarray, labels: Sequence[int], geom: SliceGeometry, want_map: bool
) -> _Scored:
    """Map the prediction back to the source slice, threshold at 0, and score it against ``gt_masks``."""
    n = gt_masks.shape[0]
    if pred.logits.shape != (n, MODEL_SLICE_SIZE, MODEL_SLICE_SIZE):
        raise ValueError(f"prediction has shape {pred.logits.shape}, expected ({n}, 256, 256)")
    if pred.binary:
        src = np.stack(
            [geom.label_from_model(pred.logits[p] > 0).astype(np.float32) * 2 - 1 for p in range(n)]
        )
    else:
        src = np.stack([geom.logits_from_model(pred.logits[p]) for p in range(n)])
    masks = src > 0
    dice, iou = slice_scores(masks, gt_masks)
    label_map = None
    if want_map:
        best = src.argmax(axis=0)
        hit = np.take_along_axis(src, best[None], 0)[0] > 0
        label_map = np.where(hit, np.asarray(labels, np.uint8)[best], 0).astype(np.uint8)
    return _Scored(
        dice, iou, masks.reshape(n, -1).sum(1), np.asarray(pred.pred_iou, np.float64), masks, label_map
    )


@dataclass
class Answer:
    """A predictor's answer to one slice request: the ``final`` prediction, the prediction after each step
    (``steps[0]``: the first prompt; ``steps[i]``: after corrective click ``i``), the final ``prompts``
    (with their clicks) and the number of corrective ``clicks`` per object ``(P,)``."""

    final: SlicePrediction
    steps: list[SlicePrediction]
    prompts: list[ObjectPrompt]
    clicks: np.ndarray


def refine(
    session: SliceSession,
    request: SliceRequest,
    first: SlicePrediction,
    gt: np.ndarray,
    valid: np.ndarray,
    rounds: int,
) -> Answer:
    """``rounds`` corrective clicks per object after ``first`` (see the module docstring).

    Args:
        session: the slice's session (its image prepared once).
        request: the slice and its objects' first prompts.
        first: the prediction of the first prompts.
        gt: ``(P, 256, 256)`` bool, each object's ground truth on the canvas.
        valid: ``(256, 256)`` bool, the canvas region holding the image (clicks go only there).
        rounds: corrective clicks per object; an object whose prediction is exact gets no more.
    """
    prompts = list(request.prompts)
    clicks = np.zeros(len(prompts), np.int64)
    steps = [first]
    current = first
    active = list(range(len(prompts)))
    for _ in range(rounds):
        clicked = []
        for p in active:
            click = corrective_click(current.logits[p] > 0, gt[p], valid)
            if click is not None:
                prompts[p] = prompts[p].with_click(*click)
                clicks[p] += 1
                clicked.append(p)
        active = clicked
        if active:
            out = session.predict([prompts[p] for p in active], [request.objects[p] for p in active])
            logits, ious = current.logits.copy(), current.pred_iou.copy()
            logits[active], ious[active] = out.logits, out.pred_iou
            current = SlicePrediction(logits, ious, out.binary)
        steps.append(current)
    return Answer(current, steps, prompts, clicks)


def answer_requests(
    predictor: Predictor,
    requests: Sequence[SliceRequest],
    gts: Sequence[np.ndarray],
    valid: np.ndarray,
    rounds: int,
) -> list[Answer]:
    """The predictor's answers to ``requests``: one batched call without corrective clicks, else one
    session per slice (:func:`refine`). ``gts``: per request, ``(P, 256, 256)`` bool canvas ground truth."""
    if rounds == 0:
        preds = predictor.predict(requests)
        if len(preds) != len(requests):
            raise ValueError("the predictor must answer every request")
        return [
            Answer(pred, [pred], list(req.prompts), np.zeros(len(req.prompts), np.int64))
            for req, pred in zip(requests, preds, strict=True)
        ]
    answers = []
    for req, gt in zip(requests, gts, strict=True):
        session = open_session(predictor, req.image)
        answers.append(refine(session, req, session.predict(req.prompts, req.objects), gt, valid, rounds))
    return answers


def box_fill_dice(prompts: Sequence[ObjectPrompt], gt_masks: np.ndarray, geom: SliceGeometry) -> np.ndarray:
    """The Dice of each prompt's rectangle, filled, against ``gt_masks (P, H, W)`` at the source resolution
    (mapped back with nearest neighbour, like a hard mask); NaN for a prompt without a box."""
    out = np.full(len(prompts), np.nan)
    boxed = [i for i, p in enumerate(prompts) if p.box is not None]
    if boxed:
        fills = np.stack([geom.label_from_model(prompts[i].box_mask()) > 0 for i in boxed])
        out[boxed] = slice_scores(fills, gt_masks[boxed])[0]
    return out


def valid_canvas(geom: SliceGeometry) -> np.ndarray:
    """``(256, 256)`` bool: the canvas region that holds the image (the rest is padding)."""
    h, w = geom.resized_shape
    out = np.zeros((MODEL_SLICE_SIZE, MODEL_SLICE_SIZE), bool)
    out[:h, :w] = True
    return out


def _iter_batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate(
    config: EvalConfig,
    predictor: Predictor | PredictFn | None = None,
    baseline: Predictor | PredictFn | None = None,
) -> dict[str, Any]:
    """Evaluate slice files; write ``slices.csv``, ``summary.json``, ``report.html`` (and ``masks/``).

    Args:
        config: data, outputs, prompts, policy and (when no predictor is given) the models to build.
        predictor: the model under test; ``None`` builds ``config.model``.
        baseline: the model to compare against; ``None`` builds ``config.baseline`` when set.

    Returns:
        The summary (also written to ``summary.json``).

    Raises:
        UserInputError: no or bad slice files, a file without labels, unknown label values, a model or
            adapter that cannot be loaded.
    """
    t_start = time.perf_counter()
    files = list_slice_files(config.data)
    cases, labels = scan_dataset(files, config.labels)
    names = dataset_label_names(cases)
    refine_rounds = config.prompt.refine
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"--out {out_dir} is a file, not a folder")

    device = "cpu"
    if predictor is None or (baseline is None and config.baseline is not None):
        from sam_medical.device import resolve_device

        device = resolve_device(config.device)
    if predictor is None:
        if config.model is None:
            raise UserInputError("no model to evaluate")
        predictor = build_model_predictor(
            config.model, device=device, batch_prompts=config.batch_prompts, multimask=config.multimask
        )
    if baseline is None and config.baseline is not None:
        baseline = build_model_predictor(
            config.baseline, device=device, batch_prompts=config.batch_prompts, multimask=config.multimask
        )
    model = as_predictor(predictor)
    base = as_predictor(baseline) if baseline is not None else None
    batch_images = config.batch_images or (8 if str(device).startswith("cuda") else 1)

    total_rows = 0
    for c in cases:
        for row in range(c.rows):
            if any(v in c.present and (c.present[v][row] or config.include_empty) for v in labels):
                total_rows += 1
    bar = _progress(total_rows, config.progress)

    rows: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    counts = {
        v: {
            "cases_with_label": 0,
            "slices_in_files": 0,
            "slices_present": 0,
            "slices_scored_present": 0,
            "slices_scored_empty": 0,
            "slices_skipped_empty": 0,
            "slices_not_in_files": 0,
        }
        for v in labels
    }
    mask_files: list[str] = []
    slices_done = objects_done = 0
    t_loop = time.perf_counter()
    for case in cases:
        arrays = load_npz(case.path, keys=("imgs", "gts"))
        imgs, gts = arrays["imgs"], arrays["gts"]
        if imgs.shape != (case.rows, MODEL_SLICE_SIZE, MODEL_SLICE_SIZE, 3) or imgs.dtype != np.uint8:
            raise UserInputError(
                f"{case.path}: imgs must be ({case.rows}, 256, 256, 3) uint8, got {imgs.shape} {imgs.dtype}"
            )
        requests, skipped = case_requests(case, imgs, gts, labels, config.prompt, config.include_empty)
        h, w = case.geometry.height, case.geometry.width
        pred_slices: dict[int, dict[int, np.ndarray]] = {v: {} for v in labels}
        base_slices: dict[int, dict[int, np.ndarray]] = {v: {} for v in labels}
        gt_slices: dict[int, dict[int, np.ndarray]] = {v: {} for v in labels}
        scored_per_label = dict.fromkeys(labels, 0)
        mask_vol = base_vol = None
        if config.save_masks:
            shape_kji = case.volume_shape[::-1]
            mask_vol = np.zeros(shape_kji, np.uint8).transpose(2, 1, 0)
            base_vol = np.zeros(shape_kji, np.uint8).transpose(2, 1, 0) if base is not None else None
        for v in labels:
            cnt = counts[v]
            cnt["slices_in_files"] += case.rows
            cnt["slices_not_in_files"] += case.volume_shape[2] - case.rows
            cnt["slices_skipped_empty"] += skipped[v]
            if v in case.present:
                cnt["cases_with_label"] += 1
                cnt["slices_present"] += int(case.present[v].sum())
        valid = valid_canvas(case.geometry)
        for batch in _iter_batches(requests, batch_images):
            canvas_gts = [np.stack([gts[o.row] == o.label for o in req.objects]) for req in batch]
            answers = answer_requests(model, batch, canvas_gts, valid, refine_rounds)
            base_answers = (
                answer_requests(base, batch, canvas_gts, valid, refine_rounds)
                if base is not None
                else [None] * len(batch)
            )
            for req, ans, bans in zip(batch, answers, base_answers, strict=True):
                row = req.objects[0].row
                k = req.objects[0].slice_index
                gt_src = case.geometry.label_from_model(gts[row])
                obj_labels = [o.label for o in req.objects]
                gt_masks = np.stack([gt_src == v for v in obj_labels])
                s = score_slice(ans.final, gt_masks, obj_labels, case.geometry, config.save_masks)
                sb = (
                    score_slice(bans.final, gt_masks, obj_labels, case.geometry, config.save_masks)
                    if bans is not None
                    else None
                )
                fill = box_fill_dice(req.prompts, gt_masks, case.geometry)
                step_dice = [
                    score_slice(st, gt_masks, obj_labels, case.geometry, False).dice for st in ans.steps[:-1]
                ]
                step_dice.append(s.dice)
                for p, obj in enumerate(req.objects):
                    cnt = counts[obj.label]
                    scored_per_label[obj.label] += 1
                    cnt["slices_scored_present" if obj.gt_present else "slices_scored_empty"] += 1
                    record: dict[str, Any] = {
                        "case": obj.case,
                        "slice_index": obj.slice_index,
                        "label": obj.label,
                        "label_name": names.get(obj.label, ""),
                        "dice": float(s.dice[p]),
                        "box_fill_dice": float(fill[p]),
                        "iou": float(s.iou[p]),
                        "gt_area": int(gt_masks[p].sum()),
                        "pred_area": int(s.pred_area[p]),
                        "pred_iou": float(s.pred_iou[p]),
                        "prompt": ans.prompts[p].describe(),
                        "gt_present": int(obj.gt_present),
                        "prompt_slice": obj.prompt_slice,
                        "clicks": int(ans.clicks[p]),
                        "dice_steps": ";".join(f"{float(d[p]):.6f}" for d in step_dice),
                        "_row": obj.row,
                        "_steps": [float(d[p]) for d in step_dice],
                    }
                    if sb is not None:
                        record.update(
                            baseline_dice=float(sb.dice[p]),
                            baseline_iou=float(sb.iou[p]),
                            baseline_pred_area=int(sb.pred_area[p]),
                            baseline_pred_iou=float(sb.pred_iou[p]),
                            dice_diff=float(s.dice[p] - sb.dice[p]),
                            same_as_baseline=int(np.array_equal(s.masks[p], sb.masks[p])),
                        )
                    rows.append(record)
                    if s.masks[p].any():
                        pred_slices[obj.label][k] = s.masks[p]
                    if sb is not None and sb.masks[p].any():
                        base_slices[obj.label][k] = sb.masks[p]
                    if obj.gt_present:
                        gt_slices[obj.label][k] = gt_masks[p]
                if mask_vol is not None:
                    mask_vol[:, :, k] = s.label_map
                    if base_vol is not None and sb is not None:
                        base_vol[:, :, k] = sb.label_map
                slices_done += 1
                objects_done += len(req.objects)
                bar.update(1)
        for v in labels:
            if v not in case.present:
                continue
            entry = {
                "case": case.name,
                "label": v,
                "slices_scored": scored_per_label[v],
            }
            entry.update(volume_scores(pred_slices[v], gt_slices[v], (h, w), case.spacing))
            if base is not None:
                b = volume_scores(base_slices[v], gt_slices[v], (h, w), case.spacing)
                entry.update(
                    baseline_dice_3d=b["dice_3d"],
                    baseline_hd95_mm=b["hd95_mm"],
                    baseline_pred_voxels=b["pred_voxels"],
                )
            volumes.append(entry)
        if mask_vol is not None:
            mask_files += _save_masks(out_dir, case, mask_vol, base_vol)
        del imgs, gts, arrays, requests, pred_slices, base_slices, gt_slices
    bar.close()
    t_eval = time.perf_counter() - t_loop
    if not rows:
        raise UserInputError("nothing to evaluate: no slice holds any of the chosen labels")

    info_model = _jsonable(getattr(model, "info", {"kind": type(model).__name__}))
    info_base = _jsonable(getattr(base, "info", {"kind": type(base).__name__})) if base is not None else None
    summary = summarize(rows, volumes, labels, counts, config, cases)
    summary["model"] = info_model
    summary["baseline"] = info_base
    if summary["comparison"] is not None:
        summary["comparison"].update(same_as_baseline(summary["comparison"], rows, info_model, info_base))
    summary["timing"] = {
        "evaluation_seconds": round(t_eval, 3),
        "slices": slices_done,
        "objects": objects_done,
        "slices_per_second": round(slices_done / t_eval, 3) if t_eval > 0 else None,
        "objects_per_second": round(objects_done / t_eval, 3) if t_eval > 0 else None,
        "batch_images": batch_images,
        "batch_prompts": config.batch_prompts,
        "note": "predictors run once per image batch" + (" (model and baseline)" if base is not None else ""),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "slices.csv"
    write_csv(csv_path, rows, with_baseline=base is not None)
    outputs: dict[str, Any] = {"csv": str(csv_path), "summary": str(out_dir / "summary.json"), "report": None}
    if mask_files:
        outputs["masks"] = mask_files
    summary["outputs"] = outputs
    if config.report:
        from sam_medical.evaluation.report import write_report

        examples = collect_examples(rows, cases, labels, model, base, config)
        report_path = out_dir / "report.html"
        write_report(report_path, summary, rows, examples)
        outputs["report"] = str(report_path)
    summary["timing"]["total_seconds"] = round(time.perf_counter() - t_start, 3)
    write_json_atomic(out_dir / "summary.json", _jsonable(summary))
    return _jsonable(summary)


def summarize(
    rows: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
    labels: Sequence[int],
    counts: dict[int, dict[str, int]],
    config: EvalConfig,
    cases: Sequence[CaseInfo],
) -> dict[str, Any]:
    """Aggregates per label and overall from the per-object rows and per-volume entries."""
    compare = bool(rows) and "baseline_dice" in rows[0]
    names = dataset_label_names(cases)
    rounds = config.prompt.refine
    per_label: dict[str, Any] = {}
    comparison: dict[str, Any] | None = {"per_label": {}} if compare else None
    for v in labels:
        present = [r for r in rows if r["label"] == v and r["gt_present"]]
        empty = [r for r in rows if r["label"] == v and not r["gt_present"]]
        vols = [e for e in volumes if e["label"] == v]
        entry: dict[str, Any] = {
            "name": names.get(v),
            "slice_dice": describe(r["dice"] for r in present),
            "slice_iou": describe(r["iou"] for r in present),
            "volume_dice": describe(e["dice_3d"] for e in vols),
            "hd95_mm": describe(e["hd95_mm"] for e in vols),
            "volumes": len(vols),
            "volumes_without_hd95": sum(1 for e in vols if e["hd95_mm"] is None),
            "counts": dict(counts[v]),
            **_box_fill_and_steps(present, rounds),
        }
        if config.include_empty:
            entry["empty_slices"] = {
                "n": len(empty),
                "predicted_empty": sum(1 for r in empty if r["pred_area"] == 0),
                "with_false_positive": sum(1 for r in empty if r["pred_area"] > 0),
                "mean_false_positive_area": (
                    float(np.mean([r["pred_area"] for r in empty])) if empty else None
                ),
            }
            entry["slice_dice_all"] = describe(r["dice"] for r in present + empty)
        if compare:
            entry["baseline_slice_dice"] = describe(r["baseline_dice"] for r in present)
            entry["baseline_volume_dice"] = describe(e["baseline_dice_3d"] for e in vols)
            entry["baseline_hd95_mm"] = describe(e["baseline_hd95_mm"] for e in vols)
            comparison["per_label"][str(v)] = paired_comparison(
                [r["dice"] for r in present], [r["baseline_dice"] for r in present]
            )
        per_label[str(v)] = entry
    present_all = [r for r in rows if r["gt_present"]]
    label_means = [per_label[str(v)]["slice_dice"]["mean"] for v in labels]
    overall: dict[str, Any] = {
        "slice_dice": describe(r["dice"] for r in present_all),
        "slice_iou": describe(r["iou"] for r in present_all),
        "slice_dice_mean_of_labels": (
            float(np.mean([m for m in label_means if m is not None]))
            if any(m is not None for m in label_means)
            else None
        ),
        "volume_dice": describe(e["dice_3d"] for e in volumes),
        "hd95_mm": describe(e["hd95_mm"] for e in volumes),
        "objects_scored": len(rows),
        "objects_present": len(present_all),
        **_box_fill_and_steps(present_all, rounds),
    }
    if compare:
        overall["baseline_slice_dice"] = describe(r["baseline_dice"] for r in present_all)
        overall["baseline_volume_dice"] = describe(e["baseline_dice_3d"] for e in volumes)
        comparison["overall"] = paired_comparison(
            [r["dice"] for r in present_all], [r["baseline_dice"] for r in present_all]
        )
        comparison["difference"] = "model - baseline (per object, slices where the label is present)"
        paired_vol = [e for e in volumes if e["dice_3d"] is not None and e["baseline_dice_3d"] is not None]
        comparison["volumes"] = paired_comparison(
            [e["dice_3d"] for e in paired_vol], [e["baseline_dice_3d"] for e in paired_vol]
        )
    return {
        "format": "sam-medical-evaluation",
        "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": {
            "files": [str(c.path) for c in cases],
            "cases": len(cases),
            "geometry_source": sorted({c.geometry_source for c in cases}),
            **config.extra.get("data", {}),
        },
        "labels": [int(v) for v in labels],
        "label_names": {str(v): names[v] for v in labels if v in names},
        "prompt": config.prompt.as_dict(),
        "policy": policy_dict(config.include_empty),
        "per_label": per_label,
        "overall": overall,
        "volumes": volumes,
        "comparison": comparison,
        "box_fill": box_fill_verdict(overall),
        **{k: val for k, val in config.extra.items() if k != "data"},
    }


def _box_fill_and_steps(present: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """The box-fill reference of ``present`` rows (``box_fill_slice_dice``, and ``vs_box_fill``: the
    paired model - box-fill comparison) when their prompts have a box; the mean Dice after each step
    (``refine_curve``) when there were corrective clicks."""
    out: dict[str, Any] = {}
    boxed = [r for r in present if math.isfinite(r["box_fill_dice"])]
    if boxed:
        out["box_fill_slice_dice"] = describe(r["box_fill_dice"] for r in boxed)
        out["vs_box_fill"] = paired_comparison(
            [r["dice"] for r in boxed], [r["box_fill_dice"] for r in boxed]
        )
    if rounds and present:
        out["refine_curve"] = [float(np.mean([r["_steps"][i] for r in present])) for i in range(rounds + 1)]
    return out


def box_fill_verdict(overall: dict[str, Any]) -> dict[str, Any] | None:
    """What the model adds over the box-fill reference, in numbers and one sentence (None: no box)."""
    vs = overall.get("vs_box_fill")
    if not vs or vs["mean_diff"] is None:
        return None
    model, fill = overall["slice_dice"]["mean"], overall["box_fill_slice_dice"]["mean"]
    gain = vs["mean_diff"]
    adds = gain >= TIE_TOLERANCE and vs["wins"] > vs["losses"]
    text = (
        f"box-fill reference: the prompt rectangle itself scores slice Dice {fill:.3f}; the model "
        f"{model:.3f} ({gain:+.3f}; better on {vs['wins']}, worse on {vs['losses']} of {vs['n']} objects)"
    )
    text += "" if adds else ": the model does not beat its own prompt box, so it adds nothing here"
    return {
        "model_slice_dice": model,
        "box_fill_slice_dice": fill,
        "gain": gain,
        "model_adds": adds,
        "verdict": text,
    }


def same_as_baseline(
    comparison: dict[str, Any],
    rows: list[dict[str, Any]],
    model: dict[str, Any],
    baseline: dict[str, Any] | None,
) -> dict[str, Any]:
    """Whether the model equals its baseline (every paired difference a tie, or identical predictions),
    with a sentence saying so and, when the adapter's own metadata tells, why."""
    overall = comparison["overall"]
    identical = sum(int(r.get("same_as_baseline", 0)) for r in rows if r["gt_present"])
    n = overall["n"]
    same = n > 0 and (overall["ties"] == n or identical == n)
    out: dict[str, Any] = {"same_as_baseline": same, "identical_predictions": identical, "verdict": None}
    if not same:
        return out
    text = (
        f"the model equals the baseline: all {n} paired objects are ties (|diff| < {overall['tie_tolerance']}), "
        f"{identical} with identical predictions"
    )
    adapter = (model or {}).get("adapter") or {}
    if adapter.get("epoch") == 0:
        text += (
            "; its adapter was saved at epoch 0 of its training, i.e. it is the model that training started "
            "from: that run learned nothing"
        )
    elif (baseline or {}).get("adapter") and (baseline or {}).get("adapter", {}).get(
        "version"
    ) == adapter.get("version"):
        text += "; both carry the same adapter version"
    out["verdict"] = text
    return out


def policy_dict(include_empty: bool) -> dict[str, Any]:
    """The metric and empty-slice policy, in words and flags, for ``summary.json`` and the report."""
    if include_empty:
        empty = (
            "Slices where the label is present are scored with their own prompt. In a case holding the label, "
            "every other slice of the file is also scored, prompted with the prompt of the nearest slice (by k, "
            "lower k on ties) where the label is present; there dice = iou = 1 if the prediction is empty, else 0. "
            "Those are reported apart (empty_slices, slice_dice_all); slice_dice stays over present slices. 3D Dice "
            "and HD95 include their false positives. Slices absent from the file count as empty in prediction and "
            "ground truth."
        )
    else:
        empty = (
            "Only slices where the label is present are scored (a prompt needs an object). Slices of the file "
            "without the label are skipped and counted (slices_skipped_empty). 3D Dice and HD95 stack the scored "
            "slices: false positives on slices without the label are not counted, so they are optimistic; "
            "use --include-empty to count them."
        )
    return {
        "include_empty": bool(include_empty),
        "empty_slices": empty,
        "objects": "each label value present in a slice is one object (all its components), with one prompt",
        "resolution": "source slice (I, J): predicted canvas logits mapped back bilinearly "
        "(SliceGeometry.logits_from_model), object where logit > 0; hard masks from a function "
        "predictor are mapped back with nearest neighbour, like the ground truth",
        "ground_truth": "the file's gts mapped back to the source slice, nearest neighbour "
        "(SliceGeometry.label_from_model)",
        "slice_metrics": "MONAI compute_dice / compute_iou, ignore_empty=False",
        "volume_metrics": "MONAI compute_dice on the predicted slices stacked at slice_index; "
        "compute_hausdorff_distance(percentile=95, spacing=file spacing), symmetric, in mm; "
        "no HD95 when the prediction is empty",
        "aggregates": "mean, median, sample sd (ddof=1), t-based 95% CI of the mean (not clipped)",
        "saved_masks": "--save-masks: one label volume per case with the source geometry; where objects of "
        "two labels overlap, the label with the higher logit wins; slices not scored are 0",
        "comparison": f"paired per object: model - baseline Dice; tie when |diff| < {TIE_TOLERANCE}; "
        "two-sided Wilcoxon signed-rank (zero differences dropped; all zero: p = 1)",
        "box_fill": "with a box prompt, the Dice of the prompt rectangle itself, filled and mapped back like a "
        "hard mask, on the same objects (box_fill_dice): on compact objects a filled box already scores "
        "0.7-0.9, so a box-prompted model that does not beat it adds nothing",
    }


def write_csv(path: Path, rows: list[dict[str, Any]], with_baseline: bool) -> None:
    """``slices.csv``, atomically. Floats are written in full precision; NaN as ``nan``."""
    columns = list(CSV_COLUMNS) + (list(BASELINE_COLUMNS) if with_baseline else [])
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            for r in rows:
                writer.writerow([_cell(r[c]) for c in columns])


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read ``slices.csv`` back with numeric columns as numbers."""
    ints = {
        "slice_index",
        "label",
        "gt_area",
        "pred_area",
        "gt_present",
        "prompt_slice",
        "clicks",
        "baseline_pred_area",
        "same_as_baseline",
    }
    out = []
    with open(path, newline="") as fh:
        for rec in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for k, v in rec.items():
                if k in _TEXT_COLUMNS:
                    row[k] = v
                elif k in ints:
                    row[k] = int(v)
                else:
                    row[k] = float(v)
            out.append(row)
    return out


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return value


def _save_masks(
    out_dir: Path, case: CaseInfo, mask_vol: np.ndarray, base_vol: np.ndarray | None
) -> list[str]:
    """Write the predicted label volume(s) with the source geometry (``write_volume``)."""
    from sam_medical.volume.io import Volume, write_volume

    ref = Volume(array=mask_vol, spacing=case.spacing, origin=case.origin, direction=case.direction)
    paths = [write_volume(mask_vol, ref, out_dir / "masks" / f"{case.name}.nii.gz")]
    if base_vol is not None:
        paths.append(write_volume(base_vol, ref, out_dir / "masks" / f"{case.name}_baseline.nii.gz"))
    return [str(p) for p in paths]


# --- report examples -------------------------------------------------------------------------------


@dataclass
class Example:
    """One slice drawn in the report: canvas image, masks and prompt, cropped to the valid region."""

    title: str
    kind: str
    case: str
    slice_index: int
    label: int
    dice: float
    image: np.ndarray  # (h, w) uint8
    gt: np.ndarray  # (h, w) bool
    pred: np.ndarray  # (h, w) bool
    baseline: np.ndarray | None
    prompt: ObjectPrompt
    aspect: float = 1.0
    baseline_dice: float | None = None
    label_name: str = ""
    box_fill_dice: float | None = None


def pick_examples(rows: list[dict[str, Any]], labels: Sequence[int], compare: bool) -> list[tuple[str, dict]]:
    """Per label: the best, median and worst slice by Dice (present slices); with a baseline, also the
    largest gain and the largest loss. Ties broken by case, then slice index."""
    picks: list[tuple[str, dict]] = []
    for v in labels:
        present = sorted(
            (r for r in rows if r["label"] == v and r["gt_present"]),
            key=lambda r: (-r["dice"], r["case"], r["slice_index"]),
        )
        if not present:
            continue
        chosen = [("best", present[0]), ("median", present[len(present) // 2]), ("worst", present[-1])]
        if compare:
            by_diff = sorted(present, key=lambda r: (-r["dice_diff"], r["case"], r["slice_index"]))
            chosen += [("largest gain", by_diff[0]), ("largest loss", by_diff[-1])]
        seen = set()
        for kind, r in chosen:
            key = (r["case"], r["slice_index"], kind)
            if key not in seen:
                seen.add(key)
                picks.append((kind, r))
    return picks


def collect_examples(
    rows: list[dict[str, Any]],
    cases: Sequence[CaseInfo],
    labels: Sequence[int],
    model: Predictor,
    base: Predictor | None,
    config: EvalConfig,
) -> list[Example]:
    """Predict the picked slices again (deterministic) to draw them; one file read per case."""
    picks = pick_examples(rows, labels, base is not None)
    by_case: dict[str, list[tuple[str, dict]]] = {}
    for kind, r in picks:
        by_case.setdefault(r["case"], []).append((kind, r))
    case_of = {c.name: c for c in cases}
    names = dataset_label_names(cases)
    drawn: dict[
        tuple[str, int, int], tuple[np.ndarray, np.ndarray, np.ndarray | None, ObjectPrompt, np.ndarray]
    ] = {}
    for name, items in by_case.items():
        case = case_of[name]
        arrays = load_npz(case.path, keys=("imgs", "gts"))
        only = {(r["_row"], r["label"]) for _, r in items}
        requests, _ = case_requests(case, arrays["imgs"], arrays["gts"], labels, config.prompt, False, only)
        valid = valid_canvas(case.geometry)
        for req in requests:
            gt = np.stack([arrays["gts"][o.row] == o.label for o in req.objects])
            ans = answer_requests(model, [req], [gt], valid, config.prompt.refine)[0]
            bans = (
                answer_requests(base, [req], [gt], valid, config.prompt.refine)[0]
                if base is not None
                else None
            )
            for p, obj in enumerate(req.objects):
                drawn[(name, obj.row, obj.label)] = (
                    req.image[:, :, 0],
                    ans.final.logits[p] > 0,
                    bans.final.logits[p] > 0 if bans is not None else None,
                    ans.prompts[p],
                    gt[p],
                )
    out = []
    for kind, r in picks:
        case = case_of[r["case"]]
        key = (r["case"], r["_row"], r["label"])
        if key not in drawn:
            continue
        image, pred, bpred, prompt, gt = drawn[key]
        hh, ww = case.geometry.resized_shape
        sp_i, sp_j = case.spacing[0] * case.geometry.height / hh, case.spacing[1] * case.geometry.width / ww
        out.append(
            Example(
                title=f"{label_display(r['label'], names)} {kind}: {r['case']} k={r['slice_index']}",
                kind=kind,
                case=r["case"],
                slice_index=r["slice_index"],
                label=r["label"],
                dice=r["dice"],
                image=image[:hh, :ww],
                gt=gt[:hh, :ww],
                pred=pred[:hh, :ww],
                baseline=None if bpred is None else bpred[:hh, :ww],
                prompt=prompt,
                aspect=float(sp_i / sp_j),
                baseline_dice=r.get("baseline_dice"),
                label_name=names.get(r["label"], ""),
                box_fill_dice=r["box_fill_dice"] if math.isfinite(r["box_fill_dice"]) else None,
            )
        )
    return out


# --- helpers ---------------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: NaN/inf -> None, numpy -> Python, paths -> str, private keys dropped."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, str | int | bool) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return str(obj)
    return str(obj)


class _NoBar:
    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="slice", desc="evaluate", file=sys.stderr)


__all__ = [
    "EvalConfig",
    "ModelSpec",
    "PromptSettings",
    "ObjectPrompt",
    "ObjectRef",
    "SliceRequest",
    "SlicePrediction",
    "Predictor",
    "InteractivePredictor",
    "SliceSession",
    "open_session",
    "refine",
    "answer_requests",
    "box_fill_dice",
    "FunctionPredictor",
    "SamSlicePredictor",
    "build_model_predictor",
    "evaluate",
    "describe",
    "paired_comparison",
    "slice_scores",
    "volume_scores",
    "read_csv",
    "object_seed",
    "make_prompt",
]
