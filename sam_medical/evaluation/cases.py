"""The data to score: scan the ``.npz`` slice files, resolve the labels, and prompt every object.

Each **label value present in a slice is its own object** with one deterministic prompt
(:func:`sam_medical.prompts.eval_prompt`) made from that label's mask on the 256 canvas, seeded per
object from ``(seed, crc32(case), slice_index, label)`` so that it does not depend on the order of
evaluation and a baseline gets exactly the same prompt. With ``include_empty``, a slice of a case without
the label is prompted with the prompt of the nearest slice (by ``k``, lower ``k`` on ties) holding it.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sam_medical.canvas.geometry import MODEL_SLICE_SIZE, SliceGeometry
from sam_medical.canvas.slice_file import load_npz
from sam_medical.errors import UserInputError
from sam_medical.evaluation.config import PromptSettings
from sam_medical.evaluation.slice_requests import ObjectPrompt, ObjectRef, SliceRequest
from sam_medical.prompts import eval_prompt
from sam_medical.training.dataset import list_npz
from sam_medical.volume.label_names import merge_value_names, npz_label_names, resolve_labels

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


def valid_canvas(geom: SliceGeometry) -> np.ndarray:
    """``(256, 256)`` bool: the canvas region that holds the image (the rest is padding)."""
    h, w = geom.resized_shape
    out = np.zeros((MODEL_SLICE_SIZE, MODEL_SLICE_SIZE), bool)
    out[:h, :w] = True
    return out
