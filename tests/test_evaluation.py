"""Batch slice evaluation: exact metrics with known predictors, accounting, outputs, comparison, CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from adapters import save_tiny_adapter
from scipy.stats import wilcoxon

from sam_medical.canvas.geometry import SliceGeometry
from sam_medical.canvas.slice_file import save_npz
from sam_medical.cli.main import main
from sam_medical.errors import UserInputError
from sam_medical.evaluation.config import EvalConfig, PromptSettings
from sam_medical.evaluation.outputs import BASELINE_COLUMNS, CSV_COLUMNS, read_csv
from sam_medical.evaluation.run import evaluate
from sam_medical.evaluation.served_sam import ServedSam
from sam_medical.evaluation.summary import describe
from sam_medical.metrics import paired_comparison

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SPACING = (0.5, 2.0, 3.0)


def square(y0: int, x0: int, size: int, shape=(256, 256)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[y0 : y0 + size, x0 : x0 + size] = True
    return m


def write_case(
    path: Path,
    source_labels: dict[int, np.ndarray],
    volume_shape: tuple[int, int, int],
    spacing=SPACING,
) -> Path:
    """An .npz slice file from source slices ``{k: (I, J) uint8 label map}`` (the preprocess layout)."""
    i_size, j_size, _ = volume_shape
    geom = SliceGeometry(i_size, j_size)
    ks = sorted(source_labels)
    gts = np.stack([geom.label_to_model(source_labels[k]) for k in ks])
    rng = np.random.default_rng(0)
    imgs = np.zeros((len(ks), 256, 256, 3), np.uint8)
    for n, k in enumerate(ks):
        gray = (rng.integers(0, 60, (i_size, j_size)) + 120 * (source_labels[k] > 0)).astype(np.uint8)
        imgs[n] = geom.image_to_model(gray)
    arrays = {
        "imgs": imgs,
        "gts": gts,
        "slice_index": np.asarray(ks, np.int32),
        "volume_shape": np.asarray(volume_shape, np.int64),
        "slice_shape": np.asarray([i_size, j_size], np.int64),
        "resized_shape": np.asarray(geom.resized_shape, np.int64),
        "scale": np.float64(geom.scale),
        "spacing": np.asarray(spacing, np.float64),
        "origin": np.asarray([10.0, -5.0, 2.0]),
        "direction": np.eye(3),
        "label_values": np.asarray(
            sorted({int(v) for m in source_labels.values() for v in np.unique(m) if v})
        ),
        "meta": np.str_("{}"),
    }
    return save_npz(path, arrays)


def standard_case(folder: Path, name: str = "a") -> Path:
    """Source 256x256 slices (canvas = source): label 1 (20x20) on k=1..3, label 2 (10x10) on k=2..4,
    an empty negative at k=5; k=0 is not in the file."""
    slices = {}
    for k in range(1, 6):
        lab = np.zeros((256, 256), np.uint8)
        if k in (1, 2, 3):
            lab[square(100, 100, 20)] = 1
        if k in (2, 3, 4):
            lab[square(30, 150, 10)] = 2
        slices[k] = lab
    return write_case(folder / f"{name}.npz", slices, (256, 256, 6))


class GroundTruth:
    """Known predictors that look the ground truth up by (case, row)."""

    def __init__(self, folder: Path) -> None:
        self.gts = {p.stem: np.load(p)["gts"] for p in folder.glob("*.npz")}

    def mask(self, obj) -> np.ndarray:
        return self.gts[obj.case][obj.row] == obj.label

    def perfect(self, req):
        return np.stack([self.mask(o) for o in req.objects]), np.full(len(req.objects), 0.9)

    def shifted(self, px: int):
        def fn(req):
            return np.stack([np.roll(self.mask(o), px, axis=1) for o in req.objects])

        return fn

    def per_label(self, shifts: dict[int, int]):
        def fn(req):
            return np.stack([np.roll(self.mask(o), shifts[o.label], axis=1) for o in req.objects])

        return fn


def box_filler(req):
    """Predicts the prompt's box, filled: perfect for squares, a false positive on empty slices."""
    out = np.zeros((len(req.prompts), 256, 256), bool)
    for p, prompt in enumerate(req.prompts):
        x0, y0, x1, y1 = (int(v) for v in prompt.box)
        out[p, y0 : y1 + 1, x0 : x1 + 1] = True
    return out


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "npz"
    standard_case(folder)
    return folder


def run_eval(data: Path, out: Path, predictor, baseline=None, **kw) -> dict:
    kw.setdefault("report", False)
    return evaluate(EvalConfig(data=data, out_dir=out, model=None, **kw), predictor, baseline)


# --- exact metrics ----------------------------------------------------------------------------------


def test_perfect_predictor_scores_one_everywhere(data: Path, tmp_path: Path) -> None:
    gt = GroundTruth(data)
    summary = run_eval(data, tmp_path / "out", gt.perfect)
    rows = read_csv(tmp_path / "out" / "slices.csv")
    assert len(rows) == 6  # 3 slices of label 1 + 3 of label 2
    assert all(r["dice"] == 1.0 and r["iou"] == 1.0 for r in rows)
    assert all(r["pred_area"] == r["gt_area"] for r in rows)
    assert all(r["pred_iou"] == pytest.approx(0.9) for r in rows)
    assert {r["gt_area"] for r in rows if r["label"] == 1} == {400}
    assert {r["gt_area"] for r in rows if r["label"] == 2} == {100}
    for v in ("1", "2"):
        e = summary["per_label"][v]
        assert e["slice_dice"]["mean"] == 1.0 and e["slice_dice"]["n"] == 3
        assert e["volume_dice"]["mean"] == 1.0
        assert e["hd95_mm"]["mean"] == 0.0


def test_shifted_square_gives_exact_dice_iou_and_hd95_in_mm(data: Path, tmp_path: Path) -> None:
    gt = GroundTruth(data)
    summary = run_eval(data, tmp_path / "out", gt.shifted(4))
    rows = read_csv(tmp_path / "out" / "slices.csv")
    one = [r for r in rows if r["label"] == 1]
    two = [r for r in rows if r["label"] == 2]
    # 20x20 square moved 4 columns: overlap 16x20
    assert all(r["dice"] == pytest.approx(2 * 320 / 800, abs=1e-6) for r in one)
    assert all(r["iou"] == pytest.approx(320 / 480, abs=1e-6) for r in one)
    # 10x10 square moved 4 columns: overlap 6x10
    assert all(r["dice"] == pytest.approx(120 / 200, abs=1e-6) for r in two)
    assert all(r["iou"] == pytest.approx(60 / 140, abs=1e-6) for r in two)
    assert all(math.isnan(r["pred_iou"]) for r in rows)  # the predictor gives no IoU estimate
    vols = {v["label"]: v for v in summary["volumes"]}
    assert vols[1]["dice_3d"] == pytest.approx(0.8, abs=1e-6)
    assert vols[2]["dice_3d"] == pytest.approx(0.6, abs=1e-6)
    # 4 columns along J at 2.0 mm per column: 8 mm (would be 2 mm if the I spacing were used)
    assert vols[1]["hd95_mm"] == pytest.approx(8.0)
    assert vols[2]["hd95_mm"] == pytest.approx(8.0)
    assert summary["per_label"]["1"]["slice_dice"]["std"] == 0.0


def test_metrics_are_at_source_resolution_for_a_non_square_slice(tmp_path: Path) -> None:
    """A 128x64 source slice sits on the canvas at x2: areas are source pixels, and the bilinear map back
    of a perfect canvas mask gives Dice 1 at the source resolution."""
    folder = tmp_path / "npz"
    lab = np.zeros((128, 64), np.uint8)
    lab[20:30, 10:16] = 3  # 60 source pixels, 240 on the canvas
    lab[70:71, 40:41] = 5  # a single voxel
    write_case(folder / "c.npz", {0: lab}, (128, 64, 1), spacing=(1.0, 1.0, 1.0))
    gt = GroundTruth(folder)
    assert int((gt.gts["c"][0] == 3).sum()) == 240
    summary = run_eval(folder, tmp_path / "out", gt.perfect)
    rows = {r["label"]: r for r in read_csv(tmp_path / "out" / "slices.csv")}
    assert rows[3]["gt_area"] == 60 and rows[3]["pred_area"] == 60 and rows[3]["dice"] == 1.0
    assert rows[5]["gt_area"] == 1 and rows[5]["dice"] == 1.0
    assert summary["labels"] == [3, 5]
    # an empty prediction: Dice 0 and no HD95
    summary = run_eval(folder, tmp_path / "out2", lambda req: np.zeros((len(req.prompts), 256, 256), bool))
    assert all(v["dice_3d"] == 0.0 and v["hd95_mm"] is None for v in summary["volumes"])
    assert summary["per_label"]["3"]["volumes_without_hd95"] == 1


# --- outputs and aggregates -------------------------------------------------------------------------


def test_csv_schema_and_summary_aggregates_match_the_csv(data: Path, tmp_path: Path) -> None:
    standard_case(data, "b")
    gt = GroundTruth(data)
    # different errors per case so that the aggregates are not trivial
    summary = run_eval(data, tmp_path / "out", gt.per_label({1: 3, 2: 1}), labels=(1, 2))
    header = (tmp_path / "out" / "slices.csv").read_text().splitlines()[0].split(",")
    assert header == list(CSV_COLUMNS)
    rows = read_csv(tmp_path / "out" / "slices.csv")
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["per_label"] == summary["per_label"]
    for v in (1, 2):
        dice = np.array([r["dice"] for r in rows if r["label"] == v and r["gt_present"]])
        stats = saved["per_label"][str(v)]["slice_dice"]
        assert stats["n"] == dice.size == 6
        assert stats["mean"] == pytest.approx(dice.mean(), abs=1e-12)
        assert stats["median"] == pytest.approx(np.median(dice), abs=1e-12)
        assert stats["std"] == pytest.approx(dice.std(ddof=1), abs=1e-12)
    all_dice = np.array([r["dice"] for r in rows])
    assert saved["overall"]["slice_dice"]["mean"] == pytest.approx(all_dice.mean(), abs=1e-12)
    assert saved["overall"]["objects_scored"] == len(rows) == 12
    assert len(saved["volumes"]) == 4 and {v["case"] for v in saved["volumes"]} == {"a", "b"}
    # the prompt column is the tight box in canvas pixels (x0, y0, x1, y1), inclusive
    assert {r["prompt"] for r in rows if r["label"] == 1} == {"box=100,100,119,119"}


def test_describe_ci_is_t_based() -> None:
    d = describe([0.2, 0.4, 0.6, float("nan")])
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.4) and d["std"] == pytest.approx(0.2)
    half = 4.302652729911275 * 0.2 / math.sqrt(3)  # t(0.975, 2)
    assert d["ci95"] == pytest.approx([0.4 - half, 0.4 + half])
    assert describe([0.5])["ci95"] is None and describe([])["mean"] is None


def test_default_policy_skips_and_counts_slices_without_the_label(data: Path, tmp_path: Path) -> None:
    summary = run_eval(data, tmp_path / "out", box_filler)
    assert summary["policy"]["include_empty"] is False
    c1, c2 = summary["per_label"]["1"]["counts"], summary["per_label"]["2"]["counts"]
    assert c1["slices_in_files"] == 5 and c1["slices_not_in_files"] == 1
    assert (
        c1["slices_scored_present"] == 3
        and c1["slices_skipped_empty"] == 2
        and c1["slices_scored_empty"] == 0
    )
    assert c2["slices_scored_present"] == 3 and c2["slices_skipped_empty"] == 2
    # no false positive can be counted: the 3D Dice is that of the present slices
    assert {v["label"]: v["dice_3d"] for v in summary["volumes"]} == {1: 1.0, 2: 1.0}


def test_include_empty_prompts_from_the_nearest_labelled_slice_and_counts_false_positives(
    data: Path, tmp_path: Path
) -> None:
    summary = run_eval(data, tmp_path / "out", box_filler, include_empty=True)
    rows = read_csv(tmp_path / "out" / "slices.csv")
    empty = {(r["label"], r["slice_index"]): r for r in rows if not r["gt_present"]}
    assert set(empty) == {(1, 4), (1, 5), (2, 1), (2, 5)}
    assert {key: r["prompt_slice"] for key, r in empty.items()} == {
        (1, 4): 3,
        (1, 5): 3,
        (2, 1): 2,
        (2, 5): 4,
    }
    # the carried box is filled: a false positive, Dice 0 on an empty slice
    assert all(r["dice"] == 0.0 and r["gt_area"] == 0 and r["pred_area"] > 0 for r in empty.values())
    e1 = summary["per_label"]["1"]
    assert e1["counts"]["slices_scored_empty"] == 2 and e1["counts"]["slices_skipped_empty"] == 0
    assert e1["empty_slices"] == {
        "n": 2,
        "predicted_empty": 0,
        "with_false_positive": 2,
        "mean_false_positive_area": 400.0,
    }
    assert e1["slice_dice"]["mean"] == 1.0  # the headline stays over present slices
    assert e1["slice_dice_all"]["mean"] == pytest.approx(3 / 5)
    vols = {v["label"]: v for v in summary["volumes"]}
    assert vols[1]["dice_3d"] == pytest.approx(2 * 1200 / (2000 + 1200))  # 5 predicted squares, 3 true
    assert vols[2]["dice_3d"] == pytest.approx(2 * 300 / (500 + 300))
    # a predictor that stays empty where there is nothing scores 1 there
    gt = GroundTruth(data)
    summary = run_eval(data, tmp_path / "out2", gt.perfect, include_empty=True)
    assert summary["per_label"]["1"]["empty_slices"]["predicted_empty"] == 2
    assert summary["per_label"]["1"]["slice_dice_all"]["mean"] == 1.0


def test_prompts_are_deterministic_and_jitter_is_seeded(data: Path, tmp_path: Path) -> None:
    prompts = []
    for i, seed in enumerate((0, 0, 1)):
        run_eval(
            data,
            tmp_path / f"o{i}",
            box_filler,
            prompt=PromptSettings(kind="box+point", points=3, box_jitter=4, seed=seed),
        )
        prompts.append([r["prompt"] for r in read_csv(tmp_path / f"o{i}" / "slices.csv")])
    assert prompts[0] == prompts[1]
    assert prompts[0] != prompts[2]
    assert all(re.fullmatch(r"box=[\d,.]+;points=([\d.]+,[\d.]+ ){2}[\d.]+,[\d.]+", p) for p in prompts[0])
    # the first click is the interior point farthest from the boundary (centre of the 20x20 square)
    assert any(";points=109,109 " in p or ";points=110,110 " in p for p in prompts[0])


def test_report_is_self_contained_with_embedded_images(data: Path, tmp_path: Path) -> None:
    gt = GroundTruth(data)
    run_eval(
        data, tmp_path / "out", gt.shifted(2), gt.perfect, report=True, prompt=PromptSettings("box+point")
    )
    text = (tmp_path / "out" / "report.html").read_text()
    assert "http://" not in text and "https://" not in text
    assert "<link" not in text and "<script" not in text
    images = re.findall(r'src="(data:image/png;base64,[A-Za-z0-9+/=]+)"', text)
    # distribution + scatter + per label best/median/worst/gain/loss overlays (deduplicated)
    assert len(images) >= 2 + 2 * 3
    assert all(len(uri) > 2000 for uri in images)
    assert "Before / after comparison" in text and "What was counted" in text


def test_save_masks_writes_volumes_with_the_source_geometry(data: Path, tmp_path: Path) -> None:
    from sam_medical.volume.io import load_label

    gt = GroundTruth(data)
    summary = run_eval(data, tmp_path / "out", gt.perfect, save_masks=True)
    assert summary["outputs"]["masks"] == [str(tmp_path / "out" / "masks" / "a.nii.gz")]
    vol = load_label(tmp_path / "out" / "masks" / "a.nii.gz")
    assert vol.shape == (256, 256, 6)
    assert vol.spacing == pytest.approx(SPACING) and vol.origin == pytest.approx((10.0, -5.0, 2.0))
    expected = np.zeros((256, 256, 6), np.uint8)
    for k in (1, 2, 3):
        expected[100:120, 100:120, k] = 1
    for k in (2, 3, 4):
        expected[30:40, 150:160, k] = 2
    np.testing.assert_array_equal(vol.array, expected)


# --- comparison -------------------------------------------------------------------------------------


def test_comparison_wins_losses_ties_and_wilcoxon(data: Path, tmp_path: Path) -> None:
    gt = GroundTruth(data)
    # model: perfect on label 1, 4 px off on label 2; baseline: the reverse
    model, baseline = gt.per_label({1: 0, 2: 4}), gt.per_label({1: 4, 2: 0})
    summary = run_eval(data, tmp_path / "out", model, baseline)
    comp = summary["comparison"]["overall"]
    diffs = [0.2] * 3 + [-0.4] * 3
    assert (comp["wins"], comp["losses"], comp["ties"]) == (3, 3, 0)
    assert comp["mean_diff"] == pytest.approx(-0.1)
    assert comp["median_diff"] == pytest.approx(-0.1)
    ref = wilcoxon(diffs)
    assert comp["wilcoxon_statistic"] == pytest.approx(ref.statistic)
    assert comp["wilcoxon_p"] == pytest.approx(ref.pvalue)
    per = summary["comparison"]["per_label"]
    assert (per["1"]["wins"], per["1"]["losses"]) == (3, 0) and per["1"]["mean_diff"] == pytest.approx(0.2)
    assert (per["2"]["wins"], per["2"]["losses"]) == (0, 3) and per["2"]["mean_diff"] == pytest.approx(-0.4)
    header = (tmp_path / "out" / "slices.csv").read_text().splitlines()[0].split(",")
    assert header == list(CSV_COLUMNS) + list(BASELINE_COLUMNS)
    rows = read_csv(tmp_path / "out" / "slices.csv")
    assert all(r["dice_diff"] == pytest.approx(r["dice"] - r["baseline_dice"]) for r in rows)


def test_comparison_of_identical_predictors_is_all_ties_with_p_one(data: Path, tmp_path: Path) -> None:
    gt = GroundTruth(data)
    summary = run_eval(data, tmp_path / "out", gt.shifted(3), gt.shifted(3))
    comp = summary["comparison"]["overall"]
    assert (comp["wins"], comp["losses"], comp["ties"]) == (0, 0, 6)
    assert comp["wilcoxon_p"] == 1.0 and comp["wilcoxon_statistic"] is None and "zero" in comp["note"]


def test_paired_comparison_tie_tolerance() -> None:
    c = paired_comparison([0.5, 0.5005, 0.7, 0.1], [0.5, 0.5, 0.6, 0.3])
    assert (c["wins"], c["losses"], c["ties"]) == (1, 1, 2)
    assert c["n_nonzero"] == 3


# --- bad input --------------------------------------------------------------------------------------


def test_bad_inputs_raise_user_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no .npz"):
        run_eval(tmp_path / "empty", tmp_path / "o", box_filler)
    write_case(tmp_path / "nolab" / "z.npz", {0: np.zeros((256, 256), np.uint8)}, (256, 256, 1))
    with pytest.raises(UserInputError, match="no labels"):
        run_eval(tmp_path / "nolab", tmp_path / "o", box_filler)
    standard_case(tmp_path / "ok")
    with pytest.raises(UserInputError, match=r"label values \[7\]"):
        run_eval(tmp_path / "ok", tmp_path / "o", box_filler, labels=(1, 7))
    with pytest.raises(UserInputError, match="--prompt"):
        PromptSettings(kind="scribble")


def make_adapter(path: Path) -> Path:
    """A rank-2 adapter for tiny random weights (seed 0) whose update is not zero (seeded, so the
    adapter's effect does not depend on what the tests before it drew from torch's global generator)."""
    save_tiny_adapter(path, rank=2, nonzero_b=True)
    return path


def test_cli_bad_inputs_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    base = ["evaluate", "--model", "tiny", "--prompt", "box", "--out", str(tmp_path / "o")]
    assert main(base + ["--data", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no .npz")
    write_case(tmp_path / "nolab" / "z.npz", {0: np.zeros((256, 256), np.uint8)}, (256, 256, 1))
    assert main(base + ["--data", str(tmp_path / "nolab")]) == 2
    standard_case(tmp_path / "ok")
    assert main(base + ["--data", str(tmp_path / "ok"), "--labels", "9"]) == 2
    assert "do not occur" in capsys.readouterr().err
    # an adapter made for tiny random weights with seed 0 does not fit seed 1
    make_adapter(tmp_path / "a.pt")
    argv = base + ["--data", str(tmp_path / "ok"), "--quiet", "--device", "cpu"]
    assert main(argv + ["--adapter", str(tmp_path / "a.pt"), "--model-seed", "1"]) == 2
    assert "seed" in capsys.readouterr().err
    assert not (tmp_path / "o" / "summary.json").exists()


# --- the real model path ----------------------------------------------------------------------------


def test_sam_predictor_encodes_each_slice_once_and_batches_prompts(data: Path, tmp_path: Path) -> None:
    from sam_medical.model.build import build_sam

    sam, _ = build_sam("tiny", random_weights=True, seed=0)
    calls = {"encoder": 0, "decoder": 0}
    sam.image_encoder.register_forward_hook(lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1))
    sam.mask_decoder.transformer.register_forward_hook(
        lambda *a: calls.__setitem__("decoder", calls["decoder"] + 1)
    )
    summary = run_eval(data, tmp_path / "out", ServedSam(sam, batch_prompts=32), include_empty=True)
    # 5 slices, 2 objects each (include_empty): 5 encoder and 5 decoder calls
    assert summary["overall"]["objects_scored"] == 10
    assert calls == {"encoder": 5, "decoder": 5}
    rows = read_csv(tmp_path / "out" / "slices.csv")
    assert all(
        0.0 <= r["dice"] <= 1.0 and 0.0 <= r["iou"] <= 1.0 and math.isfinite(r["pred_iou"]) for r in rows
    )
    # batch_prompts=1: one decoder call per object, same numbers
    calls.update(encoder=0, decoder=0)
    run_eval(data, tmp_path / "out1", ServedSam(sam, batch_prompts=1), include_empty=True)
    assert calls == {"encoder": 5, "decoder": 10}
    rows1 = read_csv(tmp_path / "out1" / "slices.csv")
    assert [r["pred_area"] for r in rows1] == [r["pred_area"] for r in rows]


def test_cli_end_to_end_with_tiny_random_weights_adapter_and_baseline(
    data: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    adapter = make_adapter(tmp_path / "a.pt")
    argv = ["evaluate", "--data", str(data), "--model", "tiny", "--random-weights", "--out", str(out)]
    argv += ["--prompt", "box+point", "--points", "2", "--adapter", str(adapter), "--baseline-model", "tiny"]
    assert main(argv + ["--quiet", "--device", "cpu", "--save-masks"]) == 0
    for name in ("slices.csv", "summary.json", "report.html", "masks/a.nii.gz", "masks/a_baseline.nii.gz"):
        assert (out / name).is_file(), name
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert printed["objects"] == summary["overall"]["objects_scored"] == 6
    assert summary["model"]["name"] == "tiny" and summary["model"]["random_weights"] is True
    assert summary["model"]["adapter"]["rank"] == 2 and summary["baseline"]["adapter"] is None
    assert summary["prompt"]["kind"] == "box+point" and summary["prompt"]["points"] == 2
    comp = summary["comparison"]["overall"]
    assert comp["n"] == 6 and comp["wins"] + comp["losses"] + comp["ties"] == 6
    rows = read_csv(out / "slices.csv")
    assert len(rows) == 6 and all(0.0 <= r["dice"] <= 1.0 for r in rows)
    # the adapter changes the model: SAM's IoU estimates differ from the base model's
    assert any(abs(r["pred_iou"] - r["baseline_pred_iou"]) > 1e-6 for r in rows)
    text = (out / "report.html").read_text()
    assert "data:image/png;base64" in text and "http://" not in text and "https://" not in text


def test_cli_dataset_mode_preprocesses_raw_volumes(tmp_path: Path) -> None:
    import nibabel as nib

    root = tmp_path / "msd"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    img = np.full((40, 30, 8), -1000, np.int16)
    img[5:35, 5:25] = 40
    lab = np.zeros((40, 30, 8), np.uint8)
    lab[10:20, 8:18, 2:5] = 1
    img[lab > 0] = 120
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    nib.save(nib.Nifti1Image(img, affine), root / "imagesTr" / "v.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine), root / "labelsTr" / "v.nii.gz")
    out = tmp_path / "out"
    argv = [
        "evaluate",
        "--dataset",
        str(root),
        "--model",
        "tiny",
        "--prompt",
        "point",
        "--out",
        str(out),
        "--quiet",
        "--no-report",
    ]
    assert main(argv + ["--include-empty", "--device", "cpu"]) == 0
    assert (out / "slices" / "v.npz").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["layout"] == "msd" and summary["data"]["keep_empty"] == 1.0
    c = summary["per_label"]["1"]["counts"]
    # every slice is in the file; 3 hold the label, the 5 others are scored as empty
    assert (c["slices_not_in_files"], c["slices_scored_present"], c["slices_scored_empty"]) == (0, 3, 5)
    assert not (out / "report.html").exists()
    # a volume without labels is refused
    nib.save(nib.Nifti1Image(np.zeros_like(lab), affine), root / "labelsTr" / "v.nii.gz")
    assert main(argv + ["--device", "cpu"]) == 2


# --- real data (optional) ---------------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED / "sts_ct").is_dir(), reason="../shared/data is not present")
def test_shared_sts_cases_end_to_end(tmp_path: Path) -> None:
    from sam_medical.canvas.preprocess import preprocess_case
    from sam_medical.volume.io import load_label

    npz = tmp_path / "npz"
    for name in ("STS_002", "STS_003"):
        preprocess_case(
            SHARED / "sts_ct" / name / "image.nii.gz",
            SHARED / "sts_ct" / name / "label.nii.gz",
            npz,
            name=name,
        )
    out = tmp_path / "out"
    argv = ["evaluate", "--data", str(npz), "--model", "tiny", "--random-weights", "--out", str(out)]
    assert main(argv + ["--quiet", "--device", "cpu", "--prompt", "box"]) == 0
    rows = read_csv(out / "slices.csv")
    summary = json.loads((out / "summary.json").read_text())
    dice = np.array([r["dice"] for r in rows if r["gt_present"]])
    assert summary["per_label"]["1"]["slice_dice"]["mean"] == pytest.approx(dice.mean(), abs=1e-12)
    assert all(0.0 <= r["dice"] <= 1.0 and 0.0 <= r["iou"] <= 1.0 for r in rows)
    assert all(0.0 <= v["dice_3d"] <= 1.0 for v in summary["volumes"])
    text = (out / "report.html").read_text()
    assert text.count("data:image/png;base64") >= 4 and "https://" not in text
    # a predictor returning the canvas ground truth scores 1, and its saved masks are the expert labels
    # voxel for voxel, with the image's geometry: the map back to the source volume is exact
    gt = GroundTruth(npz)
    summary = run_eval(npz, tmp_path / "perfect", gt.perfect, save_masks=True)
    assert summary["overall"]["slice_dice"]["mean"] == 1.0 and summary["overall"]["hd95_mm"]["max"] == 0.0
    for name in ("STS_002", "STS_003"):
        lab = load_label(SHARED / "sts_ct" / name / "label.nii.gz")
        mask = load_label(tmp_path / "perfect" / "masks" / f"{name}.nii.gz", lab)
        np.testing.assert_array_equal(mask.array, lab.array)


# --- served runtime, multimask rule, sam_3d ------------------------------------------------------------


def test_runtime_onnx_and_torch_give_the_same_dice(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from sam_medical.evaluation.config import ModelSpec

    spec = ModelSpec(name="tiny", random_weights=True)
    summaries, rows = {}, {}
    for runtime in ("torch", "onnx"):
        cfg = EvalConfig(
            data=data,
            out_dir=tmp_path / runtime,
            model=spec,
            device="cpu",
            runtime=runtime,
            export_dir=tmp_path / "exports",
            prompt=PromptSettings("box+point"),
            report=False,
        )
        summaries[runtime] = evaluate(cfg)
        rows[runtime] = read_csv(tmp_path / runtime / "slices.csv")
    assert summaries["onnx"]["model"]["runtime"]["runtime"] == "onnx"
    assert summaries["torch"]["model"]["runtime"]["runtime"] == "torch"
    # random tiny weights put many logits next to 0, where fp32 rounding may flip a pixel: the Dice agree
    # to 1e-3 (the real models give identical masks, and the export is verified at mask Dice >= 0.995)
    assert len(rows["onnx"]) == len(rows["torch"]) == 6
    for a, b in zip(rows["onnx"], rows["torch"], strict=True):
        assert (a["case"], a["slice_index"], a["label"]) == (b["case"], b["slice_index"], b["label"])
        assert a["dice"] == pytest.approx(b["dice"], abs=1e-3)
    assert summaries["onnx"]["overall"]["slice_dice"]["mean"] == pytest.approx(
        summaries["torch"]["overall"]["slice_dice"]["mean"], abs=1e-3
    )
    assert (tmp_path / "exports").is_dir() and any((tmp_path / "exports").iterdir())


def test_multimask_auto_is_three_masks_for_a_lone_click_only(data: Path, tmp_path: Path, tiny_sam) -> None:
    def areas(kind: str, rule: str) -> list[float]:
        out = tmp_path / f"{kind}-{rule}"
        run_eval(data, out, ServedSam(tiny_sam, multimask=rule), prompt=PromptSettings(kind))
        return [(r["pred_area"], r["pred_iou"]) for r in read_csv(out / "slices.csv")]

    # a lone click: auto asks for SAM's three masks and keeps the best, as "on" does
    assert areas("point", "auto") == areas("point", "on") != areas("point", "off")
    # a box (and two clicks): auto decodes SAM's single mask, as "off" does
    assert areas("box", "auto") == areas("box", "off") != areas("box", "on")
    assert ServedSam(tiny_sam, multimask=True).multimask == "on"
    assert ServedSam(tiny_sam, multimask=False).multimask == "off"


def test_propagate_reports_sam_3d_dice_consistent_with_the_walk(data: Path, tmp_path: Path, tiny_sam) -> None:
    from sam_medical.canvas.slice_file import load_npz
    from sam_medical.evaluation.cases import scan_dataset
    from sam_medical.evaluation.propagated import propagate_case

    model = ServedSam(tiny_sam)
    summary = run_eval(data, tmp_path / "out", model, propagate=True, report=True)
    prop = summary["propagation"]
    assert [(e["case"], e["label"]) for e in prop["objects"]] == [("a", 1), ("a", 2)]
    assert "slices present in the .npz file" in prop["slices_scored"]
    assert prop["volume_dice"]["n"] == 2
    assert prop["volume_dice"]["mean"] == pytest.approx(np.mean([e["dice_3d"] for e in prop["objects"]]))
    # label 1 is largest on k=1 (all equal: the lowest k), label 2 on k=2
    assert [e["prompt_slice"] for e in prop["objects"]] == [1, 2]
    assert "sam_3d from one prompt" in (tmp_path / "out" / "report.html").read_text()
    # the 3D Dice by hand, over the file's 5 slices (k = 1..5), from the walk's own mask
    (case,), _ = scan_dataset([data / "a.npz"], None)
    arrays = load_npz(case.path, keys=("imgs", "gts"))
    entries = propagate_case(
        model, case, arrays["imgs"], arrays["gts"], [1, 2], PromptSettings(), keep_masks=True
    )
    for entry, reported in zip(entries, prop["objects"], strict=True):
        pred = entry["_mask"]
        truth = np.stack([arrays["gts"][r] == entry["label"] for r in range(5)], axis=-1)
        assert pred.shape == truth.shape == (256, 256, 5)
        total = pred.sum() + truth.sum()
        by_hand = 2.0 * (pred & truth).sum() / total if total else 1.0
        assert entry["dice_3d"] == pytest.approx(by_hand, abs=1e-9)  # MONAI sums in float32
        assert reported["dice_3d"] == pytest.approx(by_hand, abs=1e-9)
        assert reported["pred_voxels"] == int(pred.sum()) and reported["gt_voxels"] == int(truth.sum())


def test_bad_runtime_multimask_and_propagate_are_refused(data: Path, tmp_path: Path, capsys) -> None:
    base = [
        "evaluate",
        "--data",
        str(data),
        "--model",
        "tiny",
        "--prompt",
        "box",
        "--out",
        str(tmp_path / "o"),
    ]
    for argv, word in (
        (["--runtime", "cuda"], "--runtime must be one of auto, torch, onnx, openvino"),
        (["--multimask", "maybe"], "--multimask must be one of auto, on, off"),
    ):
        assert main(base + argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and word in err, err
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserInputError, match="multimask"):
        EvalConfig(data=data, out_dir=tmp_path / "o", multimask="sometimes")
    with pytest.raises(UserInputError, match="runtime"):
        EvalConfig(data=data, out_dir=tmp_path / "o", runtime="tpu")
    with pytest.raises(UserInputError, match="--propagate"):
        run_eval(data, tmp_path / "o", box_filler, propagate=True)
