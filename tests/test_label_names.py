"""Labels by name (issue 10, item 4): ``labels.json``, MONAI Label's label info, the samples, preprocess,
and the app's labels (``SamAppConfig``), checked in process. What the server shows (``/info/``, the infer
answer's ``label_names``) is checked end to end in ``test_app_e2e.py``."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from sam_medical.cli.main import main
from sam_medical.errors import UserInputError
from sam_medical.quickstart.workspace import copy_samples
from sam_medical.volume.label_names import (
    datastore_label_names,
    find_label_names,
    from_label_info,
    read_labels_file,
    write_labels_file,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_volumes"
APP = REPO / "monailabel_app"
SAMPLE_NAMES = {"liver": 1, "spleen": 2, "kidney": 3}


@pytest.fixture(scope="module")
def app_lib():
    sys.path.insert(0, str(APP))
    try:
        configs = importlib.import_module("lib.settings")
        datastore = importlib.import_module("lib.datastore")
        options = importlib.import_module("lib.trainers.options")
    finally:
        sys.path.remove(str(APP))
    return configs, datastore, options


def one_case_datastore(root: Path, names: dict | None = SAMPLE_NAMES) -> Path:
    """A datastore with the smallest sample volume and its final label (and ``labels.json`` if ``names``)."""
    (root / "labels" / "final").mkdir(parents=True)
    shutil.copy(SAMPLES / "phantom_003.nii.gz", root)
    shutil.copy(SAMPLES / "labels" / "final" / "phantom_003.nii.gz", root / "labels" / "final")
    if names is not None:
        write_labels_file(root / "labels.json", names)
    return root


def test_labels_json_is_checked_and_one_line_errors(tmp_path: Path) -> None:
    path = write_labels_file(tmp_path / "labels.json", {"spleen": 2, "liver": 1})
    assert list(read_labels_file(path).items()) == [("liver", 1), ("spleen", 2)]  # sorted by value
    bad = {
        '{"liver": 1, "spleen": 1}': "both have value 1",
        '{"liver": 0}': "whole number in 1..255",
        '{"liver": true}': "whole number in 1..255",
        '{"liver,spleen": 1}': "comma",
        '{"12": 1}': "is a number",
        '["liver"]': "must be a JSON object",
        "{liver: 1": "not valid JSON",
    }
    for text, message in bad.items():
        path.write_text(text)
        with pytest.raises(UserInputError, match=message) as info:
            read_labels_file(path)
        assert "\n" not in str(info.value)


def test_samples_and_decathlon_datasets_name_their_labels(tmp_path: Path) -> None:
    assert read_labels_file(SAMPLES / "labels.json") == SAMPLE_NAMES
    assert find_label_names(SAMPLES) == SAMPLE_NAMES
    msd = tmp_path / "Task09_Spleen"
    msd.mkdir()
    (msd / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "spleen"}}))
    assert find_label_names(msd) == {"spleen": 1}
    assert find_label_names(tmp_path) == {}
    # the quick start's datastore copy keeps the names
    copy_samples(SAMPLES, tmp_path / "studies")
    assert read_labels_file(tmp_path / "studies" / "labels.json") == SAMPLE_NAMES


def test_preprocess_records_the_names_in_the_slice_files(tmp_path: Path, capsys) -> None:
    data = one_case_datastore(tmp_path / "ds")
    assert main(["preprocess", "--dataset", str(data), "--out", str(tmp_path / "npz"), "--quiet"]) == 0
    assert "labels liver (1), spleen (2), kidney (3)" in capsys.readouterr().out
    with np.load(tmp_path / "npz" / "phantom_003.npz") as f:
        assert f["label_names"].tolist() == ["liver", "spleen", "kidney"]
        assert f["label_values"].tolist() == [1, 2, 3]
        assert json.loads(str(f["meta"]))["label_names"] == SAMPLE_NAMES
    manifest = json.loads((tmp_path / "npz" / "manifest.json").read_text())
    assert manifest["cases"][0]["label_names"] == SAMPLE_NAMES
    # --label-names overrides what the folder says
    other = write_labels_file(tmp_path / "other.json", {"hepar": 1, "lien": 2, "ren": 3})
    argv = ["preprocess", "--dataset", str(data), "--out", str(tmp_path / "npz2"), "--quiet"]
    assert main(argv + ["--label-names", str(other)]) == 0
    with np.load(tmp_path / "npz2" / "phantom_003.npz") as f:
        assert f["label_names"].tolist() == ["hepar", "lien", "ren"]
    (tmp_path / "broken.json").write_text('{"liver": 1, "spleen": 1}')
    assert main(argv + ["--label-names", str(tmp_path / "broken.json")]) == 2
    assert "both have value 1" in capsys.readouterr().err


def test_label_info_that_slicer_sends_is_read_from_the_datastore(tmp_path: Path, app_lib) -> None:
    _, datastore, _ = app_lib
    assert from_label_info({"label_info": [{"name": "liver", "idx": 1}, {"name": "kidney", "id": 3}]}) == [
        ("liver", 1),
        ("kidney", 3),
    ]
    assert from_label_info({"params": {"label_names": {"spleen": 2, "background": 0}}}) == [("spleen", 2)]
    studies = one_case_datastore(tmp_path / "studies", names=None)
    store = datastore.GuardedDatastore(str(studies), auto_reload=False)
    label = SAMPLES / "labels" / "final" / "phantom_003.nii.gz"
    # exactly what MONAI Label records for Slicer's PUT /datastore/label params={"label_info": [...]}
    info = {
        "label_info": [
            {"name": "liver", "idx": 1},
            {"name": "spleen", "idx": 2},
            {"name": "kidney", "idx": 3},
        ]
    }
    store.save_label("phantom_003", str(label), "final", info)
    assert datastore_label_names(studies) == (SAMPLE_NAMES, [])
    # labels.json comes first; a label info that contradicts it is noted, not taken
    write_labels_file(studies / "labels.json", {"liver": 1, "tumour": 2})
    names, notes = datastore_label_names(studies)
    assert names == {"liver": 1, "tumour": 2, "kidney": 3}
    assert notes == ["label info of phantom_003: 'spleen' = 2 ignored (2 is 'tumour')"]


def test_app_labels_come_from_the_datastore(tmp_path: Path, app_lib) -> None:
    configs, _, _ = app_lib
    studies = one_case_datastore(tmp_path / "studies")
    cfg = configs.SamAppConfig.from_conf(tmp_path / "app", {"model": "tiny"}, studies)
    assert cfg.labels == SAMPLE_NAMES and cfg.labels_source == "datastore"
    assert (
        cfg.label_value("spleen") == 2 and cfg.label_value("Segment_1") == 4
    )  # an unknown name: a new value
    cfg = configs.SamAppConfig.from_conf(tmp_path / "app", {"labels": "liver=1,kidney=3"}, studies)
    assert cfg.labels == {"liver": 1, "kidney": 3} and cfg.labels_source == "conf"
    cfg = configs.SamAppConfig.from_conf(tmp_path / "app", {"labels": "tumour, cyst"})
    assert cfg.labels == {"tumour": 1, "cyst": 2}
    bare = configs.SamAppConfig.from_conf(tmp_path / "app", {}, one_case_datastore(tmp_path / "bare", None))
    assert bare.labels == {"object": 1} and bare.labels_source == "default"
    with pytest.raises(UserInputError, match="both have value 1"):
        configs.SamAppConfig.from_conf(tmp_path / "app", {"labels": "liver=1,spleen=1"})


def test_publish_options_are_checked(tmp_path: Path, app_lib) -> None:
    configs, _, options = app_lib
    cfg = configs.SamAppConfig.from_conf(tmp_path / "app", {"model": "tiny"})
    opts = options.train_options({}, cfg)
    assert (opts["publish_margin"], opts["publish_alpha"], opts["publish_min_items"]) == (0.005, 0.05, 6)
    opts = options.train_options({"publish_margin": "0.02", "publish_alpha": 0.01}, cfg)
    assert opts["publish_margin"] == 0.02 and opts["publish_alpha"] == 0.01
    for bad, message in (
        ({"publish_margin": 2}, "publish_margin"),
        ({"publish_alpha": 0}, "publish_alpha"),
        ({"publish_min_items": 0}, "publish_min_items"),
    ):
        with pytest.raises(UserInputError, match=message):
            options.train_options(bad, cfg)
