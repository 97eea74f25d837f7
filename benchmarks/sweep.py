"""Workload 6: an N-iteration sweep of a trivial handler on dask:// beside a bare client.map of the
same work (x -> 2x), N tasks, on the same warm LocalCluster (2 single-threaded worker processes).

One cluster for the whole measurement. Both sides are warmed first (a short map, and a short sweep:
the workers import Runbus once per cluster, as they import the map's function once); then `repeat`
pairs alternate which goes first. Figures: the median sweep time, the median map time and their
ratio (the figures the table shows side by side); each pair's times and the first (cold) sweep's
are kept in the details.

`python -m benchmarks.sweep [--iterations N] [--repeat N] [--profile DIR]` runs it alone; with
--profile, one more warm sweep and map are profiled: the driver's thread (cProfile, top functions by
own time) and the workers' task threads (Dask's own statistical profiler, `Client.profile`; other
threads, such as a worker's Runbus writer, are not sampled).
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
from distributed import Client, LocalCluster

from benchmarks.common import Outcome, fresh_home, median
from benchmarks.phases import phase
from engine import NewRun, new_function
from engine.api import close_session
from engine.runtimes.dask import MarkFinished

WORKERS = 2


def trivial(context: Any, x: int = 0) -> int:
    context.log_result("y", x * 2)
    return x * 2


def bare(x: int) -> int:
    return x * 2


def timed_map(client: Client, iterations: int) -> float:
    """Seconds for a bare client.map of `bare` over `iterations` inputs, gathered."""
    began = time.perf_counter()
    client.gather(client.map(bare, range(iterations), pure=False))
    return time.perf_counter() - began


def timed_sweep(address: str, iterations: int) -> float:
    """Seconds for a sweep of `trivial` over `iterations` values of x on the scheduler `address`,
    from run() until it returns (every iteration's events on the bus, the parent completed)."""
    began = time.perf_counter()
    run = new_function(command=f"dask://{address}").run(
        NewRun(handler=trivial), hyperparams={"x": list(range(iterations))}, selector="max.y", quiet=True)
    elapsed = time.perf_counter() - began
    if run.state != "completed":
        raise RuntimeError(f"the sweep ended {run.state}: {run.error}")
    return elapsed


def _cluster() -> LocalCluster:
    """The cluster both sides run on. Its scheduler runs no task of a dead worker again
    (allowed-failures 0 and the MarkFinished plugin), as the one `dask://` makes for a run: a sweep
    sends it chunks."""
    logging.getLogger("distributed").setLevel(logging.ERROR)  # no dashboard-port chatter in the output
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=":0")
    with Client(cluster) as client:
        client.register_plugin(MarkFinished())
    return cluster


def sweep_vs_map(iterations: int, repeat: int) -> dict[str, Any]:
    """The figures of workload 6 (see the module's docstring) and each pair's times."""
    with phase("set-up: fresh home, cluster"):
        fresh_home(prefix="runbus-bench-sweep-")
        cluster = _cluster()
    with cluster, Client(cluster) as client:
        with phase("warm-up"):
            client.gather(client.map(bare, range(WORKERS * 4), pure=False))
            cold_sweep_s = timed_sweep(cluster.scheduler_address, WORKERS * 4)
        pairs: list[tuple[float, float]] = []
        for index in range(repeat):
            if index % 2 == 0:
                map_s = timed_map(client, iterations)
                sweep_s = timed_sweep(cluster.scheduler_address, iterations)
            else:
                sweep_s = timed_sweep(cluster.scheduler_address, iterations)
                map_s = timed_map(client, iterations)
            pairs.append((sweep_s, map_s))
    close_session()
    sweep_s, map_s = median(s for s, _ in pairs), median(m for _, m in pairs)
    return {"sweep_s": sweep_s, "client_map_s": map_s, "sweep_over_map": sweep_s / map_s, "pairs_s": pairs,
            "cold_sweep_of_warmup_s": cold_sweep_s}


def run(iterations: int, repeat: int) -> Outcome:
    found = sweep_vs_map(iterations, repeat)
    return Outcome(figures={key: found[key] for key in ("sweep_s", "client_map_s", "sweep_over_map")},
                   details={"iterations": iterations, "repeat": repeat, "workers": WORKERS,
                            "pairs_s (sweep, map)": found["pairs_s"],
                            "first sweep on the cluster, s": found["cold_sweep_of_warmup_s"]})


def worker_self_time(profile: dict[str, Any], count: int = 25) -> list[tuple[str, float]]:
    """Functions by their share of the workers' samples spent in their own code, from the tree
    `Client.profile()` returns (each node: count, description, children)."""
    spent: Counter[str] = Counter()
    total = max(1, profile.get("count", 0))
    stack = [profile]
    while stack:
        node = stack.pop()
        children = list(node.get("children", {}).values())
        own = node.get("count", 0) - sum(child.get("count", 0) for child in children)
        described = node.get("description") or {}
        if own > 0 and described:
            spent[f"{described.get('name')}  {described.get('filename')}:{described.get('line_number')}"] += own
        stack.extend(children)
    return [(name, samples / total) for name, samples in spent.most_common(count)]


def _driver_profile(action: Callable[[], float], out: Path, name: str) -> float:
    profiler = cProfile.Profile()
    seconds = profiler.runcall(action)
    with (out / f"{name}-driver.txt").open("w") as text:
        stats = pstats.Stats(profiler, stream=text)
        text.write(f"{name}: {seconds:.2f} s\n\n")
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
    return seconds


def profile(iterations: int, out: Path) -> None:
    """One warm sweep and one map on a fresh cluster, profiled (see the module's docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    fresh_home(prefix="runbus-bench-sweep-")
    with _cluster() as cluster, Client(cluster) as client:
        client.gather(client.map(bare, range(WORKERS * 4), pure=False))
        timed_sweep(cluster.scheduler_address, WORKERS * 4)
        for name, action in (("map", lambda: timed_map(client, iterations)),
                             ("sweep", lambda: timed_sweep(cluster.scheduler_address, iterations))):
            began = time.time()
            seconds = _driver_profile(action, out, name)
            tree = client.profile(start=began, stop=time.time())
            lines = [f"{share:6.1%}  {fn}" for fn, share in worker_self_time(tree)]
            (out / f"{name}-workers.txt").write_text(
                f"{name}: {seconds:.2f} s; workers' task threads: {tree.get('count', 0)} samples (one each 10 ms); "
                "share of samples in each function's own code\n" + "\n".join(lines) + "\n")
            print(f"{name}: {seconds:.2f} s; profiles in {out}", flush=True)
    close_session()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", type=Path, help="profile one warm sweep and map into this folder instead")
    args = parser.parse_args()
    if args.profile:
        profile(args.iterations, args.profile)
        return
    found = sweep_vs_map(args.iterations, args.repeat)
    print(f"{args.iterations:,} iterations, {WORKERS} workers, median of {args.repeat}: "
          f"sweep {found['sweep_s']:.2f} s, client.map {found['client_map_s']:.2f} s, "
          f"sweep/map {found['sweep_over_map']:.2f}x; "
          f"pairs (sweep, map) {[(round(s, 2), round(m, 2)) for s, m in found['pairs_s']]}")


if __name__ == "__main__":
    main()
