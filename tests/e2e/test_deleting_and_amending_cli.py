"""Deleting, restoring, amending and purging runs through the command line, as a user does it, on
the default read path (the home's projection service)."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from projections.database import close_all

RUNBUS = str(Path(sys.executable).parent / "runbus")

JOB = """
def train(context, lr=0.1):
    context.log_result("accuracy", 0.5 + lr)
    context.log_artifact("model", body=("model-body-" + repr(lr)).encode())
"""
PARAM = "0.918273645"  # a value that occurs nowhere else: grep the log's files for it


@pytest.fixture
def cli(home: Path, tmp_path: Path):
    (tmp_path / "job.py").write_text(JOB)
    env = dict(os.environ)  # the bus_home fixture may have set RUNBUS_BUS for Kafka

    def run(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([RUNBUS, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120, input=stdin)
        if check:
            assert done.returncode == 0, done.stderr
        return done

    return run


def runs(cli) -> dict[str, dict]:
    return {row["uid"]: row for row in json.loads(cli("runs", "--format", "json").stdout)}


def sweep(cli, lrs: str = f"0.1,{PARAM}") -> tuple[str, set[str]]:
    """A sweep's parent uid and its iterations' uids."""
    cli("run", "job.py:train", "--hyper", f"lr={lrs}", "--selector", "max.accuracy", "--quiet")
    rows = runs(cli)
    parent = next(uid for uid, row in rows.items() if row["iteration"] == 0 and row["name"] == "train"
                  and any(other["iteration"] > 0 for other in rows.values()))
    return parent, {uid for uid, row in rows.items() if uid != parent}


def test_delete_hides_the_run_and_its_iterations_and_restore_brings_them_back(bus_home: Path, cli) -> None:
    parent, iterations = sweep(cli)
    cli("run", "job.py:train", "-p", "lr=0.3")
    single = next(uid for uid in runs(cli) if uid != parent and uid not in iterations)

    done = cli("delete", parent[:10], "--reason", "bad data")
    assert done.stdout.split() == ["deleted", parent]
    assert set(runs(cli)) == {single}
    assert json.loads(cli("sql", f"SELECT count(*) AS n FROM results WHERE uid <> '{single}'", "--format",
                          "json").stdout) == [{"n": 0}]
    deleted = json.loads(cli("sql", "SELECT uid, deleted_by, reason FROM deleted_runs", "--format", "json").stdout)
    assert deleted == [{"uid": parent, "deleted_by": getpass.getuser(), "reason": "bad data"}]

    done = cli("restore", parent[:10])
    assert done.stdout.split() == ["restored", parent]
    assert set(runs(cli)) == {parent, single, *iterations}
    assert json.loads(cli("sql", "SELECT count(*) AS n FROM deleted_runs", "--format", "json").stdout) == [{"n": 0}]


def test_labels_and_notes_show_with_who_and_when_in_the_history(bus_home: Path, cli) -> None:
    cli("run", "job.py:train", "--label", "stage=dev")
    uid = next(iter(runs(cli)))
    before = time.time()

    assert cli("label", uid[:8], "team=vision", "owner=ana").stdout.strip() == f"labelled {uid}: team=vision owner=ana"
    cli("label", uid[:8], "--remove", "stage")
    cli("note", uid[:8], "retrained: <b>first</b>")
    cli("note", uid[:8], "second thoughts")

    shown = json.loads(cli("show", uid[:8]).stdout)
    assert shown["labels"] == {"team": "vision", "owner": "ana"}
    assert shown["note"] == "second thoughts"
    history = shown["amendments"]
    assert [(h["labels"], h["removed_labels"], h["note"]) for h in history] == [
        ({"team": "vision", "owner": "ana"}, [], None), ({}, ["stage"], None),
        ({}, [], "retrained: <b>first</b>"), ({}, [], "second thoughts")]
    assert {h["amended_by"] for h in history} == {getpass.getuser()}
    assert all(pd_time(h["ts"]) >= before - 1 for h in history)
    assert [row["uid"] for row in json.loads(cli("runs", "--label", "team=vision", "--format", "json").stdout)] == [uid]


def pd_time(text: str) -> float:
    import pandas as pd

    return pd.Timestamp(text).timestamp()


def test_edits_of_unknown_runs_and_bad_values_fail_naming_them(bus_home: Path, cli) -> None:
    cli("run", "job.py:train")
    uid = next(iter(runs(cli)))

    for args, named in ((("delete", "nosuchrun"), "nosuchrun"), (("restore", uid), uid),
                        (("label", "nosuchrun", "a=b"), "nosuchrun"), (("note", "nosuchrun", "x"), "nosuchrun"),
                        (("label", uid, "a=b", "--remove", "a"), "'a'"), (("label", uid, "--remove", ""), "label key"),
                        (("label", uid, "novalue"), "novalue"), (("note", uid, "x" * 70_000), "note")):
        done = cli(*args, check=False)
        assert done.returncode != 0, args
        message = done.stderr.strip()
        assert named in message and ("\n" not in message or "Usage" in message), (args, message)

    cli("delete", uid)
    done = cli("label", uid, "a=b", check=False)
    assert done.returncode == 1 and "is deleted: restore it first" in done.stderr
    assert json.loads(cli("sql", "SELECT count(*) AS n FROM events WHERE type = 'run_amended'",
                          "--format", "json").stdout) == [{"n": 0}]  # nothing was written for the refused edits


def log_files(home: Path) -> list[Path]:
    return [path for path in home.glob("log.sqlite*") if path.is_file()]


def age_bodies(home: Path) -> None:
    """The artifact bodies as if stored two hours ago (purge spares bodies stored in the last hour)."""
    old = time.time() - 7200
    for body in (home / "artifacts").glob("*/*"):
        os.utime(body, (old, old))


def test_purge_rewrites_the_embedded_log_and_removes_the_bodies_and_a_rebuild_agrees(home: Path, cli) -> None:
    parent, iterations = sweep(cli)
    cli("run", "job.py:train", "-p", "lr=0.4")
    kept = next(uid for uid in runs(cli) if uid != parent and uid not in iterations)
    bodies_before = {path.name for path in (home / "artifacts").glob("*/*")}
    assert any(PARAM.encode() in path.read_bytes() for path in log_files(home))
    cli("delete", parent)

    refused = cli("purge", check=False, stdin="n\n")
    assert refused.returncode != 0 and "for good?" in refused.stdout
    assert any(PARAM.encode() in path.read_bytes() for path in log_files(home))  # nothing happened

    age_bodies(home)
    done = cli("purge", "--yes")
    purged = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("purged ")}
    assert purged == {parent, *iterations}
    assert f"removed {len(bodies_before) - 1} artifact bodies" in done.stdout
    assert not any(PARAM.encode() in path.read_bytes() for path in log_files(home))
    # nor in the projection's files: the projection was folded again into new ones
    assert [path.name for path in home.rglob("*") if path.is_file() and PARAM.encode() in path.read_bytes()] == []
    bodies_after = {path.name for path in (home / "artifacts").glob("*/*")}
    assert len(bodies_after) == 1 and bodies_after < bodies_before
    kept_body = json.loads(cli("show", kept).stdout)["artifacts"][0]["sha256"]
    assert bodies_after == {kept_body}

    tables = "SELECT (SELECT count(*) FROM runs) AS runs, (SELECT count(*) FROM deleted_runs) AS deleted, " \
             "(SELECT count(*) FROM events WHERE run_uid <> '{kept}') AS others"
    expected = [{"runs": 1, "deleted": 0, "others": 0}]
    assert json.loads(cli("sql", tables.format(kept=kept), "--format", "json").stdout) == expected
    cli("project", "--rebuild")
    assert json.loads(cli("sql", tables.format(kept=kept), "--format", "json").stdout) == expected
    assert set(runs(cli)) == {kept}
    assert "no run" in cli("restore", parent, check=False).stderr  # a purge cannot be undone


@pytest.mark.parametrize(("purge_with", "follow"), [("cli", "runbus"), ("api", "runbus"), ("api", "module")],
                         ids=["cli purge", "api purge", "api purge, the service module without --foreground"])
def test_a_follower_serves_on_through_a_purge_from_a_log_folded_again(home: Path, cli, purge_with: str,
                                                                       follow: str) -> None:
    """A purge stops the home's service to remove the projection's files; a follower
    (`runbus project --follow`, or `python -m engine.projection_service --follow` without
    --foreground, which exited on a purge) is the same process serving the home afterwards, folded
    from the rewritten log, and says so once. A plain stop still ends it."""
    from engine import get_run_db
    from engine.api import session
    from engine.projection_service import service_command
    from projections.client import ServiceClient
    from projections.service import ServiceAddress
    from tests.support.polling import wait_until

    command = [RUNBUS, "project", "--follow"] if follow == "runbus" else service_command("--follow")
    follower = subprocess.Popen(command, env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = ServiceClient(ServiceAddress.of(home), session().services.bus, start=None, timeout_s=30)

        def serving() -> dict | bool:
            """What the follower answers once it serves the home; True once it has exited."""
            if follower.poll() is not None:
                return True
            found = client.running()
            return found if found is not None and found["pid"] == follower.pid else False

        assert wait_until(serving, "the follower serves the home") is not True, follower.communicate(timeout=60)
        cli("run", "job.py:train", "-p", f"lr={PARAM}")
        doomed = next(iter(runs(cli)))
        cli("run", "job.py:train", "-p", "lr=0.2")
        kept = next(uid for uid in runs(cli) if uid != doomed)
        age_bodies(home)
        if purge_with == "cli":
            cli("delete", doomed)
            assert f"purged {doomed}" in cli("purge", "--yes").stdout
        else:
            db = get_run_db()
            db.delete_runs([doomed])
            assert db.purge().runs == [doomed]

        found = wait_until(serving, "the follower serves the home after the purge")
        assert found is not True, follower.communicate(timeout=60)  # it exited
        assert found["pid"] == follower.pid and found["follow"] is True  # type: ignore[index]
        assert set(runs(cli)) == {kept}
        assert json.loads(cli("sql", f"SELECT count(*) AS n FROM events WHERE run_uid = '{doomed}'",
                              "--format", "json").stdout) == [{"n": 0}]
        assert client.running()["pid"] == follower.pid  # type: ignore[index]
        assert [path.name for path in home.rglob("*") if path.is_file() and PARAM.encode() in path.read_bytes()] == []
        assert oct(ServiceAddress.of(home).purge.stat().st_mode & 0o777) == "0o600"
        assert client.stop() == follower.pid  # a stop not for a purge ends it, as before
        out, err = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.terminate()
            follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    assert out.count("folding the log again") == 1, out


@pytest.mark.kafka
@pytest.mark.parametrize("bus_home", ["kafka"], indirect=True)
def test_purge_on_kafka_keeps_the_records_and_says_so(bus_home: Path, cli) -> None:
    cli("run", "job.py:train", "-p", f"lr={PARAM}")
    uid = next(iter(runs(cli)))
    cli("delete", uid)
    age_bodies(bus_home)

    done = cli("purge", "--yes")
    assert "records cannot be rewritten" in done.stdout and "retention" in done.stdout
    assert "removed 0 artifact bodies" in done.stdout  # the deleted run can still be restored: its body stays
    cli("restore", uid)
    shown = json.loads(cli("show", uid).stdout)
    assert shown["params"] == {"lr": float(PARAM)}
    assert (bus_home / "artifacts" / shown["artifacts"][0]["sha256"][:2] / shown["artifacts"][0]["sha256"]).exists()


@pytest.mark.projection("inprocess")
def test_the_api_deletes_amends_and_purges_where_this_process_folds(home: Path, tmp_path: Path) -> None:
    from engine import get_run_db, new_function

    (tmp_path / "api_job.py").write_text(JOB)
    function = new_function(name="train", command=str(tmp_path / "api_job.py"), handler="train")
    doomed = function.run(params={"lr": float(PARAM)}).uid
    kept = function.run(params={"lr": 0.2}).uid
    db = get_run_db()

    db.set_tag(kept, "team", "vision")
    db.set_labels(kept, {"stage": 1})
    db.set_note(kept, "kept for the paper")
    assert db.delete_run(doomed[:12], reason="leak") == doomed
    run = db.read_run(kept)
    assert run["labels"] == {"team": "vision", "stage": "1"} and run["note"] == "kept for the paper"
    assert [a["labels"] for a in run["amendments"]] == [{"team": "vision"}, {"stage": "1"}, {}]
    assert db.purgeable() == [doomed]
    with pytest.raises(KeyError, match="is deleted"):
        db.set_note(doomed, "x")

    age_bodies(home)
    report = db.purge()
    assert report.log_rewritten and report.runs == [doomed] and len(report.bodies) == 1
    assert not any(PARAM.encode() in path.read_bytes() for path in log_files(home))
    assert db.list_runs().uid.tolist() == [kept] and db.purgeable() == []
    close_all()  # nor in the projection's files, once this process lets go of them
    assert [path.name for path in home.rglob("*") if path.is_file() and PARAM.encode() in path.read_bytes()] == []
    assert db.read_run(kept)["note"] == "kept for the paper"


def test_purge_refuses_a_deleted_run_that_is_still_running(home: Path) -> None:
    """What a running run logs after a purge would fold as rows no delete can reach: refused."""
    import threading

    from engine import NewRun, get_run_db, new_function

    started, release = threading.Event(), threading.Event()

    def job(context):
        context.log_result("before", 1)
        started.set()
        release.wait(60)
        context.log_result("after", 2)

    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(new_function().run(NewRun(handler=job, name="live"))))
    worker.start()
    try:
        assert started.wait(60)
        db = get_run_db()
        uid = db.list_runs(name="live").uid.iloc[0]
        db.delete_runs([uid])
        with pytest.raises(RuntimeError, match=f"deleted run {uid} is still running.*nothing was purged"):
            db.purge()
        assert db.purgeable() == [uid]
    finally:
        release.set()
        worker.join(60)
    assert outcome and outcome[0].uid == uid
    report = get_run_db().purge()
    assert report.runs == [uid] and get_run_db().sql("SELECT count(*) AS n FROM results").n[0] == 0


def test_purge_blanks_a_runs_events_found_under_another_key(home: Path) -> None:
    """Anyone who can write to the bus can copy a run's record under another key: the purge goes by
    where the projection found the run's events, not only by key, so the run does not come back."""
    from engine import NewRun, get_run_db, new_function
    from engine.api import session

    uid = new_function().run(NewRun(handler=lambda context: context.log_result("tok", "KEYSENTINEL77"),
                                    name="copied")).uid
    bus = session().services.bus
    copied = next(record for record in bus.read({0: 0}, 1000, 1.0) if record.key == uid and b"KEYSENTINEL77"
                  in record.value)
    bus.append([("someone-else", copied.value)])
    db = get_run_db()
    assert db.sql("SELECT count(*) AS n FROM duplicates").n[0] >= 1  # the copy was seen
    db.delete_runs([uid])
    report = db.purge()
    assert report.runs == [uid]
    assert get_run_db().sql("SELECT count(*) AS n FROM runs").n[0] == 0
    assert b"KEYSENTINEL77" not in (home / "log.sqlite").read_bytes()


CHARTED = """
from producers.artifacts import ChartArtifact


def chart(context):
    context.log_artifact(ChartArtifact("curve", data=[[1, 2], [3, 4]], header=["x", "y"]))
"""


def test_purge_keeps_and_export_bundles_the_chart_image_of_a_run_it_keeps(home: Path, tmp_path: Path, cli) -> None:
    """A chart's PNG is a companion body its artifact's meta names (meta.chart.sha256): a purge
    removed it from under a run it kept, and an export left it out of the bundle."""
    (tmp_path / "charted.py").write_text(CHARTED)
    cli("run", "charted.py:chart")
    kept = next(iter(runs(cli)))
    artifact = json.loads(cli("show", kept).stdout)["artifacts"][0]
    image = artifact["meta"]["chart"]["sha256"]
    cli("run", "job.py:train", "-p", "lr=0.4")
    doomed = next(uid for uid in runs(cli) if uid != kept)
    cli("delete", doomed)
    age_bodies(home)

    cli("purge", "--yes")

    store = {path.name for path in (home / "artifacts").glob("*/*")}
    assert {artifact["sha256"], image} <= store
    bundle = tmp_path / "bodies.tar.gz"
    cli("export", "-o", str(tmp_path / "kept.avro"), "--run", kept, "--with-artifacts", str(bundle))
    with tarfile.open(bundle) as tar:
        assert set(tar.getnames()) == {artifact["sha256"], image}
