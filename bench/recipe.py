"""The fine-tuning recipe, measured: train on some real cases, score on held-out ones, rotate.

Each configuration is trained with ``sam_medical.training.trainer.train`` (the code ``sam-medical train`` runs)
on the training cases of a fold, then scored on the fold's held-out cases and on organs it was never
trained on (the sample phantoms), next to the zero-shot base model. One JSON line per (configuration,
fold), appended to ``--results``::

    python bench/recipe.py --cases /tmp/real_npz --unseen /tmp/samples_npz --configs decoder,lora4 \\
        --folds 0,1,2 --results runs/recipe.jsonl

Scores (mean Dice per object, on the 256 canvas inside the image region, every labelled slice):

* ``box``: the tight box; ``box_fill``: the box rectangle itself (the trivial reference);
* ``click1``: one foreground click at the object's interior point (farthest from its boundary);
* ``click3``: ``click1`` then two corrective clicks, each at the centre of the largest error region
  (:func:`sam_medical.prompts.corrective_click`), decoded with all clicks so far;
* ``box_click``: the box and the interior click together;
* ``unseen_box`` / ``unseen_click1``: the same on the ``--unseen`` slices (forgetting shows here).

Folds: the cases (sorted by name) are dealt into ``--n-folds`` held-out groups in turn; each fold trains
on ``--train-cases`` of the remaining cases (a seeded choice), so every case is held out exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam_medical.adapters.inject import merge_lora
from sam_medical.adapters.save_and_load import load_adapter
from sam_medical.metrics import dice
from sam_medical.model import forward as sf
from sam_medical.model.build import build_sam
from sam_medical.prompts import corrective_click, interior_point, tight_box
from sam_medical.training.config import TrainConfig
from sam_medical.training.dataset import case_name, file_uid, list_npz
from sam_medical.training.feature_cache import FeatureCache
from sam_medical.training.trainer import train

#: Named configurations: TrainConfig overrides on top of the shared settings below.
CONFIGS: dict[str, dict[str, Any]] = {
    "decoder": {"lora_rank": 0, "train_decoder": True},
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


def parse_overrides(text: str) -> dict[str, Any]:
    """``key=value,key=value`` -> TrainConfig overrides (numbers parsed)."""
    out: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def folds_of(
    names: list[str], n_folds: int, train_cases: int, seed: int
) -> list[tuple[list[str], list[str]]]:
    """``(train, test)`` case names per fold (see the module docstring)."""
    names = sorted(names)
    out = []
    for f in range(n_folds):
        test = names[f::n_folds]
        rest = [n for n in names if n not in test]
        rng = np.random.default_rng([seed, f])
        train_set = sorted(rng.choice(rest, size=min(train_cases, len(rest)), replace=False).tolist())
        out.append((train_set, test))
    return out


def _mask(sam, emb, points=None, labels=None, box=None) -> np.ndarray:
    kw: dict[str, Any] = {}
    if points is not None:
        kw["points"] = torch.tensor(np.asarray(points, np.float32)[None])
        kw["point_labels"] = torch.tensor(np.asarray(labels, np.int64)[None])
    if box is not None:
        kw["boxes"] = torch.tensor(np.asarray(box, np.float32)[None])
    low, _ = sf.decode(sam, emb, sf.PromptBatch(**kw))
    return (sf.logits_to_canvas(low.float())[0, 0] > 0).numpy()


def score(
    sam, files: list[Path], kinds: tuple[str, ...], stride: int = 1, features: FeatureCache | None = None
) -> dict[str, list[float]]:
    """Per-object Dice lists for ``kinds`` over every ``stride``-th labelled slice of ``files``.

    ``features``: the base encoder's embeddings (memory and disk, shared with training runs), for models
    whose encoder is the base one.
    """
    out: dict[str, list[float]] = {k: [] for k in kinds}
    for path in files:
        with np.load(path) as f:
            imgs, gts = f["imgs"], f["gts"]
            h, w = (int(v) for v in f["resized_shape"])
            ks = f["slice_index"]
        uid = file_uid(path)
        valid = np.zeros((256, 256), bool)
        valid[:h, :w] = True
        for r in range(0, len(imgs), stride):
            with torch.inference_mode():
                canvas = torch.from_numpy(imgs[r])[None]
                if features is not None:
                    emb = features.embed(sam, canvas, [(uid, int(ks[r]))])
                else:
                    emb = sf.encode(sam, sf.canvas_to_input(sam, canvas))
                for value in (v for v in np.unique(gts[r]) if v):
                    gt = gts[r] == value
                    box = tight_box(gt)
                    x, y = interior_point(gt)
                    if "box" in out:
                        out["box"].append(dice(_mask(sam, emb, box=box) & valid, gt))
                    if "box_fill" in out:
                        fill = np.zeros_like(gt)
                        fill[int(box[1]) : int(box[3]) + 1, int(box[0]) : int(box[2]) + 1] = True
                        out["box_fill"].append(dice(fill, gt))
                    if "box_click" in out:
                        out["box_click"].append(dice(_mask(sam, emb, [[x, y]], [1], box) & valid, gt))
                    if "click1" in out or "click3" in out:
                        pts, labs = [[x, y]], [1]
                        m = _mask(sam, emb, pts, labs) & valid
                        if "click1" in out:
                            out["click1"].append(dice(m, gt))
                        if "click3" in out:
                            for _ in range(2):
                                c = corrective_click(m, gt, valid)
                                if c is None:
                                    break
                                pts.append([c[0], c[1]])
                                labs.append(c[2])
                                m = _mask(sam, emb, pts, labs) & valid
                            out["click3"].append(dice(m, gt))
    return out


def summarize(scores: dict[str, list[float]], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": round(float(np.mean(v)), 4) for k, v in scores.items() if v}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", required=True, help="folder of .npz files (one per case)")
    ap.add_argument("--unseen", default=None, help="folder of .npz files of organs never trained on")
    ap.add_argument("--unseen-stride", type=int, default=3, help="score every N-th unseen slice")
    ap.add_argument("--configs", default="decoder", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--set", default="", help="extra TrainConfig overrides for every config: k=v,k=v")
    ap.add_argument("--tag", default="", help="a name for this variant in the results")
    ap.add_argument("--folds", default="0,1,2")
    ap.add_argument("--n-folds", type=int, default=3)
    ap.add_argument("--train-cases", type=int, default=6)
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", action="store_true", help="also score the zero-shot base model")
    ap.add_argument("--results", required=True, help="JSON lines file to append to")
    ap.add_argument("--work", default=None, help="where run folders go (default: a temporary folder)")
    ap.add_argument("--features", default=None, help="feature cache folder shared by all runs")
    args = ap.parse_args(argv)

    files = {case_name(p): p for p in list_npz(args.cases)}
    unseen = list_npz(args.unseen) if args.unseen else []
    folds = folds_of(list(files), args.n_folds, args.train_cases, args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="recipe_"))
    kinds = ("box", "box_fill", "click1", "click3", "box_click")
    base_model, base_info = build_sam("medsam_lite")
    base_model.requires_grad_(False)
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
        train_names, test_names = folds[fold]
        test_files = [files[n] for n in test_names]
        if args.baseline:
            t0 = time.perf_counter()
            rec = summarize(score(base_model, test_files, kinds, features=base_features))
            rec.update(
                summarize(
                    score(base_model, unseen, ("box", "click1"), args.unseen_stride, base_features), "unseen_"
                )
            )
            emit(
                {
                    "bench": "recipe",
                    "config": "zero_shot",
                    "fold": fold,
                    "test": test_names,
                    "eval_seconds": round(time.perf_counter() - t0, 1),
                    **rec,
                }
            )
        for name in args.configs.split(","):
            run_dir = work / f"{name}{args.tag}_fold{fold}"
            data_dir = work / f"data_fold{fold}"
            data_dir.mkdir(parents=True, exist_ok=True)
            for n in train_names:
                link = data_dir / files[n].name
                if not link.exists():
                    os.symlink(files[n].resolve(), link)
            cfg = TrainConfig(
                data=str(data_dir),
                out=str(run_dir),
                max_steps=args.max_steps,
                seed=args.seed,
                overwrite=True,
                feature_cache_dir=args.features,
                **{**SHARED, **CONFIGS[name], **parse_overrides(args.set)},
            )
            summary = train(cfg, progress=False)
            sam, info = build_sam("medsam_lite")
            load_adapter(sam, summary["adapter"], base_info=info)
            merge_lora(sam)
            sam.eval()
            t0 = time.perf_counter()
            shared = base_features if cfg.lora_rank == 0 else None  # the encoder is the base one
            rec = summarize(score(sam, test_files, kinds, features=shared))
            rec.update(
                summarize(score(sam, unseen, ("box", "click1"), args.unseen_stride, shared), "unseen_")
            )
            emit(
                {
                    "bench": "recipe",
                    "config": name + args.tag,
                    "fold": fold,
                    "train": train_names,
                    "test": test_names,
                    "overrides": {**CONFIGS[name], **parse_overrides(args.set)},
                    "steps": summary["steps"],
                    "best_epoch": summary["best_epoch"],
                    "initial_val_dice": summary["initial_val_dice"],
                    "best_val_dice": summary["best_val_dice"],
                    "train_seconds": summary["seconds"],
                    "eval_seconds": round(time.perf_counter() - t0, 1),
                    "trainable_params": summary["trainable_params"],
                    "adapter_bytes": Path(summary["adapter"]).stat().st_size,
                    **rec,
                }
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
