"""Evaluation throughput: slices and objects per second of ``sam_medical.evaluation.run.evaluate``.

Synthetic ``.npz`` slice files (200x180 source slices, 2 labelled objects per slice) are evaluated with
box prompts by the ``tiny`` model and by ``vit_b`` at native 256 input (random weights, a few slices).
The rate is that of the evaluation loop (encode once per slice, one decoder call for its objects,
map back, score, 3D metrics); model building and the HTML report are not included.
Prints one JSON line.

    python bench/evaluate.py [--cases 4] [--slices 12] [--vit-b-slices 4] [--device auto] [--runtime auto]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def make_data(folder: Path, cases: int, slices: int, shape=(200, 180), seed: int = 0) -> Path:
    """``cases`` slice files of ``slices`` slices, each with two elliptical organs (labels 1 and 2)."""
    from sam_medical.canvas.geometry import SliceGeometry
    from sam_medical.canvas.slice_file import save_npz

    rng = np.random.default_rng(seed)
    geom = SliceGeometry(*shape)
    ii, jj = np.mgrid[: shape[0], : shape[1]]
    for c in range(cases):
        imgs = np.zeros((slices, 256, 256, 3), np.uint8)
        gts = np.zeros((slices, 256, 256), np.uint8)
        for k in range(slices):
            lab = np.zeros(shape, np.uint8)
            r1, r2 = 25 + 10 * np.sin(k / 3), 12 + 4 * np.cos(k / 2)
            lab[((ii - 80) / r1) ** 2 + ((jj - 70) / (1.3 * r1)) ** 2 < 1] = 1
            lab[((ii - 140) / r2) ** 2 + ((jj - 120) / r2) ** 2 < 1] = 2
            gray = np.clip(60 + 70 * (lab > 0) + rng.normal(0, 12, shape), 0, 255).astype(np.uint8)
            imgs[k] = geom.image_to_model(gray)
            gts[k] = geom.label_to_model(lab)
        save_npz(
            folder / f"case{c:02d}.npz",
            {
                "imgs": imgs,
                "gts": gts,
                "slice_index": np.arange(slices, dtype=np.int32),
                "volume_shape": np.asarray([*shape, slices], np.int64),
                "slice_shape": np.asarray(shape, np.int64),
                "resized_shape": np.asarray(geom.resized_shape, np.int64),
                "spacing": np.asarray([0.8, 0.8, 2.5]),
                "origin": np.zeros(3),
                "direction": np.eye(3),
                "label_values": np.asarray([1, 2], np.int64),
            },
        )
    return folder


def run(model: str, data: Path, out: Path, device: str, runtime: str) -> dict:
    from sam_medical.evaluation.config import EvalConfig, ModelSpec
    from sam_medical.evaluation.run import evaluate

    t = time.perf_counter()
    summary = evaluate(
        EvalConfig(
            data=data,
            out_dir=out,
            model=ModelSpec(name=model, random_weights=True, image_size=256),
            device=device,
            runtime=runtime,
            export_dir=out.parent / "exports",
            report=False,
        )
    )
    timing = summary["timing"]
    model_only = model_only_seconds(model, data, summary["model"]["device"], runtime, out.parent / "exports")
    return {
        "slices": timing["slices"],
        "objects": timing["objects"],
        "seconds": timing["evaluation_seconds"],
        "slices_per_second": timing["slices_per_second"],
        "objects_per_second": timing["objects_per_second"],
        "model_only_seconds": round(model_only, 3),
        "overhead_fraction": round(1 - model_only / timing["evaluation_seconds"], 3),
        "wall_seconds_with_model_build": round(time.perf_counter() - t, 3),
        "device": summary["model"]["device"],
        "runtime": summary["model"]["runtime"]["runtime"],
    }


def model_only_seconds(model: str, data: Path, device: str, runtime: str, export_dir: Path) -> float:
    """The same encoder and decoder calls as the evaluation (the served engine and
    ``decode_prompts``), nothing else: the floor of its time."""
    import torch

    from sam_medical.evaluation.config import ModelSpec
    from sam_medical.evaluation.served_sam import build_served_sam
    from sam_medical.evaluation.slice_requests import ObjectPrompt
    from sam_medical.prompts import tight_box

    spec = ModelSpec(name=model, random_weights=True, image_size=256)
    served = build_served_sam(spec, device=torch.device(device), runtime=runtime, export_dir=export_dir)
    total = 0.0
    for path in sorted(data.glob("*.npz")):
        arrays = np.load(path)
        imgs, gts = arrays["imgs"], arrays["gts"]
        for row in range(imgs.shape[0]):
            prompts = [ObjectPrompt(box=tight_box(gts[row] == v)) for v in (1, 2)]
            t = time.perf_counter()
            served.decode(served.encode(imgs[row : row + 1]), prompts)
            total += time.perf_counter() - t
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--vit-b-slices", type=int, default=4, help="0 skips vit_b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runtime", default="auto", help="auto, torch, onnx or openvino (as evaluate)")
    args = parser.parse_args()

    import torch

    result: dict = {"bench": "evaluate", "prompt": "box", "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root / "tiny_data", args.cases, args.slices)
        result["tiny"] = run("tiny", root / "tiny_data", root / "tiny_out", args.device, args.runtime)
        if args.vit_b_slices:
            make_data(root / "vitb_data", 1, args.vit_b_slices)
            result["vit_b_256"] = run(
                "vit_b", root / "vitb_data", root / "vitb_out", args.device, args.runtime
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
