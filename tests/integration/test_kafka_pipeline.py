"""The whole pipeline on a real Kafka broker: producers, projector, follower, push, outages."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from engine import NewRun, get_run_db, new_function
from engine.api import close_session, session
from engine.loader import load_handler
from engine.transfer import event_ids
from producers.bus.kafka import KafkaBus
from projections import Projector
from tests.kafka_support import OwnBroker, own_state, start_own_broker, unique_topic, use_fresh_topic
from tests.support.crash import kill_projector_mid_stream, resume_and_compare
from tests.support.producers import SEQ_BREAKS, produce_from_processes

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[2]
RUNBUS = str(Path(sys.executable).parent / "runbus")


@pytest.fixture
def kafka_home(home: Path, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """RUNBUS_HOME with the bus on a fresh 3-partition topic of the test broker."""
    use_fresh_topic(monkeypatch, kafka_bootstrap)
    yield home
    close_session()


def _metrics_job(count: int, pause_every: int = 0, pause_s: float = 0.0):
    def job(context):
        for step in range(count):
            context.log_metric("m", step, step=step)
            if pause_every and step % pause_every == 0:
                time.sleep(pause_s)
    return job


def test_the_seed_example_through_kafka(kafka_home: Path) -> None:
    handler = load_handler(f"{ROOT}/examples/quickstart.py:handler")
    run = new_function().run(NewRun(handler=handler, name="demo", params={"p1": 5}).set_label("type", "demo"))
    db = get_run_db()
    results = db.sql("SELECT key, value_num FROM results WHERE uid = ? AND key IN ('accuracy', 'loss')",
                     [run.uid])
    assert dict(zip(results.key, results.value_num, strict=True)) == {"accuracy": 10, "loss": 15}
    assert set(db.sql("SELECT key FROM artifacts WHERE uid = ?", [run.uid]).key) == {"model.txt", "myfig", "mydf.csv"}
    assert db.list_runs(labels={"type": "demo"}).state.tolist() == ["completed"]


def test_three_producer_processes_give_exactly_their_events(kafka_home: Path) -> None:
    produce_from_processes(3, 10_000)

    db = get_run_db()
    assert db.sql("SELECT count(*) AS n FROM metrics").n[0] == 30_000
    assert db.sql("SELECT count(DISTINCT uid) AS n FROM metrics").n[0] == 3
    assert db.sql(SEQ_BREAKS).n[0] == 0


def test_a_projector_killed_mid_stream_resumes_to_equal_a_rebuild(kafka_home: Path, tmp_path: Path) -> None:
    for i in range(4):
        new_function().run(NewRun(handler=_metrics_job(5_000), name=f"r{i}"))
    kill_projector_mid_stream(tmp_path / "killed.duckdb", batch_size=2, batches=5)
    resumed, rebuilt = resume_and_compare(session().services.bus, tmp_path / "killed.duckdb", tmp_path / "clean.duckdb")
    assert len(resumed["metrics"]) == 20_000
    assert resumed == rebuilt


@pytest.fixture
def restartable_kafka_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, OwnBroker]]:
    """RUNBUS_HOME with the bus on a broker of this test's own, which it may stop and restart (the
    shared test broker serves other tests, of other pytest-xdist workers too, meanwhile)."""
    brokers = start_own_broker(own_state("restart"))
    broker = next(brokers)
    try:
        use_fresh_topic(monkeypatch, broker.bootstrap)
        yield home, broker
        close_session()
    finally:
        brokers.close()


def test_a_broker_restart_while_a_job_logs_loses_and_doubles_nothing(
        restartable_kafka_home: tuple[Path, OwnBroker]) -> None:
    _, broker = restartable_kafka_home
    session()  # create the topic while the broker is up
    outcome: dict[str, object] = {}
    job = threading.Thread(target=lambda: outcome.update(
        run=new_function().run(NewRun(handler=_metrics_job(10_000, 500, 0.25), name="through-outage"))))
    job.start()
    time.sleep(1.0)
    broker.kafka_sh("down")
    time.sleep(2.0)
    broker.kafka_sh("up", keep_data=True)
    job.join(300)

    run = outcome["run"]
    assert run.state == "completed"
    db = get_run_db()
    counts = db.sql("SELECT count(*) AS n, count(DISTINCT step) AS steps FROM metrics WHERE uid = ?", [run.uid])
    assert (counts.n[0], counts.steps[0]) == (10_000, 10_000)


def test_garbage_on_the_topic_goes_to_dead_letters(kafka_home: Path) -> None:
    new_function().run(NewRun(handler=_metrics_job(3), name="before"))
    session().services.bus.append([("junk", b"\x00garbage")])
    new_function().run(NewRun(handler=_metrics_job(3), name="after"))
    db = get_run_db()
    assert db.sql("SELECT key FROM dead_letters").key.tolist() == ["junk"]
    assert sorted(db.sql("SELECT name FROM runs WHERE state = 'completed'").name) == ["after", "before"]


def test_push_copies_an_embedded_log_to_kafka_once(home: Path, kafka_bootstrap: str) -> None:
    for i in range(3):
        new_function().run(NewRun(handler=_metrics_job(100), name=f"offline{i}"))
    session().services.writer.flush()
    target = f"kafka://{kafka_bootstrap}"
    topic = unique_topic()
    env = {**os.environ, "RUNBUS_KAFKA_TOPIC": topic}
    first = subprocess.run([RUNBUS, "push", "--to", target], env=env, capture_output=True, text=True, timeout=120)
    second = subprocess.run([RUNBUS, "push", "--to", target], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "pushed 0 events" in second.stdout

    kafka = KafkaBus(kafka_bootstrap, topic=topic, partitions=6)
    try:
        local_ids = event_ids(session().services.bus, session().services.codec)
        assert event_ids(kafka, session().services.codec) == local_ids
        with duckdb.connect(":memory:") as con:
            Projector(kafka, con).catch_up()
            assert con.execute("SELECT count(*) FROM metrics").fetchone()[0] == 300
            assert con.execute("SELECT count(*) FROM runs WHERE state = 'completed'").fetchone()[0] == 3
    finally:
        kafka.close()


@pytest.mark.dask
def test_the_seed_sweep_on_dask_writes_through_kafka(kafka_home: Path) -> None:
    from tests.support import handlers

    task = NewRun(handler=handlers.seed_like).with_hyper_params({"p1": [5, 2, 3]}, "min.loss")
    run = new_function(command="dask://").run(task, quiet=True)
    assert run.state == "completed", run.error
    assert run.results["best_iteration"] == 2
    assert len(run.artifact("iteration_results").as_df()) == 3
