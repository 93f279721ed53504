"""Batch slice evaluation: Dice per slice and per volume, aggregates, before/after comparison.

The input is a set of ``.npz`` slice files (docs/ARCHITECTURE.md), one per volume; each label value
present in a slice is one object with one deterministic prompt (:mod:`sam_medical.evaluation.cases`).
A built model is scored as the app serves it (:mod:`sam_medical.evaluation.served_sam`: the served
runtime, :func:`~sam_medical.inference.decoding.decode_prompts` and the multimask rule), at the source
slice resolution (:mod:`sam_medical.evaluation.scoring`); ``--propagate`` also scores ``sam_3d``
(:mod:`sam_medical.evaluation.propagated`).

Empty-slice policy (always written to ``summary.json``, :func:`~sam_medical.evaluation.summary.policy_dict`)
---------------------------------------------------------------------------------------------------------
* Default: only slices where the label is present are scored (a prompt needs an object). Slices of
  the file without that label are skipped and counted. 3D Dice / HD95 then see no false positive on
  slices without the label: they are optimistic, and say so.
* ``include_empty``: in a case that holds the label, every other slice of the file is scored too,
  prompted with the prompt of the nearest slice where the label is present; such a slice has
  ``dice = iou = 1`` if the prediction is empty, else 0, reported apart (``empty_slices``).

Speed: each slice image is encoded once (``batch_images`` slices per encoder call) and all of its
objects' prompts are decoded together (chunks of ``batch_prompts``). Cases are streamed one at a time;
only per-object numbers and the current case's masks are held in memory.

Testing: :func:`evaluate` takes any :class:`~sam_medical.evaluation.models.ModelUnderTest`, or a plain
function ``fn(request) -> masks`` or ``-> (masks, pred_iou)``, so a fixed, known model gives exact numbers.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sam_medical.atomic import write_json_atomic
from sam_medical.canvas.geometry import MODEL_SLICE_SIZE
from sam_medical.canvas.slice_file import load_npz
from sam_medical.device import resolve_device
from sam_medical.errors import UserInputError
from sam_medical.evaluation.cases import (
    CaseInfo,
    case_requests,
    dataset_label_names,
    list_slice_files,
    scan_dataset,
    valid_canvas,
)
from sam_medical.evaluation.config import EvalConfig, default_export_dir
from sam_medical.evaluation.examples import collect_examples
from sam_medical.evaluation.models import ModelFn, ModelUnderTest, as_model
from sam_medical.evaluation.outputs import jsonable, save_masks, write_csv
from sam_medical.evaluation.propagated import propagate_case, propagation_summary
from sam_medical.evaluation.report import write_report
from sam_medical.evaluation.scoring import Answer, answer_requests, box_fill_dice, score_slice, volume_scores
from sam_medical.evaluation.served_sam import ServedSam, build_served_sam
from sam_medical.evaluation.slice_requests import SliceRequest
from sam_medical.evaluation.summary import same_as_baseline, summarize
from sam_medical.evaluation.tally import CaseMasks, Tally, object_record


def evaluate(
    config: EvalConfig,
    model: ModelUnderTest | ModelFn | None = None,
    baseline: ModelUnderTest | ModelFn | None = None,
) -> dict[str, Any]:
    """Evaluate slice files; write ``slices.csv``, ``summary.json``, ``report.html`` (and ``masks/``).

    Args:
        config: data, outputs, prompts, policy and (when no model is given) the models to build.
        model: the model under test; ``None`` builds ``config.model`` as served.
        baseline: the model to compare against; ``None`` builds ``config.baseline`` when set.

    Returns:
        The summary (also written to ``summary.json``).

    Raises:
        UserInputError: no or bad slice files, a file without labels, unknown label values, a model or
            adapter that cannot be loaded, ``propagate`` without a SAM model.
    """
    t_start = time.perf_counter()
    cases, labels = scan_dataset(list_slice_files(config.data), config.labels)
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"--out {out_dir} is a file, not a folder")
    model, base, device = _models(config, model, baseline)
    if config.propagate and not isinstance(model, ServedSam):
        raise UserInputError("--propagate scores sam_3d: it needs a SAM model, not a function")
    batch_images = config.batch_images or (8 if str(device).startswith("cuda") else 1)
    tally = Tally(labels, dataset_label_names(cases))
    bar = _progress(_rows_to_score(cases, labels, config.include_empty), config.progress)
    t_loop = time.perf_counter()
    for case in cases:
        _score_case(case, config, model, base, tally, bar, batch_images, out_dir)
    bar.close()
    t_eval = time.perf_counter() - t_loop
    if not tally.rows:
        raise UserInputError("nothing to evaluate: no slice holds any of the chosen labels")
    summary = _summary(tally, cases, config, model, base)
    summary["timing"] = _timing(tally, t_eval, batch_images, config.batch_prompts, base is not None)
    return _write_outputs(summary, tally, cases, config, model, base, out_dir, t_start)


def _models(
    config: EvalConfig, model: ModelUnderTest | ModelFn | None, baseline: ModelUnderTest | ModelFn | None
) -> tuple[ModelUnderTest, ModelUnderTest | None, str]:
    """The model and baseline under test (built from ``config`` when not given) and the device."""
    device = "cpu"
    if model is None or (baseline is None and config.baseline is not None):
        device = resolve_device(config.device)

    def build(spec: Any) -> ServedSam:
        export_dir = config.export_dir if config.export_dir is not None else default_export_dir()
        return build_served_sam(
            spec,
            device=device,
            runtime=config.runtime,
            export_dir=export_dir,
            batch_prompts=config.batch_prompts,
            multimask=config.multimask,
            click_strategy=config.click_strategy,
        )

    if model is None:
        if config.model is None:
            raise UserInputError("no model to evaluate")
        model = build(config.model)
    if baseline is None and config.baseline is not None:
        baseline = build(config.baseline)
    return as_model(model), as_model(baseline) if baseline is not None else None, str(device)


def _rows_to_score(cases: Sequence[CaseInfo], labels: Sequence[int], include_empty: bool) -> int:
    """Slices with at least one object to score (the progress bar's total)."""
    total = 0
    for c in cases:
        for row in range(c.rows):
            if any(v in c.present and (c.present[v][row] or include_empty) for v in labels):
                total += 1
    return total


def _load_case(case: CaseInfo) -> tuple[np.ndarray, np.ndarray]:
    """The case's ``imgs (N, 256, 256, 3) uint8`` and ``gts (N, 256, 256)``, checked."""
    arrays = load_npz(case.path, keys=("imgs", "gts"))
    imgs, gts = arrays["imgs"], arrays["gts"]
    if imgs.shape != (case.rows, MODEL_SLICE_SIZE, MODEL_SLICE_SIZE, 3) or imgs.dtype != np.uint8:
        raise UserInputError(
            f"{case.path}: imgs must be ({case.rows}, 256, 256, 3) uint8, got {imgs.shape} {imgs.dtype}"
        )
    return imgs, gts


def _score_case(
    case: CaseInfo,
    config: EvalConfig,
    model: ModelUnderTest,
    base: ModelUnderTest | None,
    tally: Tally,
    bar: Any,
    batch_images: int,
    out_dir: Path,
) -> None:
    """Score every object of one case (2D, per volume and, with ``propagate``, 3D from one prompt)."""
    imgs, gts = _load_case(case)
    labels = tally.labels
    requests, skipped = case_requests(case, imgs, gts, labels, config.prompt, config.include_empty)
    tally.count_case(case, skipped)
    masks = CaseMasks(labels)
    if config.save_masks:
        shape_kji = case.volume_shape[::-1]
        masks.volume = np.zeros(shape_kji, np.uint8).transpose(2, 1, 0)
        masks.base_volume = np.zeros(shape_kji, np.uint8).transpose(2, 1, 0) if base is not None else None
    valid = valid_canvas(case.geometry)
    rounds = config.prompt.refine
    for batch in _batches(requests, batch_images):
        canvas_gts = [np.stack([gts[o.row] == o.label for o in req.objects]) for req in batch]
        answers = answer_requests(model, batch, canvas_gts, valid, rounds)
        base_answers = (
            answer_requests(base, batch, canvas_gts, valid, rounds) if base else [None] * len(batch)
        )
        for req, ans, bans in zip(batch, answers, base_answers, strict=True):
            _score_request(req, ans, bans, case, gts, config.save_masks, tally, masks)
            bar.update(1)
    tally.volumes += _volume_entries(case, labels, masks, base is not None)
    if masks.volume is not None:
        tally.mask_files += save_masks(out_dir, case, masks.volume, masks.base_volume)
    if config.propagate:
        tally.propagated += propagate_case(model, case, imgs, gts, labels, config.prompt)  # type: ignore[arg-type]


def _score_request(
    req: SliceRequest,
    ans: Answer,
    bans: Answer | None,
    case: CaseInfo,
    gts: np.ndarray,
    want_map: bool,
    tally: Tally,
    masks: CaseMasks,
) -> None:
    """Score one slice's answers (model and baseline) and add its rows and masks."""
    row, k = req.objects[0].row, req.objects[0].slice_index
    geom = case.geometry
    gt_src = geom.label_from_model(gts[row])
    obj_labels = [o.label for o in req.objects]
    gt_masks = np.stack([gt_src == v for v in obj_labels])
    s = score_slice(ans.final, gt_masks, obj_labels, geom, want_map)
    sb = score_slice(bans.final, gt_masks, obj_labels, geom, want_map) if bans is not None else None
    fill = box_fill_dice(req.prompts, gt_masks, geom)
    steps = [score_slice(st, gt_masks, obj_labels, geom, False).dice for st in ans.steps[:-1]] + [s.dice]
    for p, obj in enumerate(req.objects):
        masks.scored[obj.label] += 1
        tally.counts[obj.label]["slices_scored_present" if obj.gt_present else "slices_scored_empty"] += 1
        record = object_record(obj, p, s, sb, fill[p], gt_masks[p], ans, steps, tally.names)
        if sb is not None and sb.masks[p].any():
            masks.base[obj.label][k] = sb.masks[p]
        tally.rows.append(record)
        if s.masks[p].any():
            masks.pred[obj.label][k] = s.masks[p]
        if obj.gt_present:
            masks.truth[obj.label][k] = gt_masks[p]
    if masks.volume is not None:
        masks.volume[:, :, k] = s.label_map
        if masks.base_volume is not None and sb is not None:
            masks.base_volume[:, :, k] = sb.label_map
    tally.slices += 1
    tally.objects += len(req.objects)


def _volume_entries(case: CaseInfo, labels: Sequence[int], masks: CaseMasks, compare: bool) -> list[dict]:
    """3D Dice and HD95 of the case's scored slices, per label present in it."""
    hw = (case.geometry.height, case.geometry.width)
    out = []
    for v in labels:
        if v not in case.present:
            continue
        entry = {"case": case.name, "label": v, "slices_scored": masks.scored[v]}
        entry.update(volume_scores(masks.pred[v], masks.truth[v], hw, case.spacing))
        if compare:
            b = volume_scores(masks.base[v], masks.truth[v], hw, case.spacing)
            entry.update(
                baseline_dice_3d=b["dice_3d"],
                baseline_hd95_mm=b["hd95_mm"],
                baseline_pred_voxels=b["pred_voxels"],
            )
        out.append(entry)
    return out


def _summary(
    tally: Tally,
    cases: Sequence[CaseInfo],
    config: EvalConfig,
    model: ModelUnderTest,
    base: ModelUnderTest | None,
) -> dict[str, Any]:
    """The aggregates, what was scored (model, baseline) and, with ``propagate``, the 3D results."""
    info_model = jsonable(getattr(model, "info", {"kind": type(model).__name__}))
    info_base = jsonable(getattr(base, "info", {"kind": type(base).__name__})) if base is not None else None
    summary = summarize(tally.rows, tally.volumes, tally.labels, tally.counts, config, cases)
    summary["model"] = info_model
    summary["baseline"] = info_base
    if summary["comparison"] is not None:
        summary["comparison"].update(
            same_as_baseline(summary["comparison"], tally.rows, info_model, info_base)
        )
    if config.propagate:
        summary["propagation"] = propagation_summary(tally.propagated, tally.labels)
    return summary


def _timing(tally: Tally, seconds: float, batch_images: int, batch_prompts: int, compare: bool) -> dict:
    return {
        "evaluation_seconds": round(seconds, 3),
        "slices": tally.slices,
        "objects": tally.objects,
        "slices_per_second": round(tally.slices / seconds, 3) if seconds > 0 else None,
        "objects_per_second": round(tally.objects / seconds, 3) if seconds > 0 else None,
        "batch_images": batch_images,
        "batch_prompts": batch_prompts,
        "note": "models run once per image batch" + (" (model and baseline)" if compare else ""),
    }


def _write_outputs(
    summary: dict[str, Any],
    tally: Tally,
    cases: Sequence[CaseInfo],
    config: EvalConfig,
    model: ModelUnderTest,
    base: ModelUnderTest | None,
    out_dir: Path,
    t_start: float,
) -> dict[str, Any]:
    """Write ``slices.csv``, ``report.html`` and ``summary.json``; return the summary as written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "slices.csv"
    write_csv(csv_path, tally.rows, with_baseline=base is not None)
    outputs: dict[str, Any] = {"csv": str(csv_path), "summary": str(out_dir / "summary.json"), "report": None}
    if tally.mask_files:
        outputs["masks"] = tally.mask_files
    summary["outputs"] = outputs
    if config.report:
        examples = collect_examples(tally.rows, cases, tally.labels, model, base, config)
        report_path = out_dir / "report.html"
        write_report(report_path, summary, tally.rows, examples)
        outputs["report"] = str(report_path)
    summary["timing"]["total_seconds"] = round(time.perf_counter() - t_start, 3)
    write_json_atomic(out_dir / "summary.json", jsonable(summary))
    return jsonable(summary)


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _NoBar:
    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm  # only with a progress bar

    return tqdm(total=total, unit="slice", desc="evaluate", file=sys.stderr)
