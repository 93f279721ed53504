"""The LoRA training engine: learning, files, frozen base, stop/resume, DDP, CLI errors.

Every run uses the ``tiny`` model with random weights on small synthetic slice files (bright discs and
grey squares on a dark background), so the whole file runs in about a minute on two CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from adapters import save_tiny_adapter
from slicer_harness import free_port

from sam_medical.adapters.files import ADAPTER_FORMAT, read_adapter_meta
from sam_medical.adapters.inject import lora_state_dict
from sam_medical.canvas.slice_file import save_npz
from sam_medical.cli.main import main as cli_main
from sam_medical.model.build import build_sam
from sam_medical.training.config import TrainConfig
from sam_medical.training.state import DEBUG_HASH_ENV, tensors_sha256
from sam_medical.training.step import area_target
from sam_medical.training.trainer import Trainer, train

REQUIRED_SUMMARY = {
    "initial_val_dice", "best_val_dice", "best_epoch", "epochs", "steps", "trainable_params", "seconds",
    "stopped_early", "train_cases", "val_cases", "config",
}  # fmt: skip


def write_case(path: Path, n: int, seed: int) -> Path:
    """``n`` slices, each with a bright disc (label 1) and every other one a grey square (label 2)."""
    rng = np.random.default_rng(seed)
    imgs = np.zeros((n, 256, 256, 3), np.uint8)
    gts = np.zeros((n, 256, 256), np.uint8)
    yy, xx = np.mgrid[:256, :256]
    for row in range(n):
        img = rng.integers(0, 40, size=(256, 256)).astype(np.uint8)
        cy, cx, r = rng.integers(50, 120), rng.integers(50, 200), rng.integers(14, 30)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        gts[row][disc], img[disc] = 1, 220
        if row % 2:
            y0, x0 = rng.integers(150, 210), rng.integers(30, 190)
            gts[row, y0 : y0 + 30, x0 : x0 + 30], img[y0 : y0 + 30, x0 : x0 + 30] = 2, 130
        imgs[row] = img[..., None]
    save_npz(path, {"imgs": imgs, "gts": gts, "slice_index": np.arange(n, dtype=np.int32)})
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("npz")
    for c in range(4):
        write_case(d / f"case{c}.npz", 4, seed=c)  # 6 items per case; 1 case for validation
    return d


#: The engine tests train LoRA on the encoder with box prompts and no step cap, whatever the default recipe
#: (decoder only, mixed prompts, 100 steps) is; ``LORA_ARGS`` is the same on the command line.
LORA = dict(lora_rank=4, train_decoder=False, prompt="box", num_points=1, num_bg_points=0, max_steps=None)
LORA_ARGS = ["--lora-rank", "4", "--no-train-decoder", "--prompt", "box", "--num-points", "1"]
LORA_ARGS += ["--num-bg-points", "0", "--max-steps", "0"]


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(data), out=str(out), model="tiny", random_weights=True, batch_size=2, val_fraction=0.25,
        **LORA,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _base_params(sam: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in sam.state_dict().items() if ".lora_" not in k}  # a GPU run compares on the CPU


def test_area_target_keeps_thin_structures():
    t = torch.zeros(1, 1, 256, 256)
    t[0, 0, 100, 10:200] = 1  # a line one canvas pixel thick
    soft = area_target(t, 64)
    assert soft.shape == (1, 1, 64, 64)
    assert soft.max() == pytest.approx(0.25) and soft.sum() == pytest.approx(t.sum() / 16)
    assert area_target(t, 256) is t


def test_training_learns_keeps_base_and_writes_files(data_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    epochs_seen = []
    cfg = _cfg(
        data_dir, out, epochs=3, batch_size=4, lr=5e-3, warmup_steps=1, train_decoder=True, log_every=3
    )
    trainer = Trainer(cfg, progress=False, on_epoch=epochs_seen.append)
    summary = trainer.run()

    assert summary["best_val_dice"] > summary["initial_val_dice"] + 0.2, summary
    assert summary["best_epoch"] >= 1 and summary["epochs"] == 3 and summary["steps"] == 3 * 5  # 18 items / 4
    assert summary["stopped_early"] is False
    assert REQUIRED_SUMMARY <= set(summary)
    assert len(summary["val_cases"]) == 1 and not set(summary["val_cases"]) & set(summary["train_cases"])
    assert summary == json.loads((out / "summary.json").read_text())
    assert [r["epoch"] for r in epochs_seen] == [0, 1, 2, 3]

    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3]
    assert all({"loss", "val_dice", "lr", "seconds"} <= set(r) for r in epochs)
    assert epochs[0]["val_dice"] == summary["initial_val_dice"]
    assert max(r["val_dice"] for r in epochs) == summary["best_val_dice"]
    assert epochs[-1]["loss"] < epochs[1]["loss"]
    assert [r["step"] for r in lines if r["event"] == "step"] == [3, 6, 9, 12, 15]

    # the adapter file is the best epoch's, and reproduces its validation Dice when loaded
    meta = read_adapter_meta(out / "adapter.pt")
    assert meta["epoch"] == summary["best_epoch"] and meta["val_dice"] == summary["best_val_dice"]
    assert meta["train_decoder"] is True and meta["rank"] == 4
    assert not list(out.glob(".*.part*"))

    # base weights bit-identical (only LoRA and the trained decoder changed)
    fresh, _ = build_sam("tiny", random_weights=True, seed=0)
    trained = _base_params(trainer.sam)
    for name, value in _base_params(fresh).items():
        if name.startswith("mask_decoder."):
            continue
        assert torch.equal(value, trained[name].cpu()), name
    assert any(
        not torch.equal(v, trained[k].cpu())
        for k, v in fresh.mask_decoder.state_dict(prefix="mask_decoder.").items()
    )
    assert all(
        p.abs().sum() > 0 for n, p in trainer.sam.named_parameters() if "lora_q_B" in n or "lora_v_B" in n
    )


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("small")
    for c in range(3):
        write_case(d / f"s{c}.npz", 3, seed=10 + c)
    return d


def test_stop_file_then_resume_matches_uninterrupted_run(small_dir: Path, tmp_path: Path):
    # LoRA only, discs only: 2 training cases x 3 items, batch 2 -> 3 steps per epoch
    kw = dict(epochs=2, lr=1e-2, warmup_steps=1, label_values=[1], val_fraction=0.34)
    data_dir = small_dir

    ref = tmp_path / "ref"
    summary_ref = train(_cfg(data_dir, ref, **kw), progress=False)
    assert summary_ref["steps"] == 6

    run = tmp_path / "run"

    def stop_at_4(info: dict) -> None:  # stop in the middle of epoch 2
        if info["step"] == 4:
            (run / "STOP").touch()

    trainer = Trainer(_cfg(data_dir, run, **kw), progress=False, on_step=stop_at_4)
    stopped = trainer.run()
    assert stopped["stopped_early"] is True and stopped["steps"] == 4 and stopped["epochs"] == 2
    assert (run / "adapter.pt").is_file() and read_adapter_meta(run / "adapter.pt")["epoch"] in (0, 1)
    assert json.loads((run / "log.jsonl").read_text().splitlines()[-1])["event"] == "stop"
    # LoRA-only: every base weight, decoder included, is bit-identical to the fresh model
    fresh, _ = build_sam("tiny", random_weights=True, seed=0)
    trained = _base_params(trainer.sam)
    assert all(torch.equal(v, trained[k]) for k, v in _base_params(fresh).items())

    resumed = train(_cfg(data_dir, run, resume=True, **kw), progress=False)  # the old STOP file is removed
    assert resumed["steps"] == 6 and resumed["stopped_early"] is False and resumed["epochs"] == 2
    assert not (run / "STOP").exists()
    assert resumed["initial_val_dice"] == summary_ref["initial_val_dice"]
    state_ref = torch.load(ref / "last.pt", weights_only=True)
    state_run = torch.load(run / "last.pt", weights_only=True)
    assert tensors_sha256(state_run["trainable"]) == tensors_sha256(state_ref["trainable"])
    assert tensors_sha256(state_ref["trainable"]) != tensors_sha256(lora_state_dict(trainer.sam.cpu()))
    assert resumed["best_val_dice"] == summary_ref["best_val_dice"]
    epochs = [json.loads(x)["epoch"] for x in (run / "log.jsonl").read_text().splitlines() if '"epoch"' in x]
    assert epochs[:2] == [0, 1] and epochs[-1] == 2


def test_stop_event_and_failed_save_leave_no_partial_adapter(small_dir: Path, tmp_path: Path, monkeypatch):
    data_dir = small_dir
    import threading

    out = tmp_path / "ev"
    stop = threading.Event()
    trainer = Trainer(
        _cfg(data_dir, out, epochs=3, lr=1e-2), progress=False, stop_event=stop, on_step=lambda i: stop.set()
    )
    summary = trainer.run()
    assert summary["stopped_early"] and summary["steps"] == 1 and summary["best_epoch"] == 0
    good = (out / "adapter.pt").read_bytes()

    # a run that crashes while writing adapter.pt leaves the previous complete file, and no temp file
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("format") == ADAPTER_FORMAT:
            Path(f).write_bytes(b"partial")
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer._save_best(0.99, 2)  # a better epoch whose adapter cannot be written
    assert (out / "adapter.pt").read_bytes() == good
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_ddp_two_processes_end_with_identical_adapters(data_dir: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    env = {**os.environ, DEBUG_HASH_ENV: "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "sam_medical.cli.main", "train", "--data", str(data_dir),
        "--out", str(out), "--model", "tiny", "--random-weights", "--max-steps", "3", "--batch-size", "2",
        "--lr", "1e-2", "--quiet", *LORA_ARGS[:-2],
    ]  # fmt: skip
    for _attempt in range(2):  # the free port can be taken between choosing and binding it: then once more
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
            break
        cmd[cmd.index("--master_port") + 1] = str(free_port())
    assert proc.returncode == 0, proc.stderr[-3000:]
    hashes = []
    for r in (0, 1):
        lines = dict(x.split() for x in (out / f"rank{r}_lora_sha.txt").read_text().splitlines())
        assert lines["start"] != lines["end"]  # the adapters did train
        hashes.append(lines)
    assert hashes[0] == hashes[1]  # ... and both ranks hold the same ones
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3 and (out / "adapter.pt").is_file()
    # rank 0 alone wrote the log (no duplicated lines)
    assert [json.loads(x)["epoch"] for x in (out / "log.jsonl").read_text().splitlines()] == [0, 1]


def _cli(args: list[str], capsys) -> tuple[int, str]:
    if "--model" not in args:  # these runs are about the CLI, on the small random model
        args = ["--model", "tiny", *args]
    code = cli_main(["train", *LORA_ARGS, *args, "--quiet"])
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_user_errors_exit_2(data_dir: Path, tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _cli(["--data", str(empty), "--out", str(tmp_path / "o1"), "--random-weights"], capsys)
    assert code == 2 and err.startswith("error: no .npz slice files") and "\n" not in err

    neg = tmp_path / "neg"
    neg.mkdir()
    for name in ("x", "y"):
        save_npz(
            neg / f"{name}.npz",
            {"imgs": np.zeros((2, 256, 256, 3), np.uint8), "gts": np.zeros((2, 256, 256), np.uint8)},
        )
    code, err = _cli(["--data", str(neg), "--out", str(tmp_path / "o2"), "--random-weights"], capsys)
    assert code == 2 and "no labelled slice" in err

    one = tmp_path / "one"
    write_case(one / "only.npz", 2, seed=0)
    code, err = _cli(["--data", str(one), "--out", str(tmp_path / "o3"), "--random-weights"], capsys)
    assert code == 2 and "at least 2 cases" in err

    code, err = _cli(
        ["--data", str(data_dir), "--out", str(tmp_path / "o4"), "--random-weights", "--resume"], capsys
    )
    assert code == 2 and "cannot resume" in err

    bad_ckpt = tmp_path / "model.pth"
    bad_ckpt.write_bytes(b"garbage")
    code, err = _cli(
        ["--data", str(data_dir), "--out", str(tmp_path / "o5"), "--checkpoint", str(bad_ckpt)], capsys
    )
    assert code == 2 and "model.pth" in err

    # adapters made for another rank, or another base model (other random seed)
    save_tiny_adapter(tmp_path / "r2.pt", rank=2)
    code, err = _cli(
        [
            "--data",
            str(data_dir),
            "--out",
            str(tmp_path / "o6"),
            "--random-weights",
            "--adapter-init",
            str(tmp_path / "r2.pt"),
        ],
        capsys,
    )
    assert code == 2 and "rank 2" in err
    save_tiny_adapter(tmp_path / "s5.pt", rank=4, model_seed=5)
    code, err = _cli(
        [
            "--data",
            str(data_dir),
            "--out",
            str(tmp_path / "o7"),
            "--random-weights",
            "--adapter-init",
            str(tmp_path / "s5.pt"),
        ],
        capsys,
    )
    assert code == 2 and "seed 5" in err


def test_cli_runs_one_case_without_validation_split(tmp_path: Path, capsys):
    one = tmp_path / "one"
    write_case(one / "only.npz", 2, seed=0)
    out = tmp_path / "run"
    code = cli_main(["train", "--data", str(one), "--out", str(out), "--model", "tiny", "--random-weights",
                     "--val-fraction", "0", "--max-steps", "1", "--quiet"])  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    printed = json.loads(lines[-2])  # the numbers; the last line is the verdict
    assert lines[-1].startswith(("learned: ", "nothing learned: "))
    summary = json.loads((out / "summary.json").read_text())
    assert printed["steps"] == summary["steps"] == 1
    assert (
        summary["val_on_train"] is True and summary["val_cases"] == [] and summary["train_cases"] == ["only"]
    )
    # a resumed run with a different LoRA rank is refused
    code = cli_main(["train", "--data", str(one), "--out", str(out), "--model", "tiny", "--random-weights",
                     "--val-fraction", "0", "--resume", "--lora-rank", "8", "--quiet"])  # fmt: skip
    assert code == 2 and "rank" in capsys.readouterr().err


def test_decode_grouped_matches_item_by_item_decoding():
    from sam_medical.model.forward import PromptBatch, canvas_to_input, decode, encode
    from sam_medical.training.prompted_sam import decode_grouped

    sam, _ = build_sam("tiny", random_weights=True, seed=0)
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 255, (4, 256, 256, 3), dtype=torch.uint8, generator=g)
    points = torch.rand(4, 3, 2, generator=g) * 255
    labels = torch.tensor([[1, 0, -1], [-1, -1, -1], [1, 1, 0], [-1, -1, -1]])
    box = torch.tensor([[10.0, 20, 90, 120], [30, 30, 60, 70], [0, 0, 0, 0], [5, 5, 250, 250]])
    has_box = torch.tensor([True, True, False, True])
    with torch.no_grad():
        emb = encode(sam, canvas_to_input(sam, image))
        out = decode_grouped(sam, emb, points, labels, box, has_box)
        assert out.shape == (4, 1, 64, 64)
        for i in range(4):
            n = int((labels[i] >= 0).sum())  # a user's prompt: the real clicks, no -1 padding
            ref, _ = decode(
                sam,
                emb[i : i + 1],
                PromptBatch(
                    points=points[i : i + 1, :n] if n else None,
                    point_labels=labels[i : i + 1, :n] if n else None,
                    boxes=box[i : i + 1] if has_box[i] else None,
                ),
            )
            torch.testing.assert_close(out[i : i + 1], ref)
        # why the padding is cut: an extra "not a point" token changes SAM's answer
        padded, _ = decode(
            sam, emb[:1], PromptBatch(points=points[:1], point_labels=labels[:1], boxes=box[:1])
        )
        assert not torch.allclose(padded, out[:1])
        with pytest.raises(ValueError, match="box or at least one click"):
            decode_grouped(sam, emb[:1], points[:1], labels[1:2], box[:1], torch.tensor([False]))
