"""Adapter versions on disk: publish, list, select (roll back), read the current one cheaply.

Layout of a store folder ``ROOT``::

    ROOT/versions/<version>/adapter.pt     # a LoRA adapter file (sam_medical.adapters.files), never modified
    ROOT/versions/<version>/meta.json      # its metadata, metrics and publication time
    ROOT/current.json                      # {"version", "path", "published", "metrics", "selected"}

Every file is written under a temporary name and renamed when complete
(:func:`sam_medical.atomic.atomic_path`), so a reader (the server, at each request) only ever sees a
complete ``current.json`` pointing at a complete adapter. Versions are kept: :meth:`ModelStore.select`
points ``current.json`` at an earlier one (or at ``"none"``, the base model without adapter).

Version ids come from the adapter's own metadata (``meta["version"]``, made by
:func:`sam_medical.adapters.save_and_load.save_adapter`). They are checked against :data:`VERSION_PATTERN` before they are
used as folder names: no ``/``, no ``..``, no leading dot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sam_medical.adapters.files import CONVERTED_FROM_STATE, export_adapter, read_adapter_meta
from sam_medical.atomic import atomic_path, write_json_atomic
from sam_medical.errors import UserInputError

VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: ``select(NO_ADAPTER)`` serves the base model.
NO_ADAPTER = "none"
CURRENT_FILE = "current.json"
ADAPTER_FILE = "adapter.pt"


def check_version_id(version: Any) -> str:
    """``version`` if it is a safe version id (letters, digits, ``._-``; no path parts), else an error."""
    if not isinstance(version, str) or not VERSION_PATTERN.match(version) or ".." in version:
        raise UserInputError(
            f"invalid adapter version {version!r}: a version id holds letters, digits, '.', '_' and '-' only"
        )
    return version


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ModelStore:
    """Adapter versions under ``root`` (created on first write)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def current_file(self) -> Path:
        return self.root / CURRENT_FILE

    def path_of(self, version: str) -> Path:
        """``ROOT/versions/<version>/adapter.pt`` of an existing version.

        Raises:
            UserInputError: malformed id (path traversal) or unknown version.
        """
        check_version_id(version)
        path = self.versions_dir / version / ADAPTER_FILE
        if not path.is_file():
            known = [v["version"] for v in self.list_versions()]
            raise UserInputError(
                f"unknown adapter version {version!r}; known versions: {', '.join(known) if known else 'none yet'}"
            )
        return path

    # -- writing -------------------------------------------------------------------------------
    def publish(
        self,
        adapter_path: str | os.PathLike,
        metrics: dict[str, Any] | None = None,
        *,
        make_current: bool = True,
    ) -> str:
        """Copy the adapter file into ``versions/<version>/`` and make it current; return the version.

        The adapter is checked first (it must be a readable sam-medical adapter with a safe version id
        that is not already published). A training run's ``last.pt`` is accepted too: its adapter is
        written out as a plain adapter file (:func:`sam_medical.adapters.files.export_adapter`), without the
        optimiser state. ``metrics`` (plain JSON values) are stored with it.
        """
        adapter_path = Path(adapter_path)
        meta = read_adapter_meta(adapter_path)
        version = check_version_id(meta.get("version"))
        folder = self.versions_dir / version
        target = folder / ADAPTER_FILE
        if target.exists():
            raise UserInputError(f"adapter version {version} is already published at {target}")
        folder.mkdir(parents=True, exist_ok=True)
        if meta.get("converted_from") == CONVERTED_FROM_STATE:
            export_adapter(adapter_path, target)
        else:
            with atomic_path(target) as tmp:
                shutil.copyfile(adapter_path, tmp)
        record = {
            "version": version,
            "path": str(target.resolve()),
            "published": _now(),
            "metrics": metrics or {},
            "adapter": meta,
        }
        write_json_atomic(folder / "meta.json", record)
        if make_current:
            self._write_current(record)
        return version

    def select(self, version: str) -> dict[str, Any]:
        """Make ``version`` (or ``"none"``: the base model) the current one; return ``current.json``."""
        if version == NO_ADAPTER:
            record: dict[str, Any] = {"version": None, "path": None, "published": None, "metrics": {}}
        else:
            self.path_of(version)  # validates
            record = self._record(version)
        return self._write_current(record)

    def _write_current(self, record: dict[str, Any]) -> dict[str, Any]:
        current = {
            "version": record.get("version"),
            "path": record.get("path"),
            "published": record.get("published"),
            "metrics": record.get("metrics") or {},
            "selected": _now(),
        }
        write_json_atomic(self.current_file, current)
        return current

    # -- reading -------------------------------------------------------------------------------
    def _record(self, version: str) -> dict[str, Any]:
        folder = self.versions_dir / version
        try:
            record = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            record = {"version": version, "published": None, "metrics": {}}
        record["version"] = version
        record["path"] = str((folder / ADAPTER_FILE).resolve())
        return record

    def current(self) -> dict[str, Any] | None:
        """The content of ``current.json`` (``version`` None means the base model), or None if absent."""
        try:
            data = json.loads(self.current_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise UserInputError(f"{self.current_file} is unreadable: {exc}") from exc
        if not isinstance(data, dict):
            raise UserInputError(f"{self.current_file} does not hold a JSON object")
        return data

    def signature(self) -> tuple[int, int] | None:
        """``(mtime_ns, size)`` of ``current.json`` (None when absent): a cheap change check per request."""
        try:
            st = os.stat(self.current_file)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def list_versions(self) -> list[dict[str, Any]]:
        """Every published version (oldest first: ids are sortable timestamps), with metrics."""
        if not self.versions_dir.is_dir():
            return []
        out = []
        for folder in sorted(self.versions_dir.iterdir()):
            if folder.is_dir() and VERSION_PATTERN.match(folder.name) and (folder / ADAPTER_FILE).is_file():
                rec = self._record(folder.name)
                out.append(
                    {
                        "version": folder.name,
                        "published": rec.get("published"),
                        "metrics": rec.get("metrics") or {},
                        "path": rec["path"],
                    }
                )
        return out
