"""The projection service as its readers see it: read your writes from any process, readers that
do not wait for one another or for the fold, one service per home, idle exit, replacement of a
killed service, and owner-only files."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import NewRun, get_run_db, new_function
from engine.api import close_session, session
from engine.bootstrap import make_bus
from engine.projection_service import build_service, service_client
from engine.ui.app import create_app
from engine.ui.store import ServedRunDB
from producers.bus import Bus
from projections.client import ServiceClient
from projections.errors import ServiceRefused
from projections.query import RunDB
from projections.service import ProjectionService, ServiceAddress, serving_in_thread
from tests.support.foreign import append, envelope, finished, started
from tests.support.polling import line_within, wait_until
from tests.support.serving import served_in_thread

ROOT = Path(__file__).resolve().parents[2]
RUNBUS = str(Path(sys.executable).parent / "runbus")


@pytest.fixture
def service_home(bus_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """`bus_home` read through its projection service; the service is stopped afterwards."""
    monkeypatch.setenv("RUNBUS_PROJECTION", "service")
    monkeypatch.setenv("RUNBUS_PROJECTION_IDLE", "30")
    close_session()
    yield bus_home
    _client().stop()


def _client() -> ServiceClient:
    svc = session().services
    return ServiceClient(ServiceAddress.of(svc.settings.home), svc.bus, start=None, timeout_s=30)


def _say(context, word="hi"):
    context.log_result("word", word)


def _child(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env or {**os.environ},
                          capture_output=True, text=True, timeout=120)


def test_another_process_sees_a_run_the_moment_run_returned(service_home: Path) -> None:
    uid = new_function().run(NewRun(handler=_say, name="here")).uid
    seen = _child(f"from engine import get_run_db; print(get_run_db().read_run({uid!r})['state'])")
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.strip() == "completed"

    made = _child("from engine import NewRun, new_function\n"
                  "def job(context):\n    context.log_result('word', 'there')\n"
                  "print(new_function().run(NewRun(handler=job, name='there')).uid)")
    assert made.returncode == 0, made.stderr
    events = get_run_db().sql("SELECT run_uid, type FROM events").values.tolist()
    assert get_run_db().read_run(made.stdout.strip())["results"] == {"word": "there"}, (made.stdout, events)


def _foreign_run(bus: Bus, uid: str) -> None:
    append(bus, uid, [envelope(uid, 0, "run_started", started(name=uid)),
                      envelope(uid, 1, "run_finished", finished())])


InThread = tuple[Bus, ServiceClient, ProjectionService]


@pytest.fixture
def in_thread(home: Path) -> Iterator[InThread]:
    """A projection service on a thread of this process (on a bus of its own), folding one record
    per batch; the bus to append to and a client of the service."""
    svc = session().services
    bus = make_bus(svc.settings.bus_url, svc.settings)
    service = build_service(svc.settings, bus)
    service.batch_size = 1
    with serving_in_thread(service):
        yield svc.bus, ServiceClient(service.address, svc.bus, start=None, timeout_s=30), service
    bus.close()


def test_a_reader_waits_for_the_fold_of_what_was_on_the_bus_when_it_asked(in_thread: InThread) -> None:
    bus, client, service_of = in_thread
    service_of.pause_folding()  # the fold pauses before its next batch
    _foreign_run(bus, "appended-before-the-query")
    answers: list[object] = []
    reader = threading.Thread(target=lambda: answers.append(
        RunDB(bus, "", source=client).read_run("appended-before-the-query")["state"]))
    reader.start()
    wait_until(lambda: service_of._active >= 1, "the reader's session is open on the service")
    assert not answers  # it waits for the fold instead of answering without the run
    service_of.fold_gate.set()
    reader.join(60)
    assert answers == ["completed"]


class _SeenBefore:
    """The bus as a reader saw it before the backlog was appended (its end offsets then)."""

    def __init__(self, offsets: dict[int, int]) -> None:
        self.offsets = offsets

    def end_offsets(self) -> dict[int, int]:
        return dict(self.offsets)


def test_two_readers_answer_at_once_while_a_backlog_is_being_folded(in_thread: InThread) -> None:
    bus, client, service = in_thread
    _foreign_run(bus, "first")
    client.catch_up()
    seen = bus.end_offsets()
    service.pause_folding()
    for i in range(60):
        _foreign_run(bus, f"backlog-{i}")
    end = bus.end_offsets()
    service.fold_gate.set()
    wait_until(lambda: sum(service.positions().values()) > sum(seen.values()), "the fold is into the backlog")
    service.pause_folding()  # in the middle of the backlog
    behind = sum(end.values()) - sum(service.positions().values())
    assert behind > 0, "the backlog was folded before the readers could ask: make it longer"

    early = ServiceClient(client.address, _SeenBefore(seen), start=None, timeout_s=30)  # type: ignore[arg-type]
    with early.snapshot() as first:
        assert "first" in set(first("SELECT uid FROM runs").uid)
        answered: list[int] = []

        def second_reader() -> None:
            with early.snapshot() as second:
                answered.append(len(second("SELECT uid FROM runs")))

        other = threading.Thread(target=second_reader)
        other.start()
        other.join(60)
        assert answered, "the second reader waited for the first"  # the first still holds its session
        assert "first" in set(first("SELECT uid FROM runs").uid)
    assert sum(end.values()) - sum(service.positions().values()) == behind  # still folding the backlog
    service.fold_gate.set()
    client.catch_up()
    assert len(RunDB(bus, "", source=client).sql("SELECT uid FROM runs")) == 61


def test_the_ui_and_a_cli_query_answer_at_the_same_time(service_home: Path, tmp_path: Path) -> None:
    from tests.e2e.test_ui import start_ui, stop

    uid = new_function().run(NewRun(handler=_say, name="shown")).uid
    ui, url = start_ui(service_home, {**os.environ}, tmp_path / "ui.log")
    try:
        token = (service_home / "ui.token").read_text()
        answers: dict[str, object] = {}

        def ask_ui() -> None:
            body = json.dumps({"sql": "SELECT uid FROM runs"}).encode()
            request = urllib.request.Request(url + "/api/sql", data=body,
                                             headers={"Authorization": f"Bearer {token}",
                                                      "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                answers["ui"] = [row[0] for row in json.loads(response.read())["rows"]]

        asking = threading.Thread(target=ask_ui)
        asking.start()
        cli = subprocess.run([RUNBUS, "sql", "SELECT uid FROM runs", "--format", "json"], env={**os.environ},
                             capture_output=True, text=True, timeout=120)
        asking.join(60)
        assert cli.returncode == 0, cli.stderr
        assert [row["uid"] for row in json.loads(cli.stdout)] == [uid]
        assert answers["ui"] == [uid]
        assert _client().ping()["pid"] not in (ui.pid, os.getpid())  # neither holds the file
    finally:
        stop(ui)


def _service_process(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "engine.projection_service"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_only_one_service_per_home(service_home: Path) -> None:
    env = {**os.environ}
    first, second = _service_process(env), _service_process(env)
    try:
        survivor = wait_until(lambda: [p for p in (first, second) if p.poll() is not None],
                              "one of two services for the same home exits")
        assert len(survivor) == 1 and survivor[0].returncode == 0, survivor[0].stdout.read()  # type: ignore[union-attr]
        running = second if survivor[0] is first else first
        assert _client().ping()["pid"] == running.pid
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)


def test_an_idle_service_exits_and_removes_its_socket(service_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBUS_PROJECTION_IDLE", "1")
    close_session()
    get_run_db().sql("SELECT 1")
    address = ServiceAddress.of(session().services.settings.home)
    pid = _client().ping()["pid"]
    wait_until(lambda: not address.socket.exists(), "the idle service's socket is gone", timeout_s=60)
    wait_until(lambda: not _alive(pid), "the idle service's process is gone", timeout_s=60)


def test_an_idle_service_exits_even_when_its_socket_file_was_removed(service_home: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """As when the home is deleted under it (a test's temporary folder): nothing can connect to wake
    its accept(), and it must still exit."""
    monkeypatch.setenv("RUNBUS_PROJECTION_IDLE", "1")
    close_session()
    get_run_db().sql("SELECT 1")
    pid = _client().ping()["pid"]
    ServiceAddress.of(session().services.settings.home).socket.unlink()
    wait_until(lambda: not _alive(pid), "the idle service's process is gone", timeout_s=60)


def test_a_killed_service_is_replaced_by_the_next_reader(service_home: Path) -> None:
    uid = new_function().run(NewRun(handler=_say, name="kept")).uid
    assert get_run_db().read_run(uid)["state"] == "completed"  # a reader started the service
    address = ServiceAddress.of(session().services.settings.home)
    killed = _client().ping()["pid"]
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: not _alive(killed), "the service is gone")
    assert address.socket.exists()  # left behind: the next reader must see it is stale
    assert get_run_db().read_run(uid)["state"] == "completed"
    assert _client().ping()["pid"] != killed


def test_the_socket_and_the_key_are_owner_only(service_home: Path) -> None:
    get_run_db().sql("SELECT 1")
    address = ServiceAddress.of(session().services.settings.home)
    for path in (address.socket, address.key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(address.socket.parent.stat().st_mode) == 0o700


def test_the_follower_is_the_service_that_answers_and_stops_on_sigterm(service_home: Path) -> None:
    follower = subprocess.Popen([RUNBUS, "project", "--follow"], env={**os.environ}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        assert "projector following" in line_within(follower.stdout, "the follower starts")  # type: ignore[arg-type]
        wait_until(lambda: _client_pid_or_none() == follower.pid, "the follower serves the home")
        new_function().run(NewRun(handler=_say, name="while-following"))
        listed = subprocess.run([RUNBUS, "runs", "--format", "csv"], env={**os.environ}, capture_output=True,
                                text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert "while-following" in listed.stdout
        assert _client().ping()["pid"] == follower.pid  # answered by the follower, not a service of its own
    finally:
        follower.send_signal(signal.SIGTERM)
        out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    assert "projector stopped" in out


def _client_pid_or_none() -> int | None:
    try:
        return int(_client().ping()["pid"])
    except Exception:  # not serving yet
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (our child, not yet reaped) is gone for this purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_the_services_files_are_its_owners_only_in_a_home_others_may_list(home: Path) -> None:
    home.mkdir(mode=0o755, parents=True, exist_ok=True)
    home.chmod(0o755)  # made by the user beforehand, listable by others
    close_session()
    new_function().run(NewRun(handler=_say, name="private"))
    db = get_run_db()
    assert "private" in set(db.sql("SELECT name FROM runs").name)
    made = [path for path in home.iterdir() if path.name.startswith(("runbus.duckdb", "projection."))
            and path.is_file()]
    assert any(path.name == "runbus.duckdb" for path in made)
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in made} == {path.name: "0o600" for path in made}


def _follower(*args: str) -> subprocess.Popen[str]:
    """`runbus project --follow [args]`, once it serves the home (its pid answers a ping)."""
    follower = subprocess.Popen([RUNBUS, "project", "--follow", *args], env={**os.environ},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: _client_pid_or_none() == follower.pid or follower.poll() is not None,
               "the follower serves the home")
    assert follower.poll() is None, follower.communicate()
    return follower


def _end(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)


def test_a_second_follower_exits_naming_the_first_which_serves_on(service_home: Path) -> None:
    first = _follower()
    try:
        second = subprocess.Popen([RUNBUS, "project", "--follow"], env={**os.environ}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            _, err = second.communicate(timeout=120)  # the test's deadline: it must exit by itself
        finally:
            _end(second)
        assert second.returncode != 0
        assert f"already follows {service_home.resolve()} as pid {first.pid}" in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert first.poll() is None
        assert _client().ping()["pid"] == first.pid
    finally:
        _end(first)


def test_a_reader_asking_files_a_follower_does_not_allow_fails_at_start(service_home: Path,
                                                                          tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    first = _follower()
    try:
        ui = subprocess.Popen([RUNBUS, "ui", "--port", "0", "--sql-read-dir", str(data)], env={**os.environ},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, err = ui.communicate(timeout=120)  # the test's deadline: it must refuse at start
        finally:
            _end(ui)
        assert ui.returncode == 1, err
        assert len(err.strip().splitlines()) == 1, err
        for part in (f"pid {first.pid}", "lets SQL read no files", str(data.resolve()), "--sql-read-dir"):
            assert part in err, (part, err)
        assert _client().ping()["pid"] == first.pid  # the follower was left serving
    finally:
        _end(first)


def test_a_follower_started_with_a_read_dir_answers_readers_that_ask_for_it(service_home: Path,
                                                                           tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "table.csv").write_text("x\n7\n")
    first = _follower("--sql-read-dir", str(data))
    try:
        svc = session().services
        reader = service_client(svc.settings, svc.bus, [str(data)])
        [frame] = reader.answer([(f"SELECT x FROM read_csv('readonly://{data.resolve()}/table.csv')", None)])
        assert frame.x.tolist() == [7]
        assert reader.ping()["pid"] == first.pid
        reader.close()
    finally:
        _end(first)


def test_a_ui_whose_service_was_replaced_by_a_follower_without_its_read_dir_answers_503_saying_why(
        service_home: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    svc = session().services
    store = ServedRunDB(svc, service_client(svc.settings, svc.bus, [str(data)]), readable_dirs=[str(data)])
    token = "reader-dirs-test-token"

    def get(path: str) -> object:
        return urllib.request.urlopen(urllib.request.Request(f"{url}{path}", headers={
            "Authorization": f"Bearer {token}"}), timeout=60)

    with served_in_thread(create_app(store, token=token)) as url:
        with get("/runs") as answer:  # its reader starts a service
            assert answer.status == 200
        started_pid = _client().stop()  # as if it idled out
        assert started_pid is not None
        wait_until(lambda: _client_pid_or_none() is None, "the reader's service is gone")
        first = _follower()  # takes the home without the UI's --sql-read-dir
        try:
            for path in ("/runs", "/api/runs/live"):
                with pytest.raises(urllib.error.HTTPError) as refused:
                    get(path)
                assert refused.value.code == 503, (path, refused.value.read())
                text = refused.value.read().decode()
                for part in (f"pid {first.pid}", "--sql-read-dir", "lets SQL read no files"):
                    assert part in text, (path, part, text)
            assert json.loads(text)["type"] == "ServiceRefused"  # the API's answer
            with pytest.raises(ServiceRefused, match="--sql-read-dir"):
                store.sql("SELECT 1")
        finally:
            _end(first)
