"""Training that tells the truth (issue 10, item 3): the verdict, Dice per label by name, the paired
publish rule, and a run's ``last.pt`` accepted wherever an adapter is.

Every run uses the ``tiny`` model with random weights on small synthetic slice files whose labels are
named (``disc`` 1, ``square`` 2), as ``sam-medical preprocess`` records names.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import LORA_ARGS, _cfg, write_case

from sam_medical.adapters.files import ADAPTER_FORMAT, CONVERTED_FROM_STATE, read_adapter_meta
from sam_medical.adapters.inject import is_lora_injected
from sam_medical.adapters.save_and_load import load_adapter
from sam_medical.adapters.store import ModelStore
from sam_medical.canvas.slice_file import load_npz, save_npz
from sam_medical.cli.main import main as cli_main
from sam_medical.errors import UserInputError
from sam_medical.model.build import build_sam
from sam_medical.training.config import TrainConfig
from sam_medical.training.outcome import NOISE_MARGIN, PublishRule, publish_decision, verdict
from sam_medical.training.trainer import Trainer, train

NAMES = {1: "disc", 2: "square"}


def named_case(path: Path, n: int, seed: int) -> Path:
    """``test_training.write_case`` plus the label names that preprocess records."""
    write_case(path, n, seed)
    arrays = load_npz(path)
    arrays["label_values"] = np.array([1, 2], np.int64)
    arrays["label_names"] = np.array([NAMES[1], NAMES[2]])
    return save_npz(path, arrays)


@pytest.fixture(scope="module")
def named_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("named")
    for c in range(4):
        named_case(d / f"case{c}.npz", 4, seed=c)  # 6 items per case; 1 case for validation
    return d


def cfg(data: Path, out: Path, **kw) -> TrainConfig:
    """``test_training``'s tiny-model settings, 4 items per batch."""
    return _cfg(data, out, **{"batch_size": 4, **kw})


# --- the verdict --------------------------------------------------------------------------------------


def test_verdict_says_plainly_whether_any_epoch_beat_the_start() -> None:
    learned, text = verdict(
        initial=0.941, best=0.941, best_epoch=0, final=0.93, stopped_early=False, steps=20, val_on_train=False
    )
    assert learned is False
    assert text.startswith("nothing learned: best epoch 0, validation Dice 0.941 -> 0.941")
    assert "adapter.pt is the starting model" in text and "last epoch 0.930" in text
    learned, text = verdict(
        initial=0.9, best=0.9, best_epoch=0, final=None, stopped_early=True, steps=3, val_on_train=True
    )
    assert not learned and "stopped at step 3, before the first epoch was validated" in text
    assert "validated on the training cases" in text
    learned, text = verdict(
        initial=0.5, best=0.50005, best_epoch=2, final=0.5, stopped_early=False, steps=9, val_on_train=False
    )
    assert learned and text.startswith("learned: best epoch 2") and f"below {NOISE_MARGIN}" in text


def test_a_run_that_learns_nothing_says_so_in_summary_and_last_cli_line(
    named_dir: Path, tmp_path: Path, capsys
):
    out = tmp_path / "run"
    # a learning rate so small that no weight moves: every epoch validates exactly as the start
    argv = ["train", "--data", str(named_dir), "--out", str(out), "--model", "tiny", "--random-weights"]
    argv += [
        "--epochs",
        "2",
        "--lr",
        "1e-30",
        "--batch-size",
        "4",
        "--val-fraction",
        "0.25",
        "--quiet",
        *LORA_ARGS,
    ]
    assert cli_main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_epoch"] == 0 and summary["learned"] is False
    assert lines[-1] == summary["verdict"]
    assert lines[-1].startswith(
        f"nothing learned: best epoch 0, validation Dice {summary['initial_val_dice']:.3f} -> "
        f"{summary['best_val_dice']:.3f}"
    )
    printed = json.loads(lines[-2])
    assert printed["learned"] is False and printed["verdict"] == summary["verdict"]
    assert summary["paired"] is None and summary["val_dice_gain"] == 0.0
    # Dice per label, by the names the slice files carry
    assert set(summary["val_dice_per_label"]) == {"disc", "square"}
    assert summary["label_names"] == {"1": "disc", "2": "square"}
    assert summary["initial_val_dice_per_label"] == summary["val_dice_per_label"]

    # evaluating that adapter against the base model: all ties, and the report and CLI say why
    ev = tmp_path / "eval"
    argv = ["evaluate", "--data", str(named_dir), "--model", "tiny", "--random-weights", "--prompt", "box"]
    argv += ["--adapter", str(out / "adapter.pt"), "--baseline-model", "tiny", "--out", str(ev), "--quiet"]
    assert cli_main(argv + ["--device", "cpu", "--labels", "disc"]) == 0
    text = capsys.readouterr().out
    assert "SAME AS BASELINE" in text and "epoch 0" in text and "learned nothing" in text
    assert "disc (1): slice Dice" in text
    report = (ev / "report.html").read_text()
    assert "id='same-as-baseline'" in report and "The adapter adds nothing here" in report


def test_a_run_stopped_before_its_first_epoch_says_nothing_was_learned(named_dir: Path, tmp_path: Path):
    stop = threading.Event()
    trainer = Trainer(
        cfg(named_dir, tmp_path / "run", epochs=3, lr=1e-2), progress=False, stop_event=stop,
        on_step=lambda info: stop.set(),
    )  # fmt: skip
    summary = trainer.run()
    assert summary["stopped_early"] and summary["best_epoch"] == 0 and summary["learned"] is False
    assert summary["verdict"].startswith("nothing learned: best epoch 0")
    assert "stopped at step 1, before the first epoch was validated" in summary["verdict"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["learned"] is False


def test_a_run_that_learns_reports_the_paired_gain_and_dice_per_label(named_dir: Path, tmp_path: Path):
    summary = train(cfg(named_dir, tmp_path / "run", epochs=2, lr=5e-3, train_decoder=True), progress=False)
    assert summary["learned"] is True and summary["best_epoch"] > 0
    assert summary["verdict"].startswith(f"learned: best epoch {summary['best_epoch']}")
    paired = summary["paired"]
    assert paired["n"] == summary["val_items"] == 6
    # the item-by-item scores reproduce the trainer's own validation means
    assert paired["mean_initial"] == pytest.approx(summary["initial_val_dice"], abs=1e-5)
    assert paired["mean_best"] == pytest.approx(summary["best_val_dice"], abs=1e-5)
    assert paired["mean_diff"] == pytest.approx(summary["val_dice_gain"], abs=1e-5)
    assert paired["wins"] + paired["losses"] + paired["ties"] == 6 and paired["wilcoxon_p"] is not None
    assert "one-sided" in paired["test"]
    assert set(summary["val_dice_per_label"]) == {"disc", "square"}
    assert summary["val_dice_per_label"] != summary["initial_val_dice_per_label"]


# --- publishing ---------------------------------------------------------------------------------------


def _summary(initial: float, best: float, diffs: list[float] | None, best_epoch: int = 3) -> dict:
    from sam_medical.metrics import paired_comparison

    out = {"initial_val_dice": initial, "best_val_dice": best, "best_epoch": best_epoch, "val_items": 40}
    out["learned"] = best_epoch > 0 and best > initial
    if diffs is not None:
        out["paired"] = paired_comparison([0.5 + d for d in diffs], [0.5] * len(diffs), alternative="greater")
    return out


def test_if_better_publishes_only_a_gain_that_means_something() -> None:
    rule = PublishRule()
    # the case: a gain of 0.00005 was published
    tiny = publish_decision(_summary(0.9, 0.90005, [0.00005] * 40), "if_better", rule)
    assert tiny["published"] is False and "below the margin 0.005" in tiny["reason"]
    assert tiny["gain"] == pytest.approx(0.00005) and tiny["n"] == 40
    # a gain above the margin, but carried by a few items: not significant
    noisy = publish_decision(
        _summary(0.9, 0.91, [0.3, 0.3, -0.2, -0.2, 0.01, -0.01, 0.0, 0.0]), "if_better", rule
    )
    assert noisy["published"] is False and "not significant at alpha 0.05" in noisy["reason"]
    assert noisy["p_value"] > 0.05 and "p = " in noisy["reason"]
    # a consistent gain: published, and the reason gives the numbers
    good = publish_decision(_summary(0.8, 0.85, [0.05] * 12), "if_better", rule)
    assert good["published"] is True and good["p_value"] < 0.05
    assert "0.8000 -> 0.8500" in good["reason"] and "12 items" in good["reason"]
    # too few paired items for a test: the margin alone decides, and the reason says so
    few = publish_decision(_summary(0.8, 0.85, [0.05] * 3), "if_better", rule)
    assert few["published"] is True and "fewer than 6 items" in few["reason"]
    # nothing learned
    none = publish_decision(_summary(0.8, 0.8, None, best_epoch=0), "if_better", rule)
    assert none["published"] is False and "nothing learned" in none["reason"]
    # always publishes, still with the numbers
    always = publish_decision(_summary(0.8, 0.8, None, best_epoch=0), "always", rule)
    assert always["published"] is True and "publish=always" in always["reason"]
    # the rule is configurable
    loose = publish_decision(_summary(0.9, 0.90005, [0.00005] * 40), "if_better", PublishRule(margin=0.0))
    assert loose["published"] is True
    with pytest.raises(UserInputError, match="publish_alpha"):
        PublishRule(alpha=0.0)


# --- last.pt is an adapter ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(named_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    train(cfg(named_dir, out, epochs=1, lr=5e-3, train_decoder=True), progress=False)
    return out


def test_last_pt_loads_as_the_adapter_of_the_last_step(trained: Path) -> None:
    state = torch.load(trained / "last.pt", weights_only=True)
    meta = read_adapter_meta(trained / "last.pt")
    assert meta["rank"] == 4 and meta["train_decoder"] is True and meta["epoch"] == state["epoch"]
    assert meta["converted_from"] == CONVERTED_FROM_STATE
    assert read_adapter_meta(trained / "last.pt")["version"] == meta["version"]  # stable id
    sam, info = build_sam("tiny", random_weights=True, seed=0)
    load_adapter(sam, trained / "last.pt", base_info=info)
    params = dict(sam.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in state["trainable"].items())
    # made for another base model: refused like any adapter
    other, other_info = build_sam("tiny", random_weights=True, seed=3)
    with pytest.raises(UserInputError, match="seed"):
        load_adapter(other, trained / "last.pt", base_info=other_info)


def test_last_pt_works_for_evaluate_train_init_and_publish(
    named_dir: Path, trained: Path, tmp_path: Path, capsys
) -> None:
    argv = ["evaluate", "--data", str(named_dir), "--model", "tiny", "--random-weights", "--prompt", "box"]
    argv += [
        "--adapter",
        str(trained / "last.pt"),
        "--out",
        str(tmp_path / "ev"),
        "--quiet",
        "--device",
        "cpu",
    ]
    assert cli_main(argv + ["--no-report"]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["model"]["adapter"]["converted_from"] == CONVERTED_FROM_STATE

    run = train(
        cfg(
            named_dir,
            tmp_path / "again",
            max_steps=1,
            train_decoder=True,
            adapter_init=str(trained / "last.pt"),
        ),
        progress=False,
    )
    assert run["steps"] == 1 and read_adapter_meta(tmp_path / "again" / "adapter.pt")["train_decoder"]

    store = ModelStore(tmp_path / "store")
    version = store.publish(trained / "last.pt", {"note": "from last.pt"})
    stored = torch.load(store.path_of(version), weights_only=True)
    assert stored["format"] == ADAPTER_FORMAT and "optimizer" not in stored  # a plain adapter file
    assert read_adapter_meta(store.path_of(version))["version"] == version


def test_damaged_last_pt_is_refused_in_one_line(
    named_dir: Path, trained: Path, tmp_path: Path, capsys
) -> None:
    state = torch.load(trained / "last.pt", weights_only=True)
    nan = {**state, "trainable": {k: torch.full_like(v, float("nan")) for k, v in state["trainable"].items()}}
    torch.save(nan, tmp_path / "nan.pt")
    with pytest.raises(UserInputError, match="NaN or infinite"):
        read_adapter_meta(tmp_path / "nan.pt")
    torch.save({**state, "identity": {**state["identity"], "rank": "four"}}, tmp_path / "meta.pt")
    with pytest.raises(UserInputError, match="damaged metadata: rank 'four'"):
        read_adapter_meta(tmp_path / "meta.pt")
    torch.save({k: v for k, v in state.items() if k != "identity"}, tmp_path / "noid.pt")
    with pytest.raises(UserInputError, match="no model identity"):
        read_adapter_meta(tmp_path / "noid.pt")
    argv = ["evaluate", "--data", str(named_dir), "--model", "tiny", "--random-weights", "--prompt", "box"]
    assert cli_main(argv + ["--adapter", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NaN" in err[0]


def test_decoder_only_last_pt_is_a_rank_0_adapter(named_dir: Path, tmp_path: Path) -> None:
    train(cfg(named_dir, tmp_path / "dec", max_steps=1, lora_rank=0, train_decoder=True), progress=False)
    meta = read_adapter_meta(tmp_path / "dec" / "last.pt")
    assert meta["rank"] == 0 and meta["blocks"] == [] and meta["train_decoder"] is True
    sam, info = build_sam("tiny", random_weights=True, seed=0)
    load_adapter(sam, tmp_path / "dec" / "last.pt", base_info=info)
    assert not is_lora_injected(sam)
