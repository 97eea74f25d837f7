"""The parent's record of its iterations (a sweep's, or a run's child contexts): best_iteration and
the best iteration's results and artifacts, the iteration_results table, a parallel-coordinates plot.

Importing this module installs `record_iterations` as the step RunContext calls when a run with
child contexts finishes (producers cannot import the engine).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from producers.artifacts import LinkArtifact, PlotArtifact, TableArtifact
from producers.context import RunContext
from producers.data_item import DataItem

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Iterations = Mapping[int, tuple[str, dict[str, Any], dict[str, Any]]]  # iteration -> (state, params, results)
OWN_ARTIFACTS = ("iteration_results", "parallel_coordinates")


def record_iterations(parent: RunContext, iterations: Iterations, best: int | None,
                      best_artifacts: Sequence[DataItem] = ()) -> None:
    """Log on `parent` what MLRun's parent of iterations holds: with a `best` iteration (counted
    from 1), `best_iteration`, its results and its artifacts (the same stored bodies, under their
    own keys, except keys the parent logged itself); then the iteration_results table and the
    parallel-coordinates plot. Finishes nothing."""
    # the table and plot are Runbus's own bodies, made from params and results: secrets masked
    table = iteration_table(iterations).map(lambda v: parent.mask_secrets(v) if isinstance(v, str) else v)
    table.columns = [parent.mask_secrets(str(column)) for column in table.columns]
    if best is not None:
        parent.log_result("best_iteration", best)
        parent.log_results({k: v for k, v in iterations[best][2].items() if k != "return"})
        own = {*parent.artifacts, *OWN_ARTIFACTS}
        for item in best_artifacts:
            if item.key in own:
                continue
            try:
                parent.log_artifact(LinkArtifact(item, best))
            except (OSError, ValueError, TypeError) as exc:  # e.g. a remote worker's body, not in this store
                warnings.warn(f"run {parent.uid}: artifact {item.key!r} of iteration {best} is not linked: {exc}",
                              stacklevel=2)
    parent.log_artifact(TableArtifact("iteration_results", df=table, visible=True))
    parent.log_artifact(PlotArtifact("parallel_coordinates",
                                     body=parallel_coordinates(table, best, f"sweep {parent.name}")))


def iterations_rows(table: pd.DataFrame) -> list[list[Any]]:
    """An iteration_results table as MLRun's `status.iterations`: a header row (state, iter,
    param.*, output.*), then one row per iteration; a missing value is None."""
    first = [column for column in ("state", "iter") if column in table.columns]
    ordered = table[first + [c for c in table.columns if c not in first]]
    plain = ordered.astype(object).where(ordered.notna(), None)
    return [list(map(str, plain.columns)), *plain.values.tolist()]


def iteration_table(iterations: Iterations) -> pd.DataFrame:
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


