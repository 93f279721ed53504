"""The CT-like phantom generator (``sam_medical.quickstart.samples``) and the committed ``sample_volumes/``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from sam_medical.cli.main import main
from sam_medical.errors import UserInputError
from sam_medical.quickstart import samples
from sam_medical.quickstart.samples import (
    LABEL_NAMES,
    LPS_DIRECTION,
    ORGAN_HU,
    RAS_DIRECTION,
    SampleSpec,
    make_phantom,
)
from sam_medical.volume.io import image_stem, load_label, load_volume

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "sample_volumes"

SMALL_SHAPE = (96, 80, 24)
SMALL_SPACING = (3.5, 3.5, 5.0)
IN_PLANE = np.zeros((3, 3, 1), bool)
IN_PLANE[:, :, 0] = ndi.generate_binary_structure(2, 1)

SMALL_SPECS = (
    SampleSpec((64, 64, 16), (5.0, 5.0, 7.5), LPS_DIRECTION),
    SampleSpec((72, 60, 16), (4.5, 4.5, 7.5), RAS_DIRECTION),
)


@pytest.fixture(scope="module")
def small() -> tuple[np.ndarray, np.ndarray, dict]:
    return make_phantom(7, SMALL_SHAPE, SMALL_SPACING)


def moment_ellipsoid_iou(mask: np.ndarray, spacing) -> float:
    """IoU of a mask with the solid ellipsoid of equal second moments (1.0 for any ellipsoid or sphere)."""
    scale = np.asarray(spacing, float)
    pts = np.argwhere(mask) * scale
    mean = pts.mean(axis=0)
    inv = np.linalg.inv(np.cov(pts.T, bias=True))
    grid = np.indices(mask.shape).reshape(3, -1).T * scale - mean
    ellipsoid = (np.einsum("ni,ij,nj->n", grid, inv, grid) <= 5.0).reshape(mask.shape)  # var = r^2 / 5
    return float((ellipsoid & mask).sum() / (ellipsoid | mask).sum())


def world_centroid(label: np.ndarray, value: int, info: dict) -> np.ndarray:
    d = np.asarray(info["direction"]).reshape(3, 3)
    ijk = np.argwhere(label == value).mean(axis=0)
    return np.asarray(info["origin"]) + d @ (ijk * np.asarray(info["spacing"]))


def test_same_seed_same_arrays_other_seed_differs(small):
    image, label, info = small
    image2, label2, info2 = make_phantom(7, SMALL_SHAPE, SMALL_SPACING)
    assert np.array_equal(image, image2) and np.array_equal(label, label2)
    assert info == info2
    image3, label3, _ = make_phantom(8, SMALL_SHAPE, SMALL_SPACING)
    assert not np.array_equal(label, label3)
    assert np.mean(image != image3) > 0.5


def test_types_and_hounsfield_units(small):
    image, label, info = small
    assert image.dtype == np.int16 and label.dtype == np.uint8
    assert image.shape == label.shape == SMALL_SHAPE
    corners = np.concatenate([image[:4, :4].ravel(), image[-4:, -4:].ravel()]).astype(float)
    assert abs(corners.mean() + 1000) < 8  # air
    assert 5 < corners.std() < 25  # scanner noise
    assert 8 < info["noise_sd_hu"] < 20
    body = ndi.binary_fill_holes(image > -500)
    # subcutaneous / visceral fat: plenty of body voxels around -100 HU
    assert np.mean((image[body] > -140) & (image[body] < -50)) > 0.1
    assert image.max() > 300  # bone (unlabelled)
    for value, hu in ORGAN_HU.items():
        inner = ndi.binary_erosion(label == value, IN_PLANE, iterations=1)
        assert inner.sum() > 20
        assert abs(float(image[inner].mean()) - hu) < 12, LABEL_NAMES[value]


def test_organs_stand_out_from_their_neighbours():
    """Voxels just outside each organ differ from it by >= 40 HU (visible at L40/W400)."""
    image, label, _ = make_phantom(11, (160, 136, 20), (2.0, 2.0, 6.0))  # in-plane spacing as the samples
    smooth = ndi.gaussian_filter(image.astype(np.float32), (0.7, 0.7, 0))
    for value, hu in ORGAN_HU.items():
        mask = label == value
        ring = ndi.binary_dilation(mask, IN_PLANE, iterations=2) & ~ndi.binary_dilation(
            mask, IN_PLANE, iterations=1
        )
        assert ring.sum() > 20
        assert np.mean(np.abs(smooth[ring] - hu) < 40) < 0.05, LABEL_NAMES[value]


def test_labels_span_a_sub_range_of_slices(small):
    _, label, info = small
    assert set(np.unique(label).tolist()) == {0, *LABEL_NAMES}
    per_slice = [(label[:, :, k] > 0).any() for k in range(label.shape[2])]
    assert not per_slice[0] and not per_slice[1] and not per_slice[-1] and not per_slice[-2]
    for value, name in LABEL_NAMES.items():
        ks = np.nonzero((label == value).any(axis=(0, 1)))[0]
        assert 3 <= len(ks) < label.shape[2] - 4, name
        assert info["labels"][name]["k_range"] == [int(ks[0]), int(ks[-1])]
        assert info["labels"][name]["voxels"] == int((label == value).sum())


def test_organs_are_neither_spheres_nor_ellipsoids(small):
    _, label, _ = small
    # the measure itself: a (rotated, anisotropically sampled) ellipsoid scores ~1
    idx = np.indices(SMALL_SHAPE).astype(float) * np.asarray(SMALL_SPACING)[:, None, None, None]
    x, y, z = idx[0] - 160, idx[1] - 140, idx[2] - 60
    xr, yr = 0.8 * x + 0.6 * y, -0.6 * x + 0.8 * y
    ellipsoid = (xr / 70) ** 2 + (yr / 35) ** 2 + (z / 40) ** 2 <= 1
    assert moment_ellipsoid_iou(ellipsoid, SMALL_SPACING) > 0.95
    for value, name in LABEL_NAMES.items():
        assert moment_ellipsoid_iou(label == value, SMALL_SPACING) < 0.9, name


@pytest.mark.parametrize("direction", [LPS_DIRECTION, RAS_DIRECTION])
def test_anatomy_is_placed_in_patient_coordinates(direction):
    """Whatever the stored orientation: liver on the patient's right (LPS x < 0), spleen left, spine posterior."""
    image, label, info = make_phantom(3, (64, 56, 16), (5.0, 5.0, 7.5), direction)
    liver, spleen, kidney = (world_centroid(label, v, info) for v in (1, 2, 3))
    assert liver[0] < spleen[0] and liver[0] < kidney[0]
    centre = np.asarray(info["origin"]) + np.asarray(direction).reshape(3, 3) @ (
        np.asarray(info["spacing"]) * (np.asarray(info["shape"]) - 1) / 2
    )
    assert liver[0] < centre[0] < spleen[0]
    bone = np.argwhere(image > 300).mean(axis=0)
    bone_world = np.asarray(info["origin"]) + np.asarray(direction).reshape(3, 3) @ (
        bone * np.asarray(info["spacing"])
    )
    assert bone_world[1] > centre[1]  # posterior (+y in LPS)


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserInputError):
        make_phantom(-1, SMALL_SHAPE, SMALL_SPACING)
    with pytest.raises(UserInputError):
        make_phantom(0, (16, 16, 4), SMALL_SPACING)
    with pytest.raises(UserInputError):
        make_phantom(0, SMALL_SHAPE, (1.0, 0.0, 3.0))
    with pytest.raises(UserInputError):
        samples.make_samples(tmp_path / "x", 0, 0)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(UserInputError):
        samples.make_samples(afile, 1, 0)


@pytest.mark.parametrize("argv", [["--count", "0"], ["--count", "-3"], ["--count", "2", "--seed", "-1"]])
def test_cli_rejects_bad_count_and_seed(tmp_path, capsys, argv):
    out = tmp_path / "ds"
    assert main(["make-samples", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert not out.exists() or not list(out.glob("*.nii.gz"))


def test_cli_writes_a_monailabel_datastore(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(samples, "SAMPLE_SPECS", SMALL_SPECS)
    out = tmp_path / "ds"
    assert main(["make-samples", "--out", str(out), "--count", "3", "--seed", "5"]) == 0
    assert "wrote 3 volumes" in capsys.readouterr().out
    images = sorted(out.glob("*.nii.gz"))
    labels = sorted((out / "labels" / "final").iterdir())
    # the label names beside the volumes, as the app and preprocess read them
    assert sorted(p.name for p in out.iterdir() if p.is_file() and p not in images) == ["labels.json"]
    assert json.loads((out / "labels.json").read_text()) == {"liver": 1, "spleen": 2, "kidney": 3}
    assert [p.name for p in images] == [p.name for p in labels] == [f"phantom_00{n}.nii.gz" for n in range(3)]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["labels"]
    codes = []
    for n, (img_path, lab_path) in enumerate(zip(images, labels, strict=True)):
        vol = load_volume(img_path)
        lab = load_label(lab_path, vol)  # raises unless the geometry matches
        spec = SMALL_SPECS[n % 2]
        assert vol.shape == spec.shape and vol.spacing == spec.spacing
        assert set(np.unique(lab.array).tolist()) == {0, 1, 2, 3}
        image, label, info = make_phantom(samples.case_seed(5, n), spec.shape, spec.spacing, spec.direction)
        assert np.array_equal(vol.array, image) and np.array_equal(lab.array, label)
        assert vol.origin == tuple(info["origin"])
        codes.append(vol.orientation_code())
    assert codes == ["LPS", "RAS", "LPS"]
    # byte-identical files from the same seed; different files from another seed
    before = {p.name: p.read_bytes() for p in images}
    assert main(["make-samples", "--out", str(out), "--count", "3", "--seed", "5"]) == 0
    assert {p.name: p.read_bytes() for p in images} == before
    other = tmp_path / "other"
    assert main(["make-samples", "--out", str(other), "--count", "1", "--seed", "6"]) == 0
    assert (other / "phantom_000.nii.gz").read_bytes() != before["phantom_000.nii.gz"]


def test_committed_sample_volumes():
    images = sorted(p for p in COMMITTED.glob("*.nii.gz"))
    labels = sorted((COMMITTED / "labels" / "final").glob("*.nii.gz"))
    assert len(images) == 4 and [p.name for p in images] == [p.name for p in labels]
    assert json.loads((COMMITTED / "labels.json").read_text()) == {"liver": 1, "spleen": 2, "kidney": 3}
    assert sum(p.stat().st_size for p in COMMITTED.rglob("*") if p.is_file()) <= 10 * 1024 * 1024
    codes, shapes = set(), set()
    for img_path, lab_path in zip(images, labels, strict=True):
        vol = load_volume(img_path)
        lab = load_label(lab_path, vol)
        codes.add(vol.orientation_code())
        shapes.add(vol.shape)
        assert vol.spacing[2] > 1.2 * vol.spacing[0]  # anisotropic
        assert set(np.unique(lab.array).tolist()) == {0, 1, 2, 3}
        assert vol.array.min() >= -1024 and abs(np.median(vol.array[:3, :3]) + 1000) < 15
        assert not lab.array[:, :, 0].any() and not lab.array[:, :, -1].any()
    assert {"LPS", "RAS"} <= codes
    assert any(s[0] != s[1] for s in shapes)
    # the committed files are what the code makes: regenerate one (tolerant to last-bit float differences)
    n = 1
    spec = samples.SAMPLE_SPECS[n]
    image, label, _ = make_phantom(samples.case_seed(0, n), spec.shape, spec.spacing, spec.direction)
    vol = load_volume(images[n])
    assert image_stem(images[n]) == samples.sample_name(n)
    assert vol.shape == spec.shape and vol.spacing == spec.spacing
    assert np.mean(load_label(labels[n]).array != label) < 1e-4
    assert np.mean(vol.array != image) < 1e-3


@pytest.mark.parametrize(
    ("args", "image_sha", "label_sha"),
    [
        (
            (7, (64, 48, 12), (1.875, 1.875, 3.0), LPS_DIRECTION, (1.0, 2.0, 3.0)),
            "5efb6fce39287307fe20893f879630561e59c669cc6b49461775915ba2c60980",
            "18c8138595b15c0874daebd1828841c556d9ada1b2b6b0df734d4d9ad3c1adc1",
        ),
        (
            (samples.case_seed(0, 0), (176, 176, 40), (1.875, 1.875, 3.0), LPS_DIRECTION),
            "5bdb792114e2599af15d0cbe38eee54817fc37d04bd91ebf5892988d72fb4d8e",
            "d0cf0360eda8ba6414c11da2fa046a83344c94ec161c3befd6a922debf0746ba",
        ),
    ],
)
def test_phantom_arrays_are_pinned(args, image_sha, label_sha):
    """The exact bytes the phantom maker gave before it was split into functions (a refactoring guard;
    float32 maths on another CPU or NumPy build may differ in the last bit, see the committed-files test)."""
    image, label, _ = make_phantom(*args)
    assert hashlib.sha256(image.tobytes()).hexdigest() == image_sha
    assert hashlib.sha256(label.tobytes()).hexdigest() == label_sha
