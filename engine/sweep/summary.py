"""The parent's record of a sweep: the iteration_results table and a parallel-coordinates plot."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
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
    figure = Figure(figsize=(8, 4.5))
    axes = figure.subplots()
    columns = [c for c in table.columns if c.startswith(("param.", "output."))
               and pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])]
    if columns and len(table):
        numeric = table[columns].astype(float)
        span = (numeric.max() - numeric.min()).replace(0, 1)
        scaled = (numeric - numeric.min()) / span
        for index, row in scaled.iterrows():
            best = table.loc[index, "iter"] == best_iteration
            axes.plot(range(len(columns)), row.values, color="crimson" if best else "steelblue",
                      alpha=1.0 if best else 0.5, linewidth=2.5 if best else 1,
                      label=f"iter {best_iteration} (best)" if best else None)
        axes.set_xticks(range(len(columns)), columns, rotation=20)
        if best_iteration is not None:
            axes.legend(loc="best")
    axes.set_title(title)
    axes.set_ylabel("scaled value")
    return figure
