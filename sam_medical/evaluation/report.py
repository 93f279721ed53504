"""The evaluation report: one self-contained HTML file.

No external resource of any kind: styles are inline, every figure is a PNG drawn with matplotlib's Agg
canvas (no pyplot, no global state) and embedded as ``data:image/png;base64``; PNG metadata is
stripped so that not even the encoded bytes carry a URL. All text from the data (case names, paths) is
HTML-escaped.

Sections: banners (the model equals its baseline; the model does not beat its own prompt box); settings
and policy, as tables; per-label table (labels by name, with the box-fill reference next to the model's
Dice); Dice after each corrective click (``--refine``); per-volume table; the Dice distribution per label
(box plot and histogram); before/after comparison (table and scatter plot) when there is a baseline;
overlays of the best, median and worst slice per label (image, ground-truth contour, predicted contour,
baseline contour, and the prompt: box and points; the whole slice and a zoom on the object, each panel at
least :data:`MIN_OVERLAY_PX` pixels, so that a small kidney is visible); model and timing, as tables.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sam_medical.atomic import write_text_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from sam_medical.evaluation.run import Example

GT_COLOR = "#00c853"
PRED_COLOR = "#ff1744"
BASE_COLOR = "#ffd600"
PROMPT_COLOR = "#2979ff"
NEGATIVE_COLOR = "#ff9100"
#: Each overlay panel is drawn at least this many pixels wide and high.
MIN_OVERLAY_PX = 384
#: Pixels of context around the object in the zoomed panel (canvas pixels).
ZOOM_MARGIN = 12
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


def figure_to_data_uri(fig: Figure, dpi: int = 100) -> str:
    """A matplotlib figure as ``data:image/png;base64,...`` (PNG metadata removed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


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


# --- figures ---------------------------------------------------------------------------------------


def _label_text(v: int, names: dict[int, str] | None) -> str:
    from sam_medical.volume.label_names import label_display

    return label_display(v, names or {})


def dice_distribution_figure(
    rows: list[dict[str, Any]], labels: Sequence[int], names: dict[int, str] | None = None
) -> Figure:
    """Box plot and histogram of the per-slice Dice of each label (present slices)."""
    from matplotlib.figure import Figure

    data = [[r["dice"] for r in rows if r["label"] == v and r["gt_present"]] for v in labels]
    fig = Figure(figsize=(11, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.boxplot(data, tick_labels=[_label_text(v, names) for v in labels], showmeans=True)
    ax1.set_xlabel("label")
    ax1.set_ylabel("slice Dice")
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_title("Dice per label (box: quartiles, triangle: mean)")
    bins = np.linspace(0, 1, 21)
    for v, d in zip(labels, data, strict=True):
        ax2.hist(d, bins=bins, histtype="step", linewidth=1.8, label=f"{_label_text(v, names)} (n={len(d)})")
    ax2.set_xlabel("slice Dice")
    ax2.set_ylabel("slices")
    ax2.set_title("Dice histogram")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def comparison_scatter_figure(
    rows: list[dict[str, Any]], labels: Sequence[int], names: dict[int, str] | None = None
) -> Figure:
    """Per-object baseline Dice (x) against model Dice (y), one colour per label, with the diagonal."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 5))
    ax = fig.subplots()
    for v in labels:
        pts = [(r["baseline_dice"], r["dice"]) for r in rows if r["label"] == v and r["gt_present"]]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.scatter(x, y, s=10, alpha=0.6, label=_label_text(v, names))
    ax.plot([0, 1], [0, 1], color="#888", linewidth=1, linestyle="--")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("baseline (before) slice Dice")
    ax.set_ylabel("model (after) slice Dice")
    ax.set_title("before vs after (above the diagonal: better)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def zoom_window(ex: Example) -> tuple[float, float, float, float]:
    """``(x0, x1, y0, y1)`` of the zoomed panel: the object (its ground truth, the prompt box and the
    foreground clicks; the prediction is cut where it strays) with :data:`ZOOM_MARGIN` pixels around it,
    at least 32 pixels wide and high, inside the image."""
    h, w = ex.image.shape
    xs = [float(x) for x in np.flatnonzero(ex.gt.any(axis=0))]
    ys = [float(y) for y in np.flatnonzero(ex.gt.any(axis=1))]
    if ex.prompt.box is not None:
        x0, y0, x1, y1 = (float(v) for v in ex.prompt.box)
        xs += [x0, x1]
        ys += [y0, y1]
    if ex.prompt.points is not None:
        pts = np.asarray(ex.prompt.points, float)
        fg = (
            np.ones(len(pts), bool)
            if ex.prompt.point_labels is None
            else np.asarray(ex.prompt.point_labels) == 1
        )
        xs += pts[fg, 0].tolist()
        ys += pts[fg, 1].tolist()
    if not xs:
        return -0.5, w - 0.5, -0.5, h - 0.5
    # a window of the image's own shape (so that it fills its panel as the whole slice does), moved
    # inside the image rather than cut at its border
    half_x = max(16.0, (max(xs) - min(xs)) / 2 + ZOOM_MARGIN, ((max(ys) - min(ys)) / 2 + ZOOM_MARGIN) * w / h)
    half_y = half_x * h / w

    def span(centre: float, half: float, size: int) -> tuple[float, float]:
        if 2 * half >= size:
            return -0.5, size - 0.5
        lo = min(max(centre - half, -0.5), size - 0.5 - 2 * half)
        return lo, lo + 2 * half

    x0, x1 = span((min(xs) + max(xs)) / 2, half_x, w)
    y0, y1 = span((min(ys) + max(ys)) / 2, half_y, h)
    return x0, x1, y0, y1


def _draw_overlay(ax: Any, ex: Example, window: tuple[float, float, float, float] | None) -> list:
    """Draw image, contours and prompt on ``ax`` (whole slice, or ``window``); return legend handles."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    ax.imshow(ex.image, cmap="gray", vmin=0, vmax=255, aspect=ex.aspect, interpolation="nearest")
    handles = [
        Line2D([], [], color=GT_COLOR, label="ground truth"),
        Line2D([], [], color=PRED_COLOR, label="prediction"),
    ]
    for mask, color in ((ex.gt, GT_COLOR), (ex.pred, PRED_COLOR)):
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors=[color], linewidths=1.4)
    if ex.baseline is not None:
        handles.append(Line2D([], [], color=BASE_COLOR, linestyle="--", label="baseline"))
        if ex.baseline.any():
            ax.contour(
                ex.baseline.astype(float),
                levels=[0.5],
                colors=[BASE_COLOR],
                linewidths=1.2,
                linestyles="dashed",
            )
    if ex.prompt.box is not None:
        x0, y0, x1, y1 = (float(v) for v in ex.prompt.box)
        ax.add_patch(
            Rectangle(
                (x0 - 0.5, y0 - 0.5),
                x1 - x0 + 1,
                y1 - y0 + 1,
                fill=False,
                edgecolor=PROMPT_COLOR,
                linewidth=1.3,
            )
        )
        handles.append(Line2D([], [], color=PROMPT_COLOR, label="box prompt"))
    if ex.prompt.points is not None:
        pts = np.asarray(ex.prompt.points, float)
        labels = (
            np.asarray(ex.prompt.point_labels)
            if ex.prompt.point_labels is not None
            else np.ones(len(pts), int)
        )
        for value, color, marker, name in (
            (1, PROMPT_COLOR, "*", "click"),
            (0, NEGATIVE_COLOR, "X", "background click"),
        ):
            sel = pts[labels == value]
            if len(sel):
                ax.scatter(
                    sel[:, 0], sel[:, 1], marker=marker, s=110, c=color, edgecolors="white", linewidths=0.7
                )
                handles.append(Line2D([], [], color=color, marker=marker, linestyle="", label=name))
    x0, x1, y0, y1 = window or (-0.5, ex.image.shape[1] - 0.5, -0.5, ex.image.shape[0] - 0.5)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_xticks([])
    ax.set_yticks([])
    return handles


def overlay_figure(ex: Example) -> Figure:
    """The slice with ground truth (green), prediction (red), baseline (yellow, dashed) and prompt (blue;
    background clicks orange): the whole slice on the left, a zoom on the object on the right. At the
    report's 100 dpi each panel is at least :data:`MIN_OVERLAY_PX` pixels."""
    from matplotlib.figure import Figure

    # each panel's shorter side gets MIN_OVERLAY_PX pixels (and some room) at 100 dpi, whatever the shape
    ratio = min(4.0, max(0.25, ex.image.shape[0] * ex.aspect / ex.image.shape[1]))  # displayed height / width
    side = 1.25 * MIN_OVERLAY_PX / 100
    width, height = (side, side * ratio) if ratio >= 1 else (side / ratio, side)
    fig = Figure(figsize=(2 * width + 0.4, height + 0.8))
    ax_full, ax_zoom = fig.subplots(1, 2)
    handles = _draw_overlay(ax_full, ex, None)
    _draw_overlay(ax_zoom, ex, zoom_window(ex))
    extra = [f"box fill {ex.box_fill_dice:.3f}"] if ex.box_fill_dice is not None else []
    extra += [f"baseline {ex.baseline_dice:.3f}"] if ex.baseline_dice is not None else []
    title = f"{ex.kind}: Dice {ex.dice:.3f}" + (f" ({'; '.join(extra)})" if extra else "")
    ax_full.set_title(title, fontsize=11)
    ax_zoom.set_title("zoom on the object", fontsize=11)
    ax_full.legend(handles=handles, fontsize=8, loc="lower left", framealpha=0.7)
    fig.tight_layout()
    return fig


# --- the page --------------------------------------------------------------------------------------


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


def render_report(summary: dict[str, Any], rows: list[dict[str, Any]], examples: Sequence[Example]) -> str:
    """The report's HTML text."""
    from sam_medical.volume.label_names import label_display

    labels = [int(v) for v in summary["labels"]]
    names = _label_names(summary)

    def lab(v: int) -> str:
        return label_display(v, names)

    compare = summary.get("comparison") is not None
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>sam-medical evaluation</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>sam-medical evaluation report</h1>",
        f"<p class='small'>created {_fmt(summary.get('created'))}; {summary['data']['cases']} case(s); "
        f"{summary['overall']['objects_scored']} object(s) scored; labels: "
        f"{html.escape(', '.join(lab(v) for v in labels))}.</p>",
        *banners(summary),
    ]

    # settings, as tables
    settings: dict[str, Any] = {"model": _model_settings(summary.get("model") or {})}
    if compare:
        settings["baseline"] = _model_settings(summary.get("baseline") or {})
    settings["prompt"] = {k: v for k, v in summary["prompt"].items() if v is not None}
    settings["labels"] = {lab(v): v for v in labels}
    parts += ["<h2>Settings</h2>", _kv_table(settings)]
    parts += ["<h2>What was counted</h2>", _kv_table(summary["policy"], ("rule", "what it means"))]

    # per label
    header = [
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
    ]

    def box_cols(e: dict[str, Any]) -> list[Any]:
        return [
            (e.get("box_fill_slice_dice") or {}).get("mean"),
            (e.get("vs_box_fill") or {}).get("mean_diff"),
        ]

    table_rows = []
    for v in labels:
        e = summary["per_label"][str(v)]
        c = e["counts"]
        d = e["slice_dice"]
        table_rows.append(
            [
                lab(v),
                c["slices_scored_present"],
                c["slices_skipped_empty"],
                c["slices_scored_empty"],
                c["slices_not_in_files"],
                d["mean"],
                *box_cols(e),
                d["median"],
                d["std"],
                d["ci95"],
                e["slice_iou"]["mean"],
                e["volumes"],
                e["volume_dice"]["mean"],
                e["hd95_mm"]["mean"],
                e["hd95_mm"]["median"],
                e["volumes_without_hd95"],
            ]
        )
    o = summary["overall"]
    table_rows.append(
        [
            "all",
            o["objects_present"],
            sum(summary["per_label"][str(v)]["counts"]["slices_skipped_empty"] for v in labels),
            o["objects_scored"] - o["objects_present"],
            "",
            o["slice_dice"]["mean"],
            *box_cols(o),
            o["slice_dice"]["median"],
            o["slice_dice"]["std"],
            o["slice_dice"]["ci95"],
            o["slice_iou"]["mean"],
            o["volume_dice"]["n"],
            o["volume_dice"]["mean"],
            o["hd95_mm"]["mean"],
            o["hd95_mm"]["median"],
            "",
        ]
    )
    parts += [
        "<h2>Per label</h2>",
        "<p class='small'>Slice Dice over slices where the label is present; mean of the label means: "
        f"{_fmt(o['slice_dice_mean_of_labels'])}. Box-fill Dice: the prompt rectangle itself, filled, on the same "
        "objects (no box in the prompt: &ndash;).</p>",
        _table(header, table_rows),
    ]
    if summary["policy"]["include_empty"]:
        er = []
        for v in labels:
            e = summary["per_label"][str(v)]
            em = e["empty_slices"]
            er.append(
                [
                    lab(v),
                    em["n"],
                    em["predicted_empty"],
                    em["with_false_positive"],
                    em["mean_false_positive_area"],
                    e["slice_dice_all"]["mean"],
                ]
            )
        parts += [
            "<h3>Empty slices (--include-empty)</h3>",
            _table(
                [
                    "label",
                    "empty slices scored",
                    "predicted empty",
                    "with false positive",
                    "mean FP area (px)",
                    "Dice incl. empty",
                ],
                er,
            ),
        ]

    # corrective clicks
    rounds = int(summary["prompt"].get("refine") or 0)
    if rounds and o.get("refine_curve"):
        rh = ["label", "first prompt", *[f"+{i} click{'s' if i > 1 else ''}" for i in range(1, rounds + 1)]]
        rr = [[lab(v), *summary["per_label"][str(v)].get("refine_curve", [])] for v in labels]
        rr.append(["all", *o["refine_curve"]])
        parts += [
            "<h2>Dice after each corrective click</h2>",
            f"<p class='small'>Mean slice Dice after the first prompt and after each of {rounds} corrective "
            f"click(s): {html.escape(summary['prompt'].get('refine_rule') or '')}.</p>",
            _table(rh, rr),
        ]

    # per volume
    vh = ["case", "label", "slices scored", "gt voxels", "pred voxels", "3D Dice", "HD95 mm"]
    if compare:
        vh += ["baseline 3D Dice", "baseline HD95 mm"]
    vrows = []
    for e in summary["volumes"]:
        r = [
            e["case"],
            lab(e["label"]),
            e["slices_scored"],
            e["gt_voxels"],
            e["pred_voxels"],
            e["dice_3d"],
            e["hd95_mm"],
        ]
        if compare:
            r += [e.get("baseline_dice_3d"), e.get("baseline_hd95_mm")]
        vrows.append(r)
    parts += ["<h2>Per volume</h2>", _table(vh, vrows, left=2)]

    # distributions
    parts += [
        "<h2>Dice distribution</h2>",
        _img(
            figure_to_data_uri(dice_distribution_figure(rows, labels, names)), "Dice distribution per label"
        ),
    ]

    # comparison
    if compare:
        comp = summary["comparison"]
        ch = ["scope", "n", "mean diff", "median diff", "wins", "losses", "ties", "Wilcoxon W", "p"]
        crow = []
        for scope, c in (
            [("all slices", comp["overall"])]
            + [(f"{lab(v)} slices", comp["per_label"][str(v)]) for v in labels]
            + [("volumes (3D Dice)", comp["volumes"])]
        ):
            crow.append(
                [
                    scope,
                    c["n"],
                    c["mean_diff"],
                    c["median_diff"],
                    c["wins"],
                    c["losses"],
                    c["ties"],
                    c["wilcoxon_statistic"],
                    c["wilcoxon_p"],
                ]
            )
        parts += [
            "<h2>Before / after comparison</h2>",
            f"<p class='small'>Differences are {html.escape(comp['difference'])}; tie when |diff| &lt; "
            f"{comp['overall']['tie_tolerance']}; {html.escape(comp['overall']['test'])}; identical predictions: "
            f"{comp.get('identical_predictions', 0)} of {comp['overall']['n']}.</p>",
            _table(ch, crow),
            _img(
                figure_to_data_uri(comparison_scatter_figure(rows, labels, names)), "before vs after scatter"
            ),
        ]

    # examples
    if examples:
        parts.append("<h2>Examples</h2>")
        parts.append(
            "<p class='small'>Green: ground truth; red: prediction; yellow dashed: baseline; blue: prompt (box, "
            "clicks), orange: background clicks. Left: the slice on the 256 canvas (valid region), pixel aspect "
            "from the spacing; right: a zoom on the object.</p>"
        )
        for v in labels:
            figs = [ex for ex in examples if ex.label == v]
            if not figs:
                continue
            parts.append(f"<h3>{html.escape(lab(v))}</h3><div class='grid'>")
            for ex in figs:
                uri = figure_to_data_uri(overlay_figure(ex), dpi=100)
                parts.append(
                    f"<figure>{_img(uri, ex.title)}<figcaption>{html.escape(ex.title)}</figcaption></figure>"
                )
            parts.append("</div>")

    # model and timing, as tables
    parts += ["<h2>Model and timing</h2>"]
    for key in ("model", "baseline", "timing"):
        if summary.get(key):
            parts += [f"<h3>{key}</h3>", _kv_table(summary[key], ("key", "value"))]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    path: str | os.PathLike, summary: dict[str, Any], rows: list[dict[str, Any]], examples: Sequence[Example]
) -> Path:
    """Write the report to ``path`` atomically."""
    text = render_report(summary, rows, examples)
    write_text_atomic(path, text)
    return Path(path)
