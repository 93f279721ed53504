"""Clicks that work after fine-tuning in the app, on real CT (optional: needs ../shared/data).

The real ``monailabel start_server`` serves LiteMedSAM on copies of three soft-tissue-sarcoma CT cases and
one held-out case. As a radiologist would through 3D Slicer's own client: labels are saved for the three
(``PUT /datastore/label``), ``sam_lora`` trains with the app's default recipe (capped in steps so that the
test stays short), the published version is served without a restart, and a click on the held-out case
segments the tumour better than before (clicks decoded directly, as training taught them).
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import SimpleITK as sitk
from slicer_harness import REPO, running_server, slicer_infer

SHARED = REPO.parent / "shared" / "data" / "sts_ct"
TRAIN = ("STS_001", "STS_003", "STS_006")
HELD_OUT = "STS_012"
STEPS = 40

pytestmark = [
    pytest.mark.shared,
    pytest.mark.server,
    pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present"),
]


def tumour_label(name: str) -> np.ndarray:
    img = sitk.ReadImage(str(SHARED / name / "label.nii.gz"))
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0) > 0


def click_dice(srv, name: str, lab: np.ndarray, slices: list[int]) -> tuple[float, set[str]]:
    """Mean Dice of one click at the tumour's interior point on each of ``slices``; the versions used."""
    from scipy import ndimage

    scores, versions = [], set()
    for k in slices:
        dist = ndimage.distance_transform_edt(lab[:, :, k])
        i, j = np.unravel_index(int(np.argmax(dist)), dist.shape)
        arr, _, out = slicer_infer(srv, "sam_2d", name, fg=[[int(i), int(j), k]], slice_index=k)
        got, want = arr[:, :, k] > 0, lab[:, :, k]
        scores.append(2 * (got & want).sum() / (got.sum() + want.sum()))
        versions.add(out["model_version"])
    return float(np.mean(scores)), versions


def test_saved_labels_train_a_version_whose_clicks_work_on_a_held_out_case(tmp_path, request):
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for name in (*TRAIN, HELD_OUT):
        shutil.copy(SHARED / name / "image.nii.gz", studies / f"{name}.nii.gz")
    lab = tumour_label(HELD_OUT)
    present = np.flatnonzero(lab.any(axis=(0, 1)))
    slices = [int(k) for k in present[:: max(1, len(present) // 6)]]

    # clicks decoded by the model itself (click_strategy direct): this test measures what training teaches;
    # by default the base model answers clicks with the click-to-box search (test_app_medsam_lite.py),
    # which on this case scored 0.451 before training and 0.486 after it (40 steps, served direct)
    conf = {"prefetch_slices": "0", "click_strategy": "direct"}
    with running_server(tmp_path, studies, conf, request) as srv:
        client = srv["client"]
        before, versions = click_dice(srv, HELD_OUT, lab, slices)
        assert versions == {"base"}

        for name in TRAIN:
            client.save_label(
                name,
                str(SHARED / name / "label.nii.gz"),
                params={"label_info": [{"name": "tumour", "idx": 1}]},
            )
        objects = client.datastore()["objects"]
        assert all("final" in objects[name]["labels"] for name in TRAIN)

        t0 = time.time()
        client.train_start("sam_lora", {"max_steps": STEPS})
        time.sleep(2)
        while client.train_status(check_if_running=True):
            assert time.time() - t0 < 900, "training did not finish in time"
            time.sleep(2)
        stats = client.info()["train_stats"]["sam_lora"]
        assert stats["status"] == "DONE" and stats["published"] is True, stats
        assert sorted(stats["cases"]) == sorted(TRAIN)

        after, versions = click_dice(srv, HELD_OUT, lab, slices)
        assert versions == {stats["version"]}  # served at the next click, no restart
        assert after > before + 0.2, (before, after)
