"""Finding 9: nothing from the log is trusted as a path or as code.

Hostile runs are made the way an attacker would hand them over: a real run is exported with
`engine.archive`, its events are rewritten (artifact uri/sha256, handler, params, code_ref) under new
ids, and the file is imported, or the events are appended to the bus directly (someone who can write
to the topic). Then every reader of artifact bodies (UI route and preview, report, DataItem, export
--with-artifacts) and `rerun` must refuse them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine import NewRun, get_run_db, new_function
from engine.api import session
from engine.archive import (
    ArtifactNotBundled,
    bundle_artifacts,
    export_events,
    import_events,
    selected_events,
    unpack_artifacts,
)
from engine.loader import RunSigner, describe_handler, load_handler
from engine.rerun import UntrustedRun, check_handler_trusted
from engine.run import RunObject
from engine.sweep.runner import _longest_interval
from engine.transfer import append_new
from engine.ui.app import create_app
from engine.ui.report import report_html
from engine.ui.store import HeldRunDB
from producers.artifact_store import ArtifactUnavailable
from producers.context import RUN_MAC
from projections import open_projection
from schemas import Event
from tests.support import handlers
from tests.support.serving import http_get, served_in_thread

RUNBUS = str(Path(sys.executable).parent / "runbus")
PASSWD = Path("/etc/passwd")
SECRET_LINE = PASSWD.read_bytes().splitlines()[0]  # "root:x:0:0:..." : must never come out
Rewrite = Callable[[Event], Event]


def _logs_bodies(context):
    context.log_artifact("weights.csv", body=b"weights\n0.5\n")
    context.log_artifact("notes.txt", body=b"plain notes")
    context.log_result("done", 1)


def _record() -> str:
    return new_function().run(NewRun(handler=_logs_bodies, name="victim")).uid


def _exported(*uids: str) -> list[Event]:
    """The events an export of `uids` (every run when none) holds."""
    svc = session().services
    svc.writer.flush()
    return export_events(selected_events(svc.bus, svc.codec, uids), svc.codec, io.BytesIO())


def _as_new_run(events: list[Event], rewrite: Rewrite) -> tuple[str, list[Event]]:
    """The events as another run (fresh uid and event ids), each passed through `rewrite`."""
    uid = uuid.uuid4().hex
    return uid, [rewrite(dataclasses.replace(e, run_uid=uid, event_id=uuid.uuid4().hex)) for e in events]


def _appended_as_new_run(events: list[Event], **started: object) -> str:
    """The events appended straight to the bus as another run (see `_as_new_run`), with `started`
    written over its run_started payload, as anyone who reaches the bus can; returns its uid."""
    uid, forged = _as_new_run(events, _started(**started))
    svc = session().services
    append_new(forged, svc.bus, svc.codec)
    return uid


def _import(events: list[Event], tmp_path: Path) -> None:
    """Write the events as an export file and import it, as `runbus import` does."""
    svc = session().services
    path = tmp_path / f"hostile-{uuid.uuid4().hex[:8]}.avro"
    with path.open("wb") as out:
        export_events(events, svc.codec, out)
    with path.open("rb") as source:
        assert import_events(source, svc.bus, svc.codec).copied == len(events)


def _artifact(key: str, **changes: object) -> Rewrite:
    def rewrite(event: Event) -> Event:
        if event.type == "artifact" and event.payload["key"] == key:
            return dataclasses.replace(event, payload={**event.payload, **changes})
        return event
    return rewrite


def _started(**changes: object) -> Rewrite:
    def rewrite(event: Event) -> Event:
        if event.type == "run_started":
            return dataclasses.replace(event, payload={**event.payload, **changes})
        return event
    return rewrite


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


HOSTILE_ADDRESSES = {
    # the uri of a file outside the store, with that file's true sha256 (the body's own check passes)
    "absolute uri": dict(uri=PASSWD.as_uri(), sha256=_sha(PASSWD.read_bytes())),
    "relative uri with ..": dict(uri="../" * 12 + "etc/passwd", sha256=_sha(PASSWD.read_bytes())),
    "sha256 with ..": dict(uri="file:///nonexistent/x", sha256="../" * 12 + "etc/passwd"),
    "sha256 absolute": dict(uri="file:///nonexistent/x", sha256=str(PASSWD)),
}


@pytest.fixture
def hostile(bus_home: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    """An imported run per hostile address (artifact 'weights.csv'), a run whose store body was
    altered after logging, and a run whose store entry is a symlink to /etc/passwd."""
    source = _record()
    events = _exported(source)
    uids = {}
    for name, changes in HOSTILE_ADDRESSES.items():
        uids[name], forged = _as_new_run(events, _artifact("weights.csv", **changes))
        _import(forged, tmp_path)
    store = session().services.artifact_store
    planted = _sha(b"a body nobody logged " + uuid.uuid4().bytes)
    (store.root / planted[:2]).mkdir(parents=True, exist_ok=True)
    (store.root / planted[:2] / planted).symlink_to(PASSWD)
    uids["symlink in the store"], forged = _as_new_run(
        events, _artifact("weights.csv", uri="file:///nonexistent/x", sha256=planted))
    _import(forged, tmp_path)
    tampered = _record()
    body = store.root / _sha(b"weights\n0.5\n")[:2] / _sha(b"weights\n0.5\n")
    body.write_bytes(b"altered\n9\n")
    uids["tampered body"] = tampered
    yield uids


@contextmanager
def _serving() -> Iterator[str]:
    """The UI app of engine.ui.app over this home, served by uvicorn on a free loopback port."""
    svc = session().services
    with open_projection(svc.settings.db_path) as con, served_in_thread(create_app(HeldRunDB(svc, con))) as url:
        yield url


def test_artifact_route_and_run_page_never_serve_a_hostile_body(hostile: dict[str, str]) -> None:
    with _serving() as base:
        for case, uid in hostile.items():
            for url in (f"{base}/artifacts/{uid}/weights.csv", f"{base}/artifacts/{uid}/weights.csv?download=1"):
                status, body = http_get(url)
                assert status == 404, (case, url)
                assert SECRET_LINE not in body and b"altered" not in body, case
            status, page = http_get(f"{base}/runs/{uid}")
            assert status == 200, case
            assert b"body unavailable" in page and b"weights.csv" in page, case
            assert SECRET_LINE not in page and b"altered" not in page, case
            assert http_get(f"{base}/artifacts/{uid}/notes.txt") == (200, b"plain notes"), case


def test_report_shows_a_hostile_body_as_unavailable(hostile: dict[str, str]) -> None:
    svc = session().services
    html, count = report_html(get_run_db(), svc.settings.artifact_root, uids=list(hostile.values()))
    assert count == len(hostile)
    assert SECRET_LINE.decode() not in html and "altered" not in html
    assert html.count("body unavailable: artifact &#39;weights.csv&#39;") == len(hostile)


@pytest.mark.parametrize("store_given", [True, False])
def test_data_item_refuses_a_hostile_body_naming_its_key(hostile: dict[str, str], store_given: bool) -> None:
    root = str(session().services.artifact_store.root) if store_given else None
    for case, uid in hostile.items():
        run = RunObject.from_record(get_run_db().read_run(uid), root)
        item = run.artifact("weights.csv")
        for read in (item.get, item.local, item.as_df):
            with pytest.raises(ArtifactUnavailable, match=r"artifact 'weights\.csv'"):
                read()
        assert run.artifact("notes.txt").get() == b"plain notes", case


def test_an_artifact_logged_as_kind_input_is_still_read_from_the_store_only(home: Path, tmp_path: Path) -> None:
    uid, forged = _as_new_run(_exported(_record()), _artifact("weights.csv", kind="input", uri=PASSWD.as_uri(),
                                                              sha256=_sha(PASSWD.read_bytes())))
    _import(forged, tmp_path)
    with pytest.raises(ArtifactUnavailable, match=r"artifact 'weights\.csv'"):
        RunObject.from_record(get_run_db().read_run(uid)).artifact("weights.csv").get()


def test_export_with_artifacts_bundles_only_verified_store_bodies(hostile: dict[str, str], tmp_path: Path) -> None:
    svc = session().services
    events = _exported()  # every run
    bundle = tmp_path / "bodies.tar.gz"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        count = bundle_artifacts(events, bundle)
    with tarfile.open(bundle) as tar:
        bodies = {member.name: tar.extractfile(member).read() for member in tar}
    assert count == len(bodies) == 1  # plain notes (every run's notes.txt is the same body)
    assert list(bodies.values()) == [b"plain notes"]
    refused = [str(w.message) for w in caught if issubclass(w.category, ArtifactNotBundled)]
    assert len(refused) == len(hostile) + 1  # and the source run, whose body is the tampered one
    assert all("artifact 'weights.csv'" in message for message in refused)

    done = subprocess.run([RUNBUS, "export", "-o", str(tmp_path / "all.avro"), "--with-artifacts",
                           str(tmp_path / "cli.tar.gz")], env={**os.environ, "RUNBUS_HOME": str(svc.settings.home)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with tarfile.open(tmp_path / "cli.tar.gz") as tar:
        assert [tar.extractfile(member).read() for member in tar] == [b"plain notes"]


def test_an_imported_run_gets_its_bodies_from_the_bundle_verified_or_not_at_all(home: Path, tmp_path: Path) -> None:
    store = session().services.artifact_store
    good, bad = b"bundled body", b"a body that is not what its name says"
    bundle = tmp_path / "bodies.tar.gz"
    with tarfile.open(bundle, "w:gz") as tar:
        for name, data in ((_sha(good), good),):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert unpack_artifacts(bundle, store) == 1
    assert store.read_verified("k", _sha(good)) == good

    for name in (_sha(b"something else"), "../../escape", "/etc/cron.d/x"):
        lying = tmp_path / "lying.tar.gz"
        with tarfile.open(lying, "w:gz") as tar:
            info = tarfile.TarInfo(name)
            info.size = len(bad)
            tar.addfile(info, io.BytesIO(bad))
        with pytest.raises(ValueError, match="artifact bundle entry"):
            unpack_artifacts(lying, store)
    assert not (store.root / _sha(bad)[:2] / _sha(bad)).exists()
    assert sorted(p.name for p in store.root.rglob("*") if p.is_file()) == [_sha(good)]


# rerun ---------------------------------------------------------------------------------------------

def _os_system(marker: Path) -> dict[str, object]:
    """A run_started that asks rerun to call os.system, with a code_ref that looks right."""
    return dict(handler="os:system", params={"command": json.dumps(f"touch {marker}")},
                code_ref=f"{os.__file__}@sha256:{_sha(Path(os.__file__).read_bytes())}")


def test_rerun_of_an_imported_os_system_run_runs_nothing(bus_home: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    uid, forged = _as_new_run(_exported(_record()), _started(**_os_system(marker)))
    _import(forged, tmp_path)

    with pytest.raises(UntrustedRun) as refused:
        get_run_db().rerun(uid)
    message = str(refused.value)
    assert uid in message and "'os:system'" in message and "imported" in message and "--trust" in message
    assert not marker.exists()

    cli = subprocess.run([RUNBUS, "rerun", uid], env={**os.environ, "RUNBUS_HOME": str(bus_home)},
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode != 0 and "--trust" in cli.stderr
    assert not marker.exists()


@pytest.mark.parametrize("handler, param", [("os:system", "command"), ("subprocess:getoutput", "cmd")])
def test_rerun_of_a_foreign_run_appended_to_the_bus_runs_nothing(bus_home: Path, tmp_path: Path, handler: str,
                                                                 param: str) -> None:
    """Not imported, so only the code reference can tell: a digest anyone can compute (stdlib files
    are public) is not enough, the home's MAC is missing."""
    marker = tmp_path / "pwned"
    module = sys.modules[handler.split(":")[0]]
    code_ref = f"{module.__file__}@sha256:{_sha(Path(module.__file__).read_bytes())}"
    uid = _appended_as_new_run(_exported(_record()), handler=handler,
                               params={param: json.dumps(f"touch {marker}")}, code_ref=code_ref)

    with pytest.raises(UntrustedRun, match=f"run {uid}: will not load handler '{handler}'.*--trust"):
        get_run_db().rerun(uid)
    assert not marker.exists()


def test_rerun_refuses_a_code_ref_signed_by_another_home(home: Path, tmp_path: Path) -> None:
    foreign_ref = describe_handler(handlers.seed_like, tmp_path / "another-home")[1]
    uid = _appended_as_new_run(_exported(_record()), handler="tests.support.handlers:seed_like",
                               code_ref=foreign_ref)
    with pytest.raises(UntrustedRun, match="not recorded by this Runbus home"):
        get_run_db().rerun(uid)


def test_with_trust_an_imported_run_of_a_local_handler_reruns(home: Path, tmp_path: Path) -> None:
    own = new_function().run(NewRun(handler=handlers.seed_like, params={"p1": 4}))
    # this home's own run: no --trust
    assert get_run_db().rerun(own.uid).results == {"accuracy": 8, "loss": 12, "return": "my resp"}
    uid, forged = _as_new_run(_exported(own.uid), lambda event: event)
    _import(forged, tmp_path)

    with pytest.raises(UntrustedRun, match="imported"):
        get_run_db().rerun(uid)
    again = get_run_db().rerun(uid, trust=True)
    assert again.state == "completed" and again.results == {"accuracy": 8, "loss": 12, "return": "my resp"}
    assert get_run_db().read_run(again.uid)["extra"]["rerun_of"] == uid
    with pytest.raises(UntrustedRun, match="carries no signature"):  # only --trust let it run: not signed
        get_run_db().rerun(again.uid)


def test_a_file_handler_whose_source_changed_since_the_run_needs_trust(home: Path, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("def train(context, x=1):\n    context.log_result('x', x)\n")
    run = new_function().run(NewRun(handler=load_handler(f"{script}:train"), params={"x": 3}))
    assert get_run_db().rerun(run.uid).results == {"x": 3}

    script.write_text("def train(context, x=1):\n    context.log_result('x', x * 100)\n")
    with pytest.raises(UntrustedRun, match=f"its source {script} changed since the run.*--trust"):
        get_run_db().rerun(run.uid)
    assert get_run_db().rerun(run.uid, trust=True).state == "completed"

    script.unlink()
    with pytest.raises(UntrustedRun, match="not loadable from a source file"):
        get_run_db().rerun(run.uid)


def test_rerun_refuses_a_run_that_recorded_no_code_digest(home: Path, tmp_path: Path) -> None:
    uid = _appended_as_new_run(_exported(_record()), handler="tests.support.handlers:seed_like", code_ref=None)
    with pytest.raises(UntrustedRun, match="recorded no code digest"):
        get_run_db().rerun(uid)
    assert get_run_db().rerun(uid, trust=True).state == "completed"


def test_a_sweep_resume_can_ask_the_same_question_before_loading_anything(home: Path, tmp_path: Path) -> None:
    """engine.sweep.runner's resume calls check_handler_trusted on the parent's run_started."""
    marker = tmp_path / "pwned"
    own = _record()
    started = _own_started(own)
    assert check_handler_trusted(started, False, own, home) is True
    forged = {**started, **_os_system(marker), "extra": {"sweep": "{}"}}
    with pytest.raises(UntrustedRun, match="run parent: will not load handler 'os:system'"):
        check_handler_trusted(forged, False, "parent", home)
    # trusting is the caller's decision; what it lets run is not this home's to sign
    assert check_handler_trusted(forged, True, "parent", home) is False
    assert not marker.exists()


def test_the_code_key_is_readable_by_its_owner_only(home: Path) -> None:
    _record()
    assert (home / "code.key").stat().st_mode & 0o077 == 0


@pytest.mark.timeout(60)
def test_rerun_asks_for_trust_before_it_reads_any_input_the_log_names(home: Path, tmp_path: Path) -> None:
    """Input paths come from the log too: /dev/zero would be hashed forever if read first."""
    marker = tmp_path / "pwned"
    uid = _appended_as_new_run(_exported(_record()), handler="os:system",
                               params={"command": json.dumps(f"touch {marker}")},
                               inputs={"data": "/dev/zero"}, input_digests={"data": "0" * 64})

    with pytest.raises(UntrustedRun, match="--trust"):
        get_run_db().rerun(uid, strict=True)
    assert not marker.exists()


def _forged_sweep(signed_by: Path | None = None, **started: object) -> str:
    """A sweep parent appended straight to the bus, its driver gone: a real sweep's run_started and
    iteration requests as another run, with `started` written over its run_started payload (and
    that signed by home `signed_by`, when given)."""
    own = new_function().run(NewRun(handler=handlers.seed_like, name="sweep")
                             .with_hyper_params({"p1": [1, 2]}, "min.loss")).uid
    parent = [e for e in _exported(own) if e.run_uid == own and e.type in ("run_started", "iteration_requested")]
    if signed_by is None:
        return _appended_as_new_run(parent, **started)

    def signed(event: Event) -> Event:
        if event.type != "run_started":
            return event
        payload = _signed_started({**event.payload, **started}, signed_by, event.run_uid)
        return dataclasses.replace(event, payload=payload)

    uid, forged = _as_new_run(parent, signed)
    svc = session().services
    append_new(forged, svc.bus, svc.codec)
    return uid


def test_resume_of_a_foreign_sweep_loads_and_runs_nothing_without_trust(home: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    uid = _forged_sweep(**_os_system(marker))
    with pytest.raises(UntrustedRun, match=f"run {uid}: will not load handler 'os:system'.*--trust"):
        get_run_db().resume(uid)
    cli = subprocess.run([str(Path(sys.executable).parent / "runbus"), "resume", uid],
                         env={**os.environ, "RUNBUS_HOME": str(home)}, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and "--trust" in cli.stderr and len(cli.stderr.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("signed", [False, True], ids=["written by someone else", "signed by this home"])
def test_resume_sends_nothing_to_a_scheduler_the_log_names_without_trust(home: Path, signed: bool) -> None:
    """This home's own handler, but a runtime address from the log: the run's secrets would go there.
    Written onto the run by someone else, the signature refuses it; signed by this home (a sweep it
    ran on a remote scheduler), the runtime check still asks for --trust."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        uid = _forged_sweep(runtime=f"dask://127.0.0.1:{listener.getsockname()[1]}", signed_by=home if signed else None)
        refusal = r"will not send the sweep to 'dask://127\.0\.0\.1" if signed else "signature does not match"
        with pytest.raises(UntrustedRun, match=refusal):
            get_run_db().resume(uid)
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody connected


# what a run ran with: params, inputs, secret keys, runtime and sweep are signed with the code --------

def _signed_started(started: dict[str, object], home: Path, uid: str) -> dict[str, object]:
    """`started` signed by `home` for run `uid`, as a run this home recorded with those values would be."""
    extra = {key: value for key, value in dict(started["extra"]).items() if key != RUN_MAC}  # type: ignore[call-overload]
    unsigned = {**started, "extra": extra}
    return {**unsigned, "extra": {**extra, RUN_MAC: json.dumps(RunSigner(home)(uid, unsigned))}}


def _own_started(uid: str) -> dict[str, object]:
    return next(e.payload for e in _exported(uid) if e.type == "run_started")


def _own_seed_like_run() -> str:
    """A run of this home's own handler: a valid code_ref and signature."""
    return new_function().run(NewRun(handler=handlers.seed_like, params={"p1": 4})).uid


@pytest.mark.parametrize("change", [
    {"params": {"p1": json.dumps(400)}},
    {"inputs": {"data": "/nonexistent/runbus-never-read"}, "input_digests": {"data": "0" * 64}},
    {"secret_keys": ["AWS_SECRET_ACCESS_KEY"]},
    {"runtime": "dask://203.0.113.7:8786"},
    {"labels": {"stage": "prod"}},
], ids=["params", "inputs", "secret keys", "runtime", "labels"])
def test_rerun_refuses_this_homes_code_with_what_someone_else_wrote_beside_it(
        bus_home: Path, tmp_path: Path, change: dict[str, object]) -> None:
    """The code_ref of one of this home's runs, MAC and all, copied onto a run_started whose other
    fields someone who reaches the bus chose: the code is trusted, what it would run with is not."""
    own = _own_seed_like_run()
    assert get_run_db().rerun(own).results["accuracy"] == 8  # this home's own run: no --trust
    uid = _appended_as_new_run(_exported(own), **change)

    with pytest.raises(UntrustedRun, match=f"run {uid}: .*signature does not match them.*--trust"):
        get_run_db().rerun(uid, strict=True)  # strict: an input read before the check would raise InputChanged


def test_a_run_that_carries_no_signature_needs_trust(home: Path, tmp_path: Path) -> None:
    """A run recorded before runs were signed (or written without one) is held to --trust."""
    own = _own_seed_like_run()
    extra = {key: value for key, value in _own_started(own)["extra"].items() if key != RUN_MAC}  # type: ignore[union-attr]
    uid = _appended_as_new_run(_exported(own), extra=extra)
    with pytest.raises(UntrustedRun, match="carries no signature over its params and inputs"):
        get_run_db().rerun(uid)
    assert get_run_db().rerun(uid, trust=True).results["accuracy"] == 8


def test_a_verbatim_copy_of_this_homes_run_under_another_uid_needs_trust(home: Path) -> None:
    """The signature covers the run's uid: a signed run_started replayed as another run (which
    nothing of Runbus does: a push keeps uids, an import is refused anyway) is not this home's."""
    own = _own_seed_like_run()
    uid = _appended_as_new_run(_exported(own))
    with pytest.raises(UntrustedRun, match=f"run {uid}: .*signature does not match them"):
        get_run_db().rerun(uid)


def test_what_only_trust_let_run_is_not_signed_as_this_homes(home: Path) -> None:
    """rerun --trust of a run someone else wrote runs it once; its rerun asks for --trust again."""
    own = _own_seed_like_run()
    uid = _appended_as_new_run(_exported(own), params={"p1": json.dumps(7)})
    again = get_run_db().rerun(uid, trust=True)
    assert again.results["accuracy"] == 14
    with pytest.raises(UntrustedRun, match="carries no signature"):
        get_run_db().rerun(again.uid)


def test_this_homes_sweep_iterations_rerun_without_trust(home: Path) -> None:
    parent = new_function().run(NewRun(handler=handlers.seed_like, name="sweep")
                                .with_hyper_params({"p1": [1, 2]}, "min.loss")).uid
    child = get_run_db().sql("SELECT uid FROM runs WHERE parent_uid = ? AND iteration = 2", [parent]).uid[0]
    assert get_run_db().rerun(child).results["accuracy"] == 4


@pytest.mark.parametrize("change", ["params", "sweep"])
def test_resume_refuses_a_sweep_whose_params_or_grid_someone_else_wrote(home: Path, change: str) -> None:
    started = _own_started(new_function().run(NewRun(handler=handlers.seed_like, name="sweep")
                                              .with_hyper_params({"p1": [1, 2]}, "min.loss")).uid)
    if change == "params":
        written: dict[str, object] = {"params": {"p2": json.dumps("chosen by someone else")}}
    else:
        sweep = json.loads(started["extra"]["sweep"])  # type: ignore[index]
        written = {"extra": {**started["extra"], "sweep": json.dumps({**sweep, "selector": "max.loss"})}}  # type: ignore[dict-item]
    uid = _forged_sweep(**written)
    with pytest.raises(UntrustedRun, match=f"run {uid}: .*signature does not match"):
        get_run_db().resume(uid)


def _sweep_copy(hyperparams: dict[str, list[object]], rewrite: Rewrite = lambda event: event,
                strategy: str = "grid") -> str:
    """This home's own sweep parent as another run whose driver is gone (its run_started signed for
    the new uid, as the home's own lost sweep would be), each iteration request passed through
    `rewrite`; returns its uid."""
    home = session().services.settings.home
    own = new_function().run(NewRun(handler=handlers.seed_like, name="sweep")
                             .with_hyper_params(hyperparams, "min.loss", strategy=strategy)).uid
    parent = [e for e in _exported(own) if e.run_uid == own and e.type in ("run_started", "iteration_requested")]

    def copied(event: Event) -> Event:
        if event.type == "run_started":
            return dataclasses.replace(event, payload=_signed_started(event.payload, home, event.run_uid))
        return rewrite(event)

    uid, forged = _as_new_run(parent, copied)
    svc = session().services
    append_new(forged, svc.bus, svc.codec)
    return uid


def _request(iteration: int, **params: object) -> Rewrite:
    def rewrite(event: Event) -> Event:
        if event.payload["iteration"] != iteration:
            return event
        return dataclasses.replace(event, payload={**event.payload, "params": {
            key: json.dumps(value) for key, value in params.items()}})
    return rewrite


def _extra_request(iteration: int, **params: object) -> Rewrite:
    def rewrite(event: Event) -> Event:
        return dataclasses.replace(event, payload={"iteration": iteration, "params": {
            key: json.dumps(value) for key, value in params.items()}})
    return rewrite


@pytest.mark.parametrize("hyperparams, strategy, rewrite", [
    ({"p1": [1, 2], "p2": ["a", "b"]}, "grid", _request(2, p1=1, p2="rm -rf ~")),
    ({"p1": [1, 2], "p2": ["a", "b"]}, "list", _request(2, p1=1, p2="b")),  # a pair of two rows
    ({"p1": [1, 2], "p2": ["a", "b"]}, "grid", _request(2, p1=True, p2="a")),  # True == 1 in Python
    ({"p1": [1, 2], "p2": ["a", "b"]}, "grid", _request(2, p1=2.0, p2="a")),
    ({"p1": [1, 2], "p2": ["a", "b"]}, "grid", _extra_request(99, p1=1, p2="a")),
], ids=["outside the grid", "rows of a list mixed", "bool for int", "float for int", "an iteration never asked"])
def test_resume_runs_only_the_iterations_the_signed_sweep_asked_for(
        home: Path, hyperparams: dict[str, list[object]], strategy: str, rewrite: Rewrite) -> None:
    """Iteration requests carry no MAC of their own: a resume draws the sweep's iterations again
    from its signed description and runs a request only when it is one of them, exactly."""
    uid = _sweep_copy(hyperparams, rewrite, strategy)
    with pytest.raises(UntrustedRun, match=f"run {uid}: iteration (2|99) asks for params .*--trust"):
        get_run_db().resume(uid)
    assert get_run_db().read_run(uid)["state"] in ("running", "lost")  # nothing resumed


@pytest.mark.parametrize("strategy", ["grid", "list"])
def test_a_copy_with_the_requests_the_driver_wrote_resumes(home: Path, strategy: str) -> None:
    copy = _sweep_copy({"p1": [1, 2], "p2": ["a", "b"]}, strategy=strategy)
    assert get_run_db().resume(copy).state == "completed"
    children = get_run_db().sql("SELECT count(*) AS n FROM runs WHERE parent_uid = ?", [copy]).n[0]
    assert children == (4 if strategy == "grid" else 2)


def test_a_random_sweep_records_the_seed_it_drew_and_resumes(home: Path) -> None:
    run = NewRun(handler=handlers.seed_like, name="sweep").with_hyper_params(
        {"p1": [1, 2, 3]}, "min.loss", strategy="random", max_iterations=3)
    own = new_function().run(run).uid
    assert isinstance(get_run_db().read_run(own)["extra"]["sweep"]["seed"], int)


def test_resume_runs_again_an_iteration_someone_else_reported_done(home: Path) -> None:
    """A 'completed' child appended by anyone (no signature of this home for it) is not counted:
    its iteration runs again, and its results cannot become the sweep's best."""
    copy = _sweep_copy({"p1": [1, 2]})
    donor = _own_seed_like_run()
    forged_child = [dataclasses.replace(e, payload={**e.payload, "parent_uid": copy, "iteration": 1,
                                                    "params": {"p1": json.dumps(1)}})
                    if e.type == "run_started" else
                    dataclasses.replace(e, payload={**e.payload, "value": json.dumps(-1e9)})
                    if e.type == "result" and e.payload.get("key") == "loss" else e
                    for e in _exported(donor)]
    fake_uid, events = _as_new_run(forged_child, lambda event: event)
    svc = session().services
    append_new(events, svc.bus, svc.codec)

    resumed = get_run_db().resume(copy)
    assert resumed.state == "completed"
    ran = get_run_db().sql("SELECT uid, iteration FROM runs WHERE parent_uid = ? AND uid <> ? ORDER BY iteration",
                           [copy, fake_uid])
    assert ran.iteration.tolist() == [1, 2]  # iteration 1 ran again
    assert get_run_db().read_run(copy)["results"]["best_iteration"] == 1
    assert get_run_db().read_run(copy)["results"]["loss"] == 3  # p1=1's own loss, not the forged one


def test_a_silent_iteration_someone_else_wrote_does_not_set_how_long_a_resume_waits(home: Path) -> None:
    """A resume waits for a dead driver's unfinished iterations up to three of their heartbeat
    intervals (engine.sweep.runner._settle_orphans). A run appended as an iteration, still running
    and saying its heartbeat comes every billion seconds, would hold it for ever: without trust only
    this home's signed iterations say how long."""
    copy = _sweep_copy({"p1": [1, 2]})
    forged_child = [dataclasses.replace(e, payload={**e.payload, "parent_uid": copy, "iteration": 1,
                                                    "params": {"p1": json.dumps(1)}, "heartbeat_interval_s": 1e9})
                    for e in _exported(_own_seed_like_run()) if e.type == "run_started"]  # never finishes
    fake_uid, events = _as_new_run(forged_child, lambda event: event)
    svc = session().services
    append_new(events, svc.bus, svc.codec)
    assert get_run_db().read_run(fake_uid)["state"] == "running"

    assert _longest_interval(svc, copy, trust=False) == svc.settings.heartbeat_interval_s
    assert _longest_interval(svc, copy, trust=True) == 1e9  # what trusting the log would wait for
