"""The command line refuses every user mistake of issue #11 with one line and exit code 2 (no traceback,
no library internals, no output left behind), and never mixes two training runs in one folder."""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from sam_medical.cli.main import main
from sam_medical.training.config import TrainConfig
from sam_medical.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_volumes"
#: A fast run: tiny random model, 2 steps per epoch, few validation items.
FAST = ["--model", "tiny", "--random-weights", "--batch-size", "2", "--val-max-items", "4", "--quiet"]
FAST += ["--lora-rank", "4", "--no-train-decoder"]  # adapters with LoRA tensors, which these tests damage


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    """The sample volumes as slice files (what `sam-medical preprocess` writes)."""
    out = tmp_path_factory.mktemp("npz")
    assert main(["preprocess", "--dataset", str(SAMPLES), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def adapter(npz, tmp_path_factory) -> Path:
    """A trained adapter of the tiny model (the base of the damaged ones below)."""
    run = tmp_path_factory.mktemp("run") / "r"
    assert main(["train", "--data", str(npz), "--out", str(run), "--max-steps", "1", *FAST]) == 0
    return run / "adapter.pt"


def refused(capsys, argv: list[str], *words: str) -> str:
    """Run the CLI; it must exit 2 with one line on stderr, nothing on stdout, holding ``words``."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    assert out == "" and err.count("\n") == 1 and err.startswith("error: "), (out, err)
    for word in words:
        assert word in err, (word, err)
    for internal in ("Traceback", ".cxx", "sitk::", "itk::", "weights_only", "\x1b["):
        assert internal not in err, (internal, err)
    return err


# --- preprocess ---------------------------------------------------------------------------------


def test_preprocess_out_that_is_a_file_or_under_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(capsys, ["preprocess", "--dataset", str(SAMPLES), "--out", str(afile)], "is a file, not a folder")
    refused(capsys, ["preprocess", "--dataset", str(SAMPLES), "--out", str(afile / "sub")], "is a file")
    assert afile.read_text() == "x"


def test_preprocess_out_that_is_read_only(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: refuse the write as the file system would
        real = tempfile.mkstemp

        def mkstemp(*args, **kw):
            if Path(kw.get("dir", "")) == ro:
                raise PermissionError(13, "Permission denied", str(ro))
            return real(*args, **kw)

        monkeypatch.setattr("sam_medical.outdir.tempfile.mkstemp", mkstemp)
    try:
        refused(capsys, ["preprocess", "--dataset", str(SAMPLES), "--out", str(ro)], "not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_a_single_failed_case_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    image = SAMPLES / "phantom_000.nii.gz"
    refused(
        capsys,
        [
            "preprocess",
            "--image",
            str(image),
            "--label",
            str(SAMPLES / "phantom_001.nii.gz"),
            "--out",
            str(out),
        ],
        "negative values",
    )
    assert not out.exists()  # no manifest.json, no folder
    bad = tmp_path / "bad" / "labels" / "final"
    bad.mkdir(parents=True)
    for folder in (bad.parents[1], bad):
        (folder / "x.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 not a volume")
    err = refused(capsys, ["preprocess", "--dataset", str(bad.parents[1]), "--out", str(out)], "cannot read")
    assert "Unable to determine ImageIO reader" in err  # what SimpleITK said, without its source path
    assert not out.exists()


# --- train --------------------------------------------------------------------------------------


def test_train_user_mistakes(npz, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(capsys, ["train", "--data", str(npz), "--out", str(afile), *FAST], "is a file, not a folder")
    refused(capsys, ["train", "--data", str(npz), "--out", str(tmp_path / "r"), "--lr", "nan", *FAST], "--lr")
    assert not (tmp_path / "r").exists()


def test_train_resume_with_a_state_missing_keys(npz, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(npz), "--out", str(run), "--max-steps", "1", *FAST]) == 0
    capsys.readouterr()
    state = torch.load(run / "last.pt", weights_only=True)
    del state["optimizer"], state["step"]
    torch.save(state, run / "last.pt")
    argv = ["train", "--data", str(npz), "--out", str(run), "--resume", "--max-steps", "2", *FAST]
    refused(capsys, argv, "cannot resume", "incomplete", "optimizer", "step")


def test_a_run_folder_never_mixes_two_runs(npz, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data", str(npz), "--out", str(run), "--epochs", "1", "--max-steps", "2", *FAST]
    assert main(argv) == 0
    finished = json.loads((run / "summary.json").read_text())
    assert finished["steps"] == 2
    capsys.readouterr()
    # a new run into the folder of a finished one is refused, naming both ways on
    refused(capsys, argv, "already holds a training run", "--resume", "--overwrite")
    refused(capsys, [*argv, "--resume"], "nothing to resume", "complete")

    # --overwrite starts clean; killed in its first epoch, it resumes from its own first validation
    class Killed(BaseException):
        pass

    def kill(info: dict) -> None:
        raise Killed

    cfg = TrainConfig(
        data=str(npz), out=str(run), model="tiny", random_weights=True, batch_size=2, val_max_items=4,
        epochs=1, max_steps=3, overwrite=True, lora_rank=4, train_decoder=False,
    )  # fmt: skip
    with pytest.raises(Killed):
        Trainer(cfg, progress=False, on_step=kill).run()
    assert not (run / "summary.json").exists()  # the finished run's summary is gone, not kept beside
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] == 0 and state["initial_val_dice"] is not None
    resume = [
        "train",
        "--data",
        str(npz),
        "--out",
        str(run),
        "--epochs",
        "1",
        "--max-steps",
        "3",
        "--resume",
        *FAST,
    ]
    assert main(resume) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["initial_val_dice"] == state["initial_val_dice"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]  # one run's log: no line of the finished run


def test_resume_of_a_run_killed_before_its_first_validation_says_why(npz, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("")
    argv = ["train", "--data", str(npz), "--out", str(run), "--resume", *FAST]
    refused(capsys, argv, "cannot resume", "before its first validation finished", "--overwrite")


# --- evaluate -----------------------------------------------------------------------------------


def _evaluate(npz: Path, adapter: Path, out: Path) -> list[str]:
    return ["evaluate", "--data", str(npz), "--model", "tiny", "--random-weights", "--adapter", str(adapter),
            "--prompt", "box", "--out", str(out), "--quiet"]  # fmt: skip


def test_evaluate_refuses_damaged_adapters(npz, adapter, tmp_path, capsys):
    obj = torch.load(adapter, weights_only=True)
    bad_meta = tmp_path / "bad_meta.pt"
    torch.save({**obj, "meta": {**obj["meta"], "rank": "abc"}}, bad_meta)
    out = tmp_path / "eval"
    refused(capsys, _evaluate(npz, bad_meta, out), "damaged metadata", "rank 'abc'")
    nan = tmp_path / "nan.pt"
    torch.save({**obj, "lora": {k: torch.full_like(v, float("nan")) for k, v in obj["lora"].items()}}, nan)
    refused(capsys, _evaluate(npz, nan, out), "NaN")  # not an evaluation with Dice 0.0
    pickled = tmp_path / "pickled.pt"
    torch.save({**obj, "created": datetime.date(2025, 1, 1)}, pickled)
    refused(capsys, _evaluate(npz, pickled, out), "could not be read", "datetime.date")
    assert not out.exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(capsys, _evaluate(npz, adapter, afile / "sub"), "is a file")
