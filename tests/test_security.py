"""Hostile requests against the real server (issue #11), each reproduced as it was sent.

The server (``monailabel start_server``, ``tiny`` model) runs on a datastore copied from the sample
volumes into a temporary folder. Every hostile request must get a 4xx JSON answer that says what is
wrong, the server must answer ``/info/`` afterwards, no file outside the datastore may change and no
datastore image may change (checked by SHA-256 after the whole suite, which the last tests replay).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from slicer_harness import REPO, running_server

pytestmark = pytest.mark.server

SAMPLES = REPO / "sample_volumes"
LABELLED = ("phantom_000", "phantom_001", "phantom_002")
UNLABELLED = "phantom_003"
#: Absolute targets of the hostile requests: unique, so that a leftover from another run cannot hide one.
ABS_TAG = f"{tempfile.gettempdir()}/sam_medical_hostile_{uuid.uuid4().hex[:8]}"
PROBE = Path(tempfile.gettempdir()) / f"sam_medical_probe_{uuid.uuid4().hex[:8]}.nii.gz"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def nifti_bytes(array_kji: np.ndarray, spacing=(1.0, 1.0, 1.0), like: Path | None = None) -> bytes:
    """A ``.nii.gz`` file's bytes; with ``like``, the geometry of that image."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array_kji)
    if like is not None:
        ref = sitk.ReadImage(str(like))
        img.CopyInformation(ref)
    else:
        img.SetSpacing(spacing)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.nii.gz"
        sitk.WriteImage(img, str(path), True)
        return path.read_bytes()


@pytest.fixture(scope="module")
def payloads() -> dict[str, bytes]:
    """The files the hostile requests upload."""
    import SimpleITK as sitk

    img = SAMPLES / f"{UNLABELLED}.nii.gz"
    size = sitk.ReadImage(str(img)).GetSize()
    label = np.zeros(size[::-1], np.uint8)
    label[10:14, 40:80, 40:80] = 1
    half = label.astype(np.float32) * 0.5
    nan = np.zeros((8, 8, 8), np.float32)
    nan[2, 2, 2] = np.nan
    return {
        "tiny_label": nifti_bytes(np.ones((2, 3, 4), np.uint8)),  # the 280-byte file
        "label": nifti_bytes(label, like=img),
        "label_other_spacing": nifti_bytes(label, spacing=(1.0, 1.0, 1.0)),
        "label_half_values": nifti_bytes(half, like=img),
        "image": img.read_bytes(),
        "image_2d": nifti_bytes(np.zeros((1, 16, 16), np.int16)[0]),
        "image_nan": nifti_bytes(nan),
        "garbage": b"\x1f\x8b\x08\x00 this is not a volume",
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("hostile")
    studies = tmp / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for name in (*LABELLED, UNLABELLED):
        shutil.copy(SAMPLES / f"{name}.nii.gz", studies / f"{name}.nii.gz")
    for name in LABELLED:
        shutil.copy(SAMPLES / "labels" / "final" / f"{name}.nii.gz", studies / "labels" / "final")
    shutil.copy(SAMPLES / f"{UNLABELLED}.nii.gz", PROBE)  # a real volume outside the datastore
    conf = {"model": "tiny", "prefetch_slices": "0"}
    try:
        with running_server(tmp, studies, conf, request) as srv:
            yield srv
    finally:
        PROBE.unlink(missing_ok=True)


def call(srv, method: str, path: str, case: dict | None = None, payloads: dict | None = None, **kw):
    """One HTTP request (``requests``); ``case`` holds ``query``, ``form``, ``files``, ``json``."""
    import requests

    case = case or {}
    files = {field: (filename, payloads[key]) for field, (filename, key) in (case.get("files") or {}).items()}
    return requests.request(
        method,
        srv["url"] + path,
        params=case.get("query"),
        data=case.get("form"),
        files=files or None,
        json=case.get("json"),
        timeout=120,
        **kw,
    )


def click_params(k: int = 20, **extra) -> dict:
    return {
        "label": "object",
        "foreground": [[88, 88, k]],
        "background": [],
        "slice": k,
        "result_extension": ".nrrd",
        "result_dtype": "uint8",
        **extra,
    }


def infer_case(image: str, params, **more) -> dict:
    form = {"params": params if isinstance(params, str) else json.dumps(params)}
    return {"method": "POST", "path": "/infer/sam_2d", "query": {"image": image, **more}, "form": form}


def label_case(image: str, tag: str | None, payload: str = "tiny_label") -> dict:
    query = {"image": image} if tag is None else {"image": image, "tag": tag}
    return {
        "method": "PUT",
        "path": "/datastore/label",
        "query": query,
        "form": {"params": "{}"},
        "files": {"label": ("label.nii.gz", payload)},
    }


def image_case(image: str | None, payload: str = "image", filename: str = "upload.nii.gz") -> dict:
    return {
        "method": "PUT",
        "path": "/datastore/image",
        "query": {"image": image} if image is not None else {},
        "form": {"params": "{}"},
        "files": {"file": (filename, payload)},
    }


def train_case(options: dict) -> dict:
    return {"method": "POST", "path": "/train/sam_lora", "json": options}


#: item -> [(case, expected status, words the answer must hold)]
HOSTILE: dict[str, list[tuple[dict, int, str]]] = {
    "1 paths": [
        (label_case(UNLABELLED, ".."), 422, "label tag '..' is refused"),
        (label_case(UNLABELLED, "../../x"), 422, "label tag '../../x' is refused"),
        (label_case(UNLABELLED, ABS_TAG), 422, "is refused"),
        (label_case(UNLABELLED, "fi\nnal"), 422, "control characters"),
        (label_case(UNLABELLED, "..\\..\\x"), 422, "is refused"),
        (image_case("../x"), 422, "image id '../x' is refused"),
        (image_case("/tmp/abs_image"), 422, "is refused"),
        (image_case(UNLABELLED), 409, "never replaced"),
        (image_case(None, filename="phantom_000.nii.gz"), 409, "never replaced"),
        ({"method": "DELETE", "path": "/datastore/image", "query": {"id": LABELLED[0]}}, 403, "not deleted"),
    ],
    "1 uploads": [
        (image_case("new_garbage", "garbage"), 422, "cannot read"),
        (image_case("new_flat", "image_2d"), 422, "3D volume is required"),
        (image_case("new_nan", "image_nan"), 422, "NaN"),
        (image_case("new_txt", "image", filename="scan.txt"), 422, "upload one of"),
        (label_case(UNLABELLED, "final", "label_other_spacing"), 422, "differs from image"),
        (label_case(UNLABELLED, "final", "label_half_values"), 422, "whole numbers"),
        (label_case(UNLABELLED, "final", "garbage"), 422, "cannot read"),
    ],
    "2 only datastore images": [
        (infer_case(str(PROBE), click_params()), 422, "is refused"),
        (infer_case(str(PROBE) + ".missing", click_params()), 422, "is refused"),
        (infer_case("../" + UNLABELLED, click_params()), 422, "is refused"),
        (infer_case(LABELLED[0], {**click_params(), "image": str(PROBE)}), 422, "params may not set image"),
        (infer_case(LABELLED[0], click_params(), session_id="../x"), 422, "session id '../x' is refused"),
        (infer_case(LABELLED[0], click_params(), session_id="no-such-session"), 404, "does not exist"),
    ],
    "3 no 500": [
        (infer_case(LABELLED[0], "{not json"), 422, "not valid JSON"),
        (infer_case(LABELLED[0], "[1,2,3]"), 422, "must be a JSON object"),
        (infer_case(LABELLED[0], '"hello"'), 422, "must be a JSON object"),
        (infer_case(LABELLED[0], "null"), 422, "must be a JSON object"),
        (infer_case("", click_params()), 422, "no image"),
        (label_case("no_such_case", "final", "label"), 404, "not in the datastore"),
        (
            {**label_case(UNLABELLED, "final", "label"), "form": {"params": "[1]"}},
            422,
            "must be a JSON object",
        ),
        (
            {
                "method": "PUT",
                "path": "/datastore/image/info",
                "query": {"image": LABELLED[0]},
                "form": {"info": "[]"},
            },
            422,
            "must be a JSON object",
        ),
        (
            {
                "method": "PUT",
                "path": "/datastore/image/info",
                "query": {"image": "nope"},
                "form": {"info": "{}"},
            },
            404,
            "not in the datastore",
        ),
    ],
    "4 bounded": [
        (infer_case(LABELLED[0], click_params(foreground=[[88, 88, 20]] * 5000)), 422, "at most 64"),
        (train_case({"lora_rank": 1000000}), 422, "lora_rank must be <= 64"),
        (train_case({"batch_size": 100000}), 422, "batch_size must be <= 64"),
        (train_case({"epochs": 10**9}), 422, "epochs must be <= 1000"),
    ],
    "5 train options": [
        (train_case({"epochs": -1}), 422, "epochs must be >= 1"),
        (train_case({"learning_rate": "abc"}), 422, "learning_rate must be a number"),
        (train_case({"prompt": "lasso"}), 422, "prompt must be one of"),
        (train_case({"lora_rank": -1}), 422, "lora_rank must be >= 0"),
        (train_case({"lora_rank": 0, "train_decoder": False}), 422, "nothing would train"),
        (train_case({"batch_size": 0}), 422, "batch_size must be >= 1"),
        (train_case({"val_fraction": 1.5}), 422, "val_fraction must be in [0, 1)"),
        (train_case({"publish": "sometimes"}), 422, "publish must be one of"),
        ({"method": "POST", "path": "/train/no_such_task", "json": {}}, 404, "unknown train task"),
    ],
}


def send_and_check(srv, payloads, case: dict, status: int, words: str) -> None:
    """Send ``case``; its answer must be ``status`` with JSON ``detail`` holding ``words``; /info/ answers."""
    res = call(srv, case["method"], case["path"], case, payloads)
    assert res.status_code == status, (case, res.status_code, res.text[:500])
    body = res.json()
    assert words in str(body.get("detail")), (case, body)
    assert "Traceback" not in res.text
    assert call(srv, "GET", "/info/").status_code == 200  # the server keeps serving


def run_item(srv, payloads, item: str) -> None:
    for case, status, words in HOSTILE[item]:
        send_and_check(srv, payloads, case, status, words)


def outside_snapshot(srv) -> dict[str, str]:
    """SHA-256 of every file of the test folder outside the datastore and the server's own folders."""
    tmp = srv["tmp"]
    out = {}
    for path in sorted(tmp.rglob("*")):
        rel = path.relative_to(tmp)
        if not path.is_file() or rel.parts[0] == "studies" or "__pycache__" in rel.parts:
            continue
        if rel.parts[0] == "app" and len(rel.parts) > 1 and rel.parts[1] in ("model", "logs"):
            continue
        if rel.name == "server.log":
            continue
        out[str(rel)] = sha256(path)
    return out


def assert_no_hostile_file(srv) -> None:
    tmp = srv["tmp"]
    for target in (
        tmp / "x",
        tmp / "x.nii.gz",
        tmp / "abs_image.nii.gz",
        Path(ABS_TAG),
        Path("/tmp/abs_image.nii.gz"),
    ):
        assert not target.exists(), target


# --- one test per item of the issue -----------------------------------------------------------------


def test_item1_datastore_refuses_paths_and_never_replaces_or_deletes_an_image(server, payloads):
    before = {p.name: sha256(p) for p in server["studies"].glob("*.nii.gz")}
    run_item(server, payloads, "1 paths")
    assert {p.name: sha256(p) for p in server["studies"].glob("*.nii.gz")} == before
    assert_no_hostile_file(server)
    assert not (server["studies"] / "labels" / "final" / f"{UNLABELLED}.nii.gz").exists()


def test_item1_uploads_are_checked_before_they_are_stored(server, payloads):
    listing = sorted(str(p.relative_to(server["studies"])) for p in server["studies"].rglob("*.nii.gz"))
    run_item(server, payloads, "1 uploads")
    assert (
        sorted(str(p.relative_to(server["studies"])) for p in server["studies"].rglob("*.nii.gz")) == listing
    )
    assert not [p for p in server["studies"].rglob("*") if p.name.endswith(".tmp")]  # no temporary left


def test_good_uploads_are_stored_atomically_and_segmented(server, payloads):
    """The positive side of item 1: a new image and its label are stored, byte for byte, and served."""
    res = call(server, "PUT", "/datastore/image", image_case("uploaded_case"), payloads)
    assert res.status_code == 200 and res.json() == {"image": "uploaded_case"}
    stored = server["studies"] / "uploaded_case.nii.gz"
    assert stored.read_bytes() == payloads["image"]
    res = call(server, "PUT", "/datastore/label", label_case("uploaded_case", "final", "label"), payloads)
    assert res.status_code == 200, res.text
    assert (server["studies"] / "labels" / "final" / "uploaded_case.nii.gz").read_bytes() == payloads["label"]
    res = call(server, "POST", "/infer/sam_2d", infer_case("uploaded_case", click_params()), payloads)
    assert res.status_code == 200
    datastore = json.loads((server["studies"] / "datastore_v2.json").read_text())
    assert "final" in datastore["objects"]["uploaded_case"]["labels"]


def test_item2_only_datastore_images_are_segmented(server, payloads):
    run_item(server, payloads, "2 only datastore images")
    # the answer does not tell whether a path exists
    answers = []
    for path in (str(PROBE), str(PROBE) + ".missing"):
        res = call(server, "POST", "/infer/sam_2d", infer_case(path, click_params()), payloads)
        answers.append(res.json()["detail"].replace(path, "PATH"))
    assert answers[0] == answers[1]
    # the client's own volume, uploaded with the request, is segmented (and nothing else is read)
    case = {**infer_case(LABELLED[0], click_params()), "files": {"file": ("mine.nii.gz", "image")}}
    res = call(server, "POST", "/infer/sam_2d", case, payloads)
    assert res.status_code == 200, res.text[:300]


def test_item3_malformed_requests_get_4xx_not_500(server, payloads):
    run_item(server, payloads, "3 no 500")


def test_item4_requests_are_bounded(server, payloads):
    run_item(server, payloads, "4 bounded")
    # the bound is on the count, not on valid clicks: 64 points still work
    res = call(
        server, "POST", "/infer/sam_2d", infer_case(LABELLED[0], click_params(foreground=[[88, 88, 20]] * 64))
    )
    assert res.status_code == 200


def test_item5_train_options_are_checked_before_the_run_is_accepted(server, payloads):
    def tasks() -> int:
        res = call(server, "GET", "/train/", {"query": {"all": "true"}})
        return len(res.json()) if res.status_code == 200 else 0

    before = tasks()
    run_item(server, payloads, "5 train options")
    assert tasks() == before  # nothing was submitted


def test_item5_train_status_shows_no_stack_frames():
    """``GET /train/`` filters the training process's output: a real traceback's frames are dropped."""
    import sys
    import traceback

    sys.path.insert(0, str(REPO / "monailabel_app"))
    try:
        from lib.http_guard import clean_task
    finally:
        sys.path.remove(str(REPO / "monailabel_app"))
    try:
        int("abc")
    except ValueError:
        trace = traceback.format_exc().splitlines()
    log = "[2025-01-01 10:00:00] [MainThread] [INFO] (lib.trainers.sam_lora:123) - preprocessing 4 cases"
    task = {"id": "t", "status": "ERROR", "details": [log, *trace]}
    cleaned = clean_task([task])[0]
    assert cleaned["details"] == [
        "[2025-01-01 10:00:00] [MainThread] [INFO] (lib.trainers.sam_lora) - preprocessing 4 cases",
        "ValueError: invalid literal for int() with base 10: 'abc'",
    ]
    assert task["details"][1].startswith("Traceback")  # the record itself is not changed


def _publish_tiny_adapter(server, tmp_path) -> str:
    from adapters import save_tiny_adapter

    from sam_medical.adapters.store import ModelStore

    save_tiny_adapter(tmp_path / "good.pt", nonzero_b=True)
    return ModelStore(server["app"] / "model" / "adapters").publish(tmp_path / "good.pt")


def _write_version(server, version: str, obj: dict) -> None:
    import torch

    root = server["app"] / "model" / "adapters"
    folder = root / "versions" / version
    folder.mkdir(parents=True)
    torch.save(obj, folder / "adapter.pt")
    (root / "current.json").write_text(json.dumps({"version": version, "path": str(folder / "adapter.pt")}))


def _served(server) -> tuple[int, str, str | None]:
    res = call(server, "POST", "/infer/sam_2d", infer_case(LABELLED[0], click_params()))
    info = call(server, "GET", "/info/")
    assert info.status_code == 200
    sam = info.json()["models"]["sam_2d"]["sam"]
    return res.status_code, (res.status_code == 200 and sam["model_version"]), sam["adapter_error"]


def test_item6_a_bad_adapter_never_takes_the_server_down(server, tmp_path):
    import torch

    good = _publish_tiny_adapter(server, tmp_path)
    assert _served(server) == (200, good, None)
    root = server["app"] / "model" / "adapters"
    good_current = (root / "current.json").read_text()

    obj = torch.load(root / "versions" / good / "adapter.pt", weights_only=True)
    wrong_types = {**obj, "meta": {**obj["meta"], "rank": "abc", "version": "20990101-000000-badmeta0"}}
    _write_version(server, "20990101-000000-badmeta0", wrong_types)
    status, version, error = _served(server)
    assert (status, version) == (200, good) and "20990101-000000-badmeta0" in error and "rank" in error

    nan = {**obj, "lora": {k: torch.full_like(v, float("nan")) for k, v in obj["lora"].items()}}
    nan["meta"] = {**obj["meta"], "version": "20990101-000000-nanvalue"}
    _write_version(server, "20990101-000000-nanvalue", nan)
    status, version, error = _served(server)
    assert (status, version) == (200, good) and "NaN" in error

    # /info/'s train_stats reads current.json too once a run has left its status (here: a finished one)
    status_file = server["app"] / "model" / "train" / "status.json"
    status_file.parent.mkdir(parents=True, exist_ok=True)
    status_file.write_text(json.dumps({"status": "DONE", "stage": "finished"}))
    for text in ("{not json", "[1, 2]", ""):
        (root / "current.json").write_text(text)
        status, version, error = _served(server)
        assert (status, version) == (200, good) and "current.json" in error, text
        stats = call(server, "GET", "/info/").json()["train_stats"]["sam_lora"]
        assert "current.json" in stats["current_error"] and stats["current_version"] is None
    status_file.unlink()

    (root / "current.json").write_text(good_current)
    assert _served(server) == (200, good, None)


# --- the whole suite, replayed: no 500, every image byte-identical, nothing written outside ------------


def test_item10_hostile_suite_leaves_every_image_byte_identical(server, payloads):
    originals = {f"{n}.nii.gz": sha256(SAMPLES / f"{n}.nii.gz") for n in (*LABELLED, UNLABELLED)}
    labels = {p.name: sha256(p) for p in (server["studies"] / "labels" / "final").glob("*.nii.gz")}
    outside = outside_snapshot(server)
    for item in HOSTILE:
        run_item(server, payloads, item)
    for name, digest in originals.items():
        assert sha256(server["studies"] / name) == digest, name
    assert {p.name: sha256(p) for p in (server["studies"] / "labels" / "final").glob("*.nii.gz")} == labels
    assert outside_snapshot(server) == outside
    assert_no_hostile_file(server)


def test_item10_load_50_clicks_through_a_pool_of_8_during_training(server):
    """A bounded load run: 50 clicks, 8 at a time, while a training run holds the CPU; all answered."""
    options = {"epochs": 50, "val_max_items": 4, "publish": "always"}
    res = call(server, "POST", "/train/sam_lora", train_case(options))
    assert res.status_code == 200, res.text
    deadline = time.time() + 120
    while call(server, "GET", "/info/").json()["train_stats"].get("sam_lora", {}).get("stage") != "training":
        assert time.time() < deadline, "training did not start"
        time.sleep(0.5)

    def click(n: int) -> int:
        k = 10 + n % 20
        res = call(server, "POST", "/infer/sam_2d", infer_case(LABELLED[n % 3], click_params(k=k)))
        return res.status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(click, range(50)))
    assert codes == [200] * 50
    running = call(server, "GET", "/train/", {"query": {"check_if_running": "true"}})
    assert running.status_code == 200  # the clicks were answered while the run went on
    assert call(server, "DELETE", "/train/").status_code == 200
    status = call(server, "GET", "/train/").json()
    assert status["status"] == "STOPPED"
    assert not any(line.startswith((" ", "Traceback")) for line in status.get("details", []))
