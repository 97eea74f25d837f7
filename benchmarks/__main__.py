"""Run every benchmark and print the figures (also written to benchmarks/results/latest.json)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks import pipeline, sweep


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is shown")
    parser.add_argument("--kafka", default=os.environ.get("RUNBUS_BENCH_KAFKA"),
                        help="host:port of a broker for the Kafka figures")
    parser.add_argument("--sweep-iterations", type=int, default=1_000)
    args = parser.parse_args()

    figures: dict[str, float] = {}
    samples = [pipeline.log_metric_cost() for _ in range(args.repeat)]
    figures["log_metric_us_median"] = sorted(s["log_metric_us_median"] for s in samples)[len(samples) // 2]
    runs = sorted((pipeline.end_to_end(args.events) for _ in range(args.repeat)),
                  key=lambda r: r["events_per_s"])
    figures["embedded_events_per_s"] = runs[len(runs) // 2]["events_per_s"]
    figures["embedded_rebuild_s"] = sorted(r["rebuild_s"] for r in runs)[len(runs) // 2]
    if args.kafka:
        kafka = sorted((pipeline.end_to_end(args.events, f"kafka://{args.kafka}") for _ in range(args.repeat)),
                       key=lambda r: r["events_per_s"])
        figures["kafka_events_per_s"] = kafka[len(kafka) // 2]["events_per_s"]
    sweeps = sorted((sweep.sweep_vs_map(args.sweep_iterations) for _ in range(args.repeat)),
                    key=lambda r: r["sweep_over_map"])
    figures["sweep_s"] = sweeps[len(sweeps) // 2]["sweep_s"]
    figures["client_map_s"] = sweeps[len(sweeps) // 2]["client_map_s"]
    figures["sweep_over_map"] = sweeps[len(sweeps) // 2]["sweep_over_map"]

    table = Table(title=f"runbus benchmarks ({args.events:,} events, median of {args.repeat})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    labels = {
        "log_metric_us_median": ("log_metric, cost in the job's thread", "{:.2f} us/call"),
        "embedded_events_per_s": ("producer -> SQL rows, embedded bus", "{:,.0f} events/s"),
        "kafka_events_per_s": ("producer -> SQL rows, Kafka", "{:,.0f} events/s"),
        "embedded_rebuild_s": (f"rebuild of {args.events:,} events", "{:.2f} s"),
        "sweep_s": (f"{args.sweep_iterations:,}-iteration sweep on dask://", "{:.2f} s"),
        "client_map_s": ("bare client.map of the same function, same cluster", "{:.2f} s"),
        "sweep_over_map": ("sweep / client.map", "{:.2f}x"),
    }
    for key, value in figures.items():
        label, fmt = labels[key]
        table.add_row(label, fmt.format(value))
    Console().print(table)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(
        {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.platform(),
         "cpus": os.cpu_count(), "events": args.events, "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
