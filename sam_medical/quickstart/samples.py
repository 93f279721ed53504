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

from sam_medical.atomic import atomic_path
from sam_medical.errors import UserInputError

LABEL_NAMES: dict[int, str] = {1: "liver", 2: "spleen", 3: "kidney"}
"""Label value -> organ name, for every phantom (the kidney is the left one); ``labels.json`` holds them."""

ORGAN_HU: dict[int, float] = {1: 60.0, 2: 45.0, 3: 150.0}
"""Mean Hounsfield units of each labelled organ (before noise and partial volume)."""

AIR_HU = -1000.0
SUBCUTANEOUS_FAT_HU = -100.0
VISCERAL_FAT_HU = -85.0
MUSCLE_HU = 50.0
HU_MIN, HU_MAX = -1024, 3071

LPS_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
"""ITK direction identity: I -> patient left, J -> posterior, K -> superior (orientation ``LPS``)."""
RAS_DIRECTION: tuple[float, ...] = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
"""diag(-1, -1, 1): I -> patient right, J -> anterior, K -> superior (orientation ``RAS``)."""

MAX_COUNT = 1000
_GAP_MM = 4.0  # fat kept between a labelled organ and any tissue of similar density


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


# --- implicit-function helpers: P = (x, y, z) float32 arrays in mm, patient coordinates ----------------
Coords = tuple[np.ndarray, np.ndarray, np.ndarray]


def _shape_fn(
    P: Coords,
    center: tuple[float, float, float],
    radii: tuple[float, float, float],
    angle: float = 0.0,
    power: float = 2.0,
    taper: float = 0.0,
) -> np.ndarray:
    """Super-ellipsoid, rotated by ``angle`` about z, in-plane radii scaled by ``1 + taper * z/rz``.

    Returns ``(rho - 1) * min(radii)``: about mm near the surface, negative inside. ``power > 2``
    flattens the top and bottom (z) ends.
    """
    x = P[0] - np.float32(center[0])
    y = P[1] - np.float32(center[1])
    zn = (P[2] - np.float32(center[2])) / np.float32(radii[2])
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    xr = c * x + s * y
    yr = -s * x + c * y
    widen = np.maximum(np.float32(1.0) + np.float32(taper) * zn, np.float32(0.3))
    rxy = np.sqrt((xr / np.float32(radii[0])) ** 2 + (yr / np.float32(radii[1])) ** 2) / widen
    rho = (rxy**power + np.abs(zn) ** power) ** np.float32(1.0 / power)
    return (rho - np.float32(1.0)) * np.float32(min(radii))


def _warp(
    rng: np.random.Generator, P: Coords, wavelength_mm: float, amplitude_mm: float, terms: int = 8
) -> np.ndarray:
    """Smooth random field (sum of ``terms`` random plane waves), standard deviation ``amplitude_mm``."""
    out = np.zeros(P[0].shape, np.float32)
    for _ in range(terms):
        w = rng.normal(size=3)
        w *= (2 * math.pi / wavelength_mm) * rng.uniform(0.6, 1.4) / np.linalg.norm(w)
        phase = rng.uniform(0, 2 * math.pi)
        out += np.cos(
            np.float32(w[0]) * P[0] + np.float32(w[1]) * P[1] + np.float32(w[2]) * P[2] + np.float32(phase)
        )
    out *= np.float32(amplitude_mm * math.sqrt(2.0 / terms))
    return out


def _smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum of two implicit functions (a union with a rounded seam of ~``k`` mm)."""
    h = np.maximum(np.float32(k) - np.abs(a - b), np.float32(0)) / np.float32(k)
    return np.minimum(a, b) - h * h * np.float32(k / 4.0)


def _outside(f_other: np.ndarray, gap_mm: float = _GAP_MM) -> np.ndarray:
    """Implicit function of "at least ``gap_mm`` outside ``f_other``": intersect with it to keep clear."""
    return np.float32(gap_mm) - f_other


def _occupancy(f: np.ndarray) -> np.ndarray:
    """Fraction of each voxel inside ``f <= 0``: ``clip(0.5 - f / R, 0, 1)``, ``R`` = range of f over a voxel."""
    r = np.zeros(f.shape, np.float32)
    for axis in range(3):
        if f.shape[axis] > 1:
            r += np.abs(np.gradient(f, axis=axis))
    return np.clip(np.float32(0.5) - f / np.maximum(r, np.float32(1e-3)), 0.0, 1.0).astype(np.float32)


class _Canvas:
    """Paints tissues by occupancy, in order: later structures cover earlier ones."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.hu = np.full(shape, AIR_HU, np.float32)

    def paint(self, f: np.ndarray, hu: float | np.ndarray) -> np.ndarray:
        occ = _occupancy(f)
        self.hu += occ * (np.asarray(hu, np.float32) - self.hu)
        return occ


def _world_coords(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    origin: np.ndarray,
    direction: np.ndarray,
) -> Coords:
    """LPS mm of every voxel centre, three ``(I, J, K)`` float32 arrays."""
    idx = [np.arange(n, dtype=np.float64) * s for n, s in zip(shape, spacing, strict=True)]
    out = []
    for row in range(3):
        comp = np.full(shape, origin[row], np.float64)
        comp += direction[row, 0] * idx[0][:, None, None]
        comp += direction[row, 1] * idx[1][None, :, None]
        comp += direction[row, 2] * idx[2][None, None, :]
        out.append(comp.astype(np.float32))
    return out[0], out[1], out[2]


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

    extent = np.asarray(spacing) * (np.asarray(shape) - 1)
    centre_world = (
        np.round(np.array([rng.uniform(-15, 15), rng.uniform(-20, 20), rng.uniform(-350, -150)]) * 8) / 8
    )
    org = centre_world - d @ (extent / 2) if origin is None else np.asarray(origin, np.float64)
    if origin is not None:
        centre_world = org + d @ (extent / 2)
    X, Y, Z = _world_coords(shape, spacing, org, d)
    X -= np.float32(centre_world[0])
    Y -= np.float32(centre_world[1])
    Z -= np.float32(centre_world[2])
    P = (X, Y, Z)

    # field of view along patient x (lateral) and y (anterior-posterior), and z coverage
    world_extent = np.abs(d) @ (extent + np.asarray(spacing))
    fov_x, fov_y, z_len = (float(v) for v in world_extent)
    z_lo = -z_len / 2

    def z_at(t: float) -> float:  # fraction of the z coverage (0 = inferior end) -> mm
        return z_lo + t * z_len

    # --- torso outline ------------------------------------------------------------------------------
    a = 0.45 * fov_x * rng.uniform(0.93, 1.0)  # lateral half-width, mm
    b = min(0.43 * fov_y, a * rng.uniform(0.70, 0.80))  # anterior-posterior half-depth, mm
    zn = Z / np.float32(z_len)
    ak = np.float32(a) * (
        1 + np.float32(0.04) * np.sin(np.float32(2.2) * zn + np.float32(rng.uniform(0, 6.3)))
    )
    bk = np.float32(b) * (
        1 + np.float32(0.05) * np.sin(np.float32(1.7) * zn + np.float32(rng.uniform(0, 6.3)))
    )
    u, v = X / ak, Y / bk
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    sin_t = np.sin(theta)
    radius = np.ones_like(rho)
    for m in (2, 3, 4, 5):
        amp = rng.uniform(0.008, 0.03) / (m - 1) ** 0.5
        radius += np.float32(amp) * np.cos(
            np.float32(m) * theta + np.float32(rng.uniform(0, 6.3)) + np.float32(rng.uniform(0.5, 1.5)) * zn
        )
    radius *= 1 - np.float32(0.10) * np.maximum(sin_t, 0) ** 6  # flat back
    local = np.sqrt((ak * np.cos(theta)) ** 2 + (bk * sin_t) ** 2)  # centre-to-outline distance, mm
    f_body = (rho - radius) * local
    fat_mm = np.float32(rng.uniform(10, 16)) * (
        1 + np.float32(0.35) * np.cos(theta - np.float32(1.2))
    ) + _warp(rng, P, 120, 2.0)
    f_wall = f_body + np.maximum(fat_mm, np.float32(4))  # inner surface of subcutaneous fat
    muscle_mm = np.float32(rng.uniform(8, 12)) + _warp(rng, P, 90, 1.5)
    f_cavity = f_wall + np.maximum(muscle_mm, np.float32(4))

    canvas = _Canvas(shape)
    canvas.paint(f_body, SUBCUTANEOUS_FAT_HU + _warp(rng, P, 25, 6.0))
    canvas.paint(f_wall, MUSCLE_HU + _warp(rng, P, 30, 5.0))
    canvas.paint(f_cavity, VISCERAL_FAT_HU + _warp(rng, P, 25, 8.0))

    # --- spine, muscles, vessels (unlabelled) -------------------------------------------------------
    vx, vy = rng.uniform(-3, 3), 0.30 * b
    vr = 0.10 * a
    f_vert = _shape_fn(P, (vx, vy, 0), (vr, 0.85 * vr, 1e4))
    disc_period = rng.uniform(28, 34)
    disc = np.cos(
        np.float32(2 * math.pi / disc_period) * (Z - np.float32(rng.uniform(0, disc_period)))
    ) > np.float32(0.78)
    f_canal = _shape_fn(P, (vx, vy + 1.45 * vr, 0), (0.45 * vr, 0.42 * vr, 1e4))
    f_arch = _shape_fn(P, (vx, vy + 1.75 * vr, 0), (1.15 * vr, 0.55 * vr, 1e4))
    f_spinous = _shape_fn(P, (vx, vy + 2.4 * vr, 0), (0.22 * vr, 0.75 * vr, 1e4))
    f_paraspinal = np.minimum(
        _shape_fn(P, (vx - 1.5 * vr, vy + 2.4 * vr, 0), (1.3 * vr, 1.1 * vr, 1e4)),
        _shape_fn(P, (vx + 1.5 * vr, vy + 2.4 * vr, 0), (1.3 * vr, 1.1 * vr, 1e4)),
    )
    psoas_r = np.float32(0.45 * vr) + np.float32(0.5 * vr) * np.clip(
        np.float32(0.2) - Z / np.float32(z_len), 0, 1
    )  # grows inferiorly
    py = Y - np.float32(vy - 0.1 * vr)
    f_psoas = np.minimum(
        np.sqrt((X - np.float32(vx - 1.45 * vr)) ** 2 + py**2) - psoas_r,
        np.sqrt((X - np.float32(vx + 1.45 * vr)) ** 2 + py**2) - psoas_r,
    )
    aorta = (vx + 0.55 * vr, vy - 1.35 * vr, 0.0)
    f_aorta = _shape_fn(P, aorta, (rng.uniform(9, 12), rng.uniform(9, 12), 1e4))
    ivc = (vx - 1.05 * vr, vy - 1.25 * vr, 0.0)
    f_ivc = _shape_fn(P, ivc, (rng.uniform(11, 14), rng.uniform(7, 9), 1e4), angle=0.3)
    f_spine_all = np.minimum.reduce([f_vert, f_arch, f_spinous, f_paraspinal, f_psoas, f_aorta, f_ivc])

    # --- labelled organs ----------------------------------------------------------------------------
    keep_in = f_cavity + np.float32(_GAP_MM)  # organs stay clear of the muscle wall

    def z_range(lo: tuple[float, float], hi: tuple[float, float]) -> tuple[float, float]:
        t0, t1 = rng.uniform(*lo), rng.uniform(*hi)
        return z_at(t0), z_at(t1)

    # liver: big right lobe + left lobe across the midline, smooth union, warped, tapering downwards
    l0, l1 = z_range((0.30, 0.38), (0.86, 0.91))
    lz, lh = (l0 + l1) / 2, (l1 - l0) / 2
    right = _shape_fn(
        P,
        (-0.42 * a, -0.05 * b, lz),
        (0.40 * a * rng.uniform(0.9, 1.05), 0.62 * b, lh),
        angle=rng.uniform(-0.25, 0.1),
        power=3,
        taper=0.35,
    )
    left = _shape_fn(
        P,
        (0.05 * a, -0.42 * b, lz + 0.3 * lh),
        (0.36 * a * rng.uniform(0.8, 1.1), 0.24 * b, 0.65 * lh),
        angle=rng.uniform(-0.4, -0.1),
        power=2.5,
    )
    f_liver = _smooth_union(right, left, 18.0) + _warp(rng, P, 70, 4.0)
    gb_c = (-0.2 * a, -0.45 * b, lz - 0.55 * lh)
    f_gb = _shape_fn(P, gb_c, (0.07 * a, 0.11 * b, 0.35 * lh), angle=0.6) + _warp(rng, P, 40, 1.0)
    f_liver = np.maximum.reduce(
        [
            f_liver,
            keep_in,
            _outside(f_gb, 3.0),
            _outside(f_spine_all),
            np.abs(Z - np.float32(lz)) - np.float32(lh + 2),
        ]
    )

    # spleen: a crescent (an ellipsoid minus an offset ellipsoid) at the left posterior
    s0, s1 = z_range((0.46, 0.52), (0.78, 0.85))
    sz, sh = (s0 + s1) / 2, (s1 - s0) / 2
    sc = (0.58 * a, 0.30 * b, sz)
    sang = rng.uniform(0.6, 0.9)
    f_sp = _shape_fn(P, sc, (0.15 * a, 0.38 * b, sh), angle=sang, power=2.4) + _warp(rng, P, 60, 2.5)
    hollow = _shape_fn(
        P, (sc[0] - 0.19 * a, sc[1] - 0.06 * b, sz), (0.11 * a, 0.22 * b, 1.3 * sh), angle=sang
    )
    f_spleen = np.maximum.reduce(
        [
            f_sp,
            -hollow,
            keep_in,
            _outside(f_liver, 8.0),
            _outside(f_spine_all),
            np.abs(Z - np.float32(sz)) - np.float32(sh + 2),
        ]
    )

    # left kidney: a bean (ellipsoid with a hilum notch facing antero-medially), renal sinus fat
    k0, k1 = z_range((0.10, 0.17), (0.50, 0.57))
    kz, kh = (k0 + k1) / 2, (k1 - k0) / 2
    kc = (0.37 * a, 0.30 * b, kz)
    kang = rng.uniform(-0.7, -0.4)
    f_kid = _shape_fn(P, kc, (0.15 * a, 0.22 * b, kh), angle=kang) + _warp(rng, P, 50, 1.5)
    notch = _shape_fn(
        P, (kc[0] - 0.12 * a, kc[1] - 0.06 * b, kz), (0.08 * a, 0.09 * b, 0.45 * kh), angle=kang
    )
    f_kidney = np.maximum.reduce(
        [
            f_kid,
            -notch,
            keep_in,
            _outside(f_spine_all),
            _outside(f_spleen),
            _outside(f_liver),
            np.abs(Z - np.float32(kz)) - np.float32(kh + 2),
        ]
    )
    organs = {1: f_liver, 2: f_spleen, 3: f_kidney}
    f_any_organ = np.minimum.reduce(list(organs.values()))

    # --- bowel loops (wall ~30 HU; fluid or gas inside), kept clear of the organs --------------------
    bowel = []
    for _ in range(int(rng.integers(4, 8))):
        c = (rng.uniform(-0.5, 0.5) * a, rng.uniform(-0.65, 0.05) * b, z_at(rng.uniform(0.0, 0.6)))
        r = (rng.uniform(10, 22), rng.uniform(10, 18), rng.uniform(20, 60))
        f = np.maximum.reduce(
            [
                _shape_fn(P, c, r, angle=rng.uniform(0, 3.1)) + _warp(rng, P, 40, 2.0),
                keep_in,
                _outside(f_any_organ, 5.0),
            ]
        )
        f = np.maximum(f, _outside(f_spine_all, 2.0))
        bowel.append((f, -900.0 if rng.uniform() < 0.4 else rng.uniform(0, 20)))

    # --- lungs at the top, posterior, around the liver dome and spleen ------------------------------
    f_lungs = np.minimum(
        _shape_fn(P, (-0.45 * a, 0.2 * b, z_at(1.32)), (0.42 * a, 0.6 * b, 0.5 * z_len)),
        _shape_fn(P, (0.45 * a, 0.2 * b, z_at(1.36)), (0.42 * a, 0.6 * b, 0.5 * z_len)),
    )
    f_lungs = np.maximum.reduce([f_lungs, keep_in, _outside(f_any_organ, 5.0), _outside(f_spine_all)])

    # --- ribs: cross-sections inside the muscle wall, in the upper half ------------------------------
    ribs = np.full(shape, np.float32(1e3), np.float32)
    for angle in rng.uniform(0, 2 * math.pi, size=int(rng.integers(6, 10))):
        if math.sin(angle) < -0.55:  # no ribs over the anterior abdomen
            continue
        band_z = z_at(rng.uniform(0.55, 0.95))
        cx, cy = float(a * math.cos(angle)), float(b * math.sin(angle))
        f_rib = _shape_fn(
            P, (cx * 0.86, cy * 0.84, band_z), (7.0, 5.0, rng.uniform(8, 14)), angle=angle + math.pi / 2
        )
        ribs = np.minimum(ribs, f_rib)

    # --- paint, back to front -----------------------------------------------------------------------
    canvas.paint(f_psoas, MUSCLE_HU + 5)
    canvas.paint(f_paraspinal, MUSCLE_HU)
    canvas.paint(f_arch, 450.0)
    canvas.paint(f_spinous, 450.0)
    canvas.paint(f_vert, 650.0)  # cortical shell ...
    canvas.paint(
        f_vert + np.float32(2.0), np.where(disc, np.float32(85.0), np.float32(230.0))
    )  # ... cancellous bone / disc
    canvas.paint(f_canal, 15.0)
    canvas.paint(f_aorta, rng.uniform(160, 190))
    canvas.paint(f_ivc, rng.uniform(120, 140))
    canvas.paint(np.maximum(ribs, keep_in - np.float32(14)), 550.0)
    for f, lumen in bowel:
        canvas.paint(f, 30.0)
        canvas.paint(f + np.float32(2.5), lumen)
    canvas.paint(f_lungs, -850.0 + _warp(rng, P, 20, 15.0))
    canvas.paint(np.maximum(f_gb, keep_in), 8.0)

    texture = _warp(rng, P, 18, 4.0)
    canvas.paint(f_kidney, ORGAN_HU[3] + texture)
    canvas.paint(f_spleen, ORGAN_HU[2] + texture)
    canvas.paint(f_liver, ORGAN_HU[1] + texture)
    lesion = None
    if rng.uniform() < 0.5:  # a hypodense liver lesion (part of the liver label)
        inside = np.argwhere(f_liver < -12)
        if len(inside):
            c_idx = inside[int(rng.integers(len(inside)))]
            lr = rng.uniform(6, 11)
            f_lesion = np.maximum(
                _shape_fn(P, tuple(float(p[tuple(c_idx)]) for p in P), (lr, lr * 0.85, lr), angle=1.0),
                f_liver + 2,
            )
            canvas.paint(f_lesion, rng.uniform(15, 30))
            lesion = {"ijk": [int(c) for c in c_idx], "radius_mm": round(lr, 2)}

    # --- scanner: slight in-plane blur (PSF) + correlated noise -------------------------------------
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(canvas.hu, sigma=(0.5, 0.5, 0.0))
    noise_sd = float(rng.uniform(10, 18))
    noise = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=(0.6, 0.6, 0.0))
    noise *= np.float32(noise_sd) / np.float32(max(float(noise.std()), 1e-6))
    img += noise
    image = np.clip(np.rint(img), HU_MIN, HU_MAX).astype(np.int16)

    label = np.zeros(shape, np.uint8)
    for value in (3, 2, 1):  # painted order: later organs win
        label[organs[value] <= 0] = value

    info = {
        "seed": int(seed),
        "shape": list(shape),
        "spacing": list(spacing),
        "origin": [float(o) for o in org],
        "direction": [float(x) for x in d.ravel()],
        "noise_sd_hu": round(noise_sd, 3),
        "label_names": {str(k): v for k, v in LABEL_NAMES.items()},
        "organ_hu": {str(k): v for k, v in ORGAN_HU.items()},
        "labels": {},
        "lesion": lesion,
    }
    for value, name in LABEL_NAMES.items():
        ks = np.nonzero((label == value).any(axis=(0, 1)))[0]
        info["labels"][name] = {
            "value": value,
            "voxels": int((label == value).sum()),
            "k_range": [int(ks[0]), int(ks[-1])] if len(ks) else None,
        }
    return image, label, info


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
    import SimpleITK as sitk

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
    from sam_medical.volume.label_names import LABELS_FILE, write_labels_file

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
