"""The offline demo model: committed weights that segment the bundled sample volumes from a box.

The server test starts ``monailabel start_server --conf model demo`` on the sample volumes, exactly as the
README's main command does, and draws an ROI box as 3D Slicer sends it.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from slicer_harness import REPO, running_server, slicer_infer

from sam_medical.models import DEMO_ASSET, build_sam

SAMPLES = REPO / "sample_volumes"


def label_ijk(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_demo_weights_are_committed_small_and_load():
    assert DEMO_ASSET.is_file(), "sam_medical/assets/demo_sam.pt is missing: run scripts/train_demo.py"
    assert DEMO_ASSET.stat().st_size <= 20 * 2**20
    sam, info = build_sam("demo")
    assert info["random_weights"] is False and info["name"] == "demo"
    assert sum(p.numel() for p in sam.parameters()) > 4_000_000


@pytest.mark.server
def test_demo_server_box_on_a_sample_volume_gives_dice_above_0_8(tmp_path, request):
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    name = "phantom_003"  # LPS storage, non-square 200 x 168 slices
    shutil.copy(SAMPLES / f"{name}.nii.gz", studies / f"{name}.nii.gz")
    shutil.copy(
        SAMPLES / "labels" / "final" / f"{name}.nii.gz", studies / "labels" / "final" / f"{name}.nii.gz"
    )
    truth = label_ijk(studies / "labels" / "final" / f"{name}.nii.gz")
    with running_server(tmp_path, studies, {"model": "demo", "prefetch_slices": "0"}, request) as srv:
        info = srv["client"].info()
        assert "demo" in info["models"]["sam_2d"]["description"].lower()
        assert "not a foundation model" in info["models"]["sam_2d"]["sam"]["note"].lower()
        scores = {}
        for value in (1, 2, 3):
            obj = truth == value
            k = int(np.argmax(obj.sum(axis=(0, 1))))
            ii, jj = np.nonzero(obj[:, :, k])
            roi = [int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max()), k, k]
            arr, _, out = slicer_infer(srv, "sam_2d", name, roi=roi, slice_index=k)
            assert out["model_version"] == "base"
            scores[value] = dice(arr[:, :, k] > 0, obj[:, :, k])
        assert min(scores.values()) >= 0.8, scores
