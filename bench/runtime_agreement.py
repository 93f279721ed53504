"""Mask agreement of the exported runtimes with fp32 PyTorch, on real and sample slices (issue #12).

For each dataset the volumes are preprocessed with ``sam-medical preprocess`` (the training canvases),
then every ``--stride``-th slice holding a label is encoded by each engine and every labelled object on
it is prompted three ways, decoded end to end by the same engine (its encoder's embedding, its decoder):

* ``box``: the object's tight box (LiteMedSAM's training prompt);
* ``click``: one click at the object's interior point, SAM's single-mask output;
* ``click_multimask``: the same click, best of SAM's three masks by predicted IoU (what the app serves
  with ``--conf multimask auto``; zero-shot LiteMedSAM mostly answers one click with an empty mask).

Masks are the low-resolution logits > 0 on the 256 canvas. Dice is taken against fp32 PyTorch's mask
(two empty masks agree). One JSON line per dataset x runtime x prompt: ``n``, ``min``, ``mean``,
``share_ge_0995``, ``max_pixels_differing``, ``nonempty`` (masks PyTorch found non-empty). Datasets:

* ``sts_ct``: ``../shared/data/sts_ct`` (10 soft-tissue sarcoma CTs), ``--dataset``;
* ``sct_t2``: ``../shared/data/sct_t2`` (cervical spinal cord, T2 MR), ``--image/--label``;
* ``samples``: the repository's ``sample_volumes`` (4 CT-like phantoms, 3 organs each).

A dataset whose folder is missing is reported as skipped. Usage::

    .venv/bin/python bench/runtime_agreement.py [--runtimes onnx,openvino] [--stride 2] [--work DIR]
    .venv/bin/python bench/runtime_agreement.py --runtimes torch:cuda:fp32,torch:cuda:fp16,torch:cuda:bf16  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PROMPTS = ("box", "click", "click_multimask")


def datasets(shared: Path) -> dict[str, list[str] | None]:
    """``name -> sam-medical preprocess arguments`` (None: the data is not there)."""
    sts, cord = shared / "sts_ct", shared / "sct_t2"
    return {
        "sts_ct": ["--dataset", str(sts)] if sts.is_dir() else None,
        "sct_t2": ["--image", str(cord / "image.nii.gz"), "--label", str(cord / "label.nii.gz")]
        if (cord / "image.nii.gz").is_file()
        else None,
        "samples": ["--dataset", str(REPO / "sample_volumes")],
    }


def preprocess(name: str, args: list[str], work: Path) -> list[Path]:
    out = work / "npz" / name
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "sam_medical", "preprocess", *args, "--out", str(out), "--quiet"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return sorted(out.rglob("*.npz"))


def prompts_for(mask: np.ndarray) -> dict[str, tuple[dict, bool]]:
    from sam_medical.prompts import interior_point, tight_box

    x, y = interior_point(mask)
    click = {"points": torch.tensor([[[float(x), float(y)]]]), "point_labels": torch.tensor([[1]])}
    return {
        "box": ({"boxes": torch.from_numpy(tight_box(mask))[None]}, False),
        "click": (click, False),
        "click_multimask": (click, True),
    }


def make_engine(name: str, sam, info: dict, work: Path, threads: int):
    """``onnx`` / ``openvino``: the verified export; ``torch:DEVICE:PRECISION`` (``torch:cuda:fp16``): the
    PyTorch model on that device under that autocast precision (the GPU path)."""
    import copy

    from sam_medical.inference.engines import TorchEngine
    from sam_medical.inference.export_cache import load_or_export

    name = name.strip()
    if name.startswith("torch:"):
        _, device, precision = (name.split(":") + ["fp32"])[:3]
        return TorchEngine(copy.deepcopy(sam).to(device), precision=precision)
    return load_or_export(sam, work / "exports", info, backend=name, threads=threads)


def decode_mask(engine, emb: torch.Tensor, kwargs: dict, multimask: bool) -> np.ndarray:
    from sam_medical.inference.decoding import choose_mask
    from sam_medical.model.forward import PromptBatch, logits_to_canvas

    low, iou = engine.decode(emb, PromptBatch(**kwargs, multimask_output=multimask))
    low, _ = choose_mask(low.float(), iou)  # the best of three by predicted IoU, as served
    return (logits_to_canvas(low)[0, 0] > 0).cpu().numpy()


def agreement(files: list[Path], sam, engines: dict, stride: int) -> dict[str, dict[str, list]]:
    """``runtime -> prompt -> [(dice, pixels differing, reference non-empty)]``."""
    from sam_medical.inference.engines import TorchEngine
    from sam_medical.metrics import dice
    from sam_medical.model import forward as sf

    ref = TorchEngine(sam)
    out = {rt: {p: [] for p in PROMPTS} for rt in engines}
    for f in files:
        z = np.load(f)
        imgs, gts = z["imgs"], z["gts"]
        for i in range(0, len(imgs), stride):
            values = [int(v) for v in np.unique(gts[i]) if v != 0]
            if not values:
                continue
            images = sf.canvas_to_input(sam, torch.from_numpy(imgs[i : i + 1]))
            ref_emb = ref.encode(images)
            embs = {rt: e.encode(images) for rt, e in engines.items()}
            for v in values:
                for name, (kwargs, multimask) in prompts_for(gts[i] == v).items():
                    want = decode_mask(ref, ref_emb, kwargs, multimask)
                    for rt, e in engines.items():
                        got = decode_mask(e, embs[rt], kwargs, multimask)
                        out[rt][name].append((dice(want, got), int((want != got).sum()), bool(want.any())))
    return out


def summary(rows: list) -> dict:
    if not rows:
        return {"n": 0}
    d = np.array([r[0] for r in rows])
    return {
        "n": len(rows),
        "min": round(float(d.min()), 6),
        "mean": round(float(d.mean()), 6),
        "share_ge_0995": round(float((d >= 0.995).mean()), 4),
        "max_pixels_differing": max(r[1] for r in rows),
        "nonempty": sum(r[2] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--runtimes",
        default="onnx",
        help="comma-separated: onnx, openvino; on a GPU torch:cuda:fp32, torch:cuda:fp16, ...",
    )
    parser.add_argument("--stride", type=int, default=2, help="every n-th labelled slice (default 2)")
    parser.add_argument("--datasets", default="sts_ct,sct_t2,samples")
    parser.add_argument(
        "--shared", default=str(SHARED), help="the shared data folder (default ../shared/data)"
    )
    parser.add_argument(
        "--work", default=None, help="folder for the .npz files and exports (default: temporary)"
    )
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every engine (default 1)")
    args = parser.parse_args()
    if args.stride < 1:
        raise SystemExit("error: --stride must be at least 1")

    from sam_medical.model.build import build_sam

    torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="runtime_agreement_"))
    sam, info = build_sam("medsam_lite")
    engines = {
        rt.strip(): make_engine(rt, sam, info, work, args.threads)
        for rt in args.runtimes.split(",")
        if rt.strip()
    }
    command = "bench/runtime_agreement.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(
        json.dumps(
            {
                "command": command,
                "model": "medsam_lite",
                "load_average": os.getloadavg(),
                "engines": {rt: e.describe() for rt, e in engines.items()},
            }
        ),
        flush=True,
    )
    known = datasets(Path(args.shared))
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        if name not in known:
            raise SystemExit(f"error: unknown dataset {name!r}; choose from {', '.join(known)}")
        if known[name] is None:
            print(json.dumps({"dataset": name, "skipped": f"not found under {args.shared}"}), flush=True)
            continue
        t0 = time.perf_counter()
        files = preprocess(name, known[name], work)
        results = agreement(files, sam, engines, args.stride)
        for rt, per_prompt in results.items():
            for prompt, rows in per_prompt.items():
                line = {
                    "dataset": name,
                    "runtime": rt,
                    "prompt": prompt,
                    "stride": args.stride,
                    **summary(rows),
                }
                line["seconds"] = round(time.perf_counter() - t0, 1)
                line["load_average"] = [round(x, 2) for x in os.getloadavg()]
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
