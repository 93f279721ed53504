"""Does a model segment better with the canvas as stored (rows = i) or transposed (rows = j)?

MedSAM's training slices were rows and columns of SimpleITK's array, the transpose of our canvas. This
bench measures zero-shot Dice both ways on ``.npz`` slice files (from ``sam-medical preprocess``), with
the tight box and with one click (the interior point farthest from the boundary), on every labelled
slice and label, and prints one JSON line per dataset::

    python bench/layout.py --model medsam_lite --data sts=/tmp/sts_npz --data samples=/tmp/samples_npz

Transposing is done outside the model: the canvas, the prompt (x and y swapped) and the predicted mask
(transposed back) -- exactly what running the model on the transposed image means. Dice is computed on
the canvas inside the image region (the zero padding excluded).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from sam_medical.metrics import dice
from sam_medical.model import forward as sf
from sam_medical.model.build import build_sam
from sam_medical.prompts import interior_point, tight_box
from sam_medical.training.dataset import list_npz


def predict(sam, emb, box, point, transposed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Box mask and click mask ``(256, 256)`` bool on the stored canvas."""
    if transposed:
        box = box[[1, 0, 3, 2]]
        point = point[::-1]
    with torch.inference_mode():
        low_b, _ = sf.decode(sam, emb, sf.PromptBatch(boxes=torch.tensor(box[None], dtype=torch.float32)))
        low_p, _ = sf.decode(
            sam,
            emb,
            sf.PromptBatch(
                points=torch.tensor(np.array(point, np.float32)[None, None]),
                point_labels=torch.ones(1, 1, dtype=torch.int64),
            ),
        )
    out = []
    for low in (low_b, low_p):
        m = (sf.logits_to_canvas(low.float())[0, 0] > 0).numpy()
        out.append(m.T if transposed else m)
    return out[0], out[1]


def run(sam, files: list[Path], max_slices: int | None) -> dict:
    per_case: dict[str, dict[str, list[float]]] = {}
    for path in files:
        with np.load(path) as f:
            imgs, gts = f["imgs"], f["gts"]
            h, w = (int(v) for v in f["resized_shape"])
        rows = (
            range(len(imgs)) if max_slices is None else np.linspace(0, len(imgs) - 1, max_slices).astype(int)
        )
        scores = per_case.setdefault(
            path.stem, {k: [] for k in ("box_ij", "box_ji", "point_ij", "point_ji", "box_fill")}
        )
        valid = np.zeros((256, 256), bool)
        valid[:h, :w] = True
        for r in sorted(set(rows)):
            canvas = torch.from_numpy(imgs[r])[None]
            with torch.inference_mode():
                emb_ij = sf.encode(sam, sf.canvas_to_input(sam, canvas))
                emb_ji = sf.encode(sam, sf.canvas_to_input(sam, canvas.transpose(1, 2).contiguous()))
            for value in np.unique(gts[r]):
                if value == 0:
                    continue
                gt = gts[r] == value
                box = tight_box(gt)
                point = np.array(interior_point(gt), np.float32)
                fill = np.zeros_like(gt)
                x0, y0, x1, y1 = box.astype(int)
                fill[y0 : y1 + 1, x0 : x1 + 1] = True
                scores["box_fill"].append(dice(fill, gt))
                for tag, emb, tr in (("ij", emb_ij, False), ("ji", emb_ji, True)):
                    b, p = predict(sam, emb, box, point, tr)
                    scores[f"box_{tag}"].append(dice(b & valid, gt))
                    scores[f"point_{tag}"].append(dice(p & valid, gt))
    keys = ("box_ij", "box_ji", "point_ij", "point_ji", "box_fill")
    out = {
        "objects": sum(len(c["box_ij"]) for c in per_case.values()),
        "cases": len(per_case),
        "slice_mean": {
            k: round(float(np.mean([v for c in per_case.values() for v in c[k]])), 4) for k in keys
        },
        "case_mean": {k: round(float(np.mean([np.mean(c[k]) for c in per_case.values()])), 4) for k in keys},
        "per_case_box": {
            n: [round(float(np.mean(c["box_ij"])), 4), round(float(np.mean(c["box_ji"])), 4)]
            for n, c in per_case.items()
        },
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="medsam_lite")
    ap.add_argument("--data", action="append", required=True, help="NAME=NPZ_DIR (repeatable)")
    ap.add_argument("--max-slices", type=int, default=None, help="per case, evenly spaced (default all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sam, info = build_sam(args.model)
    for spec in args.data:
        name, _, folder = spec.partition("=")
        res = run(sam, list_npz(folder), args.max_slices)
        print(json.dumps({"bench": "layout", "model": args.model, "data": name, **res}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
