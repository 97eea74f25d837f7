"""The library's entry points that need the whole engine (the query API with actions, resume) and
the library's composition root: the process's one session.

MLRun's API (`new_function`, `get_run_db`, `get_or_create_ctx`...) takes no handle, so the library
keeps one session per process, built from the environment's settings on first use and rebuilt
in a forked child. Only the library's entry points call `session()`; everything they create
carries the session's Services explicitly (see engine.bootstrap).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from engine.bootstrap import Services, bootstrap
from engine.run import RunObject
from projections.query import RunDB, check_uid

if TYPE_CHECKING:
    from engine.function import Function


@dataclass
class Session:
    """The library's services for this process and the functions `new_function` named in it
    (for MLRun's `run_function('name')`)."""

    services: Services
    functions: dict[str, Function] = field(default_factory=dict)


_lock = threading.Lock()
_session: Session | None = None


def session() -> Session:
    """The process's library session (built from the environment on first use). Called only by
    the library's entry points."""
    global _session
    with _lock:
        if _session is None:
            _session = Session(bootstrap())
        return _session


def close_session() -> None:
    """Flush and close the library session; the next entry point call builds a new one from the
    environment as it is then (tests; a process that changes its settings)."""
    global _session
    with _lock:
        found, _session = _session, None
    if found is not None:
        found.services.close()


def _forget_session_in_child() -> None:
    # a forked child builds a session of its own: the parent's writer thread does not exist in
    # it, and a bus connection must not be shared between processes
    global _lock, _session
    _lock = threading.Lock()
    _session = None


os.register_at_fork(after_in_child=_forget_session_in_child)


@dataclass(frozen=True)
class PurgeReport:
    """What `EngineRunDB.purge` removed: the deleted runs (and the iterations they hid) whose bus
    records were blanked (`log_rewritten`; False on a bus whose records cannot be rewritten, such
    as Kafka, where they stay until the topic's retention removes them), and the artifact bodies
    that no artifact event left in the log names."""

    runs: list[str]
    records: int
    bodies: list[str]
    log_rewritten: bool


# each statement names the run by a uid prefix; the status tells a shown run from a deleted one
_RUN_OR_DELETED = ("SELECT uid, 'shown' AS status FROM runs WHERE starts_with(uid, ?) UNION ALL "
                   "SELECT uid, 'deleted' AS status FROM deleted_runs WHERE starts_with(uid, ?) LIMIT 3")
_ARTIFACT_PAYLOADS = "SELECT payload FROM events WHERE type = 'artifact'"
# hidden runs with no recorded end that spoke lately: a purge now would leave what they log next
_STILL_RUNNING = """
    SELECT h.uid, epoch(now()) - max(epoch(e.ts)) AS silent_s FROM hidden_runs h JOIN events e ON e.run_uid = h.uid
    GROUP BY h.uid HAVING count(*) FILTER (WHERE e.type = 'run_finished') = 0
       AND epoch(now()) - max(epoch(e.ts)) < ? ORDER BY h.uid"""
SILENT_HEARTBEATS = 3  # as the projection judges a silent run lost
# where the events of hidden runs sit on the bus: applied, and copies skipped as duplicates or conflicts
_PLACED_EVENTS = """
    SELECT DISTINCT "offset" FROM (
        SELECT run_uid, "offset" FROM events UNION ALL SELECT run_uid, "offset" FROM duplicates
        UNION ALL SELECT run_uid, "offset" FROM conflicts)
    WHERE run_uid IN (SELECT uid FROM hidden_runs)"""


class EngineRunDB(RunDB):
    """The query API plus the actions that execute runs (rerun, resume) and edit them (delete,
    restore, labels, note, purge), with the services it was made from."""

    def __init__(self, svc: Services, as_of: int | datetime | str | None = None) -> None:
        super().__init__(svc.bus, svc.settings.db_path, svc.codec, svc.settings.db_timeout_s,
                         svc.user_projections, as_of, source=svc.reads())
        self.services = svc

    def rerun(self, uid: str, params: dict | None = None, strict: bool = False, trust: bool = False) -> RunObject:
        """Execute a recorded run again (see `engine.rerun.rerun`; `trust` runs a handler that is not
        verified as this home's own code)."""
        from engine.rerun import rerun

        return rerun(self.services, uid, params, strict, trust=trust)

    def resume(self, parent_uid: str, trust: bool = False) -> RunObject:
        """Finish a sweep whose driver died (see `resume`)."""
        from engine.sweep.runner import resume_sweep

        return RunObject.from_context(resume_sweep(self.services, parent_uid, trust=trust))

    # -- edits: events about a run, written by this process (see producers.amendments) -----------

    def principal(self) -> str:
        """Who this process's edits say they are by: the Kafka SASL user on a Kafka bus that has
        one configured, else the OS user."""
        from producers.amendments import current_principal

        security = self.services.settings.kafka_security
        on_kafka = self.services.bus.url.startswith("kafka")
        return current_principal(security.user if on_kafka else None)

    def full_uid(self, uid: str, deleted_too: bool = False) -> str:
        """The full uid of the run `uid` names (a unique prefix of it); KeyError naming `uid` when it
        names no run, several, or (unless `deleted_too`) a deleted one."""
        return self._resolve(uid, None if deleted_too else "shown")

    def _resolve(self, uid: str, wanted: str | None) -> str:
        """The full uid of the run `uid` names (a unique prefix), which must be `wanted` ("shown"
        or "deleted"; None: either); KeyError naming it otherwise."""
        check_uid(uid)
        self.services.writer.flush()  # a run this process just recorded is found
        found = self.sql(_RUN_OR_DELETED, [uid, uid])
        matches = dict(zip(found.uid, found.status, strict=True))
        if not matches:
            raise KeyError(f"no run with uid {uid!r}")
        if len(matches) > 1:
            raise KeyError(f"uid prefix {uid!r} matches more than one run; give more characters")
        full, status = next(iter(matches.items()))
        if wanted is not None and status != wanted:
            raise KeyError(f"run {full!r} is deleted: restore it first" if status == "deleted"
                           else f"run {full!r} is not deleted")
        return str(full)

    def delete_runs(self, uids: Iterable[str], reason: str = "") -> list[str]:
        """Delete runs (uids or unique prefixes): a tombstone event each; the runs and their
        iterations leave every table but `events` and are listed in `deleted_runs`, until
        `restore_runs` or `purge`. All are checked before any is written; returns the full uids."""
        from producers.amendments import delete_runs

        full = [self._resolve(uid, "shown") for uid in _uid_list(uids)]
        delete_runs(self.services.bus, self.services.codec, full, by=self.principal(), reason=reason)
        return full

    def restore_runs(self, uids: Iterable[str]) -> list[str]:
        """Undo `delete_runs` for these deleted runs (not possible after a purge); returns the
        full uids."""
        from producers.amendments import restore_runs

        full = [self._resolve(uid, "deleted") for uid in _uid_list(uids)]
        restore_runs(self.services.bus, self.services.codec, full, by=self.principal())
        return full

    def delete_run(self, uid: str, reason: str = "") -> str:
        """MLflow's name: `delete_runs([uid])`."""
        return self.delete_runs([uid], reason)[0]

    def restore_run(self, uid: str) -> str:
        """MLflow's name: `restore_runs([uid])`."""
        return self.restore_runs([uid])[0]

    def set_labels(self, uid: str, labels: Mapping[str, Any] | None = None, remove: Iterable[str] = ()) -> str:
        """Set labels (values through str()) and remove the keys in `remove` of a run, as one
        amendment recording who and when (the `amendments` table); returns the full uid.
        InvalidValue naming the key for a bad key or value."""
        from producers.amendments import amend_run

        full = self._resolve(uid, "shown")
        amend_run(self.services.bus, self.services.codec, full, by=self.principal(), labels=labels or {},
                  removed_labels=list(remove))
        return full

    def set_tag(self, uid: str, key: str, value: Any) -> str:
        """MLflow's name: `set_labels(uid, {key: value})`."""
        return self.set_labels(uid, {key: value})

    def set_note(self, uid: str, text: str) -> str:
        """Replace the run's note (runs.note) with `text`, as one amendment; returns the full uid."""
        from producers.amendments import amend_run

        full = self._resolve(uid, "shown")
        amend_run(self.services.bus, self.services.codec, full, by=self.principal(), note=text)
        return full

    def purgeable(self) -> list[str]:
        """The uids a purge would remove: deleted runs and the iterations they hide."""
        from projections.tables import PURGEABLE_RUNS_SQL

        self.services.writer.flush()
        return [str(uid) for uid in self.sql(PURGEABLE_RUNS_SQL).uid]

    def purge(self, older_than_s: float = 3600.0) -> PurgeReport:
        """Remove deleted runs for good: on the embedded log their records (and their iterations')
        are rewritten as empty records and the projection is rebuilt; then the artifact bodies
        that no artifact event left in the log names, stored more than `older_than_s` ago, are
        removed. A deleted run still running is refused (RuntimeError): what it logs after a purge
        could not be deleted. On Kafka records cannot be rewritten: they stay (restorable) until the topic's
        retention removes them, and so do the bodies they name."""
        from producers.bus.embedded import EmbeddedBus

        svc = self.services
        serving = self.source.running() if self.source is not None else None
        if serving and serving.get("rebuilding"):  # its tables are refilled: not every deleted run is back yet
            raise RuntimeError(f"purge: the projection of {svc.settings.home} is being rebuilt (runbus project "
                               "--rebuild); purge once the rebuild has ended; nothing was purged")
        uids = self.purgeable()
        running = self.sql(_STILL_RUNNING, [SILENT_HEARTBEATS * svc.settings.heartbeat_interval_s])
        if not running.empty:
            uid, silent_s = running.uid.iloc[0], float(running.silent_s.iloc[0])
            raise RuntimeError(f"purge: deleted run {uid} is still running (it spoke {silent_s:.0f}s ago): "
                               f"stop it or wait until it ends; nothing was purged")
        records = 0
        rewritable = isinstance(svc.bus, EmbeddedBus)
        if rewritable and uids:
            # by key, and where their events sit: a record on the bus may carry them under another key
            placed = self.sql(_PLACED_EVENTS)
            records = svc.bus.blank_records(uids, svc.codec.encode_batch([]), offsets=placed.offset.tolist())
            self._rebuild()
        named = _named_bodies(self.sql(_ARTIFACT_PAYLOADS).payload)
        bodies = svc.artifact_store.remove_unreferenced(named, older_than_s=older_than_s)
        return PurgeReport(uids if rewritable else [], records, bodies, rewritable)

    def _rebuild(self) -> None:
        # the log changed under the projection (its epoch too): fold it again from the start,
        # wherever the projection is folded (the home's service or this process)
        if self.source is not None:
            self._drop_served_projection()
            return
        from projections.database import discard_projection

        discard_projection(self.db_path, self.lock_timeout_s)

    def _drop_served_projection(self) -> None:
        """Stop the home's projection service and, holding its lock (no service holds the file),
        remove the projection's files: DuckDB keeps freed pages' old bytes, so a rebuild in place
        would leave the purged runs' values on disk. The home's purge lock is held from before the
        stop until the files are gone: a follower stopped for the purge waits for it, then serves
        again and folds the log from its start; otherwise the next read starts a service that does."""
        from filelock import FileLock, Timeout

        from projections.database import remove_projection_files
        from projections.service import ServiceAddress

        settings = self.services.settings
        address = ServiceAddress.of(settings.home)

        def taken(lock: FileLock, what_held_it: str) -> Any:
            try:
                return lock.acquire(timeout=settings.db_timeout_s)
            except Timeout:
                raise TimeoutError(f"purge: the log is rewritten, but {what_held_it}: the projection folds the "
                                   "log again by itself; `runbus purge` again removes the bodies") from None

        with taken(FileLock(str(address.purge), mode=0o600, thread_local=False),
                   f"another purge of {settings.home} held {address.purge} for more than "
                   f"{settings.db_timeout_s:g}s"):
            self.source.stop(for_purge=True)  # type: ignore[union-attr]
            with taken(FileLock(str(address.lock), thread_local=False),
                       f"the projection service of {settings.home} did not stop within {settings.db_timeout_s:g}s "
                       "(a reader holds it)"):
                remove_projection_files(self.db_path)


def _uid_list(uids: Iterable[str]) -> list[str]:
    listed = [uids] if isinstance(uids, str) else list(uids)
    if not listed:
        raise ValueError("give at least one run uid")
    return listed


def _named_bodies(payloads: Iterable[str]) -> set[str]:
    """Every sha256 the artifact events (their payloads, JSON text) name: see `bodies_named`."""
    from producers.artifacts import bodies_named

    return {name for payload in payloads if isinstance(payload, str) for name in bodies_named(json.loads(payload))}


def get_run_db(as_of: int | datetime | str | None = None) -> EngineRunDB:
    """The query API over the current RUNBUS_HOME / RUNBUS_BUS (waits for pending events).

    `as_of` answers from the tables as they were at that events.position or time.
    """
    svc = session().services
    svc.writer.flush()
    return EngineRunDB(svc, as_of)


def resume(parent_uid: str, trust: bool = False) -> RunObject:
    """Finish a sweep whose driver died: run only the iterations the log shows unfinished
    (`trust`: see `resume_sweep`)."""
    return get_run_db().resume(parent_uid, trust)
