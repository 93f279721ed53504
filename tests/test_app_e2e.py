"""End to end: the real ``monailabel start_server`` with ``monailabel_app``, driven by 3D Slicer's own client.

The server runs as a subprocess on 127.0.0.1 with the ``tiny`` model, on a copy of the app (its
``model/`` folder receives adapters) and a temporary datastore. Requests are built exactly as the Slicer
plugin builds them (``MONAILabel.py``: ``onClickDeepgrow`` and ``MONAILabelLogic.infer``): ``label``,
``foreground``/``background`` as ``[i, j, k]`` lists, ``roi``, ``slice`` for 2D models, the model's
``config`` values (first element of lists), ``result_extension=".nrrd"``, ``result_dtype="uint8"``.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from slicer_harness import http_error, running_server, slicer_infer

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_volumes"
START_TIMEOUT = 180


def make_datastore(root: Path) -> dict:
    """A datastore from the sample volumes: 3 labelled images, 1 without label, 1 corrupt image."""
    import SimpleITK as sitk

    images = sorted(p for p in SAMPLES.glob("*.nii.gz"))
    if len(images) < 4 or not (SAMPLES / "labels" / "final").is_dir():
        pytest.skip(
            "sample_volumes/ (4 phantoms with labels/final) is not there; run sam-medical make-samples"
        )
    (root / "labels" / "final").mkdir(parents=True)
    for img in images[:3]:
        shutil.copy(img, root / img.name)
        shutil.copy(SAMPLES / "labels" / "final" / img.name, root / "labels" / "final" / img.name)
    shutil.copy(images[3], root / "new_case.nii.gz")  # labelled later, through the client
    shutil.copy(SAMPLES / "labels.json", root / "labels.json")  # liver 1, spleen 2, kidney 3
    (root / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not a gzip stream")
    names = [p.name.replace(".nii.gz", "") for p in images[:3]]
    # the image whose direction is not the identity checks geometry best
    flipped = next(
        (
            n
            for n in names
            if sitk.ReadImage(str(root / f"{n}.nii.gz")).GetDirection() != (1, 0, 0, 0, 1, 0, 0, 0, 1)
        ),
        names[0],
    )
    return {
        "labelled": names,
        "flipped": flipped,
        "unlabelled": "new_case",
        "new_label": SAMPLES / "labels" / "final" / images[3].name,
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("e2e")
    studies = tmp / "studies"
    data = make_datastore(studies)
    with running_server(tmp, studies, {"model": "tiny", "prefetch_slices": "2"}, request) as srv:
        yield {**srv, **data}


# --- helpers: requests exactly as the Slicer plugin makes them -------------------------------------------


def object_voxel(srv, name: str) -> tuple[int, int, int]:
    """A voxel well inside label 1 of a labelled image, on its most labelled slice."""
    import SimpleITK as sitk
    from scipy import ndimage

    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(srv["studies"] / "labels" / "final" / f"{name}.nii.gz")))
    lab = lab.transpose(2, 1, 0) == 1
    k = int(np.argmax(lab.sum(axis=(0, 1))))
    dist = ndimage.distance_transform_edt(lab[:, :, k])
    i, j = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(i), int(j), k


def input_geometry(srv, name: str):
    import SimpleITK as sitk

    img = sitk.ReadImage(str(srv["studies"] / f"{name}.nii.gz"))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def assert_same_geometry(out_img, expected) -> None:
    size, spacing, origin, direction = expected
    assert out_img.GetSize() == size
    np.testing.assert_allclose(out_img.GetSpacing(), spacing, atol=1e-6)
    np.testing.assert_allclose(out_img.GetOrigin(), origin, atol=1e-6)
    np.testing.assert_allclose(out_img.GetDirection(), direction, atol=1e-9)


# --- tests ----------------------------------------------------------------------------------------


def test_info_lists_the_tasks(server):
    info = server["client"].info()
    m2, m3 = info["models"]["sam_2d"], info["models"]["sam_3d"]
    assert (m2["type"], m2["dimension"]) == ("deepgrow", 2)
    assert (m3["type"], m3["dimension"]) == ("deepgrow", 3)
    assert "sam_lora" in info["trainers"]
    assert m2["sam"]["random_weights"] is True and "random" in m2["sam"]["weights"]
    assert m2["sam"]["model"] == "tiny" and m2["sam"]["model_version"] == "base"
    # the datastore's label names (labels.json beside the studies), as Slicer lists them
    assert info["labels"] == ["liver", "spleen", "kidney"]
    assert m2["labels"] == m3["labels"] == {"liver": 1, "spleen": 2, "kidney": 3}
    assert m2["sam"]["labels_source"] == "datastore"


def test_the_answer_maps_the_segment_name_to_its_label_value(server):
    name = server["labelled"][0]
    i, j, k = object_voxel(server, name)
    arr, _, out = slicer_infer(server, "sam_2d", name, fg=[[i, j, k]], slice_index=k, label="spleen")
    assert out["label_names"] == {"spleen": 2}
    assert set(np.unique(arr)) == {0, 2}  # the mask holds spleen's value in the datastore's label maps
    arr, _, out = slicer_infer(server, "sam_3d", name, fg=[[i, j, k]], label="kidney")
    assert out["label_names"] == {"kidney": 3} and set(np.unique(arr)) == {0, 3}
    _, _, out = slicer_infer(server, "sam_2d", name, fg=[[i, j, k]], slice_index=k, label="Segment_1")
    assert out["label_names"] == {"Segment_1": 4}  # a name the app does not know: a value of its own


def test_click_answers_with_the_input_geometry_then_from_the_cache(server):
    name = server["flipped"]
    i, j, k = object_voxel(server, name)
    arr, img, out = slicer_infer(server, "sam_2d", name, fg=[[i, j, k]], slice_index=k, label="liver")
    assert_same_geometry(img, input_geometry(server, name))
    assert img.GetPixelIDTypeAsString() == "8-bit unsigned integer"
    assert arr.any(axis=(0, 1)).nonzero()[0].tolist() == [k]  # a mask, on slice k only
    assert set(np.unique(arr)) <= {0, 1} and out["label_names"] == {"liver": 1}
    assert out["slice"] == k and out["model_version"] == "base" and out["embedding"] == "computed"
    assert out["prompt"]["foreground"] == [[i, j]]
    assert set(out["latency"]) >= {"load", "encode", "decode", "write", "total"}
    assert out["cache"]["entries"] >= 1
    arr2, _, out2 = slicer_infer(server, "sam_2d", name, fg=[[i, j, k]], bg=[[2, 2, k]], slice_index=k)
    assert out2["embedding"] == "cached" and out2["latency"]["encode"] == 0.0
    assert out2["volume"]["load"] == "cached"
    # the neighbours were encoded in the background: a click there is a cache hit too
    time.sleep(1.0)
    _, _, out3 = slicer_infer(server, "sam_2d", name, fg=[[i, j, k + 1]], slice_index=k + 1)
    assert out3["embedding"] == "cached"


def test_roi_box(server):
    name = server["labelled"][0]
    i, j, k = object_voxel(server, name)
    size = input_geometry(server, name)[0]
    roi = [i + 20, i - 20, j + 15, -7, k + 2, k - 2]  # unordered, one side outside: ordered and clipped
    arr, img, out = slicer_infer(server, "sam_2d", name, roi=roi, slice_index=k)
    assert_same_geometry(img, input_geometry(server, name))
    assert out["prompt"]["box"] == [i - 20, i + 20, 0, j + 15] and out["prompt"]["foreground"] == []
    assert arr.any(axis=(0, 1)).nonzero()[0].tolist() == [k]
    assert arr.shape == size


def test_sam_3d_labels_several_slices(server):
    name = server["labelled"][1]
    i, j, k = object_voxel(server, name)
    arr, img, out = slicer_infer(server, "sam_3d", name, fg=[[i, j, k]])
    assert_same_geometry(img, input_geometry(server, name))
    labelled = arr.any(axis=(0, 1)).nonzero()[0].tolist()
    assert len(labelled) > 1 and k in labelled
    assert labelled == list(range(labelled[0], labelled[-1] + 1)) == out["slices"]
    assert out["slice"] == k


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server):
    client, module = server["client"], server["module"]
    name = server["labelled"][0]
    size = input_geometry(server, name)[0]
    base = {"label": "object", "result_extension": ".nrrd", "result_dtype": "uint8"}
    cases = [
        (
            "sam_2d",
            name,
            {"foreground": [[size[0] + 5, 3, 2]], "background": [], "slice": 2},
            422,
            "outside the volume",
        ),
        (
            "sam_2d",
            name,
            {"foreground": [[3, 3, 2]], "roi": [-50, -10, 0, 5, 0, 2], "slice": 2},
            422,
            "outside the volume",
        ),
        (
            "sam_2d",
            name,
            {"foreground": [[3, 3, size[2] + 3]], "slice": size[2] + 3},
            422,
            "outside the volume",
        ),
        ("sam_2d", name, {"foreground": [], "background": [], "slice": size[2]}, 422, "outside the volume"),
        ("sam_2d", name, {"foreground": [], "background": [], "slice": 2}, 422, "no prompt"),
        ("sam_3d", name, {"foreground": [], "background": []}, 422, "no prompt"),
        ("sam_2d", "no_such_image", {"foreground": [[3, 3, 2]], "slice": 2}, 404, "not in the datastore"),
        ("sam_2d", "../../etc/passwd", {"foreground": [[3, 3, 2]], "slice": 2}, 422, "refused"),
        ("no_such_model", name, {"foreground": [[3, 3, 2]], "slice": 2}, 404, "unknown model"),
        ("sam_2d", "corrupt", {"foreground": [[3, 3, 2]], "slice": 2}, 422, "corrupt"),
        (
            "sam_2d",
            name,
            {"foreground": [[3, 3, 2]], "slice": 2, "adapter": "../x"},
            422,
            "invalid adapter version",
        ),
    ]
    for model, image, params, status, text in cases:
        with pytest.raises(module.MONAILabelClientException) as err:
            client.infer(model, image, {**base, **params})
        code, body = http_error(err.value)
        assert code == status, (model, image, params, body)
        assert text in body["detail"], body
    info = client.info()  # still serving
    assert set(info["models"]) == {"sam_2d", "sam_3d"}
    i, j, k = object_voxel(server, name)
    slicer_infer(server, "sam_2d", name, fg=[[i, j, k]], slice_index=k)


def test_saved_label_becomes_final(server):
    client = server["client"]
    before = client.datastore()["objects"]["new_case"]["labels"]
    assert "final" not in before
    res = client.save_label(
        "new_case", str(server["new_label"]), params={"label_info": [{"name": "object", "idx": 1}]}
    )
    assert res["image"] == "new_case"
    labels = client.datastore()["objects"]["new_case"]["labels"]
    assert "final" in labels
    saved = server["studies"] / "labels" / "final" / "new_case.nii.gz"
    assert saved.read_bytes() == Path(server["new_label"]).read_bytes()


def test_training_publishes_a_version_that_is_served_at_once(server):
    client = server["client"]
    if "final" not in client.datastore()["objects"]["new_case"]["labels"]:  # when run alone
        client.save_label(
            "new_case", str(server["new_label"]), params={"label_info": [{"name": "object", "idx": 1}]}
        )
    name = server["labelled"][0]
    i, j, k = object_voxel(server, name)
    box = [i - 12, i + 12, j - 12, j + 12, k, k]
    before, _, out_before = slicer_infer(server, "sam_2d", name, roi=box, slice_index=k)
    assert out_before["model_version"] == "base"
    params = {
        "epochs": 1,
        "max_steps": 16,
        "learning_rate": 0.003,
        "train_decoder": True,
        "val_fraction": 0.25,
        "val_max_items": 16,
        "batch_size": 4,
        "publish": "if_better",
    }
    task = client.train_start("sam_lora", params)
    assert task["status"] in ("SUBMITTED", "RUNNING")
    deadline = time.time() + 60
    while client.train_status(check_if_running=False)["status"] == "SUBMITTED":  # the subprocess starts
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    assert client.train_status(check_if_running=True)

    # clicks keep working while training runs: 20 requests, 4 at a time
    clicks = [(name, (i + d % 5, j + d % 3, k)) for d in range(20)]

    def click(item):
        img, (ci, cj, ck) = item
        _, _, out = slicer_infer(server, "sam_2d", img, fg=[[ci, cj, ck]], slice_index=ck)
        return out["model_version"]

    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(click, clicks))
    assert len(versions) == 20
    assert client.train_status(check_if_running=True)  # the clicks overlapped the run

    deadline = time.time() + 240
    while client.train_status(check_if_running=True):
        assert time.time() < deadline, "training did not finish in time"
        time.sleep(2)
    status = client.train_status(check_if_running=False)
    stats = client.info()["train_stats"]["sam_lora"]
    assert status["status"] == "DONE", (status, stats)
    assert stats["status"] == "DONE" and stats["published"] is True, stats
    version = stats["version"]
    assert version and stats["current_version"] == version and version in stats["versions"]
    assert stats["summary"]["best_val_dice"] > stats["summary"]["initial_val_dice"]
    # the status says why it was published, with the numbers; Dice per label by the datastore's names
    assert stats["reason"].startswith("published: the gain is at least the margin 0.005")
    assert stats["publish"]["published"] is True and stats["publish"]["gain"] >= 0.005
    assert stats["publish"]["n"] == stats["summary"]["paired"]["n"] > 0
    assert stats["summary"]["learned"] is True and stats["summary"]["verdict"].startswith("learned: ")
    assert set(stats["summary"]["val_dice_per_label"]) <= {"liver", "spleen", "kidney"}
    assert stats["summary"]["val_dice_per_label"]
    assert "new_case" in stats["cases"]  # the label saved through the client was trained on
    assert stats["total_epochs"] == 1 and "total_time" in stats

    after, img, out_after = slicer_infer(server, "sam_2d", name, roi=box, slice_index=k)
    assert out_after["model_version"] == version and out_after["embedding"] == "computed"
    assert not np.array_equal(after, before)
    assert_same_geometry(img, input_geometry(server, name))
    # the request option "adapter" = "none" serves the base model again: same answer as before
    info = client.info()
    assert version in info["models"]["sam_2d"]["config"]["adapter"]
    params = {"label": "object", "roi": box, "slice": k, "adapter": "none", "result_extension": ".nrrd"}
    params["result_dtype"] = "uint8"
    result_file, out_base = client.infer("sam_2d", name, params)
    import SimpleITK as sitk

    base_again = sitk.GetArrayFromImage(sitk.ReadImage(result_file)).transpose(2, 1, 0)
    assert out_base["model_version"] == "base"
    np.testing.assert_array_equal(base_again, before)
    # published files: the version folder and current.json, inside the app's model folder
    current = json.loads((server["app"] / "model" / "adapters" / "current.json").read_text())
    assert current["version"] == version
    assert (server["app"] / "model" / "adapters" / "versions" / version / "adapter.pt").is_file()


def test_a_stopped_run_leaves_the_served_model_as_it_was(server):
    client = server["client"]
    name = server["labelled"][0]
    i, j, k = object_voxel(server, name)
    _, _, before = slicer_infer(server, "sam_2d", name, fg=[[i, j, k]], slice_index=k)
    client.train_start("sam_lora", {"epochs": 50, "val_max_items": 4, "publish": "always"})
    deadline = time.time() + 90
    while client.info()["train_stats"]["sam_lora"].get("stage") not in ("preprocessing", "training"):
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    stopped = client.train_stop()
    assert stopped["status"] == "STOPPED"
    while client.train_status(check_if_running=True):
        assert time.time() < deadline
        time.sleep(0.2)
    deadline = time.time() + 30
    while client.info()["train_stats"]["sam_lora"]["status"] == "RUNNING":  # until the process is reaped
        assert time.time() < deadline
        time.sleep(0.2)
    stats = client.info()["train_stats"]["sam_lora"]
    assert stats["status"] == "STOPPED" and stats["current_version"] == before["model_version"]
    _, _, after = slicer_infer(server, "sam_2d", name, fg=[[i, j, k]], slice_index=k)
    assert after["model_version"] == before["model_version"]
