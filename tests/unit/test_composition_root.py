"""One composition root per process entry point: what an entry point builds is passed down
explicitly; nothing below it looks services up (engine.bootstrap's docstring states the rule)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import engine.api
from engine.api import EngineRunDB
from engine.bootstrap import Services, bootstrap
from engine.function import Function
from engine.settings import load_settings
from engine.task import RunTemplate
from producers.bus.memory import MemoryBus
from tests.support import handlers

ENGINE = Path(__file__).resolve().parents[2] / "engine"
# the only places that build services, or take the library session
ROOTS = {"bootstrap": {("cli.py", "_build_services"), ("runtimes/dask.py", "setup"), ("api.py", "session")},
         "session": {("function.py", "new_function"), ("function.py", "run_function"), ("api.py", "get_run_db"),
                     ("script.py", "get_or_create_ctx"), ("script.py", "_join_in_child")}}


def _calls(name: str) -> set[tuple[str, str]]:
    """(module path, enclosing function) of every call of a function named `name` in engine/."""
    found = set()
    for path in ENGINE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name:
                    found.add((path.relative_to(ENGINE).as_posix(), function.name))
    return found


@pytest.mark.parametrize("name", sorted(ROOTS))
def test_only_the_entry_points_build_services_or_take_the_session(name: str) -> None:
    assert _calls(name) == ROOTS[name]


def test_the_bootstrap_module_keeps_no_services() -> None:
    import engine.bootstrap

    held = [key for key, value in vars(engine.bootstrap).items()
            if not key.startswith("__") and isinstance(value, (Services, dict, list))]
    assert held == []
    assert not hasattr(engine.bootstrap, "services") and not hasattr(engine.bootstrap, "reset_services")


@pytest.fixture
def svc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Services]:
    """Services over an in-memory bus, folded in this process; the library session is not built."""
    monkeypatch.setenv("RUNBUS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RUNBUS_PROJECTION", "inprocess")
    monkeypatch.setenv("RUNBUS_FLUSH_INTERVAL", "0.05")
    engine.api.close_session()
    built = bootstrap(load_settings(), bus=MemoryBus(partitions=2))
    yield built
    built.close()
    assert engine.api._session is None, "something below an entry point took the library session"


def test_a_function_made_with_services_records_runs_sweeps_and_reruns_through_them(svc: Services) -> None:
    function = Function(handler=handlers.seed_like, svc=svc)
    single = function.run(RunTemplate(params={"p1": 2}))
    sweep = function.run(RunTemplate(), hyperparams={"p1": [1, 3]}, selector="max.accuracy", quiet=True)
    assert (single.state, sweep.state, sweep.results["best_iteration"]) == ("completed", "completed", 2)
    assert sum(svc.bus.end_offsets().values()) > 0  # on the given bus, not one RUNBUS_BUS names
    again = EngineRunDB(svc).rerun(single.uid)
    assert again.results == {"accuracy": 4, "loss": 6, "return": "my resp"}
    runs = EngineRunDB(svc).list_runs()
    assert set(runs.uid) >= {single.uid, sweep.uid, again.uid} and len(runs) == 5  # + 2 iterations
