"""The Slicer workflow on real CT the models never saw (optional: needs ../shared/data).

The real ``monailabel start_server`` with LiteMedSAM serves three soft-tissue-sarcoma CT volumes
(float32 HU, LPS storage, non-square slices) to 3D Slicer's own client: click, cached click, ROI box,
``sam_3d``, a label saved from "Slicer", and bad requests after which the server still answers. (Training
on real CT through the app is ``test_app_finetune_real_ct.py``.)
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from slicer_harness import REPO, http_error, running_server, slicer_infer

SHARED = REPO.parent / "shared" / "data" / "sts_ct"
CASES = ("STS_010", "STS_012", "STS_014")

pytestmark = [
    pytest.mark.shared,
    pytest.mark.server,
    pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("real_ct")
    studies = tmp / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for name in CASES:
        shutil.copy(SHARED / name / "image.nii.gz", studies / f"{name}.nii.gz")
    for name in CASES[:2]:  # the third is labelled through the client
        shutil.copy(SHARED / name / "label.nii.gz", studies / "labels" / "final" / f"{name}.nii.gz")
    with running_server(tmp, studies, {"model": "medsam_lite", "prefetch_slices": "2"}, request) as srv:
        yield srv


def tumour_voxel(name: str) -> tuple[int, int, int, np.ndarray]:
    from scipy import ndimage

    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(SHARED / name / "label.nii.gz"))).transpose(2, 1, 0) > 0
    k = int(np.argmax(lab.sum(axis=(0, 1))))
    dist = ndimage.distance_transform_edt(lab[:, :, k])
    i, j = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(i), int(j), k, lab


def geometry(img) -> tuple:
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def test_clicks_boxes_3d_labels_training_and_bad_requests_on_real_ct(server):
    client = server["client"]
    info = client.info()
    assert info["models"]["sam_2d"]["type"] == "deepgrow" and info["models"]["sam_2d"]["dimension"] == 2
    name = CASES[0]
    source = sitk.ReadImage(str(server["studies"] / f"{name}.nii.gz"))
    i, j, k, lab = tumour_voxel(name)

    # base LiteMedSAM was trained with boxes only: a click answers (on slice k only), but is no tumour
    arr, img, out = slicer_infer(server, "sam_2d", name, fg=[[i, j, k]], slice_index=k)
    assert geometry(img)[0] == geometry(source)[0]
    for got, want in zip(geometry(img)[1:], geometry(source)[1:], strict=True):  # spacing, origin, direction
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert set(arr.any(axis=(0, 1)).nonzero()[0].tolist()) <= {k}
    assert out["embedding"] == "computed"
    arr2, _, out2 = slicer_infer(server, "sam_2d", name, fg=[[i, j, k]], bg=[[0, 0, k]], slice_index=k)
    assert out2["embedding"] == "cached" and set(arr2.any(axis=(0, 1)).nonzero()[0].tolist()) <= {k}

    ii, jj = np.nonzero(lab[:, :, k])
    roi = [
        int(ii.max()),
        int(ii.min()),
        int(jj.min()),
        int(jj.max()),
        k,
        k,
    ]  # min/max unordered, as Slicer may send
    box_mask, _, out_box = slicer_infer(server, "sam_2d", name, roi=roi, slice_index=k)
    inside = box_mask[:, :, k] > 0
    assert out_box["model_version"] == "base"
    assert 2 * (inside & lab[:, :, k]).sum() / (inside.sum() + lab[:, :, k].sum()) > 0.6  # the tumour

    vol, img3, out3 = slicer_infer(
        server, "sam_3d", name, roi=[int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max()), k, k]
    )
    assert geometry(img3)[0] == geometry(source)[0]
    assert len(vol.any(axis=(0, 1)).nonzero()[0]) > 1  # propagated beyond the prompted slice

    for params in ({"foreground": [[i, j, 999]]}, {"foreground": [[-5, j, k]]}, {"foreground": []}):
        full = {
            "label": "object",
            "background": [],
            "slice": k,
            "result_extension": ".nrrd",
            "result_dtype": "uint8",
            **params,
        }
        with pytest.raises(server["module"].MONAILabelClientException) as exc:
            client.infer("sam_2d", name, full)
        status, body = http_error(exc.value)
        assert 400 <= status < 500 and body
    assert client.info()["models"]["sam_2d"]

    new = CASES[2]
    client.save_label(
        new, str(SHARED / new / "label.nii.gz"), params={"label_info": [{"name": "object", "idx": 1}]}
    )
    assert "final" in client.datastore()["objects"][new]["labels"]
