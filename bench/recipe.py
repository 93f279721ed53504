"""The fine-tuning recipe, measured: train on some patients, score on held-out ones, rotate.

Each configuration is trained with ``sam_medical.training.trainer.train`` (the code ``sam-medical train`` runs)
on the training patients of a fold, then scored on the fold's held-out patients and on organs it was never
trained on (``--unseen``, e.g. the sample phantoms), next to the zero-shot base model (``--baseline``). One
JSON line per (configuration, fold) is printed and appended to ``--results``::

    python bench/recipe.py --cases /tmp/npz/sts_ct /tmp/npz/sts_mr /tmp/npz/sct_t2 --unseen /tmp/npz/samples \\
        --configs today,interactive --folds 0 --features /tmp/recipe_features --results runs/recipe.jsonl

Folds are **by patient**: a file's patient is its name (``STS_012.npz`` in ``sts_ct/`` and in ``sts_mr/`` is one
patient, CT and MR on the same side of every split). The patients (sorted, then shuffled with ``--seed``) are
dealt into ``--n-folds`` held-out groups in turn; each fold trains on the other patients' files (at most
``--train-cases`` of them, a seeded choice, when given), so every patient is held out exactly once.

Configurations (``--configs``, issue 18 item 4; ``--set k=v,...`` adds TrainConfig overrides to all):

* ``today``: today's default recipe (mask decoder on cached embeddings, mixed box/click prompts);
* ``interactive``: interactive training in click rounds (``click_rounds=8``), decoder only;
* ``interactive_lora4``: the same plus LoRA rank 4 on the encoder's q and v (``--set lora_blocks=...``);
* ``interactive_lr1e-5``: ``interactive`` at learning rate 1e-5 (the second learning rate);
* ``decoder``, ``lora4``, ``lora8``, ``lora4_decoder``: earlier variants of today's recipe.

Scores (mean Dice per object, on the 256 canvas inside the image region, every ``--stride``-th labelled slice):

* ``box``: the tight box; ``box_fill``: the box rectangle itself (the trivial reference); ``box_click``: the
  box and the interior click together;
* ``click1``, ``click3``, ``click5``: one foreground click at the object's interior point, then corrective
  clicks each at the centre of the largest error region (:func:`sam_medical.prompts.corrective_click`, as
  SAM-Med2D and nnInteractive report N-click Dice), decoded with all clicks so far as served: a lone click
  gets SAM's three masks and the one with the best predicted IoU; later clicks get the previous low-res
  logits as the mask prompt when the model was trained in click rounds (``feed_back``), as it learned;
* ``click1_token0``: one click decoded with the single-mask output (what was scored before);
* ``unseen_box`` / ``unseen_click1``: on the ``--unseen`` slices (forgetting shows here).

The base encoder's embeddings are cached once (memory and ``--features`` on disk) and shared by every
decoder-only configuration and fold, in training and scoring. Not scored here yet: ``sam_3d`` 3D Dice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam_medical.adapters.inject import merge_lora
from sam_medical.adapters.save_and_load import load_adapter
from sam_medical.canvas.slice_file import load_npz, save_npz
from sam_medical.device import resolve_device
from sam_medical.inference.decoding import choose_mask
from sam_medical.metrics import dice
from sam_medical.model import forward as sf
from sam_medical.model.build import build_sam
from sam_medical.prompts import corrective_click, interior_point, tight_box
from sam_medical.training.config import TrainConfig
from sam_medical.training.dataset import case_name, file_uid, list_npz
from sam_medical.training.feature_cache import FeatureCache
from sam_medical.training.trainer import train

DECODER = {"lora_rank": 0, "train_decoder": True}
INTERACTIVE = {**DECODER, "click_rounds": 8}
#: Named configurations: TrainConfig overrides on top of the shared settings below.
CONFIGS: dict[str, dict[str, Any]] = {
    "today": dict(DECODER),
    "interactive": dict(INTERACTIVE),
    "interactive_lora4": {**INTERACTIVE, "lora_rank": 4},
    "interactive_lr1e-5": {**INTERACTIVE, "lr": 1e-5},
    "decoder": dict(DECODER),
    "lora4": {"lora_rank": 4, "train_decoder": False},
    "lora8": {"lora_rank": 8, "train_decoder": False},
    "lora4_decoder": {"lora_rank": 4, "train_decoder": True},
}
SHARED: dict[str, Any] = {
    "prompt": "mixed",
    "num_points": 3,
    "num_bg_points": 1,
    "box_jitter": 5,
    "batch_size": 8,
    "lr": 1e-4,
    "epochs": 100,
    "val_fraction": 0.17,
}
KINDS = ("box", "box_fill", "box_click", "click1", "click3", "click5", "click1_token0")
UNSEEN_KINDS = ("box", "click1")


def parse_overrides(text: str) -> dict[str, Any]:
    """``key=value,key=value`` -> TrainConfig overrides (numbers parsed; ``a;b;c`` is a list of ints)."""
    out: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if ";" in value:
            out[key] = [int(v) for v in value.split(";") if v]
            continue
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def case_key(path: Path) -> str:
    """``folder/case``: one volume (CT and MR of one patient are two)."""
    return f"{path.parent.name}/{case_name(path)}"


def folds_by_patient(
    keys: list[str], n_folds: int, seed: int, train_cases: int | None = None
) -> list[tuple[list[str], list[str]]]:
    """``(train, test)`` volume keys per fold, split by patient (see the module docstring)."""
    patients = sorted({k.split("/")[-1] for k in keys})
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    out = []
    for f in range(n_folds):
        held = set(order[f::n_folds])
        test = sorted(k for k in keys if k.split("/")[-1] in held)
        rest = sorted(k for k in keys if k.split("/")[-1] not in held)
        if train_cases and train_cases < len(rest):
            rng = np.random.default_rng([seed, f])
            rest = sorted(rng.choice(rest, size=train_cases, replace=False).tolist())
        out.append((rest, test))
    return out


# --- scoring ------------------------------------------------------------------------------------


def _decode(sam, emb, points=None, labels=None, box=None, mask=None, single=False) -> torch.Tensor:
    """Low-res logits ``(1, 1, L, L)`` of one prompt, as served: a lone click gets three masks and the best
    predicted IoU (unless ``single``: the single-mask output)."""
    kw: dict[str, Any] = {}
    if points is not None:
        kw["points"] = torch.tensor(np.asarray(points, np.float32)[None])
        kw["point_labels"] = torch.tensor(np.asarray(labels, np.int64)[None])
    if box is not None:
        kw["boxes"] = torch.tensor(np.asarray(box, np.float32)[None])
    lone = box is None and mask is None and points is not None and len(points) == 1 and not single
    low, iou = sf.decode(sam, emb, sf.PromptBatch(mask_inputs=mask, multimask_output=lone, **kw))
    return choose_mask(low, iou)[0] if lone else low


def _canvas(low: torch.Tensor, valid: np.ndarray) -> np.ndarray:
    return (sf.logits_to_canvas(low.float())[0, 0] > 0).cpu().numpy() & valid


def click_dices(sam, emb, gt: np.ndarray, valid: np.ndarray, n: int, feed_back: bool) -> list[float]:
    """Dice after 1..``n`` clicks (interior point, then corrective clicks; see the module docstring)."""
    x, y = interior_point(gt)
    pts, labs, prev = [[x, y]], [1], None
    out: list[float] = []
    while True:
        low = _decode(sam, emb, pts, labs, mask=prev)
        m = _canvas(low, valid)
        out.append(dice(m, gt))
        c = corrective_click(m, gt, valid) if len(out) < n else None
        if c is None:
            return out + [out[-1]] * (n - len(out))
        pts.append([c[0], c[1]])
        labs.append(c[2])
        prev = low if feed_back else None


def object_scores(sam, emb, gt: np.ndarray, valid: np.ndarray, kinds: tuple[str, ...], feed_back: bool):
    """``{kind: Dice}`` of one object (``gt (256, 256)`` bool) on one slice."""
    box = tight_box(gt)
    out: dict[str, float] = {}
    if "box" in kinds:
        out["box"] = dice(_canvas(_decode(sam, emb, box=box), valid), gt)
    if "box_fill" in kinds:
        fill = np.zeros_like(gt)
        fill[int(box[1]) : int(box[3]) + 1, int(box[0]) : int(box[2]) + 1] = True
        out["box_fill"] = dice(fill, gt)
    x, y = interior_point(gt)
    if "box_click" in kinds:
        out["box_click"] = dice(_canvas(_decode(sam, emb, [[x, y]], [1], box), valid), gt)
    if "click1_token0" in kinds:
        out["click1_token0"] = dice(_canvas(_decode(sam, emb, [[x, y]], [1], single=True), valid), gt)
    n = max((int(k[5:]) for k in kinds if k in ("click1", "click3", "click5")), default=0)
    if n:
        clicks = click_dices(sam, emb, gt, valid, n, feed_back)
        out.update({f"click{i}": clicks[i - 1] for i in (1, 3, 5) if f"click{i}" in kinds})
    return out


def score(
    sam,
    files: list[Path],
    kinds: tuple[str, ...],
    stride: int = 1,
    features: FeatureCache | None = None,
    feed_back: bool = False,
) -> dict[str, list[float]]:
    """Per-object Dice lists for ``kinds`` over every ``stride``-th labelled slice of ``files``.

    ``features``: the base encoder's embeddings (memory and disk, shared with training runs), for models
    whose encoder is the base one.
    """
    out: dict[str, list[float]] = {k: [] for k in kinds}
    for path in files:
        f = load_npz(path, ("imgs", "gts", "resized_shape", "slice_index"))
        h, w = (int(v) for v in f["resized_shape"])
        uid = file_uid(path)
        valid = np.zeros((256, 256), bool)
        valid[:h, :w] = True
        for r in range(0, len(f["imgs"]), stride):
            with torch.inference_mode():
                canvas = torch.from_numpy(f["imgs"][r])[None]
                if features is not None:
                    emb = features.embed(sam, canvas, [(uid, int(f["slice_index"][r]))])
                else:
                    emb = sf.encode(sam, sf.canvas_to_input(sam, canvas))
                for value in (v for v in np.unique(f["gts"][r]) if v):
                    for k, d in object_scores(
                        sam, emb, f["gts"][r] == value, valid, kinds, feed_back
                    ).items():
                        out[k].append(d)
    return out


def summarize(scores: dict[str, list[float]], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": round(float(np.mean(v)), 4) for k, v in scores.items() if v}


# --- training data of a fold ----------------------------------------------------------------------


def fold_data(folder: Path, train: list[Path], stride: int) -> Path:
    """``folder`` holding the fold's training files: links (``stride`` 1), or copies keeping every
    ``stride``-th slice (a shorter run)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in train:
        target = folder / f"{path.parent.name}_{path.name}"
        if target.exists():
            continue
        if stride <= 1:
            os.symlink(path.resolve(), target)
            continue
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        for k in ("imgs", "gts", "slice_index"):
            arrays[k] = arrays[k][::stride]
        save_npz(target, arrays)
    return folder


# --- the run ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", required=True, help="folders of .npz files (one per volume)")
    ap.add_argument("--unseen", default=None, help="folder of .npz files of organs never trained on")
    ap.add_argument("--unseen-stride", type=int, default=3, help="score every N-th unseen slice")
    ap.add_argument("--stride", type=int, default=1, help="score every N-th held-out slice")
    ap.add_argument("--train-stride", type=int, default=1, help="train on every N-th slice (shorter runs)")
    ap.add_argument("--configs", default="today", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--set", default="", help="extra TrainConfig overrides for every config: k=v,k=v")
    ap.add_argument("--tag", default="", help="a name for this variant in the results")
    ap.add_argument("--folds", default="0", help="which folds to run, e.g. 0,1,2,3,4")
    ap.add_argument("--n-folds", type=int, default=5)
    ap.add_argument("--train-cases", type=int, default=0, help="at most this many training volumes (0: all)")
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="auto | cpu | cuda")
    ap.add_argument("--baseline", action="store_true", help="also score the zero-shot base model")
    ap.add_argument("--results", required=True, help="JSON lines file to append to")
    ap.add_argument("--work", default=None, help="where run folders go (default: a temporary folder)")
    ap.add_argument("--features", default=None, help="feature cache folder shared by all runs")
    return ap.parse_args(argv)


def run_config(
    name: str, args: argparse.Namespace, data_dir: Path, work: Path, fold: int
) -> tuple[dict[str, Any], Any]:
    """Train configuration ``name`` on ``data_dir``; ``(summary, trained model merged, eval mode)``."""
    overrides = {**CONFIGS[name], **parse_overrides(args.set)}
    cfg = TrainConfig(
        data=str(data_dir),
        out=str(work / f"{name}{args.tag}_fold{fold}"),
        max_steps=args.max_steps,
        seed=args.seed,
        overwrite=True,
        device=args.device,
        feature_cache_dir=args.features,
        **{**SHARED, **overrides},
    )
    summary = train(cfg, progress=False)
    sam, info = build_sam("medsam_lite")
    load_adapter(sam, summary["adapter"], base_info=info)
    merge_lora(sam)
    return summary, sam.to(resolve_device(args.device)).eval()


def evaluate(sam, test: list[Path], unseen: list[Path], args, features, feed_back: bool) -> dict[str, Any]:
    """The held-out and unseen scores of one model, and the seconds they took."""
    t0 = time.perf_counter()
    rec: dict[str, Any] = summarize(score(sam, test, KINDS, args.stride, features, feed_back))
    rec.update(
        summarize(score(sam, unseen, UNSEEN_KINDS, args.unseen_stride, features, feed_back), "unseen_")
    )
    rec["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def run_fold(fold: int, split, files, unseen, args, work: Path, emit: Callable, base) -> None:
    """The baseline (``--baseline``) and every configuration of ``--configs`` on one fold."""
    train_keys, test_keys = split
    test = [files[k] for k in test_keys]
    head = {"bench": "recipe", "fold": fold, "n_train": len(train_keys), "test": test_keys}
    base_sam, base_features = base
    if args.baseline:
        emit({**head, "config": "zero_shot", **evaluate(base_sam, test, unseen, args, base_features, False)})
    data_dir = fold_data(
        work / f"data_fold{fold}_s{args.train_stride}", [files[k] for k in train_keys], args.train_stride
    )
    for name in args.configs.split(","):
        summary, sam = run_config(name, args, data_dir, work, fold)
        cfg = summary["config"]
        shared = base_features if cfg["lora_rank"] == 0 else None  # the encoder is the base one
        rec = evaluate(sam, test, unseen, args, shared, feed_back=bool(cfg.get("click_rounds")))
        emit(
            {
                **head,
                "config": name + args.tag,
                "overrides": {**CONFIGS[name], **parse_overrides(args.set)},
                "feed_back": bool(cfg.get("click_rounds")),
                "steps": summary["steps"],
                "best_epoch": summary["best_epoch"],
                "initial_val_dice": summary["initial_val_dice"],
                "best_val_dice": summary["best_val_dice"],
                "train_seconds": summary["seconds"],
                "device": args.device,
                "trainable_params": summary["trainable_params"],
                "adapter_bytes": Path(summary["adapter"]).stat().st_size,
                **rec,
            }
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = {case_key(p): p for folder in args.cases for p in list_npz(folder)}
    unseen = list_npz(args.unseen) if args.unseen else []
    folds = folds_by_patient(list(files), args.n_folds, args.seed, args.train_cases or None)
    work = Path(args.work or tempfile.mkdtemp(prefix="recipe_"))
    device = resolve_device(args.device)
    base_model, base_info = build_sam("medsam_lite")
    base_model = base_model.to(device).eval().requires_grad_(False)
    # the base encoder's embeddings, shared with the training runs (same keys, same folder)
    identity = f"medsam_lite|256|{base_info['weights_digest']}"
    base_features = FeatureCache(base_model, 8 << 30, args.features, identity)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)

    def emit(record: dict[str, Any]) -> None:
        print(json.dumps(record), flush=True)
        with open(results, "a") as f:
            f.write(json.dumps(record) + "\n")

    for fold in (int(f) for f in args.folds.split(",")):
        run_fold(fold, folds[fold], files, unseen, args, work, emit, (base_model, base_features))
    return 0


if __name__ == "__main__":
    sys.exit(main())
