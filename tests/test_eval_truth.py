"""Evaluation that shows what the model adds (issue 10, item 5), and labels by name in it (item 4):
the box-fill reference, corrective clicks (``--refine``), the banner when the adapter equals the
baseline, organ names, overlay size, settings as tables. Known predictors give exact numbers."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from test_evaluation import GroundTruth, box_filler, run_eval, square, standard_case, write_case

from sam_medical.canvas.slice_file import load_npz, save_npz
from sam_medical.cli.main import main
from sam_medical.errors import UserInputError
from sam_medical.evaluation.config import PromptSettings
from sam_medical.evaluation.outputs import read_csv
from sam_medical.evaluation.report_figures import MIN_OVERLAY_PX
from sam_medical.evaluation.served_sam import ServedSam


def name_labels(path: Path, names: dict[int, str]) -> Path:
    """Record label names in a slice file, as ``sam-medical preprocess`` does."""
    arrays = load_npz(path)
    values = sorted(names)
    arrays["label_values"] = np.asarray(values, np.int64)
    arrays["label_names"] = np.asarray([names[v] for v in values])
    return save_npz(path, arrays)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "npz"
    name_labels(standard_case(folder), {1: "liver", 2: "kidney"})
    return folder


def disc_case(folder: Path, radius: int = 20) -> tuple[Path, float]:
    """One 256x256 slice with a disc (label 3); returns the file and the Dice of its filled tight box."""
    yy, xx = np.mgrid[:256, :256]
    disc = (yy - 120) ** 2 + (xx - 100) ** 2 <= radius**2
    lab = np.where(disc, 3, 0).astype(np.uint8)
    path = write_case(folder / "disc.npz", {0: lab}, (256, 256, 1), spacing=(1.0, 1.0, 1.0))
    rows, cols = np.flatnonzero(disc.any(axis=1)), np.flatnonzero(disc.any(axis=0))
    box_area = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    return path, 2 * disc.sum() / (disc.sum() + box_area)


# --- the box-fill reference ---------------------------------------------------------------------------


def test_box_fill_reference_is_the_dice_of_the_prompt_rectangle(tmp_path: Path) -> None:
    folder = tmp_path / "npz"
    _, expected = disc_case(folder)
    gt = GroundTruth(folder)
    summary = run_eval(folder, tmp_path / "perfect", gt.perfect)
    row = read_csv(tmp_path / "perfect" / "slices.csv")[0]
    assert row["box_fill_dice"] == pytest.approx(expected, abs=1e-6) and 0.7 < expected < 0.9
    assert summary["per_label"]["3"]["box_fill_slice_dice"]["mean"] == pytest.approx(expected)
    assert summary["box_fill"]["model_adds"] is True  # a perfect mask beats its box
    assert summary["per_label"]["3"]["vs_box_fill"]["mean_diff"] == pytest.approx(1 - expected)

    # a "model" that returns its prompt box adds nothing, and the summary and report say so
    summary = run_eval(folder, tmp_path / "box", box_filler, report=True)
    row = read_csv(tmp_path / "box" / "slices.csv")[0]
    assert row["dice"] == pytest.approx(row["box_fill_dice"], abs=1e-6)
    assert summary["box_fill"]["model_adds"] is False
    assert "does not beat its own prompt box" in summary["box_fill"]["verdict"]
    report = (tmp_path / "box" / "report.html").read_text()
    assert "class='warn' id='box-fill'" in report and "box-fill Dice" in report

    # point prompts have no box: no reference
    summary = run_eval(folder, tmp_path / "point", gt.perfect, prompt=PromptSettings("point"))
    assert math.isnan(read_csv(tmp_path / "point" / "slices.csv")[0]["box_fill_dice"])
    assert summary["box_fill"] is None and "box_fill_slice_dice" not in summary["overall"]


# --- corrective clicks --------------------------------------------------------------------------------


def component_predictor(gt: GroundTruth, leak: np.ndarray | None = None):
    """Predicts the ground-truth components that hold a foreground click (all of them when the prompt is
    a box), plus ``leak`` unless a background click lies in it: a model that corrections improve."""

    def fn(req):
        out = np.zeros((len(req.prompts), 256, 256), bool)
        for p, (prompt, obj) in enumerate(zip(req.prompts, req.objects, strict=True)):
            comps, _ = ndimage.label(gt.mask(obj))
            pts = (
                []
                if prompt.points is None
                else list(zip(prompt.points.tolist(), prompt.point_labels.tolist(), strict=True))
            )
            if prompt.box is not None:
                out[p] = comps > 0
            for (x, y), lab in pts:
                if lab == 1 and comps[int(y), int(x)]:
                    out[p] |= comps == comps[int(y), int(x)]
            if leak is not None and not any(lab == 0 and leak[int(y), int(x)] for (x, y), lab in pts):
                out[p] |= leak
        return out

    return fn


def test_refine_clicks_the_largest_miss_then_the_leak_and_stops_when_exact(tmp_path: Path) -> None:
    folder = tmp_path / "npz"
    lab = np.zeros((256, 256), np.uint8)
    lab[square(40, 40, 30)] = 1  # the larger part: the first click lands here
    lab[square(150, 150, 16)] = 1  # a second part of the same object: missed at first
    write_case(folder / "two.npz", {0: lab}, (256, 256, 1), spacing=(1.0, 1.0, 1.0))
    gt = GroundTruth(folder)
    summary = run_eval(
        folder, tmp_path / "pt", component_predictor(gt), prompt=PromptSettings("point", refine=3)
    )
    row = read_csv(tmp_path / "pt" / "slices.csv")[0]
    first = 2 * 900 / (900 + 900 + 256)
    steps = [float(v) for v in row["dice_steps"].split(";")]
    assert steps == pytest.approx([first, 1.0, 1.0, 1.0], abs=1e-6)
    assert row["dice"] == 1.0 and row["clicks"] == 1  # exact after one click: no more clicks
    assert row["prompt"] == "points=54,54 157,157"  # the second click: centre of the missed part
    assert summary["overall"]["refine_curve"] == pytest.approx([first, 1.0, 1.0, 1.0], abs=1e-6)
    assert summary["prompt"]["refine"] == 3

    leak = square(200, 20, 12)
    run_eval(folder, tmp_path / "box", component_predictor(gt, leak), prompt=PromptSettings("box", refine=1))
    row = read_csv(tmp_path / "box" / "slices.csv")[0]
    assert row["clicks"] == 1 and row["dice"] == 1.0
    assert row["prompt"].endswith(";points=25,205;labels=0")  # a background click in the leak
    assert float(row["dice_steps"].split(";")[0]) < 1.0


def test_refine_with_sam_encodes_each_slice_once(data: Path, tmp_path: Path) -> None:
    from sam_medical.model.build import build_sam

    sam, _ = build_sam("tiny", random_weights=True, seed=0)
    calls = {"encoder": 0, "decoder": 0}
    sam.image_encoder.register_forward_hook(lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1))
    sam.mask_decoder.transformer.register_forward_hook(
        lambda *a: calls.__setitem__("decoder", calls["decoder"] + 1)
    )
    run_eval(data, tmp_path / "out", ServedSam(sam), prompt=PromptSettings("point", refine=2))
    rows = read_csv(tmp_path / "out" / "slices.csv")
    assert calls["encoder"] == 4  # slices k=1..4 hold an object: each encoded once for all its clicks
    assert calls["decoder"] >= 4 and all(len(r["dice_steps"].split(";")) == 3 for r in rows)
    assert all(0 <= r["clicks"] <= 2 for r in rows) and any(r["clicks"] > 0 for r in rows)
    with pytest.raises(UserInputError, match="--refine"):
        PromptSettings("point", refine=-1)


# --- names, banner, report ------------------------------------------------------------------------------


def test_label_names_name_the_labels_everywhere(data: Path, tmp_path: Path) -> None:
    gt = GroundTruth(data)
    summary = run_eval(data, tmp_path / "out", gt.shifted(2), report=True, labels=("kidney",))
    assert summary["labels"] == [2] and summary["label_names"] == {"2": "kidney"}
    assert summary["per_label"]["2"]["name"] == "kidney"
    rows = read_csv(tmp_path / "out" / "slices.csv")
    assert {r["label_name"] for r in rows} == {"kidney"}
    report = (tmp_path / "out" / "report.html").read_text()
    assert "kidney (2)" in report and "<h3>kidney (2)</h3>" in report
    with pytest.raises(UserInputError, match="unknown label 'spleen'.*liver \\(1\\), kidney \\(2\\)"):
        run_eval(data, tmp_path / "o2", gt.perfect, labels=("spleen",))
    # two files that disagree on what a value is
    name_labels(standard_case(data, "b"), {1: "spleen", 2: "kidney"})
    with pytest.raises(UserInputError, match="label value 1 is 'liver' in a.npz but 'spleen' in b.npz"):
        run_eval(data, tmp_path / "o3", gt.perfect)


def test_cli_prints_names_and_box_fill(data: Path, tmp_path: Path, capsys) -> None:
    argv = ["evaluate", "--data", str(data), "--model", "tiny", "--random-weights", "--prompt", "box"]
    assert main(argv + ["--out", str(tmp_path / "o"), "--quiet", "--no-report", "--labels", "liver,2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("liver (1): slice Dice") and out[1].startswith("kidney (2): slice Dice")
    assert "box fill 1.000" in out[0]  # the squares' tight boxes are the squares
    assert any(line.startswith("box-fill reference: the prompt rectangle itself scores") for line in out)
    printed = json.loads(out[-1])
    assert printed["box_fill_dice_mean"] == 1.0 and printed["model_adds_over_box_fill"] is False


def test_report_banner_names_overlays_and_tables(data: Path, tmp_path: Path) -> None:
    gt = GroundTruth(data)
    summary = run_eval(data, tmp_path / "same", gt.shifted(3), gt.shifted(3), report=True)
    comp = summary["comparison"]
    assert comp["same_as_baseline"] is True and comp["identical_predictions"] == 6
    assert "all 6 paired objects are ties" in comp["verdict"]
    text = (tmp_path / "same" / "report.html").read_text()
    assert "<div class='banner' id='same-as-baseline'>" in text

    summary = run_eval(data, tmp_path / "diff", gt.shifted(3), gt.perfect, report=True)
    assert summary["comparison"]["same_as_baseline"] is False
    text = (tmp_path / "diff" / "report.html").read_text()
    assert "id='same-as-baseline'" not in text
    # settings and model details as tables, never raw JSON
    assert "<pre>" not in text and '{"' not in text
    settings = text[text.index("<h2>Settings</h2>") : text.index("<h2>What was counted</h2>")]
    assert settings.count("<table>") >= 3 and "liver (1)" in settings
    # every overlay is large enough to see a small organ
    from PIL import Image

    uris = re.findall(r'<figure><img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) >= 6
    for uri in uris:
        width, height = Image.open(io.BytesIO(base64.b64decode(uri))).size
        assert min(width / 2, height) >= MIN_OVERLAY_PX, (width, height)
