"""The published table of one `python -m benchmarks` run: a header naming the machine, date and
commit, then one row per figure with its N and repeats, Runbus's value, its target, and beside it
MLflow's way of doing the same thing and its value (same N, same repeats, same "done").

Printed with rich, and written to benchmarks/results/latest.json and latest.md. Figures of two runs
are never mixed: a row whose figure this run did not measure is left out.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.common import Sizes

_OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge}
COLUMNS = ("#", "figure", "N", "repeats", "Runbus", "target", "met", "MLflow way", "MLflow", "MLflow/Runbus")


@dataclass(frozen=True)
class Row:
    """One line of the table. `mlflow_key`/`mlflow_way`: MLflow's figure for the same work and how
    MLflow did it; `scale` multiplies the value before it is compared with the target; `lower_is_better`
    says which way the MLflow/Runbus ratio reads (> 1 means Runbus is ahead either way)."""

    workload: str
    key: str
    label: str
    fmt: str  # a format for the value, unit included
    n: str
    repeats: int
    target: tuple[str, float] | None = None
    mlflow_key: str | None = None
    mlflow_way: str = ""
    scale: float = 1.0
    lower_is_better: bool = True

    def met(self, value: float) -> bool | None:
        if self.target is None:
            return None
        op, bound = self.target
        return _OPS[op](value * self.scale, bound)


@dataclass(frozen=True)
class Header:
    """What the figures were measured on and from: one run's machine, date and commit."""

    cpu_model: str
    cpus: int
    platform: str
    python: str
    date: str
    commit: str
    mlflow: str  # "MLflow 3.x, sqlite store" or why MLflow was not measured

    def title(self, quick: bool = False) -> str:
        return (f"Runbus vs MLflow{' (quick sizes)' if quick else ''}: {self.cpus} cpus ({self.cpu_model}), "
                f"{self.date}, commit {self.commit}")

    def lines(self) -> list[str]:
        return [f"machine: {self.cpu_model}, {self.cpus} cpus, {self.platform}, Python {self.python}",
                f"date: {self.date}; commit: {self.commit}", f"compared with: {self.mlflow}"]


def rows(sizes: Sizes) -> list[Row]:
    """Every row the suite can print, with the N and repeats `sizes` gives them."""
    us, ms = "{:,.2f} us", "{:,.2f} ms"
    points = f"{sizes.log_metric_points:,} points"
    batch = f"MlflowClient.log_batch, {sizes.mlflow_batch:,} points a call"
    found: list[Row] = []
    for way, key in (("mlflow.log_metric", "sync"), ("mlflow.log_metric(synchronous=False)", "async"),
                     (batch, "batch")):
        found.append(Row("1", "log_metric_thread_us", "log_metric: per point, in the job's thread", us, points,
                         sizes.repeat, ("<=", 10), f"log_metric_{key}_us", way))
    for way, key in (("mlflow.log_metric", "sync"),
                     ("mlflow.log_metric(synchronous=False) + flush_async_logging", "async"), (batch, "batch")):
        found.append(Row("1", "log_metric_queryable_us",
                         "log_metric: per point, until a second process sees them all", us, points, sizes.repeat,
                         ("<=", 20), f"log_metric_{key}_queryable_us", way))
    children = f"{sizes.children:,} child runs"
    for way, key in (("nested start_run + log_params, log_metrics, set_tag", "child_run_ms"),
                     ("MlflowClient.create_run + log_batch + set_terminated", "child_run_batch_ms")):
        found.append(Row("2", "child_run_ms", "child runs of an in-process sweep (3 params, 2 results, a label "
                         "each): per child, until a second process sees them all", ms, children, sizes.repeat,
                         ("<=", 1), key, way))
    for size in sorted(sizes.query_runs):
        target = ("<=", 5.0) if size >= 100_000 else None
        mlflow = f"query_ms_{size}" if size in sizes.mlflow_query_runs else None
        found.append(Row("3", f"query_ms_{size}", "query: param + result filter, sorted, from a second process",
                         ms, f"{size:,} runs", sizes.queries, target, mlflow,
                         "mlflow.search_runs, from a second process" if mlflow else ""))
    largest, smallest = max(sizes.query_runs), min(sizes.query_runs)
    found += [
        Row("3", f"query_bare_ms_{largest}", "  the same statement on a bare DuckDB table (same rows)", ms,
            f"{largest:,} runs", sizes.queries),
        Row("3", f"query_over_bare_{largest}", "  Runbus / bare DuckDB table", "{:,.2f}x", f"{largest:,} runs",
            sizes.queries, ("<=", 1.5)),
        Row("3", f"list_runs_ms_{largest}", "list_runs(sort_by=result, limit=100)", ms, f"{largest:,} runs",
            sizes.queries, ("<=", 10)),
        Row("3", f"list_runs_bare_ms_{largest}", "  its statement on the bare DuckDB table", ms, f"{largest:,} runs",
            sizes.queries),
        Row("3", f"query_idle_ms_{smallest}", "query after 2 s idle", ms, f"{smallest:,} runs", 5,  # IDLE_QUERIES
            ("<=", 5)),
        Row("3", f"query_bare_idle_ms_{smallest}", "  bare DuckDB table after the same pauses", ms,
            f"{smallest:,} runs", 5),
        Row("3", "query_build_ms_per_run", f"building the query runs from {sizes.query_builders} processes, per "
            "run (produce + fold)", ms,
            f"{largest:,} runs", 1),
    ]
    events = f"{sizes.events:,} events"
    per_million = 1_000_000 / sizes.events
    rate = "{:,.0f} ev/s"
    found += [
        Row("4", "e2e_embedded_events_per_s", f"{sizes.producers} producer processes -> SQL rows, embedded", rate,
            events, sizes.e2e_repeat, (">=", 100_000), lower_is_better=False),
        Row("4", "e2e_embedded_produce_events_per_s", "  of which the producers alone, embedded", rate, events,
            sizes.e2e_repeat, lower_is_better=False),
        Row("4", "e2e_kafka_events_per_s", f"{sizes.producers} producer processes -> SQL rows, Kafka", rate,
            events, sizes.e2e_repeat, (">=", 100_000), lower_is_better=False),
        Row("4", "e2e_kafka_produce_events_per_s", "  of which the producers alone, Kafka", rate, events,
            sizes.e2e_repeat, lower_is_better=False),
        Row("5", "rebuild_s", "rebuild of the projection (target per 1M events)", "{:,.2f} s", events,
            sizes.e2e_repeat, ("<=", 6), scale=per_million),
        Row("5", "rebuild_rss_mb", "  peak RSS of the rebuilding process", "{:,.0f} MB", events, sizes.e2e_repeat),
        Row("6", "sweep_s", "sweep of a trivial handler on dask://", "{:,.2f} s",
            f"{sizes.sweep_iterations:,} iterations", sizes.repeat),
        Row("6", "client_map_s", "  bare client.map of the same work, same cluster", "{:,.2f} s",
            f"{sizes.sweep_iterations:,} iterations", sizes.repeat),
        Row("6", "sweep_over_map", "  sweep / client.map", "{:,.2f}x", f"{sizes.sweep_iterations:,} iterations",
            sizes.repeat, ("<=", 1.5)),
        Row("7", "projector_rss_mb", "projector peak RSS over workload 4, embedded", "{:,.0f} MB", events,
            sizes.e2e_repeat, ("<=", 300)),
        Row("7", "projector_rss_mb_kafka", "projector peak RSS over workload 4, Kafka", "{:,.0f} MB", events,
            sizes.e2e_repeat, ("<=", 300)),
    ]
    return found


def _target_text(row: Row) -> str:
    if row.target is None:
        return ""
    op, bound = row.target
    return f"{op} {row.fmt.format(bound)}"


def ratio(row: Row, runbus: float | None, mlflow: float | None) -> float | None:
    """How many times better Runbus does than MLflow on this row (> 1: Runbus ahead)."""
    if runbus is None or mlflow is None or not runbus or not mlflow:
        return None
    return mlflow / runbus if row.lower_is_better else runbus / mlflow


def table_rows(found: list[Row], figures: dict[str, float], mlflow: dict[str, float],
               failures: dict[str, str], mlflow_missing: str = "") -> list[dict[str, Any]]:
    """One dict per row this run measured (or tried to), with text cells and raw values. A row
    whose Runbus figure is neither measured nor failed is left out; `mlflow_missing` fills the
    MLflow cell of a compared row that has no MLflow figure (e.g. "failed"). With neither MLflow
    figures nor `mlflow_missing` (MLflow not run), each Runbus figure is shown once, on its own."""
    out = []
    alone = not mlflow and not mlflow_missing
    shown: set[str] = set()
    for row in found:
        value = figures.get(row.key)
        if (value is None and row.key not in failures) or (alone and row.key in shown):
            continue
        shown.add(row.key)
        if alone:
            row = replace(row, mlflow_key=None, mlflow_way="")
        theirs = mlflow.get(row.mlflow_key) if row.mlflow_key else None
        met = row.met(value) if value is not None else None
        times = ratio(row, value, theirs)
        missing = mlflow_missing if row.mlflow_key else ""
        theirs_text = row.fmt.format(theirs) if theirs is not None else missing
        out.append({
            "workload": row.workload, "figure": row.label, "key": row.key, "n": row.n, "repeats": row.repeats,
            "runbus": value, "runbus_text": row.fmt.format(value) if value is not None else failures[row.key],
            "target": _target_text(row), "met": met, "met_text": "" if met is None else ("yes" if met else "MISSED"),
            "mlflow_way": row.mlflow_way, "mlflow": theirs, "mlflow_text": theirs_text,
            "ratio": times, "ratio_text": f"{times:,.1f}x" if times is not None else "",
        })
    return out


def _cells(cell: dict[str, Any]) -> list[str]:
    repeats = f"median of {cell['repeats']}" if cell["repeats"] > 1 else "1"
    return [cell["workload"], cell["figure"], cell["n"], repeats, cell["runbus_text"], cell["target"],
            cell["met_text"], cell["mlflow_way"], cell["mlflow_text"], cell["ratio_text"]]


def print_table(cells: list[dict[str, Any]], header: Header, notes: list[str], quick: bool = False) -> None:
    table = Table(title=header.title(quick))
    for name in COLUMNS:
        table.add_column(name, justify="right" if name in ("Runbus", "target", "MLflow", "MLflow/Runbus") else "left")
    for cell in cells:
        row = _cells(cell)
        if cell["met_text"] == "MISSED":
            row[6] = "[red]MISSED[/red]"
        table.add_row(*row)
    console = Console(width=220)
    for line in header.lines():
        console.print(line, highlight=False)
    console.print(table)
    for note in notes:
        console.print(note, highlight=False)


def markdown(cells: list[dict[str, Any]], header: Header, notes: list[str], quick: bool = False) -> str:
    """The table as Markdown, headed by the machine, date and commit, with the notes below."""
    lines = [f"### {header.title(quick)}", ""] + [f"{line}  " for line in header.lines()] + [""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|---|---|---|---|--:|--:|---|---|--:|--:|"]
    for cell in cells:
        lines.append("| " + " | ".join(text.strip().replace("|", "\\|") for text in _cells(cell)) + " |")
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write(out: Path, payload: dict[str, Any], md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "latest.md").write_text(md)
