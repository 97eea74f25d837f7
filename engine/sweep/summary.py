"""The parent's record of a sweep: the iteration_results table and a parallel-coordinates plot."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def iteration_table(iterations: Mapping[int, tuple[str, dict[str, Any], dict[str, Any]]]) -> pd.DataFrame:
    """One row per iteration: iter, state, param.<name>... (sweep order), output.<result>... (by name)."""
    outputs = sorted({key for _, _, results in iterations.values() for key in results if key != "return"})
    rows = []
    for iteration in sorted(iterations):
        state, params, results = iterations[iteration]
        row: dict[str, Any] = {"iter": iteration, "state": state}
        row.update({f"param.{k}": v for k, v in params.items()})
        row.update({f"output.{k}": results.get(k) for k in outputs})
        rows.append(row)
    return pd.DataFrame(rows)


def parallel_coordinates(table: pd.DataFrame, best_iteration: int | None, title: str) -> Figure:
    """Each iteration a line across its numeric params and outputs (scaled 0..1); the best in red."""
    from matplotlib.collections import LineCollection  # slow to import; only a sweep's end needs it
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5))
    axes = figure.subplots()
    columns = [c for c in table.columns if c.startswith(("param.", "output."))
               and pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])]
    if columns and len(table):
        numeric = table[columns].astype(float)
        span = (numeric.max() - numeric.min()).replace(0, 1)
        scaled = ((numeric - numeric.min()) / span).fillna(0.5)
        xs = np.arange(len(columns))
        lines = [np.column_stack([xs, row]) for row in scaled.to_numpy()]
        # one collection, not one plot call per iteration: a 1,000-iteration sweep stays fast
        axes.add_collection(LineCollection(lines, colors="steelblue", alpha=0.4, linewidths=1))
        best = np.flatnonzero(table["iter"].to_numpy() == best_iteration)
        if best.size:
            axes.plot(xs, scaled.to_numpy()[best[0]], color="crimson", linewidth=2.5,
                      label=f"iter {best_iteration} (best)")
            axes.legend(loc="best")
        axes.set_xlim(-0.1, len(columns) - 0.9)
        axes.set_ylim(-0.05, 1.05)
        axes.set_xticks(xs, columns, rotation=20)
    axes.set_title(title)
    axes.set_ylabel("scaled value")
    return figure
