"""Encode ahead (issue 19): an opened image is encoded from its centre outwards; after a click, its
neighbours first and then the rest; the download route opens the image and answers as MONAI Label does."""

from __future__ import annotations

import importlib
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from sam_medical.inference.volume_slices import centre_out

APP = Path(__file__).resolve().parents[1] / "monailabel_app"


@pytest.fixture(scope="module")
def infers():
    sys.path.insert(0, str(APP))
    try:
        sam_2d = importlib.import_module("lib.infers.sam_2d")
        encode_ahead = importlib.import_module("lib.infers.encode_ahead")
    finally:
        sys.path.remove(str(APP))
    return sam_2d, encode_ahead


def test_after_a_click_the_neighbours_come_first_then_the_volume_from_its_centre(infers):
    sam_2d, _ = infers
    order = sam_2d.prefetch_order(10, 4, 100)
    assert order[:4] == [11, 9, 12, 8]
    assert order[4:8] == [50, 51, 49, 52]
    assert sorted(order) == [k for k in range(100) if k != 10]  # every other slice, once
    assert sam_2d.prefetch_order(10, 0, 100) == []  # prefetch_slices 0: no background encoding


class FakePredictor:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.done = threading.Event()

    def prefetch(self, image_key, volume, ks) -> int:
        self.calls.append((image_key, list(ks)))
        self.done.set()
        return len(self.calls[-1][1])


class FakeVolumes:
    def load(self, path):
        return f"key:{path}", SimpleNamespace(shape=(8, 8, 7)), "loaded"


def fake_served(prefetch_slices: int, predictor: FakePredictor):
    return SimpleNamespace(
        config=SimpleNamespace(prefetch_slices=prefetch_slices),
        predictor=lambda adapter=None: predictor,
        volumes=FakeVolumes(),
    )


def test_an_opened_image_is_queued_from_its_centre_outwards(infers):
    _, encode_ahead = infers
    predictor = FakePredictor()
    ahead = encode_ahead.EncodeAhead(fake_served(4, predictor))
    ahead.opened("/data/a.nii.gz")
    assert predictor.done.wait(30)
    assert predictor.calls == [("key:/data/a.nii.gz", centre_out(7))]
    encode_ahead.opened_sample(ahead, {"id": "b", "path": "/data/b.nii.gz"})  # next_sample's answer
    predictor.done.clear()
    assert predictor.done.wait(30) and predictor.calls[-1][0] == "key:/data/b.nii.gz"


def test_nothing_is_encoded_ahead_when_background_encoding_is_off(infers):
    _, encode_ahead = infers
    predictor = FakePredictor()
    ahead = encode_ahead.EncodeAhead(fake_served(0, predictor))
    ahead.opened("/data/a.nii.gz")
    assert ahead.opened_count == 0 and predictor.calls == []


def test_the_download_route_opens_the_image_and_answers_with_the_file(infers, tmp_path, monkeypatch):
    from fastapi import FastAPI
    from fastapi.responses import FileResponse
    from fastapi.testclient import TestClient
    from monailabel.config import settings
    from monailabel.endpoints import datastore as datastore_endpoints

    _, encode_ahead = infers
    image = tmp_path / "img.nii.gz"
    image.write_bytes(b"voxels")
    monkeypatch.setattr(datastore_endpoints, "download_image", lambda image_id: FileResponse(str(image)))
    opened: list[str] = []
    ahead = SimpleNamespace(opened=opened.append)
    app = FastAPI()
    assert encode_ahead.install_download_hook(ahead, app)
    client = TestClient(app)
    response = client.get(f"{settings.MONAI_LABEL_API_STR}/datastore/image", params={"image": "img"})
    assert response.status_code == 200 and response.content == b"voxels"
    assert opened == [str(image)]


def test_every_stage_of_a_click_is_timed_and_the_stages_do_not_overlap(tmp_path):
    import numpy as np
    import torch

    from sam_medical.volume.io import Volume, write_volume

    sys.path.insert(0, str(APP))
    try:
        sam_2d = importlib.import_module("lib.infers.sam_2d")
        served_mod = importlib.import_module("lib.served_model")
        settings = importlib.import_module("lib.settings")
    finally:
        sys.path.remove(str(APP))
    threads = torch.get_num_threads()
    cfg = settings.SamAppConfig.from_conf(tmp_path / "app", {"model": "tiny", "prefetch_slices": "2"})
    served = served_mod.ServedModel(cfg)
    served.load()
    torch.set_num_threads(threads)  # load() sets the serving thread's own
    arr = np.full((48, 40, 5), -1000.0, np.float32)
    arr[10:30, 8:30, :] = 50.0
    path = tmp_path / "img.nrrd"
    write_volume(arr, Volume(arr, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), path)
    task = sam_2d.Sam2D(served)
    request = {"image": str(path), "foreground": [[20, 20, 2]], "slice": 2, "result_extension": ".nrrd"}
    result, answer = task(request)
    stages = answer["latency"]
    parts = ("parse", "load", "prepare", "wait", "canvas", "encode", "decode", "map_back", "write", "queue")
    assert set(parts) | {"segment", "total"} <= set(stages)
    assert all(stages[name] >= 0 for name in parts) and stages["encode"] > 0
    assert sum(stages[name] for name in parts) <= stages["total"] + 0.002  # disjoint (4-decimal rounding)
    assert answer["embedding"] == "computed" and answer["volume"]["load"] == "loaded"
    assert served.predictor().prefetch_idle(timeout=60)
    _, again = task({**request, "foreground": [[21, 20, 2]]})
    assert again["embedding"] == "cached" and again["latency"]["encode"] == 0.0
    assert again["cache"]["prefetch"]["encoded"] == 4  # the other slices, neighbours first
    Path(result).unlink()
