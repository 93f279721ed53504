"""Loading and writing volumes, in stored IJK order, with every check a user's file needs.

Everything SimpleITK reads is accepted (NIfTI ``.nii``/``.nii.gz``, ``.nrrd``, ``.mha``...). Arrays are
returned in the order the voxels are stored, ``(I, J, K)``: no reorientation, because 3D Slicer's
MONAILabel plugin sends voxel indices of the volume as stored. The geometry (spacing, origin,
direction) is kept so that results can be written back with exactly the input's geometry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import UserInputError

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
GEOMETRY_TOLERANCE = 1e-3


@dataclass
class Volume:
    """A 3D scalar volume.

    ``array``: ``(I, J, K)`` in stored voxel order (float32 for images, uint8 for labels).
    ``spacing``: mm per voxel along I, J, K. ``origin``: world position of voxel (0, 0, 0) in LPS mm
    (ITK convention). ``direction``: 3x3, row-major, columns are the I, J, K axis directions in LPS.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    path: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    def geometry(self) -> dict:
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    def orientation_code(self) -> str:
        """Three letters, ITK/LPS style as DICOM writes them (e.g. ``LPS``, ``RAS``): where each axis points."""
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        letters = []
        for axis in range(3):
            col = d[:, axis]
            a = int(np.argmax(np.abs(col)))
            pos, neg = ("L", "R") if a == 0 else ("P", "A") if a == 1 else ("S", "I")
            letters.append(pos if col[a] > 0 else neg)
        return "".join(letters)


def image_stem(path: str | os.PathLike) -> str:
    """File name without its image extension: ``/x/case_01.nii.gz`` -> ``case_01``."""
    name = Path(path).name
    for ext in IMAGE_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def is_image_file(path: str | os.PathLike) -> bool:
    name = Path(path).name.lower()
    return not name.startswith(".") and name.endswith(IMAGE_EXTENSIONS)


def _read_sitk(path: str | os.PathLike, what: str):
    import SimpleITK as sitk

    p = Path(path)
    if not p.exists():
        raise UserInputError(f"{what} file not found: {p}")
    if p.is_dir():
        raise UserInputError(f"{what} path is a folder, not a file: {p}")
    if p.stat().st_size == 0:
        raise UserInputError(f"{what} file is empty: {p}")
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "rror" in ln or "ould not" in ln), "unreadable")
        raise UserInputError(f"cannot read {what} {p}: corrupt, truncated or unsupported file ({detail[:160]})") from None
    dim = img.GetDimension()
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise UserInputError(
            f"{what} {p} has {img.GetNumberOfComponentsPerPixel()} components per voxel; a scalar 3D volume is required"
        )
    if dim == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise UserInputError(f"{what} {p} is {dim}D (size {list(img.GetSize())}); a 3D volume is required")
    return img


def _sitk_to_ijk(img) -> np.ndarray:
    import SimpleITK as sitk

    try:
        arr_kji = sitk.GetArrayViewFromImage(img)
    except RuntimeError as exc:  # pragma: no cover - truncated data read lazily
        raise UserInputError(f"cannot read voxel data: {exc}") from None
    return arr_kji.transpose(2, 1, 0)


def load_volume(path: str | os.PathLike, *, what: str = "image") -> Volume:
    """Read a 3D scalar image as float32 ``(I, J, K)``. Refuses 2D/4D, vector images and NaN/Inf voxels."""
    img = _read_sitk(path, what)
    arr = np.asarray(_sitk_to_ijk(img), dtype=np.float32)
    if arr.size == 0:
        raise UserInputError(f"{what} {path} has no voxels")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise UserInputError(f"{what} {path} contains {bad} NaN or infinite voxels")
    return Volume(
        array=arr,
        spacing=tuple(float(s) for s in img.GetSpacing()),
        origin=tuple(float(o) for o in img.GetOrigin()),
        direction=tuple(float(d) for d in img.GetDirection()),
        path=str(path),
    )


def check_same_geometry(image: Volume, other: Volume, what: str = "label") -> None:
    """Raise :class:`UserInputError` unless ``other`` has the image's shape, spacing, origin, direction."""
    if image.shape != other.shape:
        raise UserInputError(f"{what} shape {list(other.shape)} differs from image shape {list(image.shape)} ({other.path})")
    for name in ("spacing", "origin", "direction"):
        a, b = np.asarray(getattr(image, name)), np.asarray(getattr(other, name))
        tol = GEOMETRY_TOLERANCE * max(1.0, float(np.abs(a).max(initial=0)))
        if not np.allclose(a, b, atol=tol):
            raise UserInputError(
                f"{what} {name} {np.round(b, 4).tolist()} differs from image {name} {np.round(a, 4).tolist()} ({other.path})"
            )


def to_label_array(values: np.ndarray, source: str = "label") -> np.ndarray:
    """Validate a label map and return it as uint8. Float maps are accepted when they hold whole numbers."""
    arr = np.asarray(values)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise UserInputError(f"{source} contains NaN or infinite values")
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            bad = arr[rounded != arr]
            raise UserInputError(f"{source} has non-integer values (e.g. {float(bad.flat[0]):g}); a label map must hold whole numbers")
        arr = rounded
    elif arr.dtype.kind not in "iub":
        raise UserInputError(f"{source} has unsupported type {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise UserInputError(f"{source} has negative values (min {arr.min()})")
    if arr.size and arr.max() > 255:
        raise UserInputError(f"{source} has values up to {int(arr.max())}; at most 255 label values are supported")
    return arr.astype(np.uint8)


def load_label(path: str | os.PathLike, image: Volume | None = None) -> Volume:
    """Read a label map as uint8 ``(I, J, K)``; with ``image``, also check that the geometry matches."""
    img = _read_sitk(path, "label")
    arr = to_label_array(_sitk_to_ijk(img), source=f"label {path}")
    vol = Volume(
        array=arr,
        spacing=tuple(float(s) for s in img.GetSpacing()),
        origin=tuple(float(o) for o in img.GetOrigin()),
        direction=tuple(float(d) for d in img.GetDirection()),
        path=str(path),
    )
    if image is not None:
        check_same_geometry(image, vol)
    return vol


def write_volume(array_ijk: np.ndarray, reference: Volume, path: str | os.PathLike) -> Path:
    """Write ``array_ijk`` (shape ``reference.shape``) with the reference's exact geometry, atomically."""
    import SimpleITK as sitk

    if tuple(array_ijk.shape) != reference.shape:
        raise ValueError(f"array shape {array_ijk.shape} != reference shape {reference.shape}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array_ijk).transpose(2, 1, 0)))
    img.SetSpacing(reference.spacing)
    img.SetOrigin(reference.origin)
    img.SetDirection(reference.direction)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), True)
    return Path(path)
