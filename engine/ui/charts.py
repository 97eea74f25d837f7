"""Charts rendered server-side by matplotlib as inline SVG (no JavaScript, no network)."""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Mapping

import matplotlib
import pandas as pd
from matplotlib.figure import Figure

from engine.sweep.summary import parallel_coordinates

# rc_context changes process-wide settings, so one chart is drawn at a time
_draw_lock = threading.Lock()
# text stays text (small, selectable); one short font list instead of matplotlib's long default
_SVG = {"svg.fonttype": "none", "font.sans-serif": ["DejaVu Sans", "Arial", "sans-serif"]}
_COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04")


def figure_svg(figure: Figure) -> str:
    """The figure as an <svg> element; ids are unique so many charts can share one page."""
    out = io.StringIO()
    with _draw_lock, matplotlib.rc_context(_SVG | {"svg.hashsalt": uuid.uuid4().hex}):
        figure.savefig(out, format="svg", bbox_inches="tight")
    text = out.getvalue()
    return text[text.index("<svg"):]


def line_chart(title: str, series: Mapping[str, tuple[list[float], list[float]]], xlabel: str = "step") -> str:
    """One line per series with a marker on every point; a legend when there are several."""
    with _draw_lock, matplotlib.rc_context({"text.parse_math": False}):
        figure = Figure(figsize=(5.4, 3.0))
        axes = figure.subplots()
        many = sum(len(x) for x, _ in series.values()) > 400
        for index, (label, (x, y)) in enumerate(series.items()):
            axes.plot(x, y, marker="o", markersize=2 if many else 4, linewidth=1.4,
                      color=_COLORS[index % len(_COLORS)], label=label)
        axes.set_title(title, fontsize=11, loc="left")
        axes.set_xlabel(xlabel, fontsize=9)
        axes.tick_params(labelsize=8)
        axes.grid(color="#e5e7eb", linewidth=0.6)
        axes.spines[["top", "right"]].set_visible(False)
        if len(series) > 1:
            axes.legend(fontsize=8, frameon=False)
    return figure_svg(figure)


def parallel_coordinates_svg(table: pd.DataFrame, best: int | None, title: str) -> str:
    """The sweep's parallel-coordinates chart (the best iteration in red)."""
    with _draw_lock, matplotlib.rc_context({"text.parse_math": False}):
        figure = parallel_coordinates(table, best, title)
    return figure_svg(figure)
