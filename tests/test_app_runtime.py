"""End to end with ``--conf runtime onnx``: the real ``monailabel start_server`` driven by 3D Slicer's own
client. The server exports the model at start (verified against PyTorch), answers clicks with masks
equal to the PyTorch model's, says which runtime serves and the export's digest in ``/info/``, loads the
export from its cache when restarted, and gives a newly published adapter its own export."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
from adapters import save_tiny_adapter
from slicer_harness import REPO, running_server, slicer_infer

from sam_medical.metrics import dice as mask_dice

pytestmark = pytest.mark.server
pytest.importorskip("onnxruntime")

CASE = "phantom_001"
CONF = {"model": "tiny", "runtime": "onnx", "prefetch_slices": "0"}


def sam_info(srv) -> dict:
    return srv["client"].info()["models"]["sam_2d"]["sam"]


def torch_mask(fg: list[int]) -> np.ndarray:
    """The same click answered in process by the PyTorch model (``tiny``, seed 0)."""
    from sam_medical.inference.caches import VolumeCache
    from sam_medical.inference.predictor import VolumePredictor
    from sam_medical.model.build import build_sam

    sam, _ = build_sam("tiny", image_size=256, seed=0)
    key, vol, _ = VolumeCache().load(REPO / "sample_volumes" / f"{CASE}.nii.gz")
    mask, info = VolumePredictor(sam, "base").segment_slice(key, vol, fg[2], [fg[:2]])
    assert info["embedding"] == "computed"
    return mask


def test_runtime_onnx_through_slicers_client(tmp_path, request):
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copy(REPO / "sample_volumes" / f"{CASE}.nii.gz", studies / f"{CASE}.nii.gz")
    app = tmp_path / "app"
    shutil.copytree(
        REPO / "monailabel_app", app, ignore=shutil.ignore_patterns("model", "logs", "__pycache__")
    )
    conf = {**CONF, "export_dir": str(tmp_path / "exports")}
    fg = [100, 84, 16]
    with running_server(tmp_path, studies, conf, request, app=app) as srv:
        runtime = sam_info(srv)["runtime"]
        assert runtime["requested"] == "onnx" and runtime["serving"] == "onnx" and runtime["state"] == "ready"
        assert runtime["source"] == "export" and runtime["verification"]["min_dice"] >= 0.999
        digest = runtime["export_digest"]
        assert (tmp_path / "exports" / digest / "manifest.json").is_file()
        arr, _, out = slicer_infer(srv, "sam_2d", CASE, fg=[fg], slice_index=fg[2])
        assert out["cache"]["engine"] == "onnx" and out["embedding"] == "computed"
        assert mask_dice(arr[:, :, fg[2]] > 0, torch_mask(fg)) >= 0.999

        # a published adapter is served at once, then from its own export
        save_tiny_adapter(tmp_path / "a.pt", nonzero_b=True)
        from sam_medical.adapters.store import ModelStore

        version = ModelStore(app / "model" / "adapters").publish(tmp_path / "a.pt")
        _, _, out = slicer_infer(srv, "sam_2d", CASE, fg=[fg], slice_index=fg[2])
        assert out["model_version"] == version
        deadline = time.time() + 300
        while (runtime := sam_info(srv)["runtime"])["state"] == "exporting" and time.time() < deadline:
            time.sleep(0.5)
        assert runtime["serving"] == "onnx" and runtime["export_digest"] != digest, runtime
        _, _, out = slicer_infer(srv, "sam_2d", CASE, fg=[fg], slice_index=fg[2])
        assert out["cache"]["engine"] == "onnx" and out["model_version"] == version

    with running_server(tmp_path, studies, conf, request, app=app) as srv:  # restarted: from the cache
        runtime = sam_info(srv)["runtime"]
        assert runtime["source"] == "cache" and runtime["serving"] == "onnx"
        assert sam_info(srv)["model_version"] == version
