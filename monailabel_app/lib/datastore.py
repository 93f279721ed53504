"""The app's datastore: MONAI Label's ``LocalDatastore``, guarding the files it holds.

MONAI Label's ``PUT /datastore/image`` and ``PUT /datastore/label`` hand an uploaded file and a
client-chosen image id and label tag to the datastore, which joins them into a path and copies the file
there. :class:`GuardedDatastore` is the same datastore (same layout, same ``datastore_v2.json``) that:

* refuses image ids and label tags that are not plain names (:func:`check_name`: no ``/``, ``\\``,
  ``..``, leading dot or control character, so no absolute path either);
* never replaces an existing image file (an upload under a known id is a 409) and never deletes one
  (``DELETE /datastore/image`` is a 403): the images are the patients' data;
* checks every upload before it is stored: an image must be a readable, scalar 3D volume with finite
  voxels; a label must belong to a known image (else 404), be a readable 3D map of whole numbers in
  0..255, and have its image's size, spacing, origin and direction;
* stores files atomically: a complete temporary copy beside the target, then a rename (a link, for an
  image, so that an existing file can never be replaced), under the datastore's file lock.

A refusal raises :class:`fastapi.HTTPException` (4xx, JSON ``{"detail": "..."}``); the files on disk
stay as they were.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from sam_medical.errors import UserInputError
from sam_medical.volume.io import check_same_geometry, load_label, load_volume, read_geometry

logger = logging.getLogger(__name__)

#: Volume formats accepted for uploaded images and labels (those the datastore lists, and that are 3D).
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
MAX_NAME_LENGTH = 128


def refuse(status: int, message: str) -> HTTPException:
    """The HTTP answer to a refused request (logged: a refusal may be an attack)."""
    logger.warning(f"refused ({status}): {message}")
    return HTTPException(status_code=status, detail=message)


def name_problem(value: Any) -> str | None:
    """Why ``value`` cannot name an image or a label tag (None: it can).

    A name is a non-empty string of at most :data:`MAX_NAME_LENGTH` characters without ``/``, ``\\``,
    ``..``, control characters or a leading dot: it can only ever name a file inside its own folder.
    """
    if not isinstance(value, str) or not value:
        return "it is empty"
    if len(value) > MAX_NAME_LENGTH:
        return f"it is longer than {MAX_NAME_LENGTH} characters"
    if "/" in value or "\\" in value or ".." in value:
        return "a name may not hold '/', '\\' or '..' (it would be a path)"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "it holds control characters"
    if value.startswith("."):
        return "it starts with a dot"
    return None


def check_name(value: Any, what: str) -> str:
    """``value`` if it is a plain name (see :func:`name_problem`), else a 422 saying why."""
    problem = name_problem(value)
    if problem:
        raise refuse(422, f"{what} {value!r} is refused: {problem}")
    return value


def volume_extension(filename: str, what: str) -> str:
    """The volume extension of ``filename`` (``.nii.gz``, ``.nii``, ``.nrrd``), else a 422."""
    lower = filename.lower()
    for ext in VOLUME_EXTENSIONS:
        if lower.endswith(ext):
            return ext
    raise refuse(
        422, f"{what} file {Path(filename).name!r} is refused: upload one of {', '.join(VOLUME_EXTENSIONS)}"
    )


def _checked_info(info: Any, what: str) -> dict[str, Any]:
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise refuse(422, f"{what} must be a JSON object, got {type(info).__name__}")
    return dict(info)


class GuardedDatastore(LocalDatastore):
    """See the module docstring. Constructed exactly as ``LocalDatastore``."""

    # -- uploads ---------------------------------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Store an uploaded image under a new id; refuse a bad id, a known id or a bad volume."""
        ext = volume_extension(image_filename, "image")
        if not image_id:
            image_id = Path(image_filename).name[: -len(ext)]
        check_name(image_id, "image id")
        info = _checked_info(image_info, "image info")
        image_dir = Path(self._datastore.image_path())
        if image_id in self._datastore.objects or any(
            (image_dir / f"{image_id}{e}").exists() for e in VOLUME_EXTENSIONS
        ):
            raise refuse(
                409, f"image {image_id!r} exists already; images are never replaced (choose a new id)"
            )
        try:
            load_volume(image_filename, what="uploaded image")
        except UserInputError as exc:
            raise refuse(422, str(exc).replace(str(image_filename), "(upload)")) from None
        name = f"{image_id}{ext}"
        with FileLock(self._lock_file):
            try:
                _install_file(Path(image_filename), image_dir / name, replace=False)
            except FileExistsError:
                raise refuse(409, f"image {image_id!r} exists already; images are never replaced") from None
            info.update({"ts": int(time.time()), "name": name})
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        logger.info(f"datastore: added image {image_id} ({name})")
        return image_id

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]
    ) -> str:
        """Store an uploaded label of a known image; refuse a bad tag, an unknown image or a bad label."""
        check_name(image_id, "image id")
        check_name(label_tag, "label tag")
        ext = volume_extension(label_filename, "label")
        info = _checked_info(label_info, "label info")
        obj = self._datastore.objects.get(image_id)
        image_path = self.get_image_uri(image_id) if obj else ""
        if not obj or not os.path.isfile(image_path):
            raise refuse(404, f"image {image_id!r} is not in the datastore: a label needs its image")
        try:
            geometry = read_geometry(image_path)
            label = load_label(label_filename)
            check_same_geometry(geometry, label, what="label")
        except UserInputError as exc:
            raise refuse(422, str(exc).replace(str(label_filename), "(upload)")) from None
        folder = Path(self._datastore.label_path(label_tag))
        name = f"{image_id}{ext}"
        with FileLock(self._lock_file):
            folder.mkdir(parents=True, exist_ok=True)
            _install_file(Path(label_filename), folder / name, replace=True)
            for other in VOLUME_EXTENSIONS:  # one label file per image and tag
                if other != ext:
                    with contextlib.suppress(FileNotFoundError):
                        (folder / f"{image_id}{other}").unlink()
            info.update({"ts": int(time.time()), "name": name})
            obj.labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        logger.info(f"datastore: saved label {label_tag}/{name}")
        return image_id

    # -- removal and metadata --------------------------------------------------------------------
    def remove_image(self, image_id: str) -> None:
        """Refused: the server never deletes a patient image (remove the file from the folder instead)."""
        raise refuse(
            403,
            "images are not deleted through the server; remove the file from the datastore folder instead",
        )

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_name(label_id, "image id")
        check_name(label_tag, "label tag")
        if not self.get_label_uri(label_id, label_tag):
            raise refuse(404, f"image {label_id!r} has no {label_tag!r} label")
        super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        info = _checked_info(info, "image info")
        if image_id not in self._datastore.objects:
            raise refuse(404, f"image {image_id!r} is not in the datastore")
        super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        info = _checked_info(info, "label info")
        if not self._datastore.label(label_id, label_tag):
            raise refuse(404, f"image {label_id!r} has no {label_tag!r} label")
        super().update_label_info(label_id, label_tag, info)

    def _update_datastore_file(self, lock: bool = True) -> None:
        """Write ``datastore_v2.json`` atomically (a reader never sees half of it)."""

        def write() -> None:
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            path = Path(self._datastore_config_path)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                tmp.write_text(text)
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            self._config_ts = os.stat(path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()


def _install_file(source: Path, target: Path, *, replace: bool) -> None:
    """Copy ``source`` to ``target`` atomically: a complete hidden copy beside it, then one rename.

    ``replace=False`` never replaces an existing ``target`` (``FileExistsError``), even when another
    process creates it meanwhile: the copy is hard-linked to the name, which fails if the name exists.
    The temporary name ends in ``.tmp``, so the datastore never lists it as an image.
    """
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o644)
        if replace:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
