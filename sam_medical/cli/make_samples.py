"""``sam-medical make-samples``: write deterministic CT-like phantoms as a MONAI Label datastore."""

from __future__ import annotations

import argparse
import time


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "make-samples",
        help="write CT-like phantom volumes and labels (a MONAI Label datastore)",
        description=(
            "Write N deterministic CT-like abdominal phantoms (int16 Hounsfield units, NIfTI) to OUT and "
            "their labels (1 liver, 2 spleen, 3 left kidney; uint8) to OUT/labels/final/ under the same "
            "names: the layout `monailabel start_server --studies OUT` expects. The same seed gives "
            "identical files."
        ),
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--count", type=int, default=4, metavar="N", help="number of volumes (default 4)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed, >= 0 (default 0)")
    return p


def run(args: argparse.Namespace) -> int:

    from sam_medical.quickstart.samples import make_samples  # deferred: keeps `sam-medical --help` fast

    start = time.perf_counter()
    paths = make_samples(args.out, args.count, args.seed, verbose=True)
    print(f"wrote {len(paths)} volumes and labels to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0
