"""Where `python -m benchmarks`'s wall time goes: each workload group's seconds split into named
phases (set-up, building data, timed measurements, tear-down), and the CPU seconds of this process
and of the children it waited for, so that time which measures nothing can be found and cut.

A workload marks its phases with `with phase("build"):`; `python -m benchmarks` opens one group per
workload (`group(name)`) and prints `breakdown()` at the end (also in latest.json). Phases nest:
an inner phase's seconds are not counted again in the outer one. Time of a group in no phase is
shown as "other".
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class GroupWall:
    """One group's wall seconds, per phase, and CPU seconds (this process + waited-for children)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    phases: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def other_s(self) -> float:
        return max(0.0, self.wall_s - sum(self.phases.values()))


_groups: dict[str, GroupWall] = {}
_stack: list[list[float]] = []  # per open phase: [its start, seconds of phases nested in it]
_current: list[str] = []


def _cpu() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


@contextmanager
def group(name: str) -> Iterator[GroupWall]:
    """Account the wall and CPU time of the block to group `name` (a workload group, or "mlflow")."""
    wall = _groups.setdefault(name, GroupWall())
    _current.append(name)
    began, cpu = time.perf_counter(), _cpu()
    try:
        yield wall
    finally:
        wall.wall_s += time.perf_counter() - began
        wall.cpu_s += _cpu() - cpu
        _current.pop()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Account the block's wall time to phase `name` of the current group (nothing outside a group)."""
    _stack.append([time.perf_counter(), 0.0])
    try:
        yield
    finally:
        began, nested = _stack.pop()
        spent = time.perf_counter() - began
        if _stack:
            _stack[-1][1] += spent
        if _current:
            _groups[_current[-1]].phases[name] += spent - nested


def add(name: str, seconds: float) -> None:
    """Account `seconds` measured elsewhere (another process's phase) to phase `name` of the current
    group, out of the phase that encloses it."""
    if _stack:
        _stack[-1][1] += seconds
    if _current:
        _groups[_current[-1]].phases[name] += seconds


def walls() -> dict[str, GroupWall]:
    return dict(_groups)


def breakdown() -> list[str]:
    """One line per group: its wall seconds, CPU seconds and phases, largest first."""
    lines = []
    for name, wall in _groups.items():
        if wall.wall_s < 0.05 and not wall.phases:
            continue  # a group that had nothing to do (MLflow with --no-mlflow)
        parts = sorted({**wall.phases, "other": wall.other_s()}.items(), key=lambda item: -item[1])
        shown = ", ".join(f"{phase_name} {seconds:.1f}s" for phase_name, seconds in parts if seconds >= 0.05)
        lines.append(f"{name}: {wall.wall_s:.1f}s wall, {wall.cpu_s:.1f}s CPU here and in waited-for "
                     f"children ({shown})")
    return lines


def reset() -> None:
    _groups.clear()
    _stack.clear()
    _current.clear()
