"""The side-by-side table: each Runbus figure, its target, MLflow's figure and the ratio.

Printed with rich, and written to benchmarks/results/latest.json and latest.md.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.common import Sizes

_OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge}


@dataclass(frozen=True)
class Row:
    workload: str
    key: str
    label: str
    fmt: str  # a format for the value, unit included
    target: tuple[str, float] | None = None
    mlflow_key: str | None = None
    scale: float = 1.0  # multiplies the value before it is compared with the target

    def met(self, value: float) -> bool | None:
        if self.target is None:
            return None
        op, bound = self.target
        return _OPS[op](value * self.scale, bound)


def rows(sizes: Sizes, mlflow_sizes: tuple[int, ...]) -> list[Row]:
    us, ms = "{:,.2f} us", "{:,.2f} ms"
    found = [
        Row("1", "log_metric_thread_us", "log_metric, per call in the job's thread (MLflow: sync)", us,
            ("<=", 10), "log_metric_sync_us"),
        Row("1", "log_metric_thread_us", "log_metric, per call in the job's thread (MLflow: async)", us,
            ("<=", 10), "log_metric_async_us"),
        Row("1", "log_metric_durable_us", "log_metric, per point until in the log (MLflow: sync)", us,
            ("<=", 20), "log_metric_sync_durable_us"),
        Row("1", "log_metric_durable_us", "log_metric, per point until in the log (MLflow: async+flush)", us,
            ("<=", 20), "log_metric_async_durable_us"),
        Row("2", "child_run_ms", f"sweep child run (3 params, 2 results, label), {sizes.children:,} children",
            ms, ("<=", 1), "child_run_ms"),
    ]
    for size in sorted(sizes.query_runs):
        target = ("<=", 5.0) if size >= 100_000 else None
        found.append(Row("3", f"query_ms_{size}", f"query: param + result filter, sorted, {size:,} runs", ms,
                         target, f"query_ms_{size}" if size in mlflow_sizes else None))
    largest = max(sizes.query_runs)
    found += [
        Row("3", f"list_runs_ms_{largest}", f"list_runs(sort_by=result, limit=100), {largest:,} runs", ms),
        Row("3", "query_build_ms_per_run", "building the query runs, per run (produce + project)", ms,
            None, "query_build_ms_per_run"),
    ]
    events = f"{sizes.events:,} events, {sizes.producers} producer processes"
    per_million = 1_000_000 / sizes.events
    found += [
        Row("4", "e2e_embedded_events_per_s", f"{events} -> SQL rows, embedded", "{:,.0f} ev/s", (">=", 100_000)),
        Row("4", "e2e_embedded_produce_events_per_s", "  of which the producers alone, embedded", "{:,.0f} ev/s"),
        Row("4", "e2e_kafka_events_per_s", f"{events} -> SQL rows, Kafka", "{:,.0f} ev/s", (">=", 50_000)),
        Row("4", "e2e_kafka_produce_events_per_s", "  of which the producers alone, Kafka", "{:,.0f} ev/s"),
        Row("5", "rebuild_s", f"rebuild of the {sizes.events:,}-event projection (target per 1M)", "{:,.2f} s",
            ("<=", 15), scale=per_million),
        Row("5", "rebuild_rss_mb", "  peak RSS of the rebuilding process", "{:,.0f} MB"),
        Row("6", "sweep_s", f"{sizes.sweep_iterations:,}-iteration sweep on dask://", "{:,.2f} s"),
        Row("6", "client_map_s", "  bare client.map of the same work, same cluster", "{:,.2f} s"),
        Row("6", "sweep_over_map", "  sweep / client.map", "{:,.2f}x", ("<=", 1.5)),
        Row("7", "projector_rss_mb", "projector peak RSS over workload 4, embedded", "{:,.0f} MB", ("<=", 300)),
        Row("7", "projector_rss_mb_kafka", "projector peak RSS over workload 4, Kafka", "{:,.0f} MB", ("<=", 300)),
    ]
    return found


def _target_text(row: Row) -> str:
    if row.target is None:
        return ""
    op, bound = row.target
    return f"{op} {row.fmt.format(bound)}"


def table_rows(found: list[Row], figures: dict[str, float], mlflow: dict[str, float],
               failures: dict[str, str]) -> list[dict[str, Any]]:
    """One dict per row with text cells and raw values (for the JSON file)."""
    out = []
    for row in found:
        value = figures.get(row.key)
        if value is None and row.key not in failures:
            continue
        theirs = mlflow.get(row.mlflow_key) if row.mlflow_key else None
        met = row.met(value) if value is not None else None
        out.append({
            "workload": row.workload, "figure": row.label, "key": row.key,
            "runbus": value, "runbus_text": row.fmt.format(value) if value is not None else failures[row.key],
            "target": _target_text(row), "met": met,
            "met_text": "" if met is None else ("yes" if met else "MISSED"),
            "mlflow": theirs, "mlflow_text": row.fmt.format(theirs) if theirs is not None else "",
            "ratio": theirs / value if theirs is not None and value else None,
        })
        out[-1]["ratio_text"] = f"{out[-1]['ratio']:,.1f}x" if out[-1]["ratio"] is not None else ""
    return out


def print_table(cells: list[dict[str, Any]], title: str, notes: list[str]) -> None:
    table = Table(title=title)
    for name, justify in (("#", "left"), ("figure", "left"), ("Runbus", "right"), ("target", "right"),
                          ("met", "left"), ("MLflow", "right"), ("MLflow/Runbus", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for cell in cells:
        met = cell["met_text"]
        table.add_row(cell["workload"], cell["figure"], cell["runbus_text"], cell["target"],
                      f"[red]{met}[/red]" if met == "MISSED" else met, cell["mlflow_text"], cell["ratio_text"])
    console = Console(width=160)
    console.print(table)
    for note in notes:
        console.print(note, highlight=False)


def markdown(cells: list[dict[str, Any]], title: str, notes: list[str]) -> str:
    lines = [f"### {title}", "", "| # | figure | Runbus | target | met | MLflow | MLflow/Runbus |",
             "|---|---|--:|--:|---|--:|--:|"]
    for c in cells:
        lines.append(f"| {c['workload']} | {c['figure'].strip()} | {c['runbus_text']} | {c['target']} | "
                     f"{c['met_text']} | {c['mlflow_text']} | {c['ratio_text']} |")
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write(out: Path, payload: dict[str, Any], md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "latest.md").write_text(md)
