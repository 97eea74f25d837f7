"""`python -m benchmarks`: Runbus's figures, and beside each comparable one MLflow's, in one table.

Every Runbus-vs-MLflow row has the same N and the same repeats (median) on both sides, and the same
"done": the clock stops when a second process sees every point or run. MLflow's best practice
(log_batch, async logging with a flush) has rows of its own beside its plain calls. The table is
headed by the machine, date and commit, and written to benchmarks/results/latest.json and latest.md;
the run ends with where its wall time went, per group and phase (benchmarks/phases.py).
Workload groups (for --only): log_metric (1), children (2), query (3), pipeline (4 end to end,
5 rebuild, 7 projector RSS; aliases e2e, rebuild, rss), sweep (6).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import mlflow_env, phases, report
from benchmarks.common import RESULTS, ROOT, Outcome, Sizes
from benchmarks.profiling import profiled

# The workload modules are imported when run, not here: a process spawned by a workload (a producer,
# a builder) imports this module again, and should load what it runs, not every workload's imports.

GROUPS = ("log_metric", "children", "query", "pipeline", "sweep")
ALIASES = {"e2e": "pipeline", "rebuild": "pipeline", "rss": "pipeline", "child_runs": "children"}
WORKLOADS = {"log_metric": {"1"}, "children": {"2"}, "query": {"3"}, "pipeline": {"4", "5", "7"}, "sweep": {"6"}}
MLFLOW_GROUPS = ("log_metric", "children", "query")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run of a few minutes")
    parser.add_argument("--only", default="", help="comma-separated workload groups (default: all)")
    parser.add_argument("--kafka", default=os.environ.get("RUNBUS_BENCH_KAFKA"),
                        help="host:port of a broker for the Kafka figures (default: $RUNBUS_BENCH_KAFKA)")
    parser.add_argument("--repeat", type=int, help="measurements per figure; the median is shown (default 3)")
    parser.add_argument("--no-mlflow", action="store_true", help="Runbus figures only")
    parser.add_argument("--events", type=int, help="events of the end-to-end workload (default 1,000,000)")
    parser.add_argument("--query-runs", type=_ints, help="run counts of the query workload (default 1k,10k,100k)")
    parser.add_argument("--mlflow-query-runs", type=_ints, help="MLflow's run counts (default 1k)")
    parser.add_argument("--points", type=int, help="points of the log_metric workload, both sides (default 2,000)")
    parser.add_argument("--children", type=int, help="child runs of the children workload, both sides (default 1,000)")
    parser.add_argument("--sweep-iterations", type=int, help="iterations of the Dask sweep (default 1,000)")
    return parser.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = Sizes.quick() if args.quick else Sizes()
    changes: dict[str, Any] = {}
    if args.repeat:
        changes.update(repeat=args.repeat, e2e_repeat=args.repeat)
    if args.points:
        changes["log_metric_points"] = args.points
    for name in ("events", "query_runs", "mlflow_query_runs", "children", "sweep_iterations"):
        if getattr(args, name):
            changes[name] = getattr(args, name)
    return dataclasses.replace(sizes, **changes)


def selected(only: str) -> list[str]:
    if not only:
        return list(GROUPS)
    names = {ALIASES.get(name.strip(), name.strip()) for name in only.split(",") if name.strip()}
    unknown = names - set(GROUPS)
    if unknown:
        raise SystemExit(f"--only: unknown workload {', '.join(sorted(unknown))}; "
                         f"use {', '.join(GROUPS + tuple(ALIASES))}")
    return [group for group in GROUPS if group in names]


def runners(sizes: Sizes, kafka: str | None) -> dict[str, Callable[[], Outcome]]:
    from benchmarks import children, log_metric, pipeline, query, sweep

    return {
        "log_metric": lambda: log_metric.run(sizes.log_metric_points, sizes.log_metric_chunk, sizes.repeat),
        "children": lambda: children.run(sizes.children, sizes.repeat),
        "query": lambda: query.run(sizes.query_runs, sizes.queries, sizes.query_builders),
        "pipeline": lambda: pipeline.run(sizes.events, sizes.producers, sizes.e2e_repeat, kafka),
        "sweep": lambda: sweep.run(sizes.sweep_iterations, sizes.repeat),
    }


def _git() -> str:
    """The commit measured, and whether files outside benchmarks/ differed from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes' if dirty else ''}"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mlflow_figures(groups: list[str], sizes: Sizes, skip: bool) -> tuple[mlflow_env.MlflowResult, float]:
    """MLflow's side of the compared groups with Runbus's N and repeats; the result and its seconds."""
    wanted = [group for group in groups if group in MLFLOW_GROUPS]
    if skip:
        return mlflow_env.MlflowResult(unavailable="--no-mlflow"), 0.0
    if not wanted:
        return mlflow_env.MlflowResult(unavailable="no compared workload selected"), 0.0
    print(f"mlflow: {', '.join(wanted)} ...", flush=True)
    began = time.perf_counter()
    found = mlflow_env.run({
        "only": wanted, "points": sizes.log_metric_points, "chunk": sizes.log_metric_chunk,
        "batch": sizes.mlflow_batch, "children": sizes.children, "query_runs": list(sizes.mlflow_query_runs),
        "queries": sizes.queries, "repeat": sizes.repeat})
    for name, seconds in found.phases.items():
        phases.add(name, seconds)
    if found.figures:
        print("  " + ", ".join(f"{k}={v:,.4g}" for k, v in found.figures.items()), flush=True)
    return found, time.perf_counter() - began


def mlflow_notes(mlflow: mlflow_env.MlflowResult, sizes: Sizes, groups: list[str]) -> list[str]:
    if mlflow.unavailable:
        return [f"MLflow: not measured ({mlflow.unavailable})"]
    notes = [f"MLflow {mlflow.version}, its default sqlite store (sqlite:///<tmp>/mlflow.db), each way on a "
             f"fresh store; its clock stops when a second MLflow process (get_metric_history, search_runs) "
             f"sees every point or run. Async child runs are not measured: end_run shuts MLflow's async "
             f"queue down and waits for it, once a child"]
    capped = [n for n in sizes.query_runs if n not in sizes.mlflow_query_runs]
    if "query" in groups and capped and "query_build_ms_per_run" in mlflow.figures:
        per_run = mlflow.figures["query_build_ms_per_run"]
        notes.append(f"MLflow's query stops at {max(sizes.mlflow_query_runs):,} runs: building one costs "
                     f"{per_run:.1f} ms (create_run + log_batch + set_terminated), so {max(capped):,} runs "
                     f"would take ~{per_run * max(capped) / 60_000:.0f} min")
    return notes


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args = parse(argv)
    sizes = sizes_from(args)
    groups = selected(args.only)
    figures: dict[str, float] = {}
    details: dict[str, Any] = {}
    failures: dict[str, str] = {}
    notes: list[str] = []
    walls: dict[str, float] = {}
    rows = report.rows(sizes)
    for group, runner in runners(sizes, args.kafka).items():
        if group not in groups:
            continue
        print(f"runbus: {group} ...", flush=True)
        began = time.perf_counter()
        try:
            with phases.group(group), profiled(group):
                outcome = runner()
        except Exception as exc:
            traceback.print_exc()
            notes.append(f"workload {group} failed: {type(exc).__name__}: {exc}")
            failures.update({row.key: "failed" for row in rows if row.workload in WORKLOADS[group]})
            continue
        finally:
            walls[group] = time.perf_counter() - began
        figures.update(outcome.figures)
        details[group] = outcome.details
        print("  " + ", ".join(f"{k}={v:,.4g}" for k, v in outcome.figures.items()), flush=True)
    if "pipeline" in groups and not args.kafka:
        notes.append("Kafka figures not measured: give --kafka host:port (or RUNBUS_BENCH_KAFKA)")

    with phases.group("mlflow"):
        mlflow, walls["mlflow"] = mlflow_figures(groups, sizes, args.no_mlflow)
    notes = mlflow_notes(mlflow, sizes, groups) + notes
    notes.append("Runbus's clock of rows 1 and 2 stops when a second process (get_run_db().sql, through the "
                 "home's projection service) sees every point or run; MLflow/Runbus > 1 means Runbus is ahead")
    wall = time.perf_counter() - started
    notes.append(f"total wall time {wall / 60:.1f} min ({', '.join(f'{k} {v:.0f}s' for k, v in walls.items())})")
    breakdown = phases.breakdown()
    print("where the wall time went:\n  " + "\n  ".join(breakdown), flush=True)

    header = report.Header(cpu_model(), os.cpu_count() or 0, platform.platform(), sys.version.split()[0], when,
                           _git(), f"MLflow {mlflow.version}" if mlflow.version else f"MLflow not measured "
                           f"({mlflow.unavailable})")
    cells = report.table_rows(rows, figures, mlflow.figures, failures,
                              "failed" if mlflow.unavailable and not args.no_mlflow else "")
    report.print_table(cells, header, notes, args.quick)
    report.write(RESULTS, {
        "header": dataclasses.asdict(header), "args": vars(args), "sizes": dataclasses.asdict(sizes),
        "wall_s": wall, "wall_s_per_group": walls, "wall_breakdown": breakdown,
        "wall_phases": {name: {"wall_s": spent.wall_s, "cpu_s": spent.cpu_s, "phases": dict(spent.phases)}
                        for name, spent in phases.walls().items()},
        "figures": figures,
        "mlflow": dataclasses.asdict(mlflow), "rows": cells, "notes": notes, "details": details,
    }, report.markdown(cells, header, notes, args.quick))
    print(f"written: {RESULTS / 'latest.json'}, {RESULTS / 'latest.md'}")


if __name__ == "__main__":
    main()
