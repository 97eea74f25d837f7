"""`python -m benchmarks`: the workload of issue 7 on Runbus and on MLflow, side by side.

Prints the table (figure, Runbus, target, MLflow, ratio) and writes benchmarks/results/latest.json
and latest.md. Workload groups (for --only): log_metric (1), children (2), query (3),
pipeline (4 end to end, 5 rebuild, 7 projector RSS; aliases e2e, rebuild, rss), sweep (6).
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
from typing import Any

from benchmarks import children, log_metric, mlflow_env, pipeline, query, report, sweep
from benchmarks.common import RESULTS, ROOT, Outcome, Sizes
from benchmarks.profiling import profiled

GROUPS = ("log_metric", "children", "query", "pipeline", "sweep")
ALIASES = {"e2e": "pipeline", "rebuild": "pipeline", "rss": "pipeline", "child_runs": "children"}
WORKLOADS = {"log_metric": {"1"}, "children": {"2"}, "query": {"3"}, "pipeline": {"4", "5", "7"}, "sweep": {"6"}}
MLFLOW_GROUPS = ("log_metric", "children", "query")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in under 2 minutes")
    parser.add_argument("--only", default="", help="comma-separated workload groups (default: all)")
    parser.add_argument("--kafka", default=os.environ.get("RUNBUS_BENCH_KAFKA"),
                        help="host:port of a broker for the Kafka figures (default: $RUNBUS_BENCH_KAFKA)")
    parser.add_argument("--repeat", type=int, help="measurements per figure; the median is shown (default 3)")
    parser.add_argument("--no-mlflow", action="store_true", help="Runbus figures only")
    parser.add_argument("--events", type=int, help="events of the end-to-end workload (default 1,000,000)")
    parser.add_argument("--query-runs", type=_ints, help="run counts of the query workload (default 1k,10k,100k)")
    parser.add_argument("--mlflow-query-runs", type=_ints, help="MLflow's run counts (default 1k,10k)")
    parser.add_argument("--children", type=int, help="child runs of the sweep workload (default 1,000)")
    parser.add_argument("--sweep-iterations", type=int, help="iterations of the Dask sweep (default 1,000)")
    return parser.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = Sizes.quick() if args.quick else Sizes()
    changes: dict[str, Any] = {}
    if args.repeat:
        changes.update(repeat=args.repeat, e2e_repeat=args.repeat)
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
    return {
        "log_metric": lambda: log_metric.run(sizes.log_metric_points, sizes.log_metric_chunk, sizes.repeat),
        "children": lambda: children.run(sizes.children, sizes.repeat),
        "query": lambda: query.run(sizes.query_runs, sizes.queries),
        "pipeline": lambda: pipeline.run(sizes.events, sizes.producers, sizes.e2e_repeat, kafka),
        "sweep": lambda: sweep.run(sizes.sweep_iterations, sizes.repeat),
    }


def _git() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!benchmarks"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{' + uncommitted changes' if dirty else ''}"


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = parse(argv)
    sizes = sizes_from(args)
    groups = selected(args.only)
    figures: dict[str, float] = {}
    details: dict[str, Any] = {}
    failures: dict[str, str] = {}
    notes: list[str] = []
    walls: dict[str, float] = {}
    rows = report.rows(sizes, sizes.mlflow_query_runs)
    for group, runner in runners(sizes, args.kafka).items():
        if group not in groups:
            continue
        print(f"runbus: {group} ...", flush=True)
        began = time.perf_counter()
        try:
            with profiled(group):
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

    mlflow = mlflow_env.MlflowResult(unavailable="--no-mlflow")
    mlflow_groups = [g for g in groups if g in MLFLOW_GROUPS]
    if mlflow_groups and not args.no_mlflow:
        print(f"mlflow: {', '.join(mlflow_groups)} ...", flush=True)
        began = time.perf_counter()
        mlflow = mlflow_env.run({
            "only": mlflow_groups, "points": sizes.mlflow_log_metric_points,
            "chunk": max(1, sizes.mlflow_log_metric_points // 20), "children": sizes.children,
            "query_runs": list(sizes.mlflow_query_runs), "queries": sizes.queries, "repeat": 1})
        walls["mlflow"] = time.perf_counter() - began
    if mlflow.unavailable:
        notes.insert(0, f"mlflow: {'not run' if args.no_mlflow else 'unavailable'} ({mlflow.unavailable})")
    else:
        notes.insert(0, f"MLflow {mlflow.version}, default sqlite store (sqlite:///<tmp>/mlflow.db), one pass; "
                        f"log_metric on {sizes.mlflow_log_metric_points:,} points (Runbus: "
                        f"{sizes.log_metric_points:,}): MLflow costs milliseconds per point")
        capped = [n for n in sizes.query_runs if n not in sizes.mlflow_query_runs]
        if "query" in mlflow_groups and capped:
            per_run = mlflow.figures.get("query_build_ms_per_run", 0.0)
            notes.append(f"MLflow query capped at {max(sizes.mlflow_query_runs):,} runs: building one costs "
                         f"{per_run:.1f} ms, so {max(capped):,} runs would take "
                         f"~{per_run * max(capped) / 60_000:.0f} min")
    notes.append(f"Runbus: median of {sizes.repeat} (end to end and rebuild: {sizes.e2e_repeat}); "
                 f"MLflow/Runbus > 1 means Runbus is faster")
    wall = time.perf_counter() - started
    notes.append(f"total wall time {wall / 60:.1f} min ({', '.join(f'{k} {v:.0f}s' for k, v in walls.items())})")

    title = f"Runbus vs MLflow, issue 7 workload ({os.cpu_count()} cpus{', quick' if args.quick else ''})"
    cells = report.table_rows(rows, figures, mlflow.figures, failures)
    report.print_table(cells, title, notes)
    report.write(RESULTS, {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.platform(), "cpus": os.cpu_count(),
        "python": sys.version.split()[0], "git": _git(), "args": vars(args), "sizes": dataclasses.asdict(sizes),
        "wall_s": wall, "wall_s_per_group": walls, "figures": figures,
        "mlflow": dataclasses.asdict(mlflow), "rows": cells, "notes": notes, "details": details,
    }, report.markdown(cells, title, notes))
    print(f"written: {RESULTS / 'latest.json'}, {RESULTS / 'latest.md'}")


if __name__ == "__main__":
    main()
