"""Runs a sweep: the parent requests iterations as events, a pool executes them, the parent
records the best. Also resumes a sweep whose driver died (or left it unfinished: SweepNotFinished),
from what the log says."""

from __future__ import annotations

import json
import math
import secrets
import sys
import time
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

from engine.bootstrap import Services
from engine.loader import load_handler
from engine.progress import SweepProgress
from engine.reaper import mark_lost, reap, running_runs
from engine.rerun import UntrustedRun, check_handler_trusted
from engine.runspec import RunSpec
from engine.runtimes.pools import open_pool
from engine.secrets import from_environment
from engine.sweep.iteration import IterationOutcome, run_iterations, run_iterations_in_driver
from engine.sweep.selection import BestSoFar, Selector, StopCondition
from engine.sweep.spec import SweepSpec
from engine.sweep.watcher import FINISHED_STATES, ChildWatcher
from producers.artifacts import artifact_meta
from producers.context import RunContext
from producers.data_item import DataItem
from producers.subscription import Subscription

# How long a finished iteration's events may take to show up on the bus after its task returned.
_EVENTS_GRACE_S = 60.0


class BusNotRead(RuntimeError):
    """After a worker died, the bus could not be read far enough to tell which of its iterations
    finished: none of them runs again, since one may have."""


class SweepNotFinished(RuntimeError):
    """The driver stopped and left the sweep's run unfinished ('running', then 'lost' once its
    heartbeats stopped) for `runbus resume` to finish: it could not learn from the bus whether
    `iterations` (of dead workers) finished, and ran none of them again."""

    def __init__(self, parent_uid: str, iterations: list[int], message: str) -> None:
        super().__init__(message)
        self.parent_uid = parent_uid
        self.iterations = iterations


@dataclass
class SweepState:
    """Each requested iteration's params; the finished ones' (state, params, results) and runs; what
    is left; where on the bus this driver began."""

    params: dict[int, dict[str, Any]] = field(default_factory=dict)
    done: dict[int, tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=dict)
    pending: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    uids: dict[int, str] = field(default_factory=dict)  # each finished iteration's run
    positions: dict[int, int] = field(default_factory=dict)  # the bus when the sweep (or its resume) began
    resumed: bool = False


def run_sweep(svc: Services, spec: RunSpec, sweep: SweepSpec) -> RunContext:
    """Start a parent run, request every iteration, run them and complete the parent (all with `svc`).
    A random sweep without a seed gets one drawn now, recorded in the signed parent: a resume tells
    the iterations it asked for from any other by drawing them again."""
    if sweep.strategy == "random" and sweep.seed is None:
        sweep = replace(sweep, seed=secrets.randbits(63))
    parent = RunSpec(**{**spec.__dict__, "extra": {**spec.extra, "sweep": sweep.describe()}}).new_context(svc)
    positions = svc.bus.end_offsets()
    parent.start()
    requests = list(enumerate(sweep.param_sets(), start=1))
    parent.request_iterations(requests)
    return _execute(svc, parent, spec, sweep, SweepState(params=dict(requests), pending=requests,
                                                         positions=positions))


def _unasked(requests: dict[int, dict[str, Any]], sweep: SweepSpec) -> str | None:
    """Why the iteration requests read from the log (iteration_requested events carry no MAC) are
    not exactly the sweep's own, drawn again from its signed description; None when they are."""
    if sweep.strategy == "random" and sweep.seed is None:
        return "its random sweep recorded no seed, so the iterations it asked for cannot be drawn again"
    sets = sweep.param_sets()
    for iteration, params in sorted(requests.items()):
        if not 1 <= iteration <= len(sets) or _canonical(params) != _canonical(sets[iteration - 1]):
            return f"iteration {iteration} asks for params {params!r}, which the sweep's recorded hyperparams do not"
    return None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _vouched_child(svc: Services, parent_uid: str, uid: str, iteration: int, params: dict[str, Any] | None,
                   started: dict[str, Any]) -> bool:
    """Whether a child's run_started is this home's, signed for run `uid`, as iteration `iteration` of
    `parent_uid` with the iteration's `params` (None: anything signed)."""
    if not svc.run_signer().signed(uid, started):
        return False
    if started.get("parent_uid") != parent_uid or started.get("iteration") != iteration:
        return False
    recorded = started.get("params") or {}
    return params is None or all(key in recorded and _canonical(json.loads(recorded[key])) == _canonical(value)
                                 for key, value in params.items())


def resume_sweep(svc: Services, parent_uid: str, quiet: bool = False, trust: bool = False) -> RunContext:
    """Run the iterations the log shows as requested but never finished, then complete the parent.

    The handler, runtime and params come from the log, which is not trusted: without `trust`,
    UntrustedRun is raised before anything is loaded unless the handler is this home's own
    unchanged code (`check_handler_trusted`) and the runtime runs on this machine (a scheduler
    address named by the log would receive the run's secrets).
    """
    db = svc.run_db()
    parent_row = db.read_run(parent_uid)
    if "sweep" not in parent_row["extra"]:
        raise ValueError(f"run {parent_uid} is not a sweep (it has no iterations to resume)")
    if parent_row["state"] not in ("running", "lost"):  # a lost driver's sweep is what resume is for
        raise ValueError(f"sweep {parent_row['uid']} already ended in state {parent_row['state']!r}")
    parent_uid = parent_row["uid"]
    started = json.loads(db.sql("SELECT payload FROM events WHERE run_uid = ? AND type = 'run_started'",
                                [parent_uid]).payload[0])
    vouched = check_handler_trusted(started, trust, parent_uid, svc.settings.home)
    if not trust and started["runtime"] not in ("local", "dask://"):
        raise UntrustedRun(f"run {parent_uid}: will not send the sweep to {started['runtime']!r}, an address "
                           f"the log names; pass --trust (trust=True) to use it anyway")
    # the sweep, the handler and its params as run_started recorded them: what check_handler_trusted found signed
    sweep = SweepSpec.from_description({**json.loads(started["extra"]["sweep"]), "quiet": quiet})
    requested = db.sql("SELECT payload FROM events WHERE run_uid = ? AND type = 'iteration_requested' "
                       "ORDER BY seq", [parent_uid]).payload
    requests = {}
    for payload in requested:
        request = json.loads(payload)
        requests[request["iteration"]] = {k: json.loads(v) for k, v in request["params"].items()}
    if vouched:
        unasked = _unasked(requests, sweep)
        if unasked and not trust:
            raise UntrustedRun(f"run {parent_uid}: {unasked}; pass --trust (trust=True) to run it anyway")
        vouched = unasked is None
    handler = load_handler(started["handler"])
    # what only --trust let run is not signed as this home's: a rerun of its iterations asks again
    spec = RunSpec(svc.settings, handler, started["handler"], started["name"], started["project"],
                   started["runtime"], {key: json.loads(value) for key, value in started["params"].items()},
                   started["inputs"], started["input_digests"], from_environment(started["secret_keys"]),
                   started["labels"], started["code_ref"], signed=vouched)
    _settle_orphans(svc, parent_uid, trust)
    state = SweepState(params=requests, positions=svc.bus.end_offsets(), resumed=True)
    children = db.sql(f"SELECT r.uid, r.iteration, r.state, e.payload FROM runs r JOIN events e ON e.run_uid = r.uid "
                      f"AND e.type = 'run_started' WHERE r.parent_uid = ? AND r.state IN "
                      f"({', '.join('?' * len(FINISHED_STATES))}) ORDER BY r.started_at",
                      [parent_uid, *FINISHED_STATES])
    for child in children.itertuples():
        # a child that is not this home's iteration as asked (appended by anyone) is run again
        if not trust and not _vouched_child(svc, parent_uid, child.uid, child.iteration,
                                            requests.get(child.iteration), json.loads(child.payload)):
            continue
        results = db.read_run(child.uid)["results"]
        state.done[child.iteration] = (child.state, requests.get(child.iteration, {}), results)
        state.uids[child.iteration] = child.uid
    state.pending = [(i, params) for i, params in sorted(requests.items()) if i not in state.done]
    parent = spec.new_context(svc, uid=parent_uid)  # a stream of its own: no seq taken from the dead driver
    parent.parent_uid = None
    parent.parameters = dict(spec.params)
    began = parent_row.get("started_at")  # its duration is the whole sweep's, not the resumed part's
    parent.resume(started_at=began.timestamp() if hasattr(began, "timestamp") else None)
    return _execute(svc, parent, spec, sweep, state)


def _settle_orphans(svc: Services, parent_uid: str, trust: bool) -> None:
    """Iterations left unfinished by a dead driver: wait while they may still speak, and write the
    'lost' verdict for those judged silent by their own heartbeat interval (without `trust`, only
    this home's signed iterations say how long: a run anyone appended could say a billion seconds)."""
    interval = _longest_interval(svc, parent_uid, trust)
    deadline = time.monotonic() + 3 * interval + 5
    while True:
        reap(svc, parent_uid=parent_uid)
        if running_runs(svc, parent_uid).empty or time.monotonic() > deadline:
            return
        time.sleep(min(1.0, interval))


def _longest_interval(svc: Services, parent_uid: str, trust: bool) -> float:
    """The longest heartbeat interval the parent's iterations recorded (the setting if none did)."""
    started = svc.run_db().sql(
        "SELECT e.run_uid, e.payload, r.iteration FROM events e JOIN runs r ON r.uid = e.run_uid "
        "WHERE e.type = 'run_started' AND r.parent_uid = ?", [parent_uid])
    intervals = []
    for uid, payload, iteration in zip(started.run_uid, started.payload, started.iteration, strict=True):
        recorded = json.loads(payload)
        if trust or _vouched_child(svc, parent_uid, uid, int(iteration), None, recorded):
            interval = recorded.get("heartbeat_interval_s")
            if isinstance(interval, int | float) and not math.isnan(interval) and interval > 0:
                intervals.append(float(interval))
    return max(intervals, default=svc.settings.heartbeat_interval_s)


def _execute(svc: Services, parent: RunContext, spec: RunSpec, sweep: SweepSpec, state: SweepState) -> RunContext:
    selector = Selector.parse(sweep.selector) if sweep.selector else None
    stop = StopCondition(sweep.stop_condition) if sweep.stop_condition else None
    watcher = ChildWatcher(svc.bus, svc.codec, parent.uid, svc.bus.end_offsets())
    failed = sum(1 for s, _, _ in state.done.values() if s != "completed")
    stop_failed: str | None = None  # why the stop condition could not be evaluated
    try:
        stopping = _should_stop(state, sweep, stop, failed)
    except ValueError as exc:  # on the results of a resumed sweep's done iterations
        stop_failed, stopping = str(exc), True
    try:
        pool = open_pool(svc, spec.runtime, sweep.parallel_runs)
    except Exception as exc:
        parent.finish(error=exc)
        return parent
    spec = pool.prepare(spec)
    execute = run_iterations_in_driver if pool.in_driver else run_iterations
    if isinstance(spec.handler, CommandJob):
        execute = _run_command_iterations
    # Tight windows only where results steer dispatch; otherwise keep every worker busy.
    unbounded = not (sweep.parallel_runs or stop or sweep.max_errors)
    window = max(1, len(state.pending)) if unbounded else (sweep.parallel_runs or pool.capacity)
    inflight: dict[Any, list[int]] = {}  # a task -> the iterations it runs
    again: deque[int] = deque()  # iterations whose task's worker died before they finished: one a task
    losses: Counter[int] = Counter()  # how many times each iteration's worker died under it
    seconds: list[float] = []  # how long the iterations that ended took where they ran
    # chunks only on workers whose scheduler runs no task of a dead worker again (see DaskPool)
    chunked = unbounded and not (pool.in_driver or pool.reruns_tasks_of_dead_workers) and execute is run_iterations
    total = len(state.done) + len(state.pending)
    best = BestSoFar(selector)
    for iteration, (outcome_state, _, results) in state.done.items():
        if outcome_state == "completed":
            best.offer(iteration, results)
    state.pending.reverse()  # the next iteration last (see below)
    # tasks whose worker died while the bus could not be read up to its end: read again once nothing runs
    unread: list[tuple[list[int], BaseException]] = []
    stopped_by: BusNotRead | None = None
    try:
        with SweepProgress(total, sweep.quiet) as progress:
            while (((state.pending or again) and not stopping) or inflight or unread) and stopped_by is None:
                in_flight = sum(map(len, inflight.values()))
                size, limit = 1, window
                if state.pending and chunked:
                    size = _chunk_size(seconds, len(state.pending), pool.capacity)
                    if not seconds:  # a few single iterations first: how long does one take?
                        limit = min(window, 2 * pool.capacity)
                chunks: list[list[RunSpec]] = []
                while again and not stopping and in_flight < limit:
                    iteration = again.popleft()
                    chunks.append([spec.for_iteration(parent.uid, iteration, state.params[iteration])])
                    in_flight += 1
                while state.pending and not stopping and in_flight < limit:
                    # from the end of the reversed list: taking n costs n, not the list's length
                    taken = [state.pending.pop() for _ in range(min(size, len(state.pending)))]
                    chunks.append([spec.for_iteration(parent.uid, i, params) for i, params in taken])
                    in_flight += len(taken)
                if chunks:  # one submission for them all: a scheduler round trip each costs ~1 ms
                    for future, chunk in zip(pool.submit_all(execute, chunks), chunks, strict=True):
                        inflight[future] = [child.iteration for child in chunk]
                rereading = not inflight  # nothing runs: the last chance to learn how `unread` ended
                if rereading:
                    tasks, unread = unread, []
                else:
                    tasks = [(inflight.pop(future), value) for future, value in pool.wait_done(inflight)]
                for task, (iterations, value) in enumerate(tasks):
                    if pool.lost(value):  # what finished stays finished; the rest runs again
                        try:
                            ended = _ended_before_loss(svc, watcher, iterations, value, losses,
                                                       pool.losses_allowed)
                        except BusNotRead as exc:
                            if rereading:  # stop, leaving the sweep to `resume` (see _leave_to_resume)
                                stopped_by, unread = exc, tasks[task:]
                                break
                            unread.append((iterations, value))  # the others go on meanwhile
                            continue
                        again.extend(i for i in iterations if i not in ended)
                        iterations, values = list(ended), list(ended.values())
                    else:
                        values = value if isinstance(value, list) else [value] * len(iterations)
                    for iteration, found in zip(iterations, values, strict=True):
                        outcome = _outcome(found, iteration)
                        if outcome.seconds:  # it ran to its end here (not an exception, nor read from the bus)
                            seconds.append(outcome.seconds)
                        results = outcome.results if outcome.results is not None \
                            else _results_on_bus(watcher, outcome)
                        state.done[iteration] = (outcome.state, state.params[iteration], results)
                        state.uids[iteration] = outcome.uid
                        failed += outcome.state != "completed"
                        if outcome.state == "completed":
                            best.offer(iteration, results)
                            try:
                                stopping = stopping or bool(stop and stop.met(results))
                            except ValueError as exc:  # no more iterations start; the sweep ends in error
                                stop_failed, stopping = stop_failed or str(exc), True
                        stopping = stopping or (sweep.max_errors is not None and failed >= sweep.max_errors)
                    progress.update(len(state.done) - failed, failed, sum(map(len, inflight.values())),
                                    best.describe())
    finally:
        pool.close()
    svc.writer.flush()
    if stopped_by is not None:  # nothing runs any more (the loop stops only then): no iteration is abandoned
        _leave_to_resume(svc, parent, sorted(i for iterations, _ in unread for i in iterations), stopped_by)
    if not pool.in_driver:  # in-process iterations cannot outlive the driver
        _settle_lost(svc, watcher)
    return _complete(parent, state, selector, svc, stop_failed)


_CHUNK_S = 0.2  # a task runs about this much of iterations: one flush (the writer's interval) for them all


def _chunk_size(seconds: list[float], pending: int, capacity: int) -> int:
    """Iterations per task on workers: one until some have ended (their time is unknown); then as
    many as take about _CHUNK_S where they run, but at most a quarter of each worker's share of
    what is pending (so the workers stay balanced)."""
    if not seconds:
        return 1
    typical = sorted(seconds)[len(seconds) // 2]
    return max(1, min(int(_CHUNK_S / max(typical, 1e-4)), pending // (4 * max(1, capacity))))


def _ended_before_loss(svc: Services, watcher: ChildWatcher, iterations: list[int], error: BaseException,
                       losses: Counter[int], allowed: int) -> dict[int, IterationOutcome | BaseException]:
    """A task whose worker died: its iterations the bus shows finished (as a resumed sweep decides,
    FINISHED_STATES), with how they ended, and `error` for those whose worker died under them more
    than `allowed` times; the others (absent) are to run again. What its worker wrote is on the bus
    before its end offsets now (the dead worker writes no more): BusNotRead when the bus cannot be
    read up to them within RUNBUS_FLUSH_TIMEOUT, since an iteration not seen finished may have."""
    wait_s = svc.settings.flush_timeout_s
    if not watcher.catch_up(svc.bus.end_offsets(), wait_s):
        raise BusNotRead(
            f"sweep {watcher.parent_uid}: the worker of iterations {sorted(iterations)} died, and the bus could not "
            f"be read up to its end within {wait_s:g}s (RUNBUS_FLUSH_TIMEOUT) to see which of them finished; "
            f"none of them runs again, since one may have finished (set RUNBUS_FLUSH_TIMEOUT to wait longer)")
    finished = watcher.finished(iterations)
    ended: dict[int, IterationOutcome | BaseException] = {}
    for iteration in iterations:
        child = finished.get(iteration)
        if child is not None:
            ended[iteration] = IterationOutcome(iteration, child.uid, child.state, dict(child.results))
            continue
        losses[iteration] += 1
        if losses[iteration] > allowed:
            ended[iteration] = error
    return ended


def _leave_to_resume(svc: Services, parent: RunContext, iterations: list[int], cause: BusNotRead) -> NoReturn:
    """Stop without ending the sweep's run: its heartbeats stop, so it reads 'lost' and `resume`
    finishes it from the log (it marks the dead workers' iterations 'lost' from the projection,
    which this driver's reading of the bus cannot do now). SweepNotFinished (a line on the run's
    stderr too) names `iterations`, whose end the bus did not show, the setting to raise and the command."""
    message = (f"sweep {parent.uid}: after a worker died, the bus could not be read up to its end within "
               f"{svc.settings.flush_timeout_s:g}s (RUNBUS_FLUSH_TIMEOUT) to see whether iterations {iterations} "
               f"finished, so none of them ran again and the sweep's run is left unfinished; raise "
               f"RUNBUS_FLUSH_TIMEOUT and run `runbus resume {parent.uid}` to run only the iterations the log "
               f"does not show finished")
    parent.log_output("stderr", message + "\n")
    parent.flush_output()
    svc.writer.untrack(parent.uid)
    svc.writer.flush()
    raise SweepNotFinished(parent.uid, iterations, message) from cause


def _results_on_bus(watcher: ChildWatcher, outcome: IterationOutcome) -> dict[str, Any]:
    child = watcher.wait_finished(outcome.uid, _EVENTS_GRACE_S) if outcome.uid else None
    return child.results if child else {}


def _outcome(value: IterationOutcome | BaseException, iteration: int) -> IterationOutcome:
    if isinstance(value, BaseException):  # the task itself failed (e.g. its worker died every time)
        print(f"iteration {iteration} could not run: {value!r}", file=sys.stderr)
        return IterationOutcome(iteration, "", "error")
    return value


def _should_stop(state: SweepState, sweep: SweepSpec, stop: StopCondition | None, failed: int) -> bool:
    if sweep.max_errors is not None and failed >= sweep.max_errors:
        return True
    return bool(stop and any(s == "completed" and stop.met(r) for s, _, r in state.done.values()))


def _settle_lost(svc: Services, watcher: ChildWatcher) -> None:
    """Attempts that started but whose worker died never finish: mark them 'lost' once silent for
    3 of their own heartbeat intervals."""
    fallback = svc.settings.heartbeat_interval_s
    watcher.poll(0.5)
    while watcher.unfinished():
        now = time.monotonic()
        for child in watcher.unfinished():
            lost_after = child.lost_after(fallback)
            if now - child.last_seen > lost_after:
                mark_lost(svc, child.uid, f"no heartbeat for {lost_after:g}s", child.last_seen - child.started)
                child.state = "lost"
        watcher.poll(min([1.0, *(child.lost_after(fallback) for child in watcher.unfinished())]))
    svc.writer.flush()


def _complete(parent: RunContext, state: SweepState, selector: Selector | None, svc: Services,
              stop_failed: str | None = None) -> RunContext:
    """Record the iterations and the best one, and finish the parent: in error when an iteration
    failed or the stop condition could not be evaluated (`stop_failed` says why)."""
    from engine.sweep.summary import record_iterations  # pandas and numpy: loaded when a sweep ends

    best = None
    completed = {i: r for i, (s, _, r) in state.done.items() if s == "completed"}
    if selector is not None:
        best = selector.best(completed)
        if best is None and completed:
            warnings.warn(f"sweep {parent.uid}: no completed iteration logged a number as {selector.key!r}, so it "
                          f"has no best iteration (selector {selector.mode}.{selector.key})", stacklevel=2)
    artifacts = _artifacts_of(svc, state, best) if best is not None else []
    record_iterations(parent, state.done, best, artifacts)
    failed = len(state.done) - len(completed)
    errors = [f"{failed} of {len(state.done)} iterations failed"] if failed else []
    if errors and state.pending:  # max_errors ended it: say what did not run
        errors.append(f"{len(state.pending)} not run")
    parent.finish(error="; ".join([*errors, *filter(None, [stop_failed])]) or None)
    return parent


def _artifacts_of(svc: Services, state: SweepState, iteration: int) -> list[DataItem]:
    """The artifacts iteration `iteration` logged, from the bus since the sweep (or its resume)
    began, or from the projection for an iteration that ended before a resume."""
    uid = state.uids.get(iteration)
    if not uid:
        return []
    root = str(svc.artifact_store.root)
    found: dict[str, dict[str, Any]] = {}
    # the log as it is now (writers going on do not keep this reading); a run's records are keyed
    # by its uid: only the iteration's are decoded
    subscription = Subscription(svc.bus, svc.codec, state.positions, until=svc.bus.end_offsets(), keys={uid})
    for event in subscription.events():
        if event.run_uid == uid and event.type == "artifact":
            found[event.payload["key"]] = event.payload
    if not found and state.resumed:
        return [_item(a, root) for a in svc.run_db().read_run(uid)["artifacts"]]
    return [_item({**a, "meta": artifact_meta(a["meta"])}, root) for a in found.values()]


def _item(artifact: dict[str, Any], root: str) -> DataItem:
    return DataItem(artifact["key"], artifact["uri"], artifact["format"], artifact["kind"], artifact["sha256"],
                    artifact["size"], dict(artifact["labels"] or {}), dict(artifact["meta"] or {}), root)


@dataclass(frozen=True)
class CommandJob:
    """A command (+ args) that stands where a RunSpec's handler goes: each run runs it in a
    subprocess (engine.runtimes.command), sweep iterations included."""

    command: str
    args: tuple[str, ...] | list[str] = ()

    def run(self, svc: Services, spec: RunSpec) -> RunContext:
        """Run the command as the run `spec` describes, recorded through `svc`; the ended context."""
        from engine.runtimes.command import run_command  # it imports engine.task, which is light; this is not

        return run_command(svc, self.command, list(self.args), spec)


def _run_command_iterations(svc: Services, specs: list[RunSpec]) -> list[IterationOutcome]:
    """Sweep iterations of a command: their results are read from the bus (its own process logged them)."""
    outcomes = []
    for spec in specs:
        assert isinstance(spec.handler, CommandJob)
        context = spec.handler.run(svc, spec)
        outcomes.append(IterationOutcome(spec.iteration, context.uid, context.state))
    return outcomes
