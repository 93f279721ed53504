"""Preprocessing throughput against the floor of merely reading the volumes with nibabel.

Prints one JSON line per data set: volumes, slices (kept), seconds (the whole ``sam-medical preprocess``
CLI run in a subprocess, start-up included; median of 3 runs), slices_per_second, load_floor_seconds (reading image and
label with nibabel, in-process, nothing else) and ratio = seconds / load_floor_seconds.

    python bench/preprocess.py                 # synthetic 512x512x200 CT (+ ../shared/data when present)
    python bench/preprocess.py --dataset DIR   # any datastore / Decathlon folder
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_ct(folder: Path, shape=(512, 512, 200), seed: int = 0) -> Path:
    """A synthetic CT datastore: one int16 HU volume with an ellipsoidal body and a labelled organ."""
    import nibabel as nib

    (folder / "labels" / "final").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    i, j = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    body2d = ((i - shape[0] / 2) / (shape[0] * 0.42)) ** 2 + ((j - shape[1] / 2) / (shape[1] * 0.35)) ** 2 < 1
    img = np.full(shape, -1000, np.int16)
    lab = np.zeros(shape, np.uint8)
    for k in range(shape[2]):
        sl = np.where(body2d, 40, -1000).astype(np.float32) + rng.normal(0, 15, shape[:2]).astype(np.float32)
        t = (k - shape[2] * 0.3) / (shape[2] * 0.4)
        if 0 <= t <= 1:
            r = 60 * np.sin(np.pi * t) + 5
            organ = (i - 230) ** 2 + (j - 300) ** 2 < r**2
            sl[organ] += 80
            lab[:, :, k] = organ
        img[:, :, k] = np.clip(sl, -1024, 3000).astype(np.int16)
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    nib.save(nib.Nifti1Image(img, affine), folder / "ct512.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine), folder / "labels" / "final" / "ct512.nii.gz")
    return folder


def load_floor(dataset: Path) -> float:
    import nibabel as nib

    from sam_medical.volume.dataset_layout import find_cases

    cases, _, _ = find_cases(dataset)
    t = time.perf_counter()
    for c in cases:
        np.asarray(nib.load(str(c.image)).dataobj)
        np.asarray(nib.load(str(c.label)).dataobj)
    return time.perf_counter() - t


def bench(dataset: Path, name: str, workers: int, repeats: int = 3) -> dict:
    """Median of ``repeats`` CLI runs against the median of ``repeats`` nibabel reads."""
    floor = float(np.median([load_floor(dataset) for _ in range(repeats)]))
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "sam_medical.cli.main", "preprocess", "--dataset", str(dataset)]
            cmd += ["--out", out, "--workers", str(workers), "--quiet"]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            times.append(time.perf_counter() - t)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr)
            totals = json.loads(proc.stdout.strip().splitlines()[-1])
    seconds = float(np.median(times))
    return {
        "bench": "preprocess",
        "dataset": name,
        "volumes": totals["cases"],
        "slices": totals["slices_kept"],
        "seconds": round(seconds, 3),
        "slices_per_second": round(totals["slices_kept"] / seconds, 1),
        "load_floor_seconds": round(floor, 3),
        "ratio": round(seconds / floor, 2),
        "workers": workers,
        "repeats": repeats,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if args.dataset:
        print(json.dumps(bench(args.dataset, str(args.dataset), args.workers)))
        return
    cache = Path(tempfile.gettempdir()) / "sam_medical_bench_ct512"
    if not (cache / "ct512.nii.gz").exists():
        make_ct(cache)
    print(json.dumps(bench(cache, "synthetic_ct_512x512x200", args.workers)), flush=True)
    shared = ROOT.parent / "shared" / "data" / "sts_ct"
    if shared.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            ds = Path(tmp)
            (ds / "labels" / "final").mkdir(parents=True)
            for case in sorted(shared.iterdir()):
                if (case / "image.nii.gz").exists():
                    (ds / f"{case.name}.nii.gz").symlink_to(case / "image.nii.gz")
                    (ds / "labels" / "final" / f"{case.name}.nii.gz").symlink_to(case / "label.nii.gz")
            print(json.dumps(bench(ds, "shared/sts_ct", args.workers)))


if __name__ == "__main__":
    main()
