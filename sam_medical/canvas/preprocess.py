"""NIfTI (or any SimpleITK-readable) volumes + label maps -> 256x256 ``.npz`` slice files.

Pipeline for one case (all steps are plain functions, reused by training, evaluation and the app):

1. :func:`sam_medical.volume.io.load_volume` / :func:`~sam_medical.volume.io.load_label`: arrays in stored IJK
   order, geometry checked, float labels accepted when whole numbers.
2. :func:`select_labels`: keep chosen label values, drop 2D connected components smaller than
   ``min_area`` pixels (source resolution, 4-connectivity... see ``scipy.ndimage.label`` defaults).
3. :func:`choose_slices`: slices ``k`` holding a label are kept; empty slices are skipped and counted,
   or a seeded ``keep_empty`` fraction of them is kept as negatives.
4. :func:`sam_medical.volume.intensity.resolve_window` once per volume, then per kept slice: window to uint8,
   :class:`~sam_medical.canvas.geometry.SliceGeometry` resize + pad to the 256 canvas.
5. :func:`sam_medical.canvas.slice_file.save_npz`, atomically, plus ``manifest.json`` for the whole run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from sam_medical.atomic import write_json_atomic
from sam_medical.canvas.geometry import MODEL_SLICE_SIZE, SliceGeometry
from sam_medical.canvas.slice_file import save_npz
from sam_medical.errors import UserInputError, library_detail
from sam_medical.outdir import prepare_output_dir, remove_created
from sam_medical.volume.dataset_layout import CasePair
from sam_medical.volume.intensity import IntensityWindow, resolve_window
from sam_medical.volume.io import Volume, image_stem, load_label, load_volume
from sam_medical.volume.label_names import check_label_names


@dataclass
class PreprocessOptions:
    """What ``sam-medical preprocess`` does to every case."""

    modality: str = "auto"
    window: str | None = None
    labels: tuple[int, ...] | None = None
    min_area: int = 0
    keep_empty: float = 0.0
    seed: int = 0
    compress: bool = True
    #: ``{name: value}`` (:mod:`sam_medical.volume.label_names`), recorded in each slice file.
    label_names: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.keep_empty) <= 1.0:
            raise UserInputError(f"--keep-empty must be a fraction in [0, 1], got {self.keep_empty}")
        if self.min_area < 0:
            raise UserInputError(f"--min-area must be >= 0, got {self.min_area}")
        if self.label_names is not None:
            self.label_names = check_label_names(self.label_names, "label names")


@dataclass
class SliceSet:
    """The canvas slices of one case. ``imgs (N,256,256,3)`` uint8, ``gts (N,256,256)`` uint8."""

    imgs: np.ndarray
    gts: np.ndarray
    slice_index: np.ndarray
    geometry: SliceGeometry
    window: IntensityWindow
    label_values: list[int]
    stats: dict = field(default_factory=dict)


def parse_label_list(text: str | None) -> tuple[int, ...] | None:
    """``"1,3"`` -> ``(1, 3)``; ``None``/empty -> ``None`` (all labels)."""
    if not text:
        return None
    try:
        values = tuple(sorted({int(v) for v in str(text).split(",") if v.strip()}))
    except ValueError:
        raise UserInputError(f"--labels must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1 or max(values) > 255:
        raise UserInputError(f"--labels values must be in 1..255, got {text!r}")
    return values


# --- the steps ------------------------------------------------------------------------------------


def select_labels(label_kji: np.ndarray, labels: Sequence[int] | None, min_area: int) -> np.ndarray:
    """Keep the chosen label values, drop per-slice components smaller than ``min_area`` pixels.

    ``label_kji``: ``(K, J, I)`` uint8 (the slice-major view of the IJK array). Returns a new array, or
    ``label_kji`` itself when there is nothing to change (it is never written to).
    """
    if labels is None and min_area <= 1:
        return label_kji  # nothing to change: no copy of a large volume
    out = np.array(label_kji, dtype=np.uint8, copy=True)
    if labels is not None:
        out[~np.isin(out, np.asarray(labels, dtype=np.uint8))] = 0
    if min_area > 1:
        for k in np.flatnonzero(out.reshape(out.shape[0], -1).any(axis=1)):
            sl = out[k]
            for value in np.unique(sl[sl > 0]):
                comp, n = ndimage.label(sl == value)
                if n == 0:
                    continue
                sizes = np.bincount(comp.ravel())
                small = np.flatnonzero(sizes < min_area)
                small = small[small > 0]
                if small.size:
                    sl[np.isin(comp, small)] = 0
    return out


def choose_slices(label_kji: np.ndarray, keep_empty: float, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Return ``(kept_k, kept_empty_k, skipped_empty_count)``; ``kept_k`` is sorted and includes negatives."""
    present = label_kji.reshape(label_kji.shape[0], -1).any(axis=1)
    labelled = np.flatnonzero(present)
    empty = np.flatnonzero(~present)
    n_keep = int(round(keep_empty * empty.size))
    rng = np.random.default_rng(seed)
    kept_empty = np.sort(rng.choice(empty, size=n_keep, replace=False)) if n_keep else np.zeros(0, np.int64)
    kept = np.sort(np.concatenate([labelled, kept_empty])).astype(np.int64)
    return kept, kept_empty, int(empty.size - n_keep)


def volume_to_slices(image: Volume, label: Volume, options: PreprocessOptions) -> SliceSet:
    """Steps 2-4 for one loaded case. Raises :class:`UserInputError` for an empty label."""
    label_kji = label.array.transpose(2, 1, 0)
    if not label_kji.any():
        raise UserInputError(f"label {label.path} is empty: it has no labelled voxel")
    selected = select_labels(label_kji, options.labels, options.min_area)
    if selected is not label_kji and not selected.any():
        what = f"label values {list(options.labels)}" if options.labels else "any label"
        raise UserInputError(
            f"label {label.path} has no voxel of {what} left (min-area {options.min_area}); present values: "
            f"{[int(v) for v in np.unique(label_kji) if v]}"
        )
    kept, kept_empty, skipped = choose_slices(selected, options.keep_empty, options.seed)
    window = resolve_window(image.array, options.modality, options.window)
    i_size, j_size, k_size = image.shape
    geom = SliceGeometry(i_size, j_size)
    image_kji = image.array.transpose(2, 1, 0)
    n = kept.size
    imgs = np.zeros((n, MODEL_SLICE_SIZE, MODEL_SLICE_SIZE, 3), np.uint8)
    gts = np.zeros((n, MODEL_SLICE_SIZE, MODEL_SLICE_SIZE), np.uint8)
    for row, k in enumerate(kept):
        imgs[row] = geom.image_to_model(window.apply(image_kji[k].T))
        gts[row] = geom.label_to_model(selected[k].T)
    counts = np.bincount(selected[selected > 0], minlength=256)  # only labelled voxels: fast
    voxel_counts = {int(v): int(counts[v]) for v in np.flatnonzero(counts) if v}
    stats = {
        "slices_total": int(k_size),
        "slices_kept": int(n),
        "slices_kept_empty": int(kept_empty.size),
        "slices_skipped_empty": skipped,
        "voxel_counts": voxel_counts,
    }
    return SliceSet(imgs, gts, kept.astype(np.int32), geom, window, sorted(voxel_counts), stats)


def slice_file_arrays(
    slices: SliceSet, image: Volume, label: Volume, options: PreprocessOptions
) -> dict[str, np.ndarray]:
    """The arrays of one ``.npz`` slice file (keys documented in docs/ARCHITECTURE.md)."""
    geom = slices.geometry
    by_value = {v: k for k, v in (options.label_names or {}).items()}
    meta = {
        "format": "sam-medical-slices",
        "format_version": 1,
        "source_image": str(Path(image.path).resolve()),
        "source_label": str(Path(label.path).resolve()),
        "volume_shape": list(image.shape),
        "spacing": list(image.spacing),
        "origin": list(image.origin),
        "direction": list(image.direction),
        "orientation": image.orientation_code(),
        "geometry": geom.as_dict(),
        "slice_axis": "k (third stored axis); slice = volume[:, :, k]; rows i, columns j",
        "window": slices.window.as_dict(),
        "label_values": slices.label_values,
        "label_names": {by_value[v]: v for v in slices.label_values if v in by_value},
        "options": asdict(options),
        **slices.stats,
    }
    return {
        "imgs": slices.imgs,
        "gts": slices.gts,
        "slice_index": slices.slice_index,
        "volume_shape": np.asarray(image.shape, np.int64),
        "slice_shape": np.asarray([geom.height, geom.width], np.int64),
        "resized_shape": np.asarray(geom.resized_shape, np.int64),
        "scale": np.float64(geom.scale),
        "spacing": np.asarray(image.spacing, np.float64),
        "origin": np.asarray(image.origin, np.float64),
        "direction": np.asarray(image.direction, np.float64).reshape(3, 3),
        "window": np.asarray([slices.window.lo, slices.window.hi], np.float64),
        "modality": np.str_(slices.window.modality),
        "label_values": np.asarray(slices.label_values, np.int64),
        "label_names": np.asarray([by_value.get(v, "") for v in slices.label_values], dtype=np.str_),
        "source_image": np.str_(meta["source_image"]),
        "source_label": np.str_(meta["source_label"]),
        "meta": np.str_(json.dumps(meta)),
    }


def preprocess_case(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: PreprocessOptions | None = None,
    name: str | None = None,
) -> dict:
    """Load, slice and write ``out_dir/<case>.npz``. Returns the case's manifest entry."""
    options = options or PreprocessOptions()
    start = time.perf_counter()
    image = load_volume(image_path)
    label = load_label(label_path, image)
    slices = volume_to_slices(image, label, options)
    case = name or image_stem(image_path)
    out = Path(out_dir) / f"{case}.npz"
    save_npz(out, slice_file_arrays(slices, image, label, options), compress=options.compress)
    return {
        "case": case,
        "image": str(Path(image_path).resolve()),
        "label": str(Path(label_path).resolve()),
        "npz": out.name,
        "shape": list(image.shape),
        "spacing": list(image.spacing),
        "orientation": image.orientation_code(),
        "modality": slices.window.modality,
        "window": slices.window.as_dict(),
        "labels": slices.label_values,
        "label_names": {
            name: value for name, value in (options.label_names or {}).items() if value in slices.label_values
        },
        **slices.stats,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _run_one(args: tuple) -> tuple[str, dict | None, str | None]:
    pair, out_dir, options = args
    try:
        return pair.name, preprocess_case(pair.image, pair.label, out_dir, options, name=pair.name), None
    except UserInputError as exc:
        return pair.name, None, str(exc)
    except OSError as exc:  # the slice file could not be written (disk full, permissions)
        return pair.name, None, f"cannot write {exc.filename or out_dir}: {exc.strerror or exc}"
    except Exception as exc:  # noqa: BLE001 - a batch goes on past one bad case and reports it
        return pair.name, None, f"{type(exc).__name__}: {library_detail(exc)}"


def preprocess_cases(
    cases: Iterable[CasePair],
    out_dir: str | os.PathLike,
    options: PreprocessOptions | None = None,
    *,
    workers: int = 1,
    progress: bool = False,
    extra: dict | None = None,
) -> dict:
    """Preprocess many cases (in parallel with ``workers`` processes); write ``manifest.json``.

    A bad case does not stop the batch: it is listed under ``failed`` with its error. When no case
    could be preprocessed, nothing is written (no ``manifest.json``; a folder this call created is
    removed again) and the returned manifest lists the failures.

    Raises:
        UserInputError: ``out_dir`` cannot be written; two cases would write the same file.
    """
    options = options or PreprocessOptions()
    out_dir = Path(out_dir)
    cases = list(cases)
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UserInputError(f"two images would write the same slice file: {dup}")
    created = prepare_output_dir(out_dir)
    start = time.perf_counter()
    done: dict[str, dict] = {}
    failed: list[dict] = []
    jobs = [(c, out_dir, options) for c in cases]
    bar = _progress(len(jobs), progress)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            futures = [pool.submit(_run_one, job) for job in jobs]
            for fut in as_completed(futures):
                _collect(fut.result(), done, failed, cases)
                bar.update(1)
    else:
        for job in jobs:
            _collect(_run_one(job), done, failed, cases)
            bar.update(1)
    bar.close()
    entries = [done[n] for n in names if n in done]
    manifest = _manifest(options, extra, entries, failed, time.perf_counter() - start)
    if entries:
        write_json_atomic(out_dir / "manifest.json", manifest)
    else:
        remove_created(created)
    return manifest


def _manifest(
    options: PreprocessOptions, extra: dict | None, entries: list[dict], failed: list[dict], seconds: float
) -> dict:
    """``manifest.json`` of a run: options, the cases written, the failures and the totals."""
    return {
        "format": "sam-medical-manifest",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": asdict(options),
        **(extra or {}),
        "cases": entries,
        "failed": failed,
        "totals": {
            "cases": len(entries),
            "failed": len(failed),
            "slices_kept": sum(e["slices_kept"] for e in entries),
            "slices_kept_empty": sum(e["slices_kept_empty"] for e in entries),
            "slices_skipped_empty": sum(e["slices_skipped_empty"] for e in entries),
            "seconds": round(seconds, 3),
        },
    }


def _collect(result: tuple, done: dict, failed: list, cases: list[CasePair]) -> None:
    name, entry, error = result
    if entry is not None:
        done[name] = entry
    else:
        image = next(str(c.image) for c in cases if c.name == name)
        failed.append({"case": name, "image": image, "error": error})


class _NoBar:
    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    return tqdm(total=total, unit="vol", desc="preprocess")
