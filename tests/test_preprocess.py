"""Preprocessing: windowing, canvas geometry, label policy, error paths and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from sam_medical.canvas.geometry import SliceGeometry
from sam_medical.canvas.preprocess import PreprocessOptions, preprocess_case
from sam_medical.canvas.slice_file import load_npz, read_meta
from sam_medical.cli.main import main
from sam_medical.errors import UserInputError
from sam_medical.volume.dataset_layout import find_cases
from sam_medical.volume.intensity import resolve_window

LPS = (1, 0, 0, 0, 1, 0, 0, 0, 1)
RAS = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write(
    path: Path, arr_ijk: np.ndarray, spacing=(0.8, 0.8, 3.0), direction=LPS, origin=(0.0, 0.0, 0.0)
) -> Path:
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_ijk.transpose(2, 1, 0)))
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def ct_case(tmp: Path, name="case", shape=(40, 30, 10), direction=LPS, label_dtype=np.uint8):
    """A CT-like volume with organ 1 on slices 2..5 and organ 2 on slices 4..7."""
    img = np.full(shape, -1000, np.int16)
    img[2:-2, 2:-2, :] = 40
    lab = np.zeros(shape, label_dtype)
    lab[5:15, 4:12, 2:6] = 1
    lab[20:30, 15:25, 4:8] = 2
    img[lab == 1] = 120
    img[lab == 2] = -40
    return write(tmp / f"{name}.nii.gz", img, direction=direction), write(
        tmp / "labels" / f"{name}.nii.gz", lab, direction=direction
    )


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


# --- intensity --------------------------------------------------------------------------------


def test_ct_abdomen_window_maps_level_and_edges():
    w = resolve_window(np.array([-1000.0, 0.0]), "ct")
    assert (w.lo, w.hi, w.name) == (-160.0, 240.0, "abdomen")
    out = w.apply(np.array([-1000, -160, 40, 240, 3000], np.float32))
    assert out.tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize(
    ("window", "lo", "hi"),
    [("bone", -500, 1300), ("lung", -1350, 150), ("10,100", -40, 60), ("soft_tissue", -125, 225)],
)
def test_window_presets_and_custom(window, lo, hi):
    w = resolve_window(np.zeros(3), "ct", window)
    assert (w.lo, w.hi) == (lo, hi)


def test_bad_window_is_a_user_error():
    with pytest.raises(UserInputError, match="unknown window"):
        resolve_window(np.zeros(3), "ct", "liver-ish")
    with pytest.raises(UserInputError, match="positive"):
        resolve_window(np.zeros(3), "ct", "40,-5")


def test_mr_percentile_clip_and_auto_modality():
    rng = np.random.default_rng(0)
    mr = rng.uniform(0, 1000, 100_000).astype(np.float32)
    mr[:50_000] = 0  # background is ignored for the percentiles
    w = resolve_window(mr, "auto")
    assert w.modality == "mr"
    assert w.lo == pytest.approx(np.percentile(mr[mr > 0], 0.5), rel=1e-3)
    assert w.hi == pytest.approx(np.percentile(mr[mr > 0], 99.5), rel=1e-3)
    ct = np.concatenate([np.full(1000, -1000.0), rng.normal(40, 20, 5000)])
    assert resolve_window(ct, "auto").modality == "ct"


# --- geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(60, 55), (300, 200), (256, 256), (100, 400)])
def test_resize_pad_map_back_round_trip(shape):
    g = SliceGeometry(*shape)
    h, w = g.resized_shape
    assert max(h, w) == 256
    rng = np.random.default_rng(1)
    lab = np.zeros(shape, np.uint8)
    lab[shape[0] // 4 : shape[0] // 2, shape[1] // 3 : shape[1] // 2 + 5] = 2
    canvas = g.label_to_model(lab)
    assert canvas[h:].sum() == 0 and canvas[:, w:].sum() == 0
    back = g.label_from_model(canvas)
    dice = 2 * ((back == 2) & (lab == 2)).sum() / ((back == 2).sum() + (lab == 2).sum())
    assert dice >= 0.95
    img = g.image_to_model(rng.integers(1, 255, shape, dtype=np.uint8))
    assert img.shape == (256, 256, 3) and img[h:].sum() == 0 and img[:, w:].sum() == 0
    assert np.array_equal(img[..., 0], img[..., 2])
    # a voxel's centre maps onto the canvas pixel that holds it, and back
    x, y = g.point_to_model(shape[0] // 3, shape[1] // 2)
    i, j = g.point_from_model(x, y)
    assert (round(i), round(j)) == (shape[0] // 3, shape[1] // 2)


# --- preprocessing --------------------------------------------------------------------------


@pytest.mark.parametrize("direction", [LPS, RAS])
def test_slices_follow_stored_ijk_whatever_the_orientation(tmp_path, direction):
    image, label = ct_case(tmp_path, direction=direction)
    entry = preprocess_case(image, label, tmp_path / "out")
    z = load_npz(tmp_path / "out" / "case.npz")
    assert z["slice_index"].tolist() == [2, 3, 4, 5, 6, 7]
    assert entry["orientation"] == ("LPS" if direction == LPS else "RAS")
    g = SliceGeometry(40, 30)
    # organ 1 lies at rows i 5..14, columns j 4..11 of slice k=2 in stored order: on the canvas, y ~ i, x ~ j
    ys, xs = np.nonzero(z["gts"][0] == 1)
    y0, x0 = g.point_to_model(5, 4)[::-1]
    y1, x1 = g.point_to_model(14, 11)[::-1]
    tol = g.scale / 2 + 1  # a voxel covers `scale` canvas pixels around its centre
    assert (
        abs(ys.min() - y0) <= tol
        and abs(ys.max() - y1) <= tol
        and abs(xs.min() - x0) <= tol
        and abs(xs.max() - x1) <= tol
    )
    # organ 1 is 120 HU -> bright in the abdomen window; body 40 HU -> 128
    assert z["imgs"][0][ys, xs, 0].mean() > 160
    assert z["imgs"].dtype == np.uint8 and z["imgs"].shape[1:] == (256, 256, 3)


def test_npz_keys_and_metadata_map_back(tmp_path):
    image, label = ct_case(tmp_path, shape=(40, 30, 10))
    preprocess_case(image, label, tmp_path / "out")
    z = load_npz(tmp_path / "out" / "case.npz")
    for key in (
        "imgs",
        "gts",
        "slice_index",
        "volume_shape",
        "slice_shape",
        "resized_shape",
        "scale",
        "spacing",
        "origin",
        "direction",
        "window",
        "modality",
        "label_values",
        "source_image",
        "source_label",
    ):
        assert key in z, key
    assert z["volume_shape"].tolist() == [40, 30, 10]
    assert z["slice_shape"].tolist() == [40, 30] and z["resized_shape"].tolist() == [256, 192]
    assert z["spacing"].tolist() == pytest.approx([0.8, 0.8, 3.0])
    assert z["window"].tolist() == [-160.0, 240.0] and str(z["modality"]) == "ct"
    assert z["label_values"].tolist() == [1, 2]
    meta = read_meta(tmp_path / "out" / "case.npz")
    assert meta["source_image"] == str(image.resolve()) and meta["slices_skipped_empty"] == 4
    src = sitk.GetArrayFromImage(sitk.ReadImage(str(label))).transpose(2, 1, 0)
    g = SliceGeometry(40, 30)
    for n, k in enumerate(z["slice_index"]):
        assert np.array_equal(g.label_from_model(z["gts"][n]), src[:, :, k])


def test_multilabel_selection_min_area_and_float_labels(tmp_path):
    image, label = ct_case(tmp_path, label_dtype=np.float32)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(label))).transpose(2, 1, 0)
    lab[35, 2, 3] = 3  # a one-voxel speck of label 3
    write(label, lab)
    entry = preprocess_case(image, label, tmp_path / "all")
    assert entry["labels"] == [1, 2, 3] and entry["voxel_counts"][3] == 1
    entry = preprocess_case(image, label, tmp_path / "sel", PreprocessOptions(labels=(2,)))
    z = load_npz(tmp_path / "sel" / "case.npz")
    assert (
        entry["labels"] == [2]
        and z["slice_index"].tolist() == [4, 5, 6, 7]
        and set(np.unique(z["gts"])) == {0, 2}
    )
    entry = preprocess_case(image, label, tmp_path / "area", PreprocessOptions(min_area=5))
    assert entry["labels"] == [1, 2]


def test_empty_slice_policy(tmp_path):
    image, label = ct_case(tmp_path)
    entry = preprocess_case(image, label, tmp_path / "skip")
    assert (entry["slices_kept"], entry["slices_skipped_empty"], entry["slices_kept_empty"]) == (6, 4, 0)
    entry = preprocess_case(image, label, tmp_path / "half", PreprocessOptions(keep_empty=0.5, seed=3))
    assert (entry["slices_kept"], entry["slices_skipped_empty"], entry["slices_kept_empty"]) == (8, 2, 2)
    z = load_npz(tmp_path / "half" / "case.npz")
    empties = [int(k) for n, k in enumerate(z["slice_index"]) if not z["gts"][n].any()]
    assert len(empties) == 2 and all(k in (0, 1, 8, 9) for k in empties)


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_dataset_run_writes_manifest_and_goes_on_past_a_bad_case(tmp_path, capsys):
    ds = tmp_path / "ds"
    image, label = ct_case(ds, name="good")
    (ds / "labels" / "final").mkdir(parents=True)
    label.rename(ds / "labels" / "final" / "good.nii.gz")
    bad = ds / "bad.nii.gz"
    bad.write_bytes(image.read_bytes()[:200])  # truncated
    (ds / "labels" / "final" / "bad.nii.gz").write_bytes(
        (ds / "labels" / "final" / "good.nii.gz").read_bytes()
    )
    write(ds / "nolabel.nii.gz", np.zeros((4, 4, 4), np.int16))
    code, out, err = run_cli(
        ["preprocess", "--dataset", str(ds), "--out", str(tmp_path / "out"), "--workers", "2"], capsys
    )
    assert code == 2
    assert "FAILED bad" in err and "Traceback" not in err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["layout"] == "monailabel" and manifest["unlabelled_images"] == ["nolabel"]
    assert [c["case"] for c in manifest["cases"]] == ["good"] and manifest["failed"][0]["case"] == "bad"
    assert (tmp_path / "out" / "good.npz").exists() and not (tmp_path / "out" / "bad.npz").exists()
    assert not list((tmp_path / "out").glob(".*part*"))


def test_msd_layout_is_detected(tmp_path):
    image, label = ct_case(tmp_path / "msd" / "imagesTr", name="liver_001")
    (tmp_path / "msd" / "labelsTr").mkdir()
    label.rename(tmp_path / "msd" / "labelsTr" / "liver_001.nii.gz")
    cases, layout, _ = find_cases(tmp_path / "msd")
    assert layout == "msd" and [c.name for c in cases] == ["liver_001"]


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, Path, str]]:
    image, label = ct_case(tmp)
    good_img, good_lab = str(image), str(label)
    cases = {}
    cases["missing"] = (tmp / "nope.nii.gz", label, "not found")
    trunc = tmp / "trunc.nii.gz"
    trunc.write_bytes(image.read_bytes()[:300])
    cases["truncated"] = (trunc, label, "corrupt, truncated")
    junk = tmp / "junk.nii"
    junk.write_bytes(b"this is not an image at all" * 20)
    cases["corrupt"] = (junk, label, "cannot read")
    two_d = tmp / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(two_d))
    cases["2d"] = (two_d, label, "2D")
    four_d = tmp / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3, 2), np.int16), np.eye(4)), four_d)
    cases["4d"] = (four_d, label, "4D")
    cases["shape"] = (
        Path(good_img),
        write(tmp / "small_lab.nii.gz", np.ones((10, 10, 10), np.uint8)),
        "shape",
    )
    lab = sitk.GetArrayFromImage(sitk.ReadImage(good_lab)).transpose(2, 1, 0)
    cases["spacing"] = (Path(good_img), write(tmp / "sp.nii.gz", lab, spacing=(1.0, 1.0, 1.0)), "spacing")
    cases["direction"] = (Path(good_img), write(tmp / "dir.nii.gz", lab, direction=RAS), "direction")
    cases["non_integer"] = (
        Path(good_img),
        write(tmp / "frac.nii.gz", lab.astype(np.float32) * 0.5),
        "non-integer",
    )
    nan_img = sitk.GetArrayFromImage(sitk.ReadImage(good_img)).transpose(2, 1, 0).astype(np.float32)
    nan_img[3, 3, 3] = np.nan
    cases["nan"] = (write(tmp / "nan.nii.gz", nan_img), label, "NaN")
    cases["empty_label"] = (Path(good_img), write(tmp / "empty.nii.gz", np.zeros_like(lab)), "empty")
    return cases


BAD = [
    "missing",
    "truncated",
    "corrupt",
    "2d",
    "4d",
    "shape",
    "spacing",
    "direction",
    "non_integer",
    "nan",
    "empty_label",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_gets_one_line_and_exit_2(tmp_path, capsys, kind):
    image, label, expected = _bad_inputs(tmp_path)[kind]
    code, out, err = run_cli(
        ["preprocess", "--image", str(image), "--label", str(label), "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err


def test_cli_argument_errors_exit_2(tmp_path, capsys):
    image, label = ct_case(tmp_path)
    for extra in (["--labels", "a,b"], ["--keep-empty", "1.5"], ["--window", "wide"]):
        code, _, err = run_cli(
            [
                "preprocess",
                "--image",
                str(image),
                "--label",
                str(label),
                "--out",
                str(tmp_path / "o"),
                *extra,
            ],
            capsys,
        )
        assert code == 2 and err.startswith("error:"), extra
    with pytest.raises(SystemExit) as exc:
        main(["preprocess", "--out", str(tmp_path)])
    assert exc.value.code == 2


# --- real data (optional) -----------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
@pytest.mark.parametrize("case", ["sts_ct/STS_003", "sct_t2"])
def test_real_volumes_map_back_and_keep_every_labelled_slice(tmp_path, case):
    folder = SHARED / case
    preprocess_case(folder / "image.nii.gz", folder / "label.nii.gz", tmp_path, name="c")
    z = load_npz(tmp_path / "c.npz")
    src = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label.nii.gz"))).transpose(2, 1, 0) > 0
    g = SliceGeometry(*z["slice_shape"].tolist())
    h, w = g.resized_shape
    for n, k in enumerate(z["slice_index"]):
        back = g.label_from_model(z["gts"][n]) > 0
        assert 2 * (back & src[:, :, k]).sum() / (back.sum() + src[:, :, k].sum()) >= 0.95
    counts = src.sum(axis=(0, 1))
    assert set(np.flatnonzero(counts >= 20)) <= set(z["slice_index"].tolist())
    assert z["imgs"][:, h:].sum() == 0 and z["imgs"][:, :, w:].sum() == 0


def test_cli_end_to_end_on_the_bundled_sample_volumes(tmp_path, capsys):
    samples = Path(__file__).resolve().parents[1] / "sample_volumes"
    code, out, err = run_cli(
        ["preprocess", "--dataset", str(samples), "--out", str(tmp_path), "--workers", "2"], capsys
    )
    assert code == 0, err
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["layout"] == "monailabel" and manifest["failed"] == []
    assert [c["case"] for c in manifest["cases"]] == [f"phantom_00{n}" for n in range(4)]
    for case in manifest["cases"]:
        z = load_npz(tmp_path / case["npz"])
        assert (
            case["labels"] == [1, 2, 3] and case["modality"] == "ct" and case["window"]["name"] == "abdomen"
        )
        assert (
            z["imgs"].shape == (case["slices_kept"], 256, 256, 3) and z["gts"].shape[0] == case["slices_kept"]
        )
        assert case["slices_kept"] + case["slices_skipped_empty"] == case["slices_total"]
        assert case["slices_skipped_empty"] > 0  # the organs do not reach the end slices
    assert {c["orientation"] for c in manifest["cases"]} == {"LPS", "RAS"}
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
