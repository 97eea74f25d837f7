"""What a process loads at start-up: the projection service imports only what serving and folding
need, and `runbus --help` builds no services. Checked in fresh processes, by the modules they hold
when they end, never by how long that takes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.bootstrap import bootstrap, make_bus
from engine.function import Function
from engine.settings import load_settings
from engine.task import RunTemplate
from projections.client import ServiceClient
from projections.database import close_all
from projections.service import ServiceAddress
from tests.support import handlers
from tests.support.polling import line_within, wait_until

# the user-facing layers (CLI, UI, sweeps, plots) and pandas, which the service never holds
NOT_IN_THE_SERVICE = {"pandas", "typer", "rich", "click", "pydantic", "matplotlib", "dask", "distributed",
                      "starlette", "uvicorn", "jinja2"}
# what only commands that read or write the log need
NOT_IN_HELP = {"duckdb", "pyarrow", "pandas", "numpy", "fastavro", "projections", "schemas"}


def run_module(module: str, *args: str) -> list[str]:
    """The command line that runs `python -m module args` and prints, as it exits, the top-level
    packages it holds (one a line; a package refused by an import hook is not held)."""
    script = ("import atexit, runpy, sys\n"
              "atexit.register(lambda: print(*sorted({name.split('.')[0] for name, module in sys.modules.items()"
              " if module is not None}), sep='\\n', file=sys.stderr))\n"
              f"sys.argv = [{module!r}, *{list(args)!r}]\n"
              f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    return [sys.executable, "-c", script]


def held(stderr: str) -> set[str]:
    """The packages the process printed as it exited (the last lines of its stderr)."""
    return {line.strip() for line in stderr.splitlines() if line.strip().isidentifier()}


def test_importing_the_service_entry_module_loads_no_user_facing_layer() -> None:
    done = subprocess.run([sys.executable, "-c", "import sys, engine.projection_service; "
                           "print(*sorted({name.split('.')[0] for name in sys.modules}), sep='\\n', file=sys.stderr)"],
                          capture_output=True, text=True, timeout=120, check=True)
    assert {"engine", "projections", "duckdb"} <= held(done.stderr)  # the listing is what it claims
    assert held(done.stderr) & NOT_IN_THE_SERVICE == set()


def test_the_service_folds_and_answers_without_loading_pandas_or_a_user_facing_layer(home: Path) -> None:
    settings = load_settings()
    svc = bootstrap(settings)
    try:
        Function(handler=handlers.seed_like, svc=svc).run(RunTemplate(params={"p1": 2}))
    finally:
        svc.close()
        close_all()  # this process folded in-process: the file is the service's now
    env = {**os.environ, "RUNBUS_PROJECTION": "service"}
    service = subprocess.Popen(run_module("engine.projection_service", "--follow"), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    bus = make_bus(settings.bus_url, settings)
    client = ServiceClient(ServiceAddress.of(settings.home), bus, start=None, timeout_s=60)
    try:
        wait_until(lambda: (client.running() or {}).get("pid") == service.pid, "the service to answer")
        # the service folds the run (the projector's writer converts rows with pyarrow) and answers
        counted = client.answer([("SELECT count(*) AS n FROM runs", None)])[0]
        assert int(counted.n[0]) == 1
    finally:
        client.close()
        bus.close()
        service.send_signal(signal.SIGTERM)
        try:
            _, stderr = service.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            service.kill()
            raise AssertionError(f"the service did not exit on SIGTERM: {service.communicate()[1][-2000:]}") from None
    assert service.returncode == 0, stderr[-2000:]
    assert {"projections", "duckdb", "pyarrow"} <= held(stderr)
    assert held(stderr) & NOT_IN_THE_SERVICE == set()


def test_runbus_help_builds_no_services() -> None:
    done = subprocess.run(run_module("engine.cli", "--help"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout and {"engine", "typer"} <= held(done.stderr)
    assert held(done.stderr) & NOT_IN_HELP == set()


# a handler run the tutorial's way; its process prints the packages it holds as it exits
JOB = """
import sys
from engine import NewRun, new_function

def handler(context, p1=1):
    context.log_result("doubled", p1 * 2)
    context.log_metric("loss", 0.5, step=1)
    context.set_label("kind", "job")

run = new_function().run(NewRun(params={"p1": 3}), handler=handler)
assert run.outputs == {"doubled": 6}, run.outputs
print(*sorted({name.split('.')[0] for name, module in sys.modules.items() if module is not None}),
      sep='\\n', file=sys.stderr)
"""


def test_a_job_that_logs_no_dataframe_never_loads_pandas(home: Path) -> None:
    done = subprocess.run([sys.executable, "-c", JOB], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert {"engine", "producers", "fastavro"} <= held(done.stderr)  # the listing is what it claims
    assert "pandas" not in held(done.stderr)

def native_libraries(pid: int) -> set[str]:
    """The packages of site-packages whose compiled libraries process `pid` has mapped (Linux /proc):
    'pandas' for site-packages/pandas/_libs/..., 'duckdb' for site-packages/_duckdb.cpython-....so."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {part.split("/", 1)[0].split(".", 1)[0].lstrip("_") for part in maps.split("site-packages/")[1:]}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps")
def test_runbus_project_follow_becomes_the_service_process(home: Path) -> None:
    settings = load_settings()
    env = {**os.environ, "RUNBUS_PROJECTION": "service"}
    runbus = str(Path(sys.executable).parent / "runbus")
    follower = subprocess.Popen([runbus, "project", "--follow"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    bus = make_bus(settings.bus_url, settings)
    client = ServiceClient(ServiceAddress.of(settings.home), bus, start=None, timeout_s=60)
    try:
        assert "projector following" in line_within(follower.stdout, "the follower starts")  # type: ignore[arg-type]
        wait_until(lambda: (client.running() or {}).get("pid") == follower.pid, "the follower to answer")
        assert int(client.answer([("SELECT count(*) AS n FROM runs", None)])[0].n[0]) == 0
        command = Path(f"/proc/{follower.pid}/cmdline").read_bytes().split(b"\0")
        loaded = native_libraries(follower.pid)
    finally:
        client.close()
        bus.close()
        follower.send_signal(signal.SIGTERM)
        out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    assert b"engine.projection_service" in command  # the same pid, now the service's entry point
    assert {"duckdb", "pyarrow"} <= loaded  # the listing is what it claims
    assert not {"pandas", "pydantic_core"} & loaded, loaded
    assert "projector stopped at" in out


def test_the_service_process_imports_nothing_from_the_current_directory_in_place_of_a_library(
        tmp_path: Path) -> None:
    """`python -m` puts the current directory first on sys.path; a project folder's `secrets.py`
    must not stand in for the standard library's in the service (nor run there)."""
    from engine.projection_service import service_command

    marker = tmp_path / "imported"
    (tmp_path / "secrets.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    done = subprocess.run(service_command("--help"), cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert done.returncode == 0, done.stderr
    assert "--follow" in done.stdout
    assert not marker.exists(), "the service imported secrets.py from its current directory"
