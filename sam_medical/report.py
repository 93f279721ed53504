"""The evaluation report: one self-contained HTML file.

No external resource of any kind: styles are inline, every figure is a PNG drawn with matplotlib's Agg
canvas (no pyplot, no global state) and embedded as ``data:image/png;base64``; PNG metadata is
stripped so that not even the encoded bytes carry a URL. All text from the data (case names, paths) is
HTML-escaped.

Sections: settings and policy; per-label table; per-volume table; the Dice distribution per label
(box plot and histogram); before/after comparison (table and scatter plot) when there is a baseline;
overlays of the best, median and worst slice per label (image, ground-truth contour, predicted
contour, baseline contour, and the prompt: box and points).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import write_text_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .evaluation import Example

GT_COLOR = "#00c853"
PRED_COLOR = "#ff1744"
BASE_COLOR = "#ffd600"
PROMPT_COLOR = "#2979ff"
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1400px}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}
td.l,th.l{text-align:left}.small{font-size:.85em;color:#555}
.grid{display:flex;flex-wrap:wrap;gap:12px}.grid figure{margin:0}
figcaption{font-size:.8em;max-width:320px}pre{background:#f6f6f6;padding:8px;font-size:.8em;white-space:pre-wrap}
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


def _kv_table(items: dict[str, Any]) -> str:
    rows = []
    for k, v in items.items():
        text = json.dumps(v, default=str) if isinstance(v, dict | list) else v
        rows.append((k, text))
    return _table(("setting", "value"), rows, left=2)


# --- figures ---------------------------------------------------------------------------------------


def dice_distribution_figure(rows: list[dict[str, Any]], labels: Sequence[int]) -> Figure:
    """Box plot and histogram of the per-slice Dice of each label (present slices)."""
    from matplotlib.figure import Figure

    data = [[r["dice"] for r in rows if r["label"] == v and r["gt_present"]] for v in labels]
    fig = Figure(figsize=(11, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.boxplot(data, tick_labels=[str(v) for v in labels], showmeans=True)
    ax1.set_xlabel("label")
    ax1.set_ylabel("slice Dice")
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_title("Dice per label (box: quartiles, triangle: mean)")
    bins = np.linspace(0, 1, 21)
    for v, d in zip(labels, data, strict=True):
        ax2.hist(d, bins=bins, histtype="step", linewidth=1.8, label=f"label {v} (n={len(d)})")
    ax2.set_xlabel("slice Dice")
    ax2.set_ylabel("slices")
    ax2.set_title("Dice histogram")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def comparison_scatter_figure(rows: list[dict[str, Any]], labels: Sequence[int]) -> Figure:
    """Per-object baseline Dice (x) against model Dice (y), one colour per label, with the diagonal."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 5))
    ax = fig.subplots()
    for v in labels:
        pts = [(r["baseline_dice"], r["dice"]) for r in rows if r["label"] == v and r["gt_present"]]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.scatter(x, y, s=10, alpha=0.6, label=f"label {v}")
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


def overlay_figure(ex: Example) -> Figure:
    """The slice with ground truth (green), prediction (red), baseline (yellow, dashed) and prompt (blue)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    fig = Figure(figsize=(3.6, 3.8))
    ax = fig.subplots()
    ax.imshow(ex.image, cmap="gray", vmin=0, vmax=255, aspect=ex.aspect, interpolation="nearest")
    handles = [
        Line2D([], [], color=GT_COLOR, label="ground truth"),
        Line2D([], [], color=PRED_COLOR, label="prediction"),
    ]
    for mask, color, style in ((ex.gt, GT_COLOR, "solid"), (ex.pred, PRED_COLOR, "solid")):
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors=[color], linewidths=1.3, linestyles=style)
    if ex.baseline is not None:
        handles.append(Line2D([], [], color=BASE_COLOR, linestyle="--", label="baseline"))
        if ex.baseline.any():
            ax.contour(
                ex.baseline.astype(float),
                levels=[0.5],
                colors=[BASE_COLOR],
                linewidths=1.1,
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
        pts = np.asarray(ex.prompt.points)
        ax.scatter(pts[:, 0], pts[:, 1], marker="*", s=90, c=PROMPT_COLOR, edgecolors="white", linewidths=0.6)
        handles.append(Line2D([], [], color=PROMPT_COLOR, marker="*", linestyle="", label="point prompt"))
    ax.set_xlim(-0.5, ex.image.shape[1] - 0.5)
    ax.set_ylim(ex.image.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    title = f"{ex.kind}: Dice {ex.dice:.3f}"
    if ex.baseline_dice is not None:
        title += f" (baseline {ex.baseline_dice:.3f})"
    ax.set_title(title, fontsize=9)
    ax.legend(handles=handles, fontsize=6, loc="lower left", framealpha=0.7)
    fig.tight_layout()
    return fig


# --- the page --------------------------------------------------------------------------------------


def render_report(summary: dict[str, Any], rows: list[dict[str, Any]], examples: Sequence[Example]) -> str:
    """The report's HTML text."""
    labels = [int(v) for v in summary["labels"]]
    compare = summary.get("comparison") is not None
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>sam-medical evaluation</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>sam-medical evaluation report</h1>",
        f"<p class='small'>created {_fmt(summary.get('created'))}; {summary['data']['cases']} case(s); "
        f"{summary['overall']['objects_scored']} object(s) scored.</p>",
    ]

    # settings
    model = summary.get("model") or {}
    settings = {
        "model": model.get("name", model.get("kind")),
        "checkpoint": model.get("checkpoint"),
        "random weights": model.get("random_weights"),
        "input size": model.get("image_size"),
        "adapter": (model.get("adapter") or {}).get("path"),
        "adapter version": (model.get("adapter") or {}).get("version"),
        "device": model.get("device"),
        "prompt": summary["prompt"],
    }
    if compare:
        b = summary.get("baseline") or {}
        settings["baseline"] = {
            k: b.get(k) for k in ("name", "checkpoint", "random_weights", "image_size") if k in b
        } | {"adapter": (b.get("adapter") or {}).get("path")}
    parts += ["<h2>Settings</h2>", _kv_table({k: v for k, v in settings.items() if v is not None})]
    parts += ["<h2>What was counted</h2>", _kv_table(summary["policy"])]

    # per label
    header = [
        "label",
        "slices scored",
        "skipped (absent)",
        "empty scored",
        "not in files",
        "Dice mean",
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
    table_rows = []
    for v in labels:
        e = summary["per_label"][str(v)]
        c = e["counts"]
        d = e["slice_dice"]
        table_rows.append(
            [
                v,
                c["slices_scored_present"],
                c["slices_skipped_empty"],
                c["slices_scored_empty"],
                c["slices_not_in_files"],
                d["mean"],
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
        f"{_fmt(o['slice_dice_mean_of_labels'])}.</p>",
        _table(header, table_rows),
    ]
    if summary["policy"]["include_empty"]:
        er = []
        for v in labels:
            e = summary["per_label"][str(v)]
            em = e["empty_slices"]
            er.append(
                [
                    v,
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

    # per volume
    vh = ["case", "label", "slices scored", "gt voxels", "pred voxels", "3D Dice", "HD95 mm"]
    if compare:
        vh += ["baseline 3D Dice", "baseline HD95 mm"]
    vrows = []
    for e in summary["volumes"]:
        r = [
            e["case"],
            e["label"],
            e["slices_scored"],
            e["gt_voxels"],
            e["pred_voxels"],
            e["dice_3d"],
            e["hd95_mm"],
        ]
        if compare:
            r += [e.get("baseline_dice_3d"), e.get("baseline_hd95_mm")]
        vrows.append(r)
    parts += ["<h2>Per volume</h2>", _table(vh, vrows, left=1)]

    # distributions
    parts += [
        "<h2>Dice distribution</h2>",
        _img(figure_to_data_uri(dice_distribution_figure(rows, labels)), "Dice distribution per label"),
    ]

    # comparison
    if compare:
        comp = summary["comparison"]
        ch = ["scope", "n", "mean diff", "median diff", "wins", "losses", "ties", "Wilcoxon W", "p"]
        crow = []
        for scope, c in (
            [("all slices", comp["overall"])]
            + [(f"label {v} slices", comp["per_label"][str(v)]) for v in labels]
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
            f"{comp['overall']['tie_tolerance']}; {html.escape(comp['overall']['test'])}.</p>",
            _table(ch, crow),
            _img(figure_to_data_uri(comparison_scatter_figure(rows, labels)), "before vs after scatter"),
        ]

    # examples
    if examples:
        parts.append("<h2>Examples</h2>")
        parts.append(
            "<p class='small'>Green: ground truth; red: prediction; yellow dashed: baseline; blue: prompt. "
            "Shown on the 256 canvas (valid region), pixel aspect from the spacing.</p>"
        )
        for v in labels:
            figs = [ex for ex in examples if ex.label == v]
            if not figs:
                continue
            parts.append(f"<h3>label {v}</h3><div class='grid'>")
            for ex in figs:
                uri = figure_to_data_uri(overlay_figure(ex), dpi=90)
                parts.append(
                    f"<figure>{_img(uri, ex.title)}<figcaption>{html.escape(ex.title)}</figcaption></figure>"
                )
            parts.append("</div>")

    # raw
    raw = {k: summary.get(k) for k in ("model", "baseline", "timing")}
    parts += [
        "<h2>Model and timing</h2>",
        f"<pre>{html.escape(json.dumps(raw, indent=2, default=str))}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(
    path: str | os.PathLike, summary: dict[str, Any], rows: list[dict[str, Any]], examples: Sequence[Example]
) -> Path:
    """Write the report to ``path`` atomically."""
    text = render_report(summary, rows, examples)
    write_text_atomic(path, text)
    return Path(path)
