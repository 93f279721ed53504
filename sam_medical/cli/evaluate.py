"""``sam-medical evaluate``: slice-by-slice Dice evaluation of a model (and a baseline) with a report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from sam_medical.errors import UserInputError
from sam_medical.model.registry import DEFAULT_MODEL, MODEL_NAMES
from sam_medical.outdir import prepare_output_dir, remove_created
from sam_medical.volume.label_names import find_label_names, label_display


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate",
        help="score a model slice by slice (Dice, IoU, 3D Dice, HD95) and write CSV, JSON and an HTML report",
        description="Prompt every labelled object of every slice deterministically, predict it, and score it at "
        "the source resolution. Writes OUT/slices.csv, OUT/summary.json and OUT/report.html (self-contained).",
    )
    _add_data_and_model(p)
    _add_prompt(p)
    _add_runtime(p)
    _add_outputs_and_baseline(p)
    return p


def _add_data_and_model(p: argparse.ArgumentParser) -> None:
    """--data/--dataset and the model: family, weights, adapter, input size."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--data", metavar="NPZ_DIR", help="folder of .npz slice files (from sam-medical preprocess)"
    )
    src.add_argument(
        "--dataset",
        metavar="DIR",
        help="raw volumes (MONAI Label datastore or Decathlon folder), preprocessed into OUT/slices/ first",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=MODEL_NAMES,
        help=f"model family (default {DEFAULT_MODEL}: LiteMedSAM)",
    )
    p.add_argument(
        "--checkpoint", help="model weights file (official SAM checkpoint or sam-medical model file)"
    )
    p.add_argument("--random-weights", action="store_true", help="seeded random weights (no checkpoint)")
    p.add_argument("--model-seed", type=int, default=0, help="seed of random weights (default 0)")
    p.add_argument("--adapter", help="LoRA adapter file to load onto the model")
    p.add_argument("--image-size", type=int, default=256, help="model input size (256 native, 1024 official)")


def _add_prompt(p: argparse.ArgumentParser) -> None:
    """How each object is prompted: kind, clicks, corrective clicks, jitter, seed."""
    p.add_argument(
        "--prompt",
        choices=("box", "point", "box+point"),
        required=True,
        help="prompt of each object: tight (or jittered) box, interior point(s), or both",
    )
    p.add_argument("--points", type=int, default=1, help="foreground clicks for point prompts (default 1)")
    p.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="N",
        help="N corrective clicks after the first prompt, each at the centre of the largest error (foreground "
        "in a miss, background in a leak), decoded with all clicks so far: '--prompt point --refine 2' is "
        "3-click Dice (default 0)",
    )
    p.add_argument(
        "--box-jitter", type=int, default=0, help="random box jitter in pixels at 256 (default 0: tight)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts (jitter, extra clicks)")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    """How the model runs, as served: multimask rule, runtime, export cache, 3D propagation."""
    p.add_argument(
        "--multimask",
        default="auto",
        metavar="{auto,on,off}",
        help="SAM's three masks and the best by predicted IoU: auto (default, as served: only for a lone "
        "click), on (every prompt) or off (the single-mask output)",
    )
    p.add_argument(
        "--click-strategy",
        default="auto",
        metavar="{auto,direct,click_to_box}",
        help="how clicks are answered, as served: auto (default: by what the weights were trained with; "
        "click_to_box for a box-only model such as medsam_lite), direct (clicks to the decoder) or "
        "click_to_box (boxes placed around the clicks, the best by predicted IoU)",
    )
    p.add_argument(
        "--runtime",
        default="auto",
        metavar="{auto,torch,onnx,openvino}",
        help="what runs the model, as served: auto (default: onnx on the CPU when installed, torch on CUDA), "
        "torch, onnx (ONNX Runtime) or openvino; exports are verified against PyTorch and cached",
    )
    p.add_argument(
        "--export-dir",
        metavar="DIR",
        help="cache of verified ONNX exports (default: $SAM_MEDICAL_CACHE/exports or ~/.cache/sam_medical/exports)",
    )
    p.add_argument(
        "--propagate",
        action="store_true",
        help="also score sam_3d: one prompt per object on its largest slice, propagated through the file's "
        "slices; reports the 3D Dice per object and its mean",
    )


def _add_outputs_and_baseline(p: argparse.ArgumentParser) -> None:
    """The output folder, the baseline, what is scored and written, batching."""
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--baseline-adapter", help="compare with the same model carrying this adapter instead")
    base.add_argument(
        "--baseline-model",
        help="compare with this model, without adapter (e.g. the same name as --model: before fine-tuning)",
    )
    p.add_argument("--baseline-checkpoint", help="weights of --baseline-model")
    p.add_argument("--save-masks", action="store_true", help="write predicted volumes as NIfTI to OUT/masks/")
    p.add_argument(
        "--include-empty",
        action="store_true",
        help="also score slices without the label, prompted from the nearest labelled slice (counts false positives)",
    )
    p.add_argument(
        "--labels", help="comma-separated label values or names to score, e.g. liver,3 (default: all present)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--batch-prompts", type=int, default=32, help="prompts per decoder call (default 32)")
    p.add_argument(
        "--batch-images", type=int, default=0, help="slices per encoder call (default: 1 CPU, 8 GPU)"
    )
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from sam_medical.evaluation.config import ModelSpec, PromptSettings  # torch: keeps --help fast
    from sam_medical.inference.decoding import check_multimask  # torch: keeps --help fast
    from sam_medical.inference.engines import check_runtime  # torch: keeps --help fast
    from sam_medical.inference.strategies import check_click_strategy  # torch: keeps --help fast
    from sam_medical.model.build import check_image_size, check_model_name  # torch: keeps --help fast

    check_runtime(args.runtime, "--runtime")
    check_multimask(args.multimask, "--multimask")
    check_click_strategy(args.click_strategy, "--click-strategy")
    check_model_name(args.model)
    check_image_size(args.image_size, args.model)
    if args.baseline_checkpoint and not args.baseline_model:
        raise UserInputError("--baseline-checkpoint goes with --baseline-model")
    for flag, value in (("--adapter", args.adapter), ("--baseline-adapter", args.baseline_adapter)):
        if value and not Path(value).is_file():
            raise UserInputError(f"{flag} file not found: {value}")
    if args.baseline_model:
        check_model_name(args.baseline_model)
    prompt = PromptSettings(
        kind=args.prompt, points=args.points, box_jitter=args.box_jitter, seed=args.seed, refine=args.refine
    )
    labels = parse_label_selection(args.labels)
    model = ModelSpec(
        name=args.model,
        checkpoint=args.checkpoint,
        random_weights=args.random_weights,
        adapter=args.adapter,
        image_size=args.image_size,
        seed=args.model_seed,
    )
    baseline = None
    if args.baseline_adapter:  # the same model with another adapter
        baseline = dataclasses.replace(model, adapter=args.baseline_adapter)
    elif args.baseline_model:  # another model, same input size and seed, no adapter
        baseline = dataclasses.replace(
            model,
            name=args.baseline_model,
            checkpoint=args.baseline_checkpoint,
            random_weights=args.random_weights and not args.baseline_checkpoint,
            adapter=None,
        )

    out = Path(args.out)
    created = prepare_output_dir(out)
    try:
        return _evaluate(args, out, prompt, labels, model, baseline)
    except UserInputError:
        remove_created(created)  # a refused evaluation leaves no empty output folder behind
        raise


def parse_label_selection(text: str | None) -> tuple[int | str, ...] | None:
    """``"liver,3"`` -> ``("liver", 3)``: values (1..255) and names; ``None``/empty -> ``None`` (all)."""
    if not text:
        return None
    out: list[int | str] = []
    for item in (t.strip() for t in str(text).split(",")):
        if not item:
            continue
        if item.lstrip("-").isdigit():
            if not 1 <= int(item) <= 255:
                raise UserInputError(f"--labels values must be in 1..255, got {item}")
            out.append(int(item))
        else:
            out.append(item)
    if not out:
        raise UserInputError(f"--labels must name labels or give their values, got {text!r}")
    return tuple(out)


#: ``EvalConfig`` fields taken as they are from the command-line option of the same name.
_SAME_NAMED_OPTIONS = (
    "include_empty",
    "save_masks",
    "device",
    "batch_prompts",
    "batch_images",
    "multimask",
    "click_strategy",
    "runtime",
    "export_dir",
    "propagate",
)


def _evaluate(
    args: argparse.Namespace, out: Path, prompt: Any, labels: Any, model: Any, baseline: Any
) -> int:
    """Preprocess ``--dataset`` if given, evaluate, print the summary; ``out`` exists and is writable."""
    from sam_medical.evaluation.config import EvalConfig  # torch: keeps --help fast
    from sam_medical.evaluation.run import evaluate  # torch: keeps --help fast

    extra: dict = {}
    if args.dataset:
        data, extra["data"] = _preprocess_dataset(args, out)
    else:
        data = args.data

    config = EvalConfig(
        data=data,
        out_dir=out,
        prompt=prompt,
        model=model,
        baseline=baseline,
        labels=labels,
        report=not args.no_report,
        progress=not args.quiet and sys.stderr.isatty(),
        extra=extra,
        **{name: getattr(args, name) for name in _SAME_NAMED_OPTIONS},
    )
    summary = evaluate(config)
    _print_summary(summary)
    result = {
        "out": str(out),
        "objects": summary["overall"]["objects_scored"],
        "slice_dice_mean": summary["overall"]["slice_dice"]["mean"],
        "volume_dice_mean": summary["overall"]["volume_dice"]["mean"],
    }
    if summary.get("box_fill"):
        result["box_fill_dice_mean"] = summary["box_fill"]["box_fill_slice_dice"]
        result["model_adds_over_box_fill"] = summary["box_fill"]["model_adds"]
    if summary["overall"].get("refine_curve"):
        result["dice_after_each_click"] = summary["overall"]["refine_curve"]
    if summary.get("comparison"):
        result["dice_diff_mean"] = summary["comparison"]["overall"]["mean_diff"]
        result["wilcoxon_p"] = summary["comparison"]["overall"]["wilcoxon_p"]
        result["same_as_baseline"] = summary["comparison"]["same_as_baseline"]
    if summary.get("propagation"):
        result["sam_3d_dice_mean"] = summary["propagation"]["volume_dice"]["mean"]
    result["runtime"] = (summary.get("model") or {}).get("runtime", {}).get("runtime")
    print(json.dumps(result))
    return 0


def _preprocess_dataset(args: argparse.Namespace, out) -> tuple[list, dict]:
    """Preprocess ``--dataset`` into ``OUT/slices/`` with ``sam-medical preprocess``'s code.

    With ``--include-empty`` every slice is kept (``keep_empty=1``), so that false positives anywhere in
    the volume are counted. Any failed case is an error: an evaluation must not silently drop volumes.
    """
    from sam_medical.canvas.preprocess import (  # image readers: keeps --help fast
        PreprocessOptions,
        preprocess_cases,
    )
    from sam_medical.volume.dataset_layout import find_cases  # keeps --help fast

    cases, layout, unlabelled = find_cases(args.dataset)
    names = find_label_names(args.dataset)  # labels.json beside the volumes, or a Decathlon dataset.json
    options = PreprocessOptions(keep_empty=1.0 if args.include_empty else 0.0, label_names=names or None)
    slices_dir = out / "slices"
    manifest = preprocess_cases(
        cases,
        slices_dir,
        options,
        workers=min(2, os.cpu_count() or 1),
        progress=not args.quiet and sys.stderr.isatty(),
        extra={"layout": layout, "unlabelled_images": unlabelled},
    )
    if manifest["failed"]:
        first = manifest["failed"][0]
        raise UserInputError(
            f"{len(manifest['failed'])} of {len(cases)} case(s) could not be preprocessed, e.g. "
            f"{first['case']}: {first['error']}"
        )
    files = [slices_dir / c["npz"] for c in manifest["cases"]]
    info = {
        "dataset": str(Path(args.dataset).resolve()),
        "layout": layout,
        "preprocessed_to": str(slices_dir),
        "keep_empty": options.keep_empty,
        "unlabelled_images": unlabelled,
    }
    return files, info


def _print_summary(summary: dict) -> None:
    def f(v, d=3):
        return "-" if v is None else f"{v:.{d}f}"

    names = {int(v): n for v, n in summary.get("label_names", {}).items()}
    for label, e in summary["per_label"].items():
        c = e["counts"]
        d = e["slice_dice"]
        fill = e.get("box_fill_slice_dice")
        steps = e.get("refine_curve")
        print(
            f"{label_display(int(label), names)}: slice Dice mean {f(d['mean'])} median {f(d['median'])} "
            f"(n={d['n']}, {c['slices_skipped_empty']} slices without the label skipped, "
            f"{c['slices_scored_empty']} scored empty)"
            + (f", box fill {f(fill['mean'])}" if fill else "")
            + (f", after each click {' -> '.join(f(x) for x in steps)}" if steps else "")
            + f"; 3D Dice {f(e['volume_dice']['mean'])}, HD95 {f(e['hd95_mm']['mean'], 2)} mm over "
            f"{e['volumes']} volume(s)"
        )
    if summary.get("box_fill"):
        print(summary["box_fill"]["verdict"])
    prop = summary.get("propagation")
    if prop:
        for e in prop["objects"]:
            print(
                f"sam_3d {e['case']} {label_display(int(e['label']), names)}: 3D Dice {f(e['dice_3d'])} from one "
                f"prompt on k={e['prompt_slice']} ({len(e['slices_walked'])} slices walked)"
            )
        print(f"sam_3d 3D Dice mean {f(prop['volume_dice']['mean'])} ({prop['slices_scored']})")
    comp = summary.get("comparison")
    if comp:
        c = comp["overall"]
        print(
            f"vs baseline: mean Dice diff {f(c['mean_diff'], 4)}, median {f(c['median_diff'], 4)}, "
            f"wins/losses/ties {c['wins']}/{c['losses']}/{c['ties']}, Wilcoxon p {f(c['wilcoxon_p'], 4)}"
        )
        if comp.get("same_as_baseline"):
            print(f"SAME AS BASELINE: {comp['verdict']}")
    outs = summary.get("outputs", {})
    print(
        f"wrote {outs.get('csv')}, {outs.get('summary')}"
        + (f", {outs['report']}" if outs.get("report") else "")
    )
