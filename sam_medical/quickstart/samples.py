"""Deterministic CT-like abdominal phantoms, written as a MONAI Label datastore (``make-samples``).

A phantom is an axial abdominal CT in Hounsfield units (int16) with a label map (uint8):

* air (-1000) around an irregular torso outline that changes slowly from slice to slice;
* subcutaneous fat (about -100), an abdominal-wall muscle ring (about 50), visceral fat (about -85),
  bowel loops (wall about 30, fluid or gas inside), paraspinal and psoas muscles, a vertebra with
  cortical and cancellous bone and discs, the spinal canal, aorta and IVC, gallbladder, rib
  cross-sections and lung bases at the top: all **unlabelled**;
* three **labelled** organs (:data:`LABEL_NAMES`): 1 liver (about 60 HU, large, may hold a hypodense
  lesion that stays part of the liver label), 2 spleen (about 45 HU, a crescent), 3 left kidney
  (about 150 HU, contrast-enhanced, a bean with a hilum). Their shapes are unions / differences of
  deformed super-ellipsoids whose boundaries are warped by low-frequency random fields, so they are
  neither spheres nor ellipsoids. Each organ spans a sub-range of the slices; the first and last
  slices hold no label.

Every labelled organ is kept at least a few millimetres away from tissue of similar density, so it
stands out by 40 HU or more from all of its neighbours in the abdomen window (L40/W400).

Anatomy is defined in **patient (world, LPS) coordinates**: ``x`` to the patient's left, ``y``
posterior, ``z`` superior. Voxel ``[i, j, k]`` sits at ``origin + direction @ (spacing * [i, j, k])``,
so the liver is on the patient's right whatever the stored orientation; a volume stored with an RAS
direction shows the same anatomy in 3D Slicer as one stored LPS.

Partial volume: each structure is an implicit function ``f`` (about mm, negative inside). Its voxel
occupancy is ``clip(0.5 - f / R, 0, 1)`` with ``R = sum_a |df/d index_a|`` (the range of ``f`` over
one voxel), and the image mixes tissue values by occupancy; a label is the crisp ``f <= 0`` (the 0.5
occupancy threshold). The image is then blurred slightly in-plane (the scanner's PSF) and
correlated Gaussian noise (10-18 HU) is added.

Everything comes from ``numpy.random.default_rng(seed)``: the same seed gives byte-identical arrays.
Files are written by SimpleITK, whose gzip stream has no time stamp, so the files are identical too.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from sam_medical.atomic import atomic_path
from sam_medical.errors import UserInputError
from sam_medical.quickstart import phantom_organs as organs
from sam_medical.quickstart.phantom_organs import (
    MUSCLE_HU,
    SUBCUTANEOUS_FAT_HU,
    VISCERAL_FAT_HU,
    Canvas,
    Frame,
    Spine,
    Torso,
    shape_fn,
    warp,
    world_coords,
)
from sam_medical.volume.label_names import LABELS_FILE, write_labels_file

LABEL_NAMES: dict[int, str] = {1: "liver", 2: "spleen", 3: "kidney"}
"""Label value -> organ name, for every phantom (the kidney is the left one); ``labels.json`` holds them."""

ORGAN_HU: dict[int, float] = {1: 60.0, 2: 45.0, 3: 150.0}
"""Mean Hounsfield units of each labelled organ (before noise and partial volume)."""

HU_MIN, HU_MAX = -1024, 3071

LPS_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
"""ITK direction identity: I -> patient left, J -> posterior, K -> superior (orientation ``LPS``)."""
RAS_DIRECTION: tuple[float, ...] = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
"""diag(-1, -1, 1): I -> patient right, J -> anterior, K -> superior (orientation ``RAS``)."""

MAX_COUNT = 1000


@dataclass(frozen=True)
class SampleSpec:
    """Geometry of one sample volume: ``shape`` ``(I, J, K)``, ``spacing`` mm, ITK ``direction``."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]


SAMPLE_SPECS: tuple[SampleSpec, ...] = (
    SampleSpec((176, 176, 40), (1.875, 1.875, 3.0), LPS_DIRECTION),
    SampleSpec((192, 160, 36), (1.75, 1.75, 3.5), RAS_DIRECTION),  # non-square in-plane
    SampleSpec((160, 160, 44), (2.0, 2.0, 2.5), RAS_DIRECTION),
    SampleSpec((200, 168, 32), (1.625, 1.625, 4.0), LPS_DIRECTION),  # non-square in-plane
)
"""Sample ``n`` of :func:`make_samples` uses ``SAMPLE_SPECS[n % 4]``: both orientations, two
non-square sizes, anisotropic spacing (in-plane 1.625-2 mm, slices 2.5-4 mm). Spacings and origins
are exact in float32, so the geometry survives the NIfTI header unchanged."""


def _check_geometry(
    shape, spacing, direction
) -> tuple[tuple[int, int, int], tuple[float, float, float], np.ndarray]:
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 1 or shape[0] < 32 or shape[1] < 32 or shape[2] < 8:
        raise UserInputError(f"phantom shape must be (I, J, K) with I, J >= 32 and K >= 8, got {list(shape)}")
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise UserInputError(f"phantom spacing must be three positive numbers, got {list(spacing)}")
    if np.size(direction) != 9:
        raise UserInputError(
            f"phantom direction must be 9 numbers (a 3x3 matrix, row-major), got {np.size(direction)}"
        )
    d = np.asarray(direction, np.float64).reshape(3, 3)
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-6):
        raise UserInputError("phantom direction must be an orthonormal 3x3 matrix (9 numbers, row-major)")
    if abs(d[2, 2]) < 0.9:
        raise UserInputError("phantom direction must keep K along the superior-inferior axis (axial slices)")
    return shape, spacing, d  # type: ignore[return-value]


def make_phantom(
    seed: int,
    shape: tuple[int, int, int] = (176, 176, 40),
    spacing: tuple[float, float, float] = (1.875, 1.875, 3.0),
    direction: tuple[float, ...] = LPS_DIRECTION,
    origin: tuple[float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Build one CT-like abdominal phantom.

    Args:
        seed: non-negative integer; everything random is drawn from ``np.random.default_rng(seed)``.
        shape: ``(I, J, K)``; slices ``[:, :, k]`` are axial, K runs inferior -> superior (or the
            reverse when ``direction[8] < 0``).
        spacing: mm along I, J, K.
        direction: ITK direction, 9 numbers row-major, columns = I, J, K axes in LPS.
        origin: LPS mm of voxel ``(0, 0, 0)``; by default the volume is centred on a random table
            position (a few cm off the world origin).

    Returns:
        ``(image, label, info)``: ``image`` ``(I, J, K)`` int16 HU; ``label`` ``(I, J, K)`` uint8 with
        values in :data:`LABEL_NAMES`; ``info`` a JSON-able dict (geometry, noise, per-label slice
        range and voxel count, lesion).
    """
    if int(seed) < 0:
        raise UserInputError(f"seed must be >= 0, got {seed}")
    shape, spacing, d = _check_geometry(shape, spacing, direction)
    rng = np.random.default_rng(int(seed))
    frame, org = _frame(rng, shape, spacing, d, origin)
    canvas = Canvas(shape)
    body = organs.torso(rng, frame)
    _paint_torso(rng, canvas, frame, body)
    spine = organs.spine(rng, frame, body)
    f_liver, f_gb = organs.liver(rng, frame, body, spine.f_all)
    f_spleen = organs.spleen(rng, frame, body, spine.f_all, f_liver)
    f_kidney = organs.kidney(rng, frame, body, spine.f_all, f_spleen, f_liver)
    labelled = {1: f_liver, 2: f_spleen, 3: f_kidney}
    f_any_organ = np.minimum.reduce(list(labelled.values()))
    bowel = organs.bowel_loops(rng, frame, body, f_any_organ, spine.f_all)
    f_lungs = organs.lungs(frame, body, f_any_organ, spine.f_all)
    f_ribs = organs.ribs(rng, frame, body)
    _paint_unlabelled(rng, canvas, frame, body, spine, f_ribs, bowel, f_lungs, f_gb)
    lesion = _paint_organs(rng, canvas, frame, labelled)
    image, noise_sd = _scan(rng, canvas.hu)
    label = np.zeros(shape, np.uint8)
    for value in (3, 2, 1):  # painted order: later organs win
        label[labelled[value] <= 0] = value
    info = {
        "seed": int(seed),
        "shape": list(shape),
        "spacing": list(spacing),
        "origin": [float(o) for o in org],
        "direction": [float(x) for x in d.ravel()],
        "noise_sd_hu": round(noise_sd, 3),
        "label_names": {str(k): v for k, v in LABEL_NAMES.items()},
        "organ_hu": {str(k): v for k, v in ORGAN_HU.items()},
        "labels": _label_extents(label),
        "lesion": lesion,
    }
    return image, label, info


def _frame(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    d: np.ndarray,
    origin: tuple[float, float, float] | None,
) -> tuple[Frame, np.ndarray]:
    """Place the volume: ``(frame, origin)``; by default centred on a random table position."""
    extent = np.asarray(spacing) * (np.asarray(shape) - 1)
    centre_world = (
        np.round(np.array([rng.uniform(-15, 15), rng.uniform(-20, 20), rng.uniform(-350, -150)]) * 8) / 8
    )
    org = centre_world - d @ (extent / 2) if origin is None else np.asarray(origin, np.float64)
    if origin is not None:
        centre_world = org + d @ (extent / 2)
    X, Y, Z = world_coords(shape, spacing, org, d)
    X -= np.float32(centre_world[0])
    Y -= np.float32(centre_world[1])
    Z -= np.float32(centre_world[2])
    # field of view along patient x (lateral) and y (anterior-posterior), and z coverage
    world_extent = np.abs(d) @ (extent + np.asarray(spacing))
    fov_x, fov_y, z_len = (float(v) for v in world_extent)
    return Frame((X, Y, Z), z_len, -z_len / 2, fov_x, fov_y), org


def _paint_torso(rng: np.random.Generator, canvas: Canvas, frame: Frame, body: Torso) -> None:
    """Subcutaneous fat, the abdominal-wall muscle ring and visceral fat, each with a smooth texture."""
    canvas.paint(body.f_body, SUBCUTANEOUS_FAT_HU + warp(rng, frame.P, 25, 6.0))
    canvas.paint(body.f_wall, MUSCLE_HU + warp(rng, frame.P, 30, 5.0))
    canvas.paint(body.f_cavity, VISCERAL_FAT_HU + warp(rng, frame.P, 25, 8.0))


def _paint_unlabelled(
    rng: np.random.Generator,
    canvas: Canvas,
    frame: Frame,
    body: Torso,
    spine: Spine,
    f_ribs: np.ndarray,
    bowel: list[tuple[np.ndarray, float]],
    f_lungs: np.ndarray,
    f_gb: np.ndarray,
) -> None:
    """Paint the unlabelled structures, back to front: muscles, bone, vessels, ribs, bowel, lungs, gallbladder."""
    canvas.paint(spine.f_psoas, MUSCLE_HU + 5)
    canvas.paint(spine.f_paraspinal, MUSCLE_HU)
    canvas.paint(spine.f_arch, 450.0)
    canvas.paint(spine.f_spinous, 450.0)
    canvas.paint(spine.f_vert, 650.0)  # cortical shell ...
    canvas.paint(
        spine.f_vert + np.float32(2.0), np.where(spine.disc, np.float32(85.0), np.float32(230.0))
    )  # ... cancellous bone / disc
    canvas.paint(spine.f_canal, 15.0)
    canvas.paint(spine.f_aorta, rng.uniform(160, 190))
    canvas.paint(spine.f_ivc, rng.uniform(120, 140))
    canvas.paint(np.maximum(f_ribs, body.keep_in - np.float32(14)), 550.0)
    for f, lumen in bowel:
        canvas.paint(f, 30.0)
        canvas.paint(f + np.float32(2.5), lumen)
    canvas.paint(f_lungs, -850.0 + warp(rng, frame.P, 20, 15.0))
    canvas.paint(np.maximum(f_gb, body.keep_in), 8.0)


def _paint_organs(
    rng: np.random.Generator, canvas: Canvas, frame: Frame, labelled: dict[int, np.ndarray]
) -> dict | None:
    """Paint the labelled organs (one shared texture) and maybe a hypodense liver lesion, which stays
    part of the liver label; return the lesion (``{"ijk", "radius_mm"}``) or None."""
    P = frame.P
    texture = warp(rng, P, 18, 4.0)
    canvas.paint(labelled[3], ORGAN_HU[3] + texture)
    canvas.paint(labelled[2], ORGAN_HU[2] + texture)
    canvas.paint(labelled[1], ORGAN_HU[1] + texture)
    f_liver = labelled[1]
    lesion = None
    if rng.uniform() < 0.5:  # a hypodense liver lesion (part of the liver label)
        inside = np.argwhere(f_liver < -12)
        if len(inside):
            c_idx = inside[int(rng.integers(len(inside)))]
            lr = rng.uniform(6, 11)
            f_lesion = np.maximum(
                shape_fn(P, tuple(float(p[tuple(c_idx)]) for p in P), (lr, lr * 0.85, lr), angle=1.0),
                f_liver + 2,
            )
            canvas.paint(f_lesion, rng.uniform(15, 30))
            lesion = {"ijk": [int(c) for c in c_idx], "radius_mm": round(lr, 2)}
    return lesion


def _scan(rng: np.random.Generator, hu: np.ndarray) -> tuple[np.ndarray, float]:
    """The scanner: slight in-plane blur (PSF) and correlated noise; ``(int16 HU image, noise SD)``."""
    img = gaussian_filter(hu, sigma=(0.5, 0.5, 0.0))
    noise_sd = float(rng.uniform(10, 18))
    noise = gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), sigma=(0.6, 0.6, 0.0))
    noise *= np.float32(noise_sd) / np.float32(max(float(noise.std()), 1e-6))
    img += noise
    return np.clip(np.rint(img), HU_MIN, HU_MAX).astype(np.int16), noise_sd


def _label_extents(label: np.ndarray) -> dict[str, dict]:
    """Per organ name: its label value, voxel count and ``k_range`` (first and last slice, or None)."""
    out = {}
    for value, name in LABEL_NAMES.items():
        ks = np.nonzero((label == value).any(axis=(0, 1)))[0]
        out[name] = {
            "value": value,
            "voxels": int((label == value).sum()),
            "k_range": [int(ks[0]), int(ks[-1])] if len(ks) else None,
        }
    return out


def sample_name(index: int) -> str:
    """File stem of sample ``index``: ``phantom_000``."""
    return f"phantom_{index:03d}"


def case_seed(seed: int, index: int) -> int:
    """Independent per-case seed from the run's ``seed`` and the case ``index`` (``SeedSequence``)."""
    return int(
        np.random.SeedSequence(entropy=int(seed), spawn_key=(int(index),)).generate_state(1, np.uint32)[0]
    )


def write_nifti(array_ijk: np.ndarray, path: str | os.PathLike, spacing, origin, direction) -> Path:
    """Write an ``(I, J, K)`` array as gzipped NIfTI with the given geometry, atomically."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_ijk.transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(x) for x in direction])
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), True, 9)
    return Path(path)


def make_samples(
    out_dir: str | os.PathLike, count: int, seed: int = 0, *, verbose: bool = False
) -> list[Path]:
    """Write ``count`` phantoms as a MONAI Label datastore; return the image paths.

    Layout: ``out_dir/phantom_NNN.nii.gz`` (int16 HU), ``out_dir/labels/final/phantom_NNN.nii.gz``
    (uint8, values of :data:`LABEL_NAMES`) and ``out_dir/labels.json`` (the label names,
    :mod:`sam_medical.volume.label_names`). Case ``n`` uses geometry ``SAMPLE_SPECS[n % 4]`` and seed
    :func:`case_seed` ``(seed, n)``. Existing files of the same names are replaced; others are left alone.
    """
    if isinstance(count, bool) or int(count) != count or not 1 <= int(count) <= MAX_COUNT:
        raise UserInputError(f"count must be a whole number from 1 to {MAX_COUNT}, got {count}")
    if int(seed) < 0:
        raise UserInputError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output path exists and is not a folder: {out}")
    label_dir = out / "labels" / "final"
    try:
        label_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"cannot create output folder {label_dir}: {exc.strerror or exc}") from None
    write_labels_file(out / LABELS_FILE, {name: value for value, name in LABEL_NAMES.items()})
    paths = []
    for n in range(int(count)):
        spec = SAMPLE_SPECS[n % len(SAMPLE_SPECS)]
        image, label, info = make_phantom(case_seed(seed, n), spec.shape, spec.spacing, spec.direction)
        name = sample_name(n) + ".nii.gz"
        geo = (info["spacing"], info["origin"], info["direction"])
        write_nifti(label, label_dir / name, *geo)
        paths.append(write_nifti(image, out / name, *geo))
        if verbose:
            ranges = ", ".join(f"{k} k={v['k_range']}" for k, v in info["labels"].items())
            print(f"{out / name}: {list(spec.shape)} {spec.spacing} mm, {ranges}")
    return paths
