"""Adapter versions on disk: publish, select (roll back), refuse bad ids."""

from __future__ import annotations

import json
import time

import pytest
from adapters import save_tiny_adapter

from sam_medical.adapters.files import read_adapter_meta
from sam_medical.adapters.store import ModelStore
from sam_medical.errors import UserInputError


def make_adapter(sam, base_info, path):
    """An adapter of the seeded tiny model (``sam``/``base_info`` are that same model)."""
    return save_tiny_adapter(path, model_seed=base_info["seed"])


def test_publish_select_and_rollback(tmp_path, tiny_sam, tiny_base_info):
    store = ModelStore(tmp_path / "store")
    assert store.current() is None and store.list_versions() == [] and store.signature() is None
    meta1 = make_adapter(tiny_sam, tiny_base_info, tmp_path / "a1.pt")
    v1 = store.publish(tmp_path / "a1.pt", {"val_dice": 0.5})
    assert v1 == meta1["version"]
    cur = store.current()
    assert cur["version"] == v1 and cur["metrics"] == {"val_dice": 0.5}
    assert read_adapter_meta(cur["path"])["version"] == v1
    sig1 = store.signature()

    time.sleep(1.1)  # version ids have one-second resolution (plus a random part)
    meta2 = make_adapter(tiny_sam, tiny_base_info, tmp_path / "a2.pt")
    v2 = store.publish(tmp_path / "a2.pt")
    assert v2 == meta2["version"] != v1
    assert store.current()["version"] == v2 and store.signature() != sig1
    assert [v["version"] for v in store.list_versions()] == [v1, v2]

    assert store.select(v1)["version"] == v1  # roll back: both versions stay
    assert store.current()["version"] == v1 and len(store.list_versions()) == 2
    assert store.select("none")["version"] is None
    assert json.loads(store.current_file.read_text())["path"] is None
    # no temporary files are left behind
    assert not [p for p in (tmp_path / "store").rglob("*") if ".part" in p.name]


def test_bad_versions_and_files_are_refused(tmp_path, tiny_sam, tiny_base_info):
    store = ModelStore(tmp_path / "store")
    for bad in ("../etc", "a/b", ".hidden", "", "x" * 200):
        with pytest.raises(UserInputError, match="invalid adapter version"):
            store.select(bad)
    with pytest.raises(UserInputError, match="unknown adapter version 'nope'"):
        store.select("nope")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserInputError):
        store.publish(tmp_path / "junk.pt")
    make_adapter(tiny_sam, tiny_base_info, tmp_path / "a.pt")
    store.publish(tmp_path / "a.pt")
    with pytest.raises(UserInputError, match="already published"):
        store.publish(tmp_path / "a.pt")
