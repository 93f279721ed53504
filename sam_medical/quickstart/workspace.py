"""A working copy of the MONAI Label app and of the sample volumes, outside the repository.

``monailabel start_server`` writes into the folder of the app it serves (``model/``: adapters,
training runs, downloaded checkpoints; ``logs/``; ``bin/``) and into the datastore it serves (labels
saved from Slicer, uploaded images, ``datastore_v2.json``). Serving the repository's own
``monailabel_app/`` and ``sample_volumes/`` would write into the repository. The quick start serves a
workspace instead::

    ROOT/app/        the app's code, refreshed from the repository at every call (its model/ and
                     logs/ are kept)
    ROOT/studies/    the sample volumes and labels, copied once, on the first call; yours afterwards

``ROOT`` is ``$SAM_MEDICAL_WORKSPACE``, else ``$XDG_DATA_HOME/sam-medical/workspace`` (by default
``~/.local/share/sam-medical/workspace``).
"""

from __future__ import annotations

import filecmp
import os
import shutil
import uuid
from pathlib import Path

from sam_medical.atomic import atomic_path
from sam_medical.errors import UserInputError
from sam_medical.quickstart.samples import make_samples
from sam_medical.volume.label_names import LABELS_FILE

#: Folders of the app that the server writes, or Python caches: never copied, never removed.
APP_RUNTIME_DIRS = frozenset({"model", "logs", "bin", "__pycache__"})
REPO = Path(__file__).resolve().parents[2]  # sam_medical/quickstart/workspace.py -> the repository


def default_root() -> Path:
    """``$SAM_MEDICAL_WORKSPACE``, else ``$XDG_DATA_HOME/sam-medical/workspace``."""
    if os.environ.get("SAM_MEDICAL_WORKSPACE"):
        return Path(os.environ["SAM_MEDICAL_WORKSPACE"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data).expanduser() / "sam-medical" / "workspace"


def _code_files(app: Path) -> dict[Path, Path]:
    """Relative path -> source file, for every file of the app outside :data:`APP_RUNTIME_DIRS`."""
    out = {}
    for path in sorted(app.rglob("*")):
        rel = path.relative_to(app)
        if path.is_file() and not (set(rel.parts[:-1]) & APP_RUNTIME_DIRS) and not path.name.endswith(".pyc"):
            out[rel] = path
    return out


def sync_app(source: Path, target: Path) -> int:
    """Make ``target``'s code equal to ``source``'s (its runtime folders untouched); return files changed."""
    wanted = _code_files(source)
    changed = 0
    for rel, src in wanted.items():
        dst = target / rel
        if not dst.is_file() or not filecmp.cmp(src, dst, shallow=False):
            with atomic_path(dst) as tmp:  # a server starting meanwhile never imports half a module
                shutil.copyfile(src, tmp)
            changed += 1
    for rel in _code_files(target):  # a module deleted from the repository must not linger in the copy
        if rel not in wanted:
            (target / rel).unlink()
            changed += 1
    return changed


def copy_samples(source: Path | None, target: Path) -> None:
    """Fill the new datastore ``target`` with the sample images, final labels and label names (files only).

    ``source``: a datastore folder (``*.nii.gz`` and ``labels/final/``); None or missing: the same 4
    phantoms are generated (``make-samples --count 4 --seed 0``).
    """
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if source is not None and source.is_dir() and any(source.glob("*.nii.gz")):
            (tmp / "labels" / "final").mkdir(parents=True)
            for image in sorted(source.glob("*.nii.gz")):
                shutil.copy2(image, tmp / image.name)
                label = source / "labels" / "final" / image.name
                if label.is_file():
                    shutil.copy2(label, tmp / "labels" / "final" / image.name)
            if (source / LABELS_FILE).is_file():  # the label names the app shows in Slicer
                shutil.copy2(source / LABELS_FILE, tmp / LABELS_FILE)
        else:
            make_samples(tmp, 4, 0)
        os.replace(tmp, target)  # the datastore appears complete, or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_workspace(
    root: str | os.PathLike | None = None, *, app_source: Path | None = None, samples: Path | None = None
) -> dict[str, Path]:
    """Create or refresh the workspace (see the module docstring); return ``{"root", "app", "studies"}``.

    Raises:
        UserInputError: the app's source is not there (sam_medical not run from a clone of the
            repository), or ``root`` is inside the app's source folder or cannot be written.
    """
    root = Path(root).expanduser().resolve() if root is not None else default_root().resolve()
    app_source = (app_source or REPO / "monailabel_app").resolve()
    if not (app_source / "main.py").is_file():
        raise UserInputError(
            f"the MONAI Label app is not at {app_source}: run sam-medical from a clone of the repository "
            "(pip install -e .)"
        )
    if root == app_source or app_source in root.parents:
        raise UserInputError(f"the workspace {root} may not be inside the app folder {app_source}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        sync_app(app_source, root / "app")
        studies = root / "studies"
        if not studies.exists():
            copy_samples(samples if samples is not None else REPO / "sample_volumes", studies)
    except OSError as exc:
        raise UserInputError(f"cannot write the workspace {root}: {exc.strerror or exc}") from None
    return {"root": root, "app": root / "app", "studies": studies}
