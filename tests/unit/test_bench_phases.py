"""The wall-time breakdown of `python -m benchmarks`: phases within a group, nested or reported by
another process, are each counted once, and what no phase covers is shown as "other"."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks import phases


class Clock:
    """perf_counter() that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    phases.reset()
    fake = Clock()
    monkeypatch.setattr(phases.time, "perf_counter", fake)
    yield fake
    phases.reset()


def test_nested_and_added_phases_are_counted_once_and_the_rest_is_other(clock: Clock) -> None:
    with phases.group("query") as wall:
        clock.wait(1)
        with phases.phase("build"):
            clock.wait(5)
            with phases.phase("measure"):
                clock.wait(3)
            phases.add("bare table", 2)  # seconds another process reported, inside "build"
        clock.wait(4)
    assert wall.wall_s == 13
    assert dict(wall.phases) == {"measure": 3, "bare table": 2, "build": 5 - 2}
    assert wall.other_s() == 13 - 8
    (line,) = phases.breakdown()
    assert line.startswith("query: 13.0s wall") and "(other 5.0s, measure 3.0s, build 3.0s, bare table 2.0s)" in line


def test_a_phase_outside_any_group_is_not_accounted(clock: Clock) -> None:
    with phases.phase("lost"):
        clock.wait(1)
    assert phases.walls() == {} and phases.breakdown() == []
