"""Label names: which organ each label value of a label map is (``{"liver": 1, "spleen": 2, "kidney": 3}``).

One convention everywhere, MONAI Label's own: a mapping from **name to value**, as its apps declare
``labels`` and as its infer answers carry ``label_names``. Where the names come from:

* ``labels.json`` beside the volumes (a MONAI Label datastore's studies folder, a folder of case
  folders): ``{"liver": 1, "spleen": 2, "kidney": 3}``; :func:`write_labels_file` writes it
  (``sam-medical make-samples`` does);
* a Medical Segmentation Decathlon ``dataset.json``: ``"labels": {"0": "background", "1": "spleen"}``
  (value to name; the background is dropped);
* MONAI Label's label info in ``datastore_v2.json``: what 3D Slicer sends with ``PUT /datastore/label``
  (``params={"label_info": [{"name": "liver", "idx": 1}, ...]}``, stored as the label's ``info``), or
  ``info["params"]["label_names"]`` (how a saved inference result records them).

``.npz`` slice files carry them as ``label_names`` (``(L,)`` str, the name of each ``label_values``
entry, ``""`` when unknown) and in ``meta["label_names"]`` (see docs/ARCHITECTURE.md). Evaluation, training
and the app show ``liver (1)`` where a value has a name, ``label 4`` where it has none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sam_medical.atomic import write_json_atomic
from sam_medical.canvas.slice_file import load_npz
from sam_medical.errors import UserInputError

LABELS_FILE = "labels.json"
MSD_DATASET_FILE = "dataset.json"
DATASTORE_FILE = "datastore_v2.json"
MAX_NAME_LENGTH = 64
MAX_LABEL_VALUE = 255


def name_problem(name: Any) -> str | None:
    """Why ``name`` cannot name a label (None: it can): empty, too long, a comma (names are listed
    comma-separated), control characters, surrounding spaces, or only digits (it would read as a value)."""
    if not isinstance(name, str) or not name:
        return "it is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"it is longer than {MAX_NAME_LENGTH} characters"
    if "," in name:
        return "it holds a comma"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it holds control characters"
    if name != name.strip():
        return "it starts or ends with a space"
    if name.isdigit():
        return "it is a number (a name must not read as a label value)"
    return None


def check_label_names(mapping: Any, source: str) -> dict[str, int]:
    """``mapping`` (``{name: value}``) checked, sorted by value.

    Raises:
        UserInputError: not an object, a bad name, a value that is not a whole number in 1..255, or two
            names for one value; the message names ``source``.
    """
    if not isinstance(mapping, Mapping):
        raise UserInputError(
            f'{source}: label names must be a JSON object {{name: value}}, e.g. {{"liver": 1}}'
        )
    out: dict[str, int] = {}
    seen: dict[int, str] = {}
    for name, value in mapping.items():
        problem = name_problem(name)
        if problem:
            raise UserInputError(f"{source}: label name {name!r} is refused: {problem}")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LABEL_VALUE:
            raise UserInputError(
                f"{source}: label {name!r} has value {value!r}; a value is a whole number in 1..{MAX_LABEL_VALUE}"
            )
        if value in seen:
            raise UserInputError(f"{source}: labels {seen[value]!r} and {name!r} both have value {value}")
        seen[value] = name
        out[name] = value
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def read_labels_file(path: str | os.PathLike) -> dict[str, int]:
    """The ``{name: value}`` of a ``labels.json``.

    Raises:
        UserInputError: unreadable, not JSON, or not a valid mapping (see :func:`check_label_names`).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UserInputError(f"cannot read label names {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UserInputError(f"label names {path} are not valid JSON ({exc})") from None
    return check_label_names(data, str(path))


def write_labels_file(path: str | os.PathLike, mapping: Mapping[str, int]) -> Path:
    """Write ``mapping`` (checked) to ``path`` as ``labels.json``, atomically."""
    write_json_atomic(path, check_label_names(mapping, str(path)))
    return Path(path)


def names_by_value(mapping: Mapping[str, int]) -> dict[int, str]:
    """``{value: name}`` of a ``{name: value}`` mapping."""
    return {int(v): str(k) for k, v in mapping.items()}


def label_key(value: int, by_value: Mapping[int, str]) -> str:
    """The name of ``value``, or ``label N`` when it has none (a key of per-label results)."""
    return by_value.get(int(value)) or f"label {int(value)}"


def label_display(value: int, by_value: Mapping[int, str]) -> str:
    """``liver (1)`` for a named value, ``label 4`` otherwise (tables, titles, the command line)."""
    name = by_value.get(int(value))
    return f"{name} ({int(value)})" if name else f"label {int(value)}"


def from_msd_dataset(data: Any, source: str) -> dict[str, int]:
    """``{name: value}`` of a Decathlon ``dataset.json``'s ``labels`` (``{"0": "background", "1": "spleen"}``)."""
    labels = data.get("labels") if isinstance(data, Mapping) else None
    if not isinstance(labels, Mapping):
        return {}
    mapping: dict[str, int] = {}
    for value, name in labels.items():
        try:
            v = int(value)
        except (TypeError, ValueError):
            raise UserInputError(f"{source}: label value {value!r} is not a whole number") from None
        if v != 0:
            mapping[str(name)] = v
    return check_label_names(mapping, source)


def find_label_names(folder: str | os.PathLike) -> dict[str, int]:
    """The label names declared in ``folder``: its ``labels.json``, else a Decathlon ``dataset.json``'s
    ``labels``, else ``{}``.

    Raises:
        UserInputError: a ``labels.json`` or ``dataset.json`` that cannot be read or is not valid.
    """
    folder = Path(folder)
    labels_file = folder / LABELS_FILE
    if labels_file.is_file():
        return read_labels_file(labels_file)
    msd = folder / MSD_DATASET_FILE
    if msd.is_file():
        try:
            data = json.loads(msd.read_text())
        except (OSError, ValueError) as exc:
            raise UserInputError(f"cannot read {msd}: {exc}") from None
        return from_msd_dataset(data, str(msd))
    return {}


def from_label_info(info: Any) -> list[tuple[str, int]]:
    """The ``(name, value)`` pairs a MONAI Label label info records, in order; malformed entries skipped.

    Reads ``info["label_info"]`` (3D Slicer: ``[{"name": "liver", "idx": 1}]``, or ``"id"`` instead of
    ``"idx"``), ``info["params"]["label_names"]`` and ``info["label_names"]`` (``{name: value}``).
    """
    if not isinstance(info, Mapping):
        return []
    pairs: list[tuple[str, int]] = []
    entries = info.get("label_info")
    if isinstance(entries, list):
        for e in entries:
            if isinstance(e, Mapping):
                value = e.get("idx", e.get("id"))
                pairs.append((e.get("name"), value))  # type: ignore[arg-type]
    params = info.get("params")
    for names in (
        params.get("label_names") if isinstance(params, Mapping) else None,
        info.get("label_names"),
    ):
        if isinstance(names, Mapping):
            pairs += list(names.items())
    return [
        (str(n), int(v))
        for n, v in pairs
        if name_problem(n) is None
        and isinstance(v, int)
        and not isinstance(v, bool)
        and 1 <= v <= MAX_LABEL_VALUE
        and n.lower() != "background"
    ]


def merge_pairs(
    base: Mapping[str, int], pairs: Iterable[tuple[str, int]], source: str
) -> tuple[dict[str, int], list[str]]:
    """``base`` plus every pair whose name and value are both new; ``(mapping, notes on conflicts)``.

    A pair that gives a known name another value, or a known value another name, is not taken and is
    noted: the first declaration wins (``labels.json`` comes first).
    """
    out = dict(base)
    by_value = names_by_value(out)
    notes: list[str] = []
    for name, value in pairs:
        if out.get(name) == value:
            continue
        if name in out or value in by_value:
            known = f"{name!r} is {out[name]}" if name in out else f"{value} is {by_value[value]!r}"
            notes.append(f"{source}: {name!r} = {value} ignored ({known})")
            continue
        out[name] = value
        by_value[value] = name
    return dict(sorted(out.items(), key=lambda kv: kv[1])), notes


def datastore_label_names(studies: str | os.PathLike, tag: str = "final") -> tuple[dict[str, int], list[str]]:
    """The label names of a MONAI Label datastore folder: its ``labels.json`` (or ``dataset.json``) first,
    then the names its saved labels' info records (``datastore_v2.json``, label tag ``tag``, images in
    sorted order). Returns ``(mapping, notes)``; the notes list names a label info contradicts.

    Raises:
        UserInputError: a ``labels.json`` that cannot be read or is not valid.
    """
    folder = Path(studies)
    mapping = find_label_names(folder)
    notes: list[str] = []
    try:
        store = json.loads((folder / DATASTORE_FILE).read_text())
    except (OSError, ValueError):
        return mapping, notes
    objects = store.get("objects") if isinstance(store, Mapping) else None
    if not isinstance(objects, Mapping):
        return mapping, notes
    for image_id in sorted(objects):
        obj = objects[image_id]
        labels = obj.get("labels") if isinstance(obj, Mapping) else None
        label = labels.get(tag) if isinstance(labels, Mapping) else None
        info = label.get("info") if isinstance(label, Mapping) else None
        mapping, more = merge_pairs(mapping, from_label_info(info), f"label info of {image_id}")
        notes += more
    return mapping, notes


# --- .npz slice files ----------------------------------------------------------------------------


def npz_label_names(arrays: Mapping[str, Any]) -> dict[int, str]:
    """``{value: name}`` recorded in one ``.npz`` slice file's arrays (``label_names`` aligned with
    ``label_values``, else ``meta["label_names"]``); ``{}`` when it records none."""
    names = arrays.get("label_names")
    values = arrays.get("label_values")
    if names is not None and values is not None:
        names_list = [str(n) for n in list(getattr(names, "tolist", lambda: names)())]
        values_list = [int(v) for v in list(getattr(values, "tolist", lambda: values)())]
        if len(names_list) == len(values_list):
            return {v: n for v, n in zip(values_list, names_list, strict=True) if n}
    meta = arrays.get("meta")
    if meta is not None:
        try:
            data = json.loads(str(meta))
        except ValueError:
            return {}
        mapping = data.get("label_names") if isinstance(data, Mapping) else None
        if isinstance(mapping, Mapping):
            return {int(v): str(k) for k, v in mapping.items() if isinstance(v, int)}
    return {}


def files_label_names(files: Sequence[str | os.PathLike]) -> dict[int, str]:
    """One ``{value: name}`` for a set of ``.npz`` slice files (see :func:`merge_value_names`)."""

    return merge_value_names(
        [
            (Path(f).name, npz_label_names(load_npz(f, keys=("label_names", "label_values", "meta"))))
            for f in files
        ]
    )


def merge_value_names(per_file: Sequence[tuple[str, Mapping[int, str]]]) -> dict[int, str]:
    """One ``{value: name}`` for several files; the files must agree.

    Raises:
        UserInputError: one value named differently by two files (their results would be mixed up).
    """
    out: dict[int, str] = {}
    where: dict[int, str] = {}
    for source, names in per_file:
        for value, name in names.items():
            if value in out and out[value] != name:
                raise UserInputError(
                    f"label value {value} is {out[value]!r} in {where[value]} but {name!r} in {source}: "
                    "the files do not agree on what the labels are"
                )
            out.setdefault(value, name)
            where.setdefault(value, source)
    return dict(sorted(out.items()))


def resolve_labels(
    selection: Sequence[int | str], by_value: Mapping[int, str], present: Sequence[int]
) -> list[int]:
    """Label values of a selection that may mix values and names (``--labels liver,3``).

    Raises:
        UserInputError: a name no file defines (the known names are listed).
    """
    by_name = {n: v for v, n in by_value.items()}
    out = set()
    for item in selection:
        if isinstance(item, int):
            out.add(item)
        elif item in by_name:
            out.add(by_name[item])
        else:
            known = ", ".join(label_display(v, by_value) for v in present) or "none"
            raise UserInputError(f"unknown label {item!r}; the data holds: {known}")
    return sorted(out)
