"""The phantom's anatomy as implicit functions (about mm, negative inside), in patient coordinates.

``P = (x, y, z)``: three ``(I, J, K)`` float32 arrays, LPS mm of every voxel centre relative to the
volume's centre (``x`` to the patient's left, ``y`` posterior, ``z`` superior). Every shape is a
deformed super-ellipsoid (:func:`shape_fn`) warped by a smooth random field (:func:`warp`), combined
by min (union), max (intersection) and :func:`smooth_union`. The builders below draw from one
``numpy.random.Generator`` in a fixed order: the same seed gives byte-identical phantoms, so their
calls and draws must not be reordered. :mod:`sam_medical.quickstart.samples` paints them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

AIR_HU = -1000.0
SUBCUTANEOUS_FAT_HU = -100.0
VISCERAL_FAT_HU = -85.0
MUSCLE_HU = 50.0
GAP_MM = 4.0  # fat kept between a labelled organ and any tissue of similar density


# --- implicit-function helpers: P = (x, y, z) float32 arrays in mm, patient coordinates ----------------
Coords = tuple[np.ndarray, np.ndarray, np.ndarray]


def shape_fn(
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


def warp(
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


def smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum of two implicit functions (a union with a rounded seam of ~``k`` mm)."""
    h = np.maximum(np.float32(k) - np.abs(a - b), np.float32(0)) / np.float32(k)
    return np.minimum(a, b) - h * h * np.float32(k / 4.0)


def outside(f_other: np.ndarray, gap_mm: float = GAP_MM) -> np.ndarray:
    """Implicit function of "at least ``gap_mm`` outside ``f_other``": intersect with it to keep clear."""
    return np.float32(gap_mm) - f_other


def occupancy(f: np.ndarray) -> np.ndarray:
    """Fraction of each voxel inside ``f <= 0``: ``clip(0.5 - f / R, 0, 1)``, ``R`` = range of f over a voxel."""
    r = np.zeros(f.shape, np.float32)
    for axis in range(3):
        if f.shape[axis] > 1:
            r += np.abs(np.gradient(f, axis=axis))
    return np.clip(np.float32(0.5) - f / np.maximum(r, np.float32(1e-3)), 0.0, 1.0).astype(np.float32)


class Canvas:
    """Paints tissues by occupancy, in order: later structures cover earlier ones."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.hu = np.full(shape, AIR_HU, np.float32)

    def paint(self, f: np.ndarray, hu: float | np.ndarray) -> np.ndarray:
        occ = occupancy(f)
        self.hu += occ * (np.asarray(hu, np.float32) - self.hu)
        return occ


def world_coords(
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


@dataclass(frozen=True)
class Frame:
    """Where the phantom's anatomy is placed: voxel coordinates and the torso's size.

    ``P = (X, Y, Z)`` as in the module docstring; ``z_len`` the z coverage (mm), ``z_lo = -z_len / 2``
    its inferior end; ``fov_x`` and ``fov_y`` the field of view along x and y (mm).
    """

    P: Coords
    z_len: float
    z_lo: float
    fov_x: float
    fov_y: float

    def z_at(self, t: float) -> float:
        """Fraction of the z coverage (0 = inferior end) -> mm."""
        return self.z_lo + t * self.z_len


@dataclass(frozen=True)
class Torso:
    """The torso: half-width ``a`` and half-depth ``b`` (mm) and its layers as implicit functions.

    ``f_body`` the skin, ``f_wall`` the inner surface of the subcutaneous fat (outer surface of the
    abdominal-wall muscle), ``f_cavity`` the inner surface of that muscle; ``keep_in`` keeps organs
    :data:`GAP_MM` clear of the wall.
    """

    a: float
    b: float
    f_body: np.ndarray
    f_wall: np.ndarray
    f_cavity: np.ndarray
    keep_in: np.ndarray


@dataclass(frozen=True)
class Spine:
    """Unlabelled structures at the back: vertebra (with ``disc``, a boolean array where discs are),
    canal, arch, spinous process, paraspinal and psoas muscles, aorta, IVC; ``f_all`` their union."""

    f_vert: np.ndarray
    disc: np.ndarray
    f_canal: np.ndarray
    f_arch: np.ndarray
    f_spinous: np.ndarray
    f_paraspinal: np.ndarray
    f_psoas: np.ndarray
    f_aorta: np.ndarray
    f_ivc: np.ndarray
    f_all: np.ndarray


def torso(rng: np.random.Generator, frame: Frame) -> Torso:
    """An irregular torso outline that changes slowly from slice to slice, with fat and muscle layers."""
    X, Y, Z = frame.P
    z_len = frame.z_len
    a = 0.45 * frame.fov_x * rng.uniform(0.93, 1.0)  # lateral half-width, mm
    b = min(0.43 * frame.fov_y, a * rng.uniform(0.70, 0.80))  # anterior-posterior half-depth, mm
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
    ) + warp(rng, frame.P, 120, 2.0)
    f_wall = f_body + np.maximum(fat_mm, np.float32(4))  # inner surface of subcutaneous fat
    muscle_mm = np.float32(rng.uniform(8, 12)) + warp(rng, frame.P, 90, 1.5)
    f_cavity = f_wall + np.maximum(muscle_mm, np.float32(4))
    return Torso(a, b, f_body, f_wall, f_cavity, f_cavity + np.float32(GAP_MM))


def spine(rng: np.random.Generator, frame: Frame, body: Torso) -> Spine:
    """Vertebra with discs, spinal canal, arch, muscles and the two big vessels (all unlabelled)."""
    P = frame.P
    X, Y, Z = P
    a, b = body.a, body.b
    vx, vy = rng.uniform(-3, 3), 0.30 * b
    vr = 0.10 * a
    f_vert = shape_fn(P, (vx, vy, 0), (vr, 0.85 * vr, 1e4))
    disc_period = rng.uniform(28, 34)
    disc = np.cos(
        np.float32(2 * math.pi / disc_period) * (Z - np.float32(rng.uniform(0, disc_period)))
    ) > np.float32(0.78)
    f_canal = shape_fn(P, (vx, vy + 1.45 * vr, 0), (0.45 * vr, 0.42 * vr, 1e4))
    f_arch = shape_fn(P, (vx, vy + 1.75 * vr, 0), (1.15 * vr, 0.55 * vr, 1e4))
    f_spinous = shape_fn(P, (vx, vy + 2.4 * vr, 0), (0.22 * vr, 0.75 * vr, 1e4))
    f_paraspinal = np.minimum(
        shape_fn(P, (vx - 1.5 * vr, vy + 2.4 * vr, 0), (1.3 * vr, 1.1 * vr, 1e4)),
        shape_fn(P, (vx + 1.5 * vr, vy + 2.4 * vr, 0), (1.3 * vr, 1.1 * vr, 1e4)),
    )
    psoas_r = np.float32(0.45 * vr) + np.float32(0.5 * vr) * np.clip(
        np.float32(0.2) - Z / np.float32(frame.z_len), 0, 1
    )  # grows inferiorly
    py = Y - np.float32(vy - 0.1 * vr)
    f_psoas = np.minimum(
        np.sqrt((X - np.float32(vx - 1.45 * vr)) ** 2 + py**2) - psoas_r,
        np.sqrt((X - np.float32(vx + 1.45 * vr)) ** 2 + py**2) - psoas_r,
    )
    aorta = (vx + 0.55 * vr, vy - 1.35 * vr, 0.0)
    f_aorta = shape_fn(P, aorta, (rng.uniform(9, 12), rng.uniform(9, 12), 1e4))
    ivc = (vx - 1.05 * vr, vy - 1.25 * vr, 0.0)
    f_ivc = shape_fn(P, ivc, (rng.uniform(11, 14), rng.uniform(7, 9), 1e4), angle=0.3)
    f_all = np.minimum.reduce([f_vert, f_arch, f_spinous, f_paraspinal, f_psoas, f_aorta, f_ivc])
    return Spine(f_vert, disc, f_canal, f_arch, f_spinous, f_paraspinal, f_psoas, f_aorta, f_ivc, f_all)


def _z_range(
    rng: np.random.Generator, frame: Frame, lo: tuple[float, float], hi: tuple[float, float]
) -> tuple[float, float]:
    """Inferior and superior end (mm) of an organ, drawn as fractions of the z coverage."""
    t0, t1 = rng.uniform(*lo), rng.uniform(*hi)
    return frame.z_at(t0), frame.z_at(t1)


def liver(
    rng: np.random.Generator, frame: Frame, body: Torso, f_spine: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(f_liver, f_gallbladder)``: a big right lobe and a left lobe across the midline, smoothly
    joined, warped, tapering downwards, clear of the gallbladder, the spine and the wall."""
    P, Z, a, b = frame.P, frame.P[2], body.a, body.b
    l0, l1 = _z_range(rng, frame, (0.30, 0.38), (0.86, 0.91))
    lz, lh = (l0 + l1) / 2, (l1 - l0) / 2
    right = shape_fn(
        P,
        (-0.42 * a, -0.05 * b, lz),
        (0.40 * a * rng.uniform(0.9, 1.05), 0.62 * b, lh),
        angle=rng.uniform(-0.25, 0.1),
        power=3,
        taper=0.35,
    )
    left = shape_fn(
        P,
        (0.05 * a, -0.42 * b, lz + 0.3 * lh),
        (0.36 * a * rng.uniform(0.8, 1.1), 0.24 * b, 0.65 * lh),
        angle=rng.uniform(-0.4, -0.1),
        power=2.5,
    )
    f_liver = smooth_union(right, left, 18.0) + warp(rng, P, 70, 4.0)
    gb_c = (-0.2 * a, -0.45 * b, lz - 0.55 * lh)
    f_gb = shape_fn(P, gb_c, (0.07 * a, 0.11 * b, 0.35 * lh), angle=0.6) + warp(rng, P, 40, 1.0)
    f_liver = np.maximum.reduce(
        [
            f_liver,
            body.keep_in,
            outside(f_gb, 3.0),
            outside(f_spine),
            np.abs(Z - np.float32(lz)) - np.float32(lh + 2),
        ]
    )
    return f_liver, f_gb


def spleen(
    rng: np.random.Generator, frame: Frame, body: Torso, f_spine: np.ndarray, f_liver: np.ndarray
) -> np.ndarray:
    """A crescent (an ellipsoid minus an offset ellipsoid) at the left posterior."""
    P, Z, a, b = frame.P, frame.P[2], body.a, body.b
    s0, s1 = _z_range(rng, frame, (0.46, 0.52), (0.78, 0.85))
    sz, sh = (s0 + s1) / 2, (s1 - s0) / 2
    sc = (0.58 * a, 0.30 * b, sz)
    sang = rng.uniform(0.6, 0.9)
    f_sp = shape_fn(P, sc, (0.15 * a, 0.38 * b, sh), angle=sang, power=2.4) + warp(rng, P, 60, 2.5)
    hollow = shape_fn(P, (sc[0] - 0.19 * a, sc[1] - 0.06 * b, sz), (0.11 * a, 0.22 * b, 1.3 * sh), angle=sang)
    return np.maximum.reduce(
        [
            f_sp,
            -hollow,
            body.keep_in,
            outside(f_liver, 8.0),
            outside(f_spine),
            np.abs(Z - np.float32(sz)) - np.float32(sh + 2),
        ]
    )


def kidney(
    rng: np.random.Generator,
    frame: Frame,
    body: Torso,
    f_spine: np.ndarray,
    f_spleen: np.ndarray,
    f_liver: np.ndarray,
) -> np.ndarray:
    """The left kidney: a bean (ellipsoid with a hilum notch facing antero-medially)."""
    P, Z, a, b = frame.P, frame.P[2], body.a, body.b
    k0, k1 = _z_range(rng, frame, (0.10, 0.17), (0.50, 0.57))
    kz, kh = (k0 + k1) / 2, (k1 - k0) / 2
    kc = (0.37 * a, 0.30 * b, kz)
    kang = rng.uniform(-0.7, -0.4)
    f_kid = shape_fn(P, kc, (0.15 * a, 0.22 * b, kh), angle=kang) + warp(rng, P, 50, 1.5)
    notch = shape_fn(P, (kc[0] - 0.12 * a, kc[1] - 0.06 * b, kz), (0.08 * a, 0.09 * b, 0.45 * kh), angle=kang)
    return np.maximum.reduce(
        [
            f_kid,
            -notch,
            body.keep_in,
            outside(f_spine),
            outside(f_spleen),
            outside(f_liver),
            np.abs(Z - np.float32(kz)) - np.float32(kh + 2),
        ]
    )


def bowel_loops(
    rng: np.random.Generator, frame: Frame, body: Torso, f_organs: np.ndarray, f_spine: np.ndarray
) -> list[tuple[np.ndarray, float]]:
    """4-7 bowel loops ``(f, lumen HU)`` (fluid or gas inside), kept clear of the organs and the spine."""
    P, a, b = frame.P, body.a, body.b
    loops = []
    for _ in range(int(rng.integers(4, 8))):
        c = (rng.uniform(-0.5, 0.5) * a, rng.uniform(-0.65, 0.05) * b, frame.z_at(rng.uniform(0.0, 0.6)))
        r = (rng.uniform(10, 22), rng.uniform(10, 18), rng.uniform(20, 60))
        f = np.maximum.reduce(
            [
                shape_fn(P, c, r, angle=rng.uniform(0, 3.1)) + warp(rng, P, 40, 2.0),
                body.keep_in,
                outside(f_organs, 5.0),
            ]
        )
        f = np.maximum(f, outside(f_spine, 2.0))
        loops.append((f, -900.0 if rng.uniform() < 0.4 else rng.uniform(0, 20)))
    return loops


def lungs(frame: Frame, body: Torso, f_organs: np.ndarray, f_spine: np.ndarray) -> np.ndarray:
    """Lung bases at the top, posterior, around the liver dome and the spleen."""
    P, a, b, z_len = frame.P, body.a, body.b, frame.z_len
    f_lungs = np.minimum(
        shape_fn(P, (-0.45 * a, 0.2 * b, frame.z_at(1.32)), (0.42 * a, 0.6 * b, 0.5 * z_len)),
        shape_fn(P, (0.45 * a, 0.2 * b, frame.z_at(1.36)), (0.42 * a, 0.6 * b, 0.5 * z_len)),
    )
    return np.maximum.reduce([f_lungs, body.keep_in, outside(f_organs, 5.0), outside(f_spine)])


def ribs(rng: np.random.Generator, frame: Frame, body: Torso) -> np.ndarray:
    """Rib cross-sections inside the muscle wall, in the upper half, none over the anterior abdomen."""
    f_ribs = np.full(frame.P[0].shape, np.float32(1e3), np.float32)
    for angle in rng.uniform(0, 2 * math.pi, size=int(rng.integers(6, 10))):
        if math.sin(angle) < -0.55:  # no ribs over the anterior abdomen
            continue
        band_z = frame.z_at(rng.uniform(0.55, 0.95))
        cx, cy = float(body.a * math.cos(angle)), float(body.b * math.sin(angle))
        f_rib = shape_fn(
            frame.P, (cx * 0.86, cy * 0.84, band_z), (7.0, 5.0, rng.uniform(8, 14)), angle=angle + math.pi / 2
        )
        f_ribs = np.minimum(f_ribs, f_rib)
    return f_ribs
