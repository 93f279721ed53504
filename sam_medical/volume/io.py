"""Loading and writing volumes, in stored IJK order, with every check a user's file needs.

Everything SimpleITK reads is accepted (NIfTI ``.nii``/``.nii.gz``, ``.nrrd``, ``.mha``...). Arrays are
returned in the order the voxels are stored, ``(I, J, K)``: no reorientation, because 3D Slicer's
MONAILabel plugin sends voxel indices of the volume as stored. The geometry (spacing, origin,
direction) is kept so that results can be written back with exactly the input's geometry.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sam_medical.atomic import atomic_path
from sam_medical.errors import UserInputError, library_detail

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
GEOMETRY_TOLERANCE = 1e-3


@dataclass
class Volume:
    """A 3D scalar volume.

    ``array``: ``(I, J, K)`` in stored voxel order (float32 or the stored integer type for images,
    uint8 for labels). It is a transposed view of a C-ordered ``(K, J, I)`` array, so
    ``array.transpose(2, 1, 0)[k]`` is a contiguous slice.
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


def _check_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserInputError(f"{what} file not found: {p}")
    if p.is_dir():
        raise UserInputError(f"{what} path is a folder, not a file: {p}")
    if p.stat().st_size == 0:
        raise UserInputError(f"{what} file is empty: {p}")
    return p


def _unreadable(p: Path, what: str, exc: BaseException) -> UserInputError:
    detail = library_detail(exc, limit=160)
    return UserInputError(f"cannot read {what} {p}: corrupt, truncated or unsupported file ({detail})")


def _read(path: str | os.PathLike, what: str) -> tuple[np.ndarray, tuple, tuple, tuple]:
    """Return ``(array_ijk, spacing, origin, direction)``; the array is a private copy.

    Geometry always comes from SimpleITK (what 3D Slicer and the app's writer use). Two traps of ITK's
    NIfTI reader are handled here: it silently turns NaN voxels into 0, so floating-point NIfTI voxel data
    is read with nibabel (which keeps them, and they are then refused); and it accepts a cut
    ``.nii.gz``, so the size of integer NIfTI files read by SimpleITK is checked (:func:`_check_nifti_size`).
    Other formats (``.nrrd``, ``.mha``...) are read with SimpleITK.
    """
    import SimpleITK as sitk  # deferred: SimpleITK/nibabel load only when a volume is read

    p = _check_file(path, what)
    reader, geometry = _read_header(p, what)
    size, spacing, origin, direction = (
        list(geometry.shape),
        geometry.spacing,
        geometry.origin,
        geometry.direction,
    )
    is_nifti = p.name.lower().endswith((".nii", ".nii.gz"))
    is_float = reader.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64)
    if is_nifti and is_float:
        import nibabel as nib  # deferred: SimpleITK/nibabel load only when a volume is read

        try:
            arr = np.asanyarray(nib.load(str(p)).dataobj)
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
            raise _unreadable(p, what, exc) from None
        arr = np.array(arr.reshape(arr.shape[:3]) if arr.ndim == 4 else arr, copy=False)
        # nibabel returns a Fortran-ordered (I, J, K) array: its transpose is a C-ordered (K, J, I).
        arr = np.require(arr.transpose(2, 1, 0), requirements="C").transpose(2, 1, 0)
    else:
        if is_nifti:
            _check_nifti_size(p, what, int(np.prod(size)) * _pixel_itemsize(reader.GetPixelID()))
        try:
            img = reader.Execute()
        except RuntimeError as exc:
            raise _unreadable(p, what, exc) from None
        if img.GetDimension() == 4:
            img = img[:, :, :, 0]
        # SimpleITK's array *view* dies with the image object: copy once.
        arr = np.array(sitk.GetArrayViewFromImage(img), copy=True).transpose(2, 1, 0)
    if list(arr.shape) != size:
        raise UserInputError(
            f"{what} {p}: header size {size} does not match its voxel data {list(arr.shape)}"
        )
    return arr, spacing, origin, direction


@dataclass(frozen=True)
class Geometry:
    """Size and placement of a volume, read from its header: ``shape (I, J, K)``, ``spacing``, ``origin``,
    ``direction`` as in :class:`Volume`."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]


def _read_header(p: Path, what: str) -> tuple[Any, Geometry]:
    """``(reader, geometry)`` of a scalar 3D image file, from its header (no voxel data is read).

    Raises:
        UserInputError: unreadable, not scalar, not 3D (a 4D file with one volume counts as 3D).
    """
    import SimpleITK as sitk  # deferred: SimpleITK/nibabel load only when a volume is read

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(p, what, exc) from None
    size = list(reader.GetSize())
    dim = reader.GetDimension()
    if reader.GetNumberOfComponents() != 1:
        raise UserInputError(
            f"{what} {p} has {reader.GetNumberOfComponents()} components per voxel; a scalar 3D volume is required"
        )
    if dim == 4 and size[3] == 1:
        dim, size = 3, size[:3]
    if dim != 3:
        raise UserInputError(f"{what} {p} is {dim}D (size {size}); a 3D volume is required")
    direction = tuple(float(d) for d in reader.GetDirection())
    if len(direction) == 16:  # a 4D header with one volume: keep the 3x3 spatial part
        direction = tuple(direction[r * 4 + c] for r in range(3) for c in range(3))
    geometry = Geometry(
        shape=tuple(int(n) for n in size),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in reader.GetSpacing()[:3]),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in reader.GetOrigin()[:3]),  # type: ignore[arg-type]
        direction=direction,
    )
    return reader, geometry


def read_geometry(path: str | os.PathLike, *, what: str = "image") -> Geometry:
    """The geometry of a scalar 3D image file, from its header only (cheap for a large volume).

    Raises:
        UserInputError: missing, empty, unreadable, not scalar or not 3D.
    """
    return _read_header(_check_file(path, what), what)[1]


def _pixel_itemsize(pixel_id: int) -> int:
    """Bytes per voxel of a scalar SimpleITK pixel type (1 when unknown: never a false 'truncated')."""
    import SimpleITK as sitk  # deferred: SimpleITK/nibabel load only when a volume is read

    sizes = {
        sitk.sitkUInt8: 1,
        sitk.sitkInt8: 1,
        sitk.sitkUInt16: 2,
        sitk.sitkInt16: 2,
        sitk.sitkUInt32: 4,
        sitk.sitkInt32: 4,
        sitk.sitkUInt64: 8,
        sitk.sitkInt64: 8,
        sitk.sitkFloat32: 4,
        sitk.sitkFloat64: 8,
    }
    return sizes.get(pixel_id, 1)


def _check_nifti_size(p: Path, what: str, data_bytes: int) -> None:
    """Refuse a NIfTI file whose voxel data is shorter than its header says (a cut download or copy).

    ``.nii``: the file size. ``.nii.gz``: the gzip trailer holds the uncompressed size (mod 2**32); only
    when it disagrees (a cut file, or a multi-member gzip) is the stream decompressed to be sure.
    """

    gz = p.name.lower().endswith(".gz")
    try:
        with gzip.open(p, "rb") if gz else open(p, "rb") as fh:
            head = fh.read(352)
        sizeof_hdr = struct.unpack("<i", head[:4])[0]
        endian = "<" if sizeof_hdr in (348, 540) else ">"
        if struct.unpack(endian + "i", head[:4])[0] == 540:  # NIfTI-2
            vox_offset = struct.unpack(endian + "q", head[168:176])[0]
        else:
            vox_offset = int(struct.unpack(endian + "f", head[108:112])[0])
        expected = max(vox_offset, 352) + data_bytes
        if not gz:
            if p.stat().st_size < expected:
                raise UserInputError(
                    f"cannot read {what} {p}: truncated file ({p.stat().st_size} of {expected} bytes)"
                )
            return
        with open(p, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", fh.read(4))[0]
        if isize == expected % 2**32:
            return
        with gzip.open(p, "rb") as fh:  # slow path: read the whole stream
            total = 0
            while chunk := fh.read(1 << 24):
                total += len(chunk)
        if total < expected:
            raise UserInputError(
                f"cannot read {what} {p}: truncated file ({total} of {expected} bytes of data)"
            )
    except (OSError, EOFError, zlib.error, struct.error) as exc:
        raise _unreadable(p, what, exc) from None


def load_volume(path: str | os.PathLike, *, what: str = "image") -> Volume:
    """Read a 3D scalar image as ``(I, J, K)``. Refuses 2D/4D, vector images and NaN/Inf voxels.

    Integer images keep their stored integer type (no NaN is possible, and it halves memory for int16
    CT); floating-point images become float32.
    """
    arr, spacing, origin, direction = _read(path, what)
    if arr.size == 0:
        raise UserInputError(f"{what} {path} has no voxels")
    if arr.dtype.kind == "f":
        if arr.dtype != np.float32:
            arr = np.require(arr.transpose(2, 1, 0), np.float32, "C").transpose(2, 1, 0)
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise UserInputError(f"{what} {path} contains {bad} NaN or infinite voxels")
    elif arr.dtype.kind not in "iub":
        raise UserInputError(f"{what} {path} has unsupported voxel type {arr.dtype}")
    return Volume(array=arr, spacing=spacing, origin=origin, direction=direction, path=str(path))


def check_same_geometry(image: Volume | Geometry, other: Volume, what: str = "label") -> None:
    """Raise :class:`UserInputError` unless ``other`` has the image's shape, spacing, origin, direction."""
    if image.shape != other.shape:
        raise UserInputError(
            f"{what} shape {list(other.shape)} differs from image shape {list(image.shape)} ({other.path})"
        )
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
            raise UserInputError(
                f"{source} has non-integer values (e.g. {float(bad.flat[0]):g}); a label map must hold whole numbers"
            )
        arr = rounded
    elif arr.dtype.kind not in "iub":
        raise UserInputError(f"{source} has unsupported type {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise UserInputError(f"{source} has negative values (min {arr.min()})")
    if arr.size and arr.max() > 255:
        raise UserInputError(
            f"{source} has values up to {int(arr.max())}; at most 255 label values are supported"
        )
    return arr.astype(np.uint8, copy=False)


def load_label(path: str | os.PathLike, image: Volume | None = None) -> Volume:
    """Read a label map as uint8 ``(I, J, K)``; with ``image``, also check that the geometry matches."""
    arr, spacing, origin, direction = _read(path, "label")
    arr = to_label_array(arr, source=f"label {path}")
    vol = Volume(array=arr, spacing=spacing, origin=origin, direction=direction, path=str(path))
    if image is not None:
        check_same_geometry(image, vol)
    return vol


def write_volume(array_ijk: np.ndarray, reference: Volume, path: str | os.PathLike) -> Path:
    """Write ``array_ijk`` (shape ``reference.shape``) with the reference's exact geometry, atomically."""
    import SimpleITK as sitk  # deferred: SimpleITK/nibabel load only when a volume is read

    if tuple(array_ijk.shape) != reference.shape:
        raise ValueError(f"array shape {array_ijk.shape} != reference shape {reference.shape}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array_ijk).transpose(2, 1, 0)))
    img.SetSpacing(reference.spacing)
    img.SetOrigin(reference.origin)
    img.SetDirection(reference.direction)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), True)
    return Path(path)
