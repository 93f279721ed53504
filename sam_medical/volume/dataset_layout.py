"""Find the cases of a dataset folder: each image paired with its label map, whatever the layout.

Layouts: a MONAI Label datastore (images at the top, labels in ``labels/final/`` under the same names),
a Medical Segmentation Decathlon folder (``imagesTr/`` + ``labelsTr/``), or one folder per case
(``<case>/image.nii.gz`` + ``<case>/label.nii.gz``). Used by ``preprocess``, ``evaluate`` and the
app's training task.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sam_medical.errors import UserInputError
from sam_medical.volume.io import image_stem, is_image_file


@dataclass
class CasePair:
    """One image and its label map."""

    name: str
    image: Path
    label: Path


# --- finding cases --------------------------------------------------------------------------------


#: Image and label file stems of the per-case folder layout (``<case>/image.nii.gz`` + ``label.nii.gz``;
#: KiTS-style ``imaging``/``segmentation`` too).
CASE_FOLDER_IMAGES = ("image", "imaging", "img")
CASE_FOLDER_LABELS = ("label", "segmentation", "seg", "mask")


def _case_folder_pair(folder: Path) -> tuple[Path | None, Path | None]:
    """``(image, label)`` files of one case folder (None where missing)."""
    files = {image_stem(p).lower(): p for p in sorted(folder.iterdir()) if p.is_file() and is_image_file(p)}
    image = next((files[s] for s in CASE_FOLDER_IMAGES if s in files), None)
    label = next((files[s] for s in CASE_FOLDER_LABELS if s in files), None)
    return image, label


def find_cases(dataset: str | os.PathLike) -> tuple[list[CasePair], str, list[str]]:
    """Detect the layout of ``dataset`` and pair images with labels.

    Layouts: MONAI Label datastore (images at the top, labels in ``labels/final/`` under the same
    names), Medical Segmentation Decathlon (``imagesTr/`` + ``labelsTr/``), or one folder per case
    (``<case>/image.nii.gz`` + ``<case>/label.nii.gz``, the case named after its folder).
    Returns ``(cases, layout, unlabelled_image_names)``.
    """
    root = Path(dataset)
    if not root.is_dir():
        raise UserInputError(f"dataset folder not found: {root}")
    if (root / "imagesTr").is_dir():
        layout, image_dir, label_dir = "msd", root / "imagesTr", root / "labelsTr"
    elif (root / "labels" / "final").is_dir():
        layout, image_dir, label_dir = "monailabel", root, root / "labels" / "final"
    else:
        folders = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        pairs = [(d.name, *_case_folder_pair(d)) for d in folders]
        cases = [CasePair(name, img, lab) for name, img, lab in pairs if img is not None and lab is not None]
        if not cases:
            raise UserInputError(
                f"{root} is neither a MONAI Label datastore (images + labels/final/), a Decathlon folder "
                "(imagesTr/ + labelsTr/) nor a folder of case folders (<case>/image.nii.gz + label.nii.gz)"
            )
        return cases, "case_folders", [name for name, img, lab in pairs if img is not None and lab is None]
    labels = (
        {image_stem(p): p for p in sorted(label_dir.iterdir()) if is_image_file(p)}
        if label_dir.is_dir()
        else {}
    )
    cases, unlabelled = [], []
    for img in sorted(image_dir.iterdir()):
        if not (img.is_file() and is_image_file(img)):
            continue
        name = image_stem(img)
        if name in labels:
            cases.append(CasePair(name, img, labels[name]))
        else:
            unlabelled.append(name)
    if not cases:
        raise UserInputError(
            f"no labelled image found in {root} ({layout} layout, labels expected in {label_dir})"
        )
    return cases, layout, unlabelled
