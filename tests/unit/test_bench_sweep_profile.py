"""Where the workers' time goes, from the tree Dask's profiler returns (benchmarks.sweep)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.sweep import worker_self_time


def _node(name: str, count: int, *children: dict[str, Any]) -> dict[str, Any]:
    return {"count": count, "description": {"name": name, "filename": f"{name}.py", "line_number": 1},
            "children": {child["description"]["name"]: child for child in children}}


def test_each_function_gets_the_samples_spent_in_its_own_code_as_a_share_of_all() -> None:
    leaf = _node("flush", 50)
    tree = {"count": 100, "description": None,
            "children": {"run": _node("run", 90, _node("emit", 20), leaf), "idle": _node("idle", 10)}}
    shares = dict(worker_self_time(tree))
    assert shares == {"flush  flush.py:1": 0.5, "run  run.py:1": 0.2,
                      "emit  emit.py:1": 0.2, "idle  idle.py:1": 0.1}
    assert [name for name, _ in worker_self_time(tree, count=1)] == ["flush  flush.py:1"]


def test_an_empty_profile_has_no_functions() -> None:
    assert worker_self_time({"count": 0, "children": {}}) == []
    assert sum(share for _, share in worker_self_time(_node("a", 4, _node("b", 4)))) == pytest.approx(1.0)
