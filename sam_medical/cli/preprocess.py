"""``sam-medical preprocess``: volumes + label maps -> 256x256 ``.npz`` slice files and ``manifest.json``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sam_medical.errors import UserInputError
from sam_medical.volume.label_names import find_label_names, label_display, names_by_value, read_labels_file


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "preprocess",
        help="turn NIfTI volumes and label maps into 256x256 .npz slice files",
        description="Turn volumes and label maps into 256x256 .npz slice files (keys imgs, gts, slice_index, ...). "
        "Slices are volume[:, :, k] in stored IJK order, resized longest-side-to-256 and zero-padded bottom/right.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="one image (.nii, .nii.gz, .nrrd, .mha); needs --label")
    src.add_argument(
        "--dataset",
        help="a MONAI Label datastore (labels/final/), a Decathlon folder (imagesTr/, labelsTr/), or a folder of case folders (<case>/image.nii.gz + label.nii.gz)",
    )
    p.add_argument("--label", help="the label map of --image")
    p.add_argument("--out", required=True, help="output folder for <case>.npz and manifest.json")
    p.add_argument(
        "--modality",
        choices=("auto", "ct", "mr"),
        default="auto",
        help="ct: window; mr: 0.5-99.5 percentile clip; auto: decide from the intensities (default)",
    )
    p.add_argument(
        "--window",
        default=None,
        help="CT window: abdomen (L40/W400, default), soft_tissue, bone, lung, or LEVEL,WIDTH",
    )
    p.add_argument("--labels", default=None, help="comma-separated label values to keep (default: all)")
    p.add_argument(
        "--min-area", type=int, default=0, help="drop 2D connected components smaller than this (pixels)"
    )
    p.add_argument(
        "--keep-empty",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="fraction of label-free slices to keep as negatives (default 0: skip and count them)",
    )
    p.add_argument(
        "--label-names",
        metavar="JSON",
        help='label names {"liver": 1, ...} recorded in the slice files (default: labels.json beside the '
        "volumes, or a Decathlon dataset.json)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for choosing kept empty slices")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel processes")
    p.add_argument("--no-compress", action="store_true", help="store the .npz uncompressed (faster, larger)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from sam_medical.canvas.preprocess import preprocess_cases  # volume readers: keeps --help fast

    if args.label_names:
        names = read_labels_file(args.label_names)
    else:
        names = find_label_names(Path(args.image).parent if args.image else Path(args.dataset))
    options = _options(args, names)
    if args.workers < 1:
        raise UserInputError("--workers must be at least 1")
    cases, extra = _cases(args)
    manifest = preprocess_cases(
        cases,
        args.out,
        options,
        workers=args.workers,
        progress=not args.quiet and sys.stderr.isatty(),
        extra=extra,
    )
    if not manifest["cases"]:  # nothing was written: one line says why
        first = manifest["failed"][0]
        if len(cases) == 1:
            raise UserInputError(first["error"])
        raise UserInputError(
            f"none of the {len(cases)} cases could be preprocessed (nothing written); "
            f"e.g. {first['case']}: {first['error']}"
        )
    return _report(args, manifest, names, len(cases))


def _options(args: argparse.Namespace, names: dict[str, int]):
    """The run's ``PreprocessOptions`` from the command line and the label names found."""
    from sam_medical.canvas.preprocess import PreprocessOptions, parse_label_list  # keeps --help fast

    return PreprocessOptions(
        modality=args.modality,
        window=args.window,
        labels=parse_label_list(args.labels),
        min_area=args.min_area,
        keep_empty=args.keep_empty,
        seed=args.seed,
        compress=not args.no_compress,
        label_names=names or None,
    )


def _cases(args: argparse.Namespace) -> tuple[list, dict]:
    """``(cases, manifest extra)``: the ``--image``/``--label`` pair, or the cases of ``--dataset``."""
    from sam_medical.volume.dataset_layout import CasePair, find_cases  # keeps --help fast
    from sam_medical.volume.intensity import parse_window  # numpy: keeps --help fast
    from sam_medical.volume.io import image_stem  # numpy: keeps --help fast

    if args.image and not args.label:
        raise UserInputError("--image needs --label")
    if not args.image and args.label:
        raise UserInputError("--label goes with --image, not with --dataset")
    if args.window is not None:
        parse_window(args.window)
    if args.image:
        return [CasePair(image_stem(args.image), Path(args.image), Path(args.label))], {"layout": "pair"}
    cases, layout, unlabelled = find_cases(args.dataset)
    return cases, {"layout": layout, "unlabelled_images": unlabelled}


def _report(args: argparse.Namespace, manifest: dict, names: dict[str, int], n_cases: int) -> int:
    """Print one line per case, the failures and the totals (JSON); exit status 2 if any case failed."""
    by_value = names_by_value(names)
    for case in manifest["cases"]:
        labels = ", ".join(label_display(v, by_value) for v in case["labels"])
        print(
            f"{case['case']}: kept {case['slices_kept']} of {case['slices_total']} slices "
            f"({case['slices_skipped_empty']} empty skipped), labels {labels}, {case['modality']} {case['window']['name']}"
        )
    for bad in manifest["failed"]:
        print(f"FAILED {bad['case']}: {bad['error']}", file=sys.stderr)
    print(json.dumps({"out": str(args.out), **manifest["totals"]}))
    if manifest["failed"]:
        print(
            f"error: {len(manifest['failed'])} of {n_cases} cases failed (listed above and in manifest.json)",
            file=sys.stderr,
        )
        return 2
    return 0
