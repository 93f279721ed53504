"""The evaluation report: one self-contained HTML file.

No external resource of any kind: styles are inline, every figure is a PNG embedded as
``data:image/png;base64`` (:mod:`sam_medical.evaluation.report_figures`). All text from the data (case
names, paths) is HTML-escaped.

Sections: banners (the model equals its baseline; the model does not beat its own prompt box); settings
and policy, as tables; per-label table (labels by name, with the box-fill reference next to the model's
Dice); Dice after each corrective click (``--refine``); per-volume table; ``sam_3d`` from one prompt
(``--propagate``); the Dice distribution per label (box plot and histogram); before/after comparison
(table and scatter plot) when there is a baseline; overlays of the best, median and worst slice per
label; model and timing, as tables.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sam_medical.atomic import write_text_atomic
from sam_medical.evaluation.examples import Example
from sam_medical.evaluation.report_figures import (
    comparison_scatter_figure,
    dice_distribution_figure,
    figure_to_data_uri,
    overlay_figure,
)
from sam_medical.volume.label_names import label_display

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1400px}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}
td.l,th.l{text-align:left}.small{font-size:.85em;color:#555}
.grid{display:flex;flex-wrap:wrap;gap:12px}.grid figure{margin:0}
figcaption{font-size:.85em;max-width:900px}pre{background:#f6f6f6;padding:8px;font-size:.8em;white-space:pre-wrap}
.banner{border:3px solid #c62828;background:#ffebee;color:#b71c1c;font-size:1.25em;font-weight:bold;padding:.8em 1em;margin:1em 0}
.warn{border:2px solid #ef6c00;background:#fff3e0;color:#8a3c00;font-size:1.1em;font-weight:bold;padding:.6em 1em;margin:1em 0}
.note{border:1px solid #2e7d32;background:#e8f5e9;padding:.5em 1em;margin:1em 0}
table table{margin:0;font-size:1em}
"""


def _img(uri: str, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img src="{uri}" alt="{html.escape(alt)}"{w}>'


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"[{value[0]:.{digits}f}, {value[1]:.{digits}f}]"
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(h)}</th>' for i, h in enumerate(header))
    body = []
    for r in rows:
        body.append(
            "<tr>"
            + "".join(f'<td class="{"l" if i < left else ""}">{_fmt(v)}</td>' for i, v in enumerate(r))
            + "</tr>"
        )
    return f"<table><tr>{th}</tr>{''.join(body)}</table>"


def _value_html(value: Any, depth: int = 0) -> str:
    """A value as HTML: nested dicts as nested tables, lists of plain values comma-separated, lists of
    dicts as tables, the rest escaped text (:func:`_fmt`)."""
    if isinstance(value, dict):
        if not value:
            return "&ndash;"
        rows = "".join(
            f'<tr><th class="l">{html.escape(str(k))}</th><td class="l">{_value_html(v, depth + 1)}</td></tr>'
            for k, v in value.items()
        )
        return f"<table>{rows}</table>"
    if isinstance(value, list | tuple):
        if value and all(isinstance(v, dict) for v in value):
            return "".join(_value_html(v, depth + 1) for v in value)
        if len(value) == 2 and all(isinstance(v, float) for v in value):
            return _fmt(list(value))
        return ", ".join(_fmt(v) for v in value) if value else "&ndash;"
    return _fmt(value)


def _kv_table(items: dict[str, Any], header: tuple[str, str] = ("setting", "value")) -> str:
    """A two-column table; values that are dicts or lists become nested tables (never raw JSON)."""
    th = f'<tr><th class="l">{html.escape(header[0])}</th><th class="l">{html.escape(header[1])}</th></tr>'
    body = "".join(
        f'<tr><td class="l">{html.escape(str(k))}</td><td class="l">{_value_html(v)}</td></tr>'
        for k, v in items.items()
    )
    return f"<table>{th}{body}</table>"


def _label_names(summary: dict[str, Any]) -> dict[int, str]:
    return {int(v): str(n) for v, n in (summary.get("label_names") or {}).items()}


def banners(summary: dict[str, Any]) -> list[str]:
    """The report's loud lines: the model equals its baseline; the model does not beat its own box."""
    out = []
    comp = summary.get("comparison") or {}
    if comp.get("same_as_baseline"):
        out.append(
            "<div class='banner' id='same-as-baseline'>The model is the same as its baseline: "
            f"{html.escape(str(comp.get('verdict') or ''))}. The adapter adds nothing here.</div>"
        )
    box = summary.get("box_fill") or {}
    if box and not box.get("model_adds"):
        out.append(f"<div class='warn' id='box-fill'>{html.escape(box['verdict'])}.</div>")
    elif box:
        out.append(f"<div class='note' id='box-fill'>{html.escape(box['verdict'])}.</div>")
    return out


def _model_settings(model: dict[str, Any]) -> dict[str, Any]:
    adapter = model.get("adapter") or {}
    out = {
        "model": model.get("name", model.get("kind")),
        "checkpoint": model.get("checkpoint"),
        "random weights": model.get("random_weights"),
        "input size": model.get("image_size"),
        "adapter": adapter.get("path"),
        "adapter version": adapter.get("version"),
        "adapter epoch": adapter.get("epoch"),
        "adapter validation Dice": adapter.get("val_dice"),
        "device": model.get("device"),
    }
    return {k: v for k, v in out.items() if v is not None}


class _Page:
    """What every section needs: the summary, the labels and their display names."""

    def __init__(self, summary: dict[str, Any]) -> None:
        self.summary = summary
        self.labels = [int(v) for v in summary["labels"]]
        self.names = _label_names(summary)
        self.compare = summary.get("comparison") is not None

    def lab(self, v: int) -> str:
        return label_display(v, self.names)


def render_report(summary: dict[str, Any], rows: list[dict[str, Any]], examples: Sequence[Example]) -> str:
    """The report's HTML text."""
    page = _Page(summary)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>sam-medical evaluation</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>sam-medical evaluation report</h1>",
        f"<p class='small'>created {_fmt(summary.get('created'))}; {summary['data']['cases']} case(s); "
        f"{summary['overall']['objects_scored']} object(s) scored; labels: "
        f"{html.escape(', '.join(page.lab(v) for v in page.labels))}.</p>",
        *banners(summary),
        *_settings_section(page),
        *_per_label_section(page),
        *_empty_section(page),
        *_refine_section(page),
        *_volume_section(page),
        *_propagation_section(page),
        "<h2>Dice distribution</h2>",
        _img(
            figure_to_data_uri(dice_distribution_figure(rows, page.labels, page.names)),
            "Dice distribution per label",
        ),
        *_comparison_section(page, rows),
        *_examples_section(page, examples),
        "<h2>Model and timing</h2>",
    ]
    for key in ("model", "baseline", "timing"):
        if summary.get(key):
            parts += [f"<h3>{key}</h3>", _kv_table(summary[key], ("key", "value"))]
    parts.append("</body></html>")
    return "\n".join(parts)


def _settings_section(page: _Page) -> list[str]:
    summary = page.summary
    settings: dict[str, Any] = {"model": _model_settings(summary.get("model") or {})}
    if page.compare:
        settings["baseline"] = _model_settings(summary.get("baseline") or {})
    settings["prompt"] = {k: v for k, v in summary["prompt"].items() if v is not None}
    settings["labels"] = {page.lab(v): v for v in page.labels}
    return [
        "<h2>Settings</h2>",
        _kv_table(settings),
        "<h2>What was counted</h2>",
        _kv_table(summary["policy"], ("rule", "what it means")),
    ]


_PER_LABEL_HEADER = (
    "label",
    "slices scored",
    "skipped (absent)",
    "empty scored",
    "not in files",
    "Dice mean",
    "box-fill Dice",
    "model - box fill",
    "median",
    "sd",
    "95% CI (t)",
    "IoU mean",
    "volumes",
    "3D Dice mean",
    "HD95 mm mean",
    "HD95 median",
    "no HD95",
)


def _box_cols(e: dict[str, Any]) -> list[Any]:
    return [(e.get("box_fill_slice_dice") or {}).get("mean"), (e.get("vs_box_fill") or {}).get("mean_diff")]


def _per_label_section(page: _Page) -> list[str]:
    summary, labels = page.summary, page.labels
    table_rows = []
    for v in labels:
        e = summary["per_label"][str(v)]
        c, d = e["counts"], e["slice_dice"]
        table_rows.append(
            [page.lab(v), c["slices_scored_present"], c["slices_skipped_empty"], c["slices_scored_empty"]]
            + [c["slices_not_in_files"], d["mean"], *_box_cols(e), d["median"], d["std"], d["ci95"]]
            + [e["slice_iou"]["mean"], e["volumes"], e["volume_dice"]["mean"], e["hd95_mm"]["mean"]]
            + [e["hd95_mm"]["median"], e["volumes_without_hd95"]]
        )
    o = summary["overall"]
    skipped = sum(summary["per_label"][str(v)]["counts"]["slices_skipped_empty"] for v in labels)
    d = o["slice_dice"]
    table_rows.append(
        ["all", o["objects_present"], skipped, o["objects_scored"] - o["objects_present"], "", d["mean"]]
        + [*_box_cols(o), d["median"], d["std"], d["ci95"], o["slice_iou"]["mean"], o["volume_dice"]["n"]]
        + [o["volume_dice"]["mean"], o["hd95_mm"]["mean"], o["hd95_mm"]["median"], ""]
    )
    return [
        "<h2>Per label</h2>",
        "<p class='small'>Slice Dice over slices where the label is present; mean of the label means: "
        f"{_fmt(o['slice_dice_mean_of_labels'])}. Box-fill Dice: the prompt rectangle itself, filled, on the same "
        "objects (no box in the prompt: &ndash;).</p>",
        _table(_PER_LABEL_HEADER, table_rows),
    ]


def _empty_section(page: _Page) -> list[str]:
    if not page.summary["policy"]["include_empty"]:
        return []
    er = []
    for v in page.labels:
        e = page.summary["per_label"][str(v)]
        em = e["empty_slices"]
        er.append(
            [page.lab(v), em["n"], em["predicted_empty"], em["with_false_positive"]]
            + [em["mean_false_positive_area"], e["slice_dice_all"]["mean"]]
        )
    header = ["label", "empty slices scored", "predicted empty", "with false positive"]
    header += ["mean FP area (px)", "Dice incl. empty"]
    return ["<h3>Empty slices (--include-empty)</h3>", _table(header, er)]


def _refine_section(page: _Page) -> list[str]:
    summary, o = page.summary, page.summary["overall"]
    rounds = int(summary["prompt"].get("refine") or 0)
    if not (rounds and o.get("refine_curve")):
        return []
    rh = ["label", "first prompt", *[f"+{i} click{'s' if i > 1 else ''}" for i in range(1, rounds + 1)]]
    rr = [[page.lab(v), *summary["per_label"][str(v)].get("refine_curve", [])] for v in page.labels]
    rr.append(["all", *o["refine_curve"]])
    return [
        "<h2>Dice after each corrective click</h2>",
        f"<p class='small'>Mean slice Dice after the first prompt and after each of {rounds} corrective "
        f"click(s): {html.escape(summary['prompt'].get('refine_rule') or '')}.</p>",
        _table(rh, rr),
    ]


def _volume_section(page: _Page) -> list[str]:
    vh = ["case", "label", "slices scored", "gt voxels", "pred voxels", "3D Dice", "HD95 mm"]
    if page.compare:
        vh += ["baseline 3D Dice", "baseline HD95 mm"]
    vrows = []
    for e in page.summary["volumes"]:
        r = [e["case"], page.lab(e["label"]), e["slices_scored"], e["gt_voxels"], e["pred_voxels"]]
        r += [e["dice_3d"], e["hd95_mm"]]
        if page.compare:
            r += [e.get("baseline_dice_3d"), e.get("baseline_hd95_mm")]
        vrows.append(r)
    return ["<h2>Per volume</h2>", _table(vh, vrows, left=2)]


def _propagation_section(page: _Page) -> list[str]:
    prop = page.summary.get("propagation")
    if not prop:
        return []
    header = ["case", "label", "prompted slice k", "slices walked", "gt voxels", "pred voxels", "3D Dice"]
    rows = [
        [e["case"], page.lab(e["label"]), e["prompt_slice"], len(e["slices_walked"]), e["gt_voxels"]]
        + [e["pred_voxels"], e["dice_3d"]]
        for e in prop["objects"]
    ]
    means = [
        [page.lab(int(v)), d["n"], d["mean"], d["median"], d["min"]] for v, d in prop["per_label"].items()
    ]
    means.append(
        ["all", prop["volume_dice"]["n"], prop["volume_dice"]["mean"], prop["volume_dice"]["median"]]
    )
    means[-1].append(prop["volume_dice"]["min"])
    return [
        "<h2 id='propagation'>sam_3d from one prompt (--propagate)</h2>",
        f"<p class='small'>{html.escape(prop['task'])}. {html.escape(prop['slices_scored'])}.</p>",
        _table(["label", "objects", "3D Dice mean", "median", "min"], means),
        _table(header, rows, left=2),
    ]


def _comparison_section(page: _Page, rows: list[dict[str, Any]]) -> list[str]:
    if not page.compare:
        return []
    comp = page.summary["comparison"]
    ch = ["scope", "n", "mean diff", "median diff", "wins", "losses", "ties", "Wilcoxon W", "p"]
    scopes = [("all slices", comp["overall"])]
    scopes += [(f"{page.lab(v)} slices", comp["per_label"][str(v)]) for v in page.labels]
    scopes += [("volumes (3D Dice)", comp["volumes"])]
    keys = ("n", "mean_diff", "median_diff", "wins", "losses", "ties", "wilcoxon_statistic", "wilcoxon_p")
    crow = [[scope, *(c[k] for k in keys)] for scope, c in scopes]
    scatter = comparison_scatter_figure(rows, page.labels, page.names)
    return [
        "<h2>Before / after comparison</h2>",
        f"<p class='small'>Differences are {html.escape(comp['difference'])}; tie when |diff| &lt; "
        f"{comp['overall']['tie_tolerance']}; {html.escape(comp['overall']['test'])}; identical predictions: "
        f"{comp.get('identical_predictions', 0)} of {comp['overall']['n']}.</p>",
        _table(ch, crow),
        _img(figure_to_data_uri(scatter), "before vs after scatter"),
    ]


def _examples_section(page: _Page, examples: Sequence[Example]) -> list[str]:
    if not examples:
        return []
    parts = [
        "<h2>Examples</h2>",
        "<p class='small'>Green: ground truth; red: prediction; yellow dashed: baseline; blue: prompt (box, "
        "clicks), orange: background clicks. Left: the slice on the 256 canvas (valid region), pixel aspect "
        "from the spacing; right: a zoom on the object.</p>",
    ]
    for v in page.labels:
        figs = [ex for ex in examples if ex.label == v]
        if not figs:
            continue
        parts.append(f"<h3>{html.escape(page.lab(v))}</h3><div class='grid'>")
        for ex in figs:
            uri = figure_to_data_uri(overlay_figure(ex), dpi=100)
            parts.append(
                f"<figure>{_img(uri, ex.title)}<figcaption>{html.escape(ex.title)}</figcaption></figure>"
            )
        parts.append("</div>")
    return parts


def write_report(
    path: str | os.PathLike, summary: dict[str, Any], rows: list[dict[str, Any]], examples: Sequence[Example]
) -> Path:
    """Write the report to ``path`` atomically."""
    text = render_report(summary, rows, examples)
    write_text_atomic(path, text)
    return Path(path)
