"""The projector: its exactly-once contract (tests/contract/projector_contract.py) on the embedded,
in-memory and Kafka buses, and the engine's use of it (many producers, the file held, damage)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest

from engine import NewRun, get_run_db, new_function
from engine.api import session
from producers.bus import Bus
from producers.bus.embedded import EmbeddedBus
from producers.bus.kafka import KafkaBus
from producers.bus.memory import MemoryBus
from projections import open_projection
from projections.database import close_all
from tests.contract.projector_contract import ProjectorContract
from tests.kafka_support import unique_topic
from tests.support.polling import line_within
from tests.support.producers import SEQ_BREAKS, produce_from_processes

ROOT = Path(__file__).resolve().parents[2]


def _train(context, epochs=100, name="x"):
    for epoch in range(epochs):
        context.log_metric("loss", 1.0 / (epoch + 1), step=epoch)
        if epoch % 10 == 0:
            context.log_result("last_epoch", epoch)
    context.set_label("model", name)
    context.log_artifact(f"{name}.txt", body=name.encode())
    return epochs


def _record_runs(count: int, epochs: int) -> list[str]:
    uids = []
    for i in range(count):
        run = new_function().run(NewRun(handler=_train, name=f"run{i}", params={"epochs": epochs, "name": f"m{i}"}))
        uids.append(run.uid)
    return uids


def test_four_processes_logging_at_once_lose_nothing_and_keep_order(home: Path) -> None:
    produce_from_processes(4, 5000)

    db = get_run_db()
    runs = db.sql("SELECT uid, state FROM runs")
    assert len(runs) == 4 and set(runs.state) == {"completed"}
    counts = db.sql("SELECT uid, count(*) AS n, count(DISTINCT step) AS steps FROM metrics GROUP BY uid")
    assert list(counts.n) == [5000] * 4 and list(counts.steps) == [5000] * 4
    assert db.sql(SEQ_BREAKS).n[0] == 0


def test_a_second_process_waits_for_the_projection_instead_of_failing(home: Path) -> None:
    """RUNBUS_PROJECTION=inprocess: a reader finding the file held waits on its lock (the lock's
    own log says so) and answers once it is released, instead of failing."""
    _record_runs(1, 5)
    svc = session().services
    svc.writer.flush()
    code = ("import logging, sys; logging.basicConfig(stream=sys.stderr, level=logging.WARNING); "
            "logging.getLogger('filelock').setLevel(logging.DEBUG); "
            "from engine import get_run_db; db = get_run_db(); "
            "print(db.sql('select count(*) as n from runs').n[0], flush=True)")
    with open_projection(svc.settings.db_path):
        child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "RUNBUS_PROJECTION": "inprocess", "RUNBUS_DB_TIMEOUT": "300"})
        assert child.stderr is not None
        waiting = ""
        while "not acquired" not in waiting:  # the child reached the lock and waits on it
            waiting = line_within(child.stderr, "the child waits for the projection's lock")
            assert waiting, "the child ended without waiting for the lock"
        assert child.poll() is None
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert out.strip() == "1"


def test_the_sql_surface_refuses_writes_and_changes_nothing(home: Path) -> None:
    _record_runs(1, 5)
    db = get_run_db()
    for statement in ("DELETE FROM runs", "DROP TABLE runs", "UPDATE runs SET state = 'x'",
                      "INSERT INTO labels VALUES ('a', 'b', 'c')", "CREATE TABLE t (x INT)",
                      "SELECT 1; DELETE FROM runs", "ATTACH 'other.db'", "COPY runs TO 'out.csv'"):
        try:
            db.sql(statement)
        except ValueError as exc:
            assert "read-only" in str(exc)
        else:
            raise AssertionError(f"{statement!r} was accepted")
    assert db.sql("SELECT count(*) AS n FROM runs").n[0] == 1
    assert db.sql("SELECT state FROM runs").state[0] == "completed"


def test_damage_found_in_a_data_block_fails_once_then_the_projection_is_rebuilt(home: Path) -> None:
    def job(context):
        for step in range(60_000):
            context.log_metric("m", float(step), step=step)

    new_function().run(NewRun(handler=job))
    db = get_run_db()
    assert db.sql("SELECT count(*) AS n FROM metrics").n[0] == 60_000
    close_all()
    path = session().services.settings.db_path
    size = path.stat().st_size
    with path.open("r+b") as f:  # the middle of the file: metrics' data blocks, not the catalog
        f.seek(size // 2)
        f.write(os.urandom(256 * 1024))
    answers = []
    for _ in range(2):
        try:
            answers.append(db.sql("SELECT sum(value) AS s, count(*) AS n FROM metrics").values.tolist())
        except duckdb.Error as exc:
            assert "Corrupt database file" in str(exc)
            assert any(p.name.startswith(path.name + ".corrupt-") for p in path.parent.iterdir())
    assert answers[-1] == [[sum(range(60_000)), 60_000]]


class TestProjectorOnTheEmbeddedBus(ProjectorContract):
    @pytest.fixture
    def bus_factory(self, tmp_path: Path) -> Callable[[], Bus]:
        return functools.partial(EmbeddedBus, tmp_path / "log.sqlite")


class TestProjectorOnTheMemoryBus(ProjectorContract):
    shared_across_processes = False

    @pytest.fixture
    def bus_factory(self) -> Callable[[], Bus]:
        bus = MemoryBus(partitions=3)
        return lambda: bus


@pytest.mark.kafka
class TestProjectorOnKafka(ProjectorContract):
    @pytest.fixture
    def bus_factory(self, kafka_bootstrap: str) -> Callable[[], Bus]:
        return functools.partial(KafkaBus, kafka_bootstrap, topic=unique_topic(), partitions=3)
