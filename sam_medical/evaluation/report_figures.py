"""The report's figures: PNGs drawn with matplotlib's Agg canvas (no pyplot, no global state), embedded as
``data:image/png;base64`` with the PNG metadata stripped.

Overlays show the slice with ground truth (green), prediction (red), baseline (yellow, dashed) and the
prompt (blue; background clicks orange): the whole slice and a zoom on the object, each panel at least
:data:`MIN_OVERLAY_PX` pixels, so that a small kidney is visible. Canvas coordinates: ``x`` = column,
``y`` = row.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sam_medical.evaluation.examples import Example
from sam_medical.volume.label_names import label_display

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GT_COLOR = "#00c853"
PRED_COLOR = "#ff1744"
BASE_COLOR = "#ffd600"
PROMPT_COLOR = "#2979ff"
NEGATIVE_COLOR = "#ff9100"
#: Each overlay panel is drawn at least this many pixels wide and high.
MIN_OVERLAY_PX = 384
#: Pixels of context around the object in the zoomed panel (canvas pixels).
ZOOM_MARGIN = 12


def figure_to_data_uri(fig: Figure, dpi: int = 100) -> str:
    """A matplotlib figure as ``data:image/png;base64,...`` (PNG metadata removed)."""
    from matplotlib.backends.backend_agg import (
        FigureCanvasAgg,  # heavy; loaded only when a report or test is made
    )

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _label_text(v: int, names: dict[int, str] | None) -> str:
    return label_display(v, names or {})


def dice_distribution_figure(
    rows: list[dict[str, Any]], labels: Sequence[int], names: dict[int, str] | None = None
) -> Figure:
    """Box plot and histogram of the per-slice Dice of each label (present slices)."""
    from matplotlib.figure import Figure  # heavy; loaded only when a report or test is made

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
    from matplotlib.figure import Figure  # heavy; loaded only when a report or test is made

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
    from matplotlib.lines import Line2D  # heavy; loaded only when a report or test is made
    from matplotlib.patches import Rectangle  # heavy; loaded only when a report or test is made

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
    from matplotlib.figure import Figure  # heavy; loaded only when a report or test is made

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
