"""RunContext: what a handler receives. Every call on it becomes an event on the bus.

Each call validates what it logs (see producers.values) and refuses it with an error naming the key,
so every event it hands the writer encodes and folds. Payloads are copies taken at the call, and
every string in them has the run's secret values masked (producers.redact). After run_finished the
context refuses to log more."""

from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
import time
import traceback as tb
import uuid
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from producers.artifact_store import ArtifactStore, check_artifact_key
from producers.artifacts import Artifact, DatasetArtifact, ModelArtifact
from producers.console import STREAMS, RunOutput
from producers.data_item import DataItem
from producers.redact import RedactingLogger, Redactor
from producers.values import (
    INT64_MAX,
    INT64_MIN,
    MAX_LABEL_CHARS,
    InvalidValue,
    check_key,
    check_label,
    check_text,
    check_text_map,
    to_json,
    to_number,
    to_step,
    to_timestamp,
)
from producers.writer import BackgroundWriter, MetricPoint

if TYPE_CHECKING:  # pandas is imported where a DataFrame is used: a job that logs none starts without it
    import pandas as pd

# key of run_started's extra holding the run's signature (see RunSigner in engine.loader): a JSON string
RUN_MAC = "run_mac"
# signs a run's run_started payload, given the run's uid (the engine's RunSigner, under the home's code key)
RunSign = Callable[[str, Mapping[str, Any]], str]
_MAX_ERROR_CHARS = 64 * 1024  # of an error message or traceback kept in run_finished (head and tail)
_KNOWN_KEYS = 10_000  # metric keys remembered as valid, per run


class RunFinishedError(RuntimeError):
    """A call that logs on a run that has already finished."""


# iteration -> (state, params, results) of a run's child iterations
Iterations = Mapping[int, tuple[str, dict[str, Any], dict[str, Any]]]
# logs a parent's iterations (best_iteration, the best's results and artifacts, the table): the
# engine's step (engine.sweep.summary.record_iterations, given by whoever makes the context),
# shared with its hyper-param sweeps
IterationsRecorder = Callable[["RunContext", Iterations, "int | None", Sequence[DataItem]], None]


class RunContext:
    """The run's identity, inputs and the logging calls of the MLRun context API."""

    _children: list[ChildContext] | None = None  # made by get_child_context, on first use
    _best_child: int | None = None
    _annotations: dict[str, Any] | None = None  # made by set_annotation, on first use

    def __init__(self, writer: BackgroundWriter, artifact_store: ArtifactStore, *, uid: str,
                 name: str, project: str = "default", handler: str = "", runtime: str = "local",
                 params: Mapping[str, Any] | None = None, inputs: Mapping[str, str] | None = None,
                 input_digests: Mapping[str, str] | None = None,
                 secrets: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None,
                 parent_uid: str | None = None, iteration: int = 0, code_ref: str | None = None,
                 extra: Mapping[str, Any] | None = None,
                 iterations_recorder: IterationsRecorder | None = None, sign: RunSign | None = None) -> None:
        """`sign`: signs run_started (into its extra's RUN_MAC), so that a rerun can tell this
        run's params, inputs and code from ones written to the log by anyone else."""
        self._writer = writer
        self._sign = sign
        self._store = artifact_store
        # this context's own stream of the run's events: a resumed run, or the reaper writing
        # about it, never collides with the seq numbers of another process
        self.stream = uuid.uuid4().hex
        self._seq = itertools.count()
        # heartbeats travel on a stream of their own: the writer sends them ahead of a backlog,
        # which would break the order of the run's own stream
        self.heartbeat_stream = uuid.uuid4().hex
        self._beat_seq = itertools.count()
        # seq numbers must reach the writer in order
        self._emit_lock = threading.Lock()
        self._finished = False
        self._secrets = dict(secrets or {})
        self._redact = Redactor(self._secrets)
        for what, text in (("name", name), ("project", project), ("handler", handler), ("runtime", runtime)):
            check_text("run", what, text)
        # a name (like every key) is masked too: a secret value has no business in either
        self.uid, self.name, self.project = uid, self._redact(name), project
        self.handler, self.runtime = self._redact(handler), runtime  # a command line may hold a secret
        self.parent_uid, self.iteration, self.code_ref = parent_uid, iteration, code_ref
        self.parameters: dict[str, Any] = {}
        self._logged_params: dict[str, Any] = {}
        self._params_json: dict[str, str] = {}
        for key, value in (params or {}).items():
            logged_key, text, logged = self._json("param", key, value)
            self.parameters[key] = self._plain("param", key, value, logged)
            self._logged_params[logged_key] = logged
            self._params_json[logged_key] = text
        self.inputs: dict[str, str] = check_text_map("input", inputs)
        self._input_digests = check_text_map("input digest", input_digests)
        self.labels: dict[str, str] = check_text_map("label", labels, self._redact, MAX_LABEL_CHARS)
        # what the engine describes the run with (a sweep's hyperparams): masked like the params
        self._iterations_recorder = iterations_recorder
        self._extra = {self._redact(check_key("extra", k)): to_json("extra", k, v, self._redact or None)[0]
                       for k, v in (extra or {}).items()}
        self.results: dict[str, Any] = {}
        self._metric_keys: dict[str, str] = {}  # key -> the key as logged (masked)
        self.artifacts: dict[str, DataItem] = {}
        self.state = "created"
        self.error: str | None = None
        self.traceback: str | None = None
        self.return_value: Any = None
        self._started = 0.0
        self._output = RunOutput(self._emit_log, self._redact, writer, self.stream, f"run {uid}")
        self.logger = RedactingLogger(logging.getLogger(f"runbus.run.{self.name}"), self._redact,
                                      sink=self._logger_line)

    # lifecycle (called by the runtime) -------------------------------------------------------

    def start(self) -> None:
        """Emit run_started; params, inputs, secret keys and labels as they are now."""
        self._started = time.time()
        self.state = "running"
        started: dict[str, Any] = {
            "name": self.name, "project": self.project, "handler": self.handler,
            "runtime": self.runtime, "params": dict(self._params_json),
            "inputs": {self._redact(k): self._redact(v) for k, v in self.inputs.items()},
            "input_digests": {self._redact(k): v for k, v in self._input_digests.items()},
            "secret_keys": sorted(self._secrets),
            "labels": dict(self.labels), "parent_uid": self.parent_uid, "iteration": self.iteration,
            "host": socket.gethostname(), "code_ref": self.code_ref, "extra": dict(self._extra),
            "heartbeat_interval_s": self._writer.heartbeat_interval_s,
        }
        if self._sign is not None:
            started["extra"][RUN_MAC] = json.dumps(self._sign(self.uid, started))
        self._emit("run_started", started)
        self._writer.track(self.uid, self._heartbeat)

    def resume(self, started_at: float | None = None) -> None:
        """Continue a run started by another process (on this context's own stream). `started_at`:
        when the run began (seconds since the epoch), so its duration counts from then; default now."""
        self._started = time.time() if started_at is None else started_at
        self.state = "running"
        self._writer.track(self.uid, self._heartbeat)

    def finish(self, return_value: Any = None, error: BaseException | str | None = None,
               state: str | None = None, flush: bool = True) -> None:
        """Emit run_finished and (with `flush`) wait until everything the run logged is on the bus.

        `error` is the exception that ended the run, or a message when no exception did. Error and
        traceback are recorded with secret values masked. The wait is bounded (the writer's
        flush_timeout_s); EventsNotWritten says why when the events are not on the bus (a bus that
        refuses them, and the spill file that keeps them, or one that stays away).
        """
        if self._finished:
            raise RunFinishedError(f"run {self.uid} has already finished ({self.state})")
        try:
            error = self._settle_children(error, state)
            self._output.close()  # the run's console output comes before its end
            self._finish(return_value, error, state)
            if flush:
                self._writer.sync(f"the events of run {self.uid}")
        finally:
            # the heartbeats go on until run_finished is on the bus: a run waiting for its backlog
            # is alive (they travel on their own stream, so one after run_finished is harmless)
            self._writer.untrack(self.uid)

    def _finish(self, return_value: Any, error: BaseException | str | None, state: str | None) -> None:
        return_json = None
        if error is None and return_value is not None:
            try:
                _, return_json, self.return_value = self._json("result", "return", return_value)
            except InvalidValue as exc:
                error = exc
            else:
                self._emit("result", {"key": "return", "value": return_json})
                self.results["return"] = self.return_value
        if isinstance(error, str):
            self.error = _bounded(self._redact(_printable(error)))
        elif error is not None:
            self.error = _bounded(self._redact(_printable(f"{type(error).__name__}: {error}")))
            self.traceback = _bounded(self._redact(_printable("".join(tb.format_exception(error)))))
        self.state = state or ("error" if error is not None else "completed")
        # marked finished under the same lock as the run_finished emit: a call from another thread
        # is either before run_finished on the run's stream or refused
        self._emit("run_finished", {
            "state": self.state, "error": self.error, "traceback": self.traceback,
            "return_value": return_json, "duration_s": time.time() - self._started}, last=True)

    def request_iterations(self, requests: list[tuple[int, Mapping[str, Any]]]) -> None:
        """Ask for sweep iterations: one iteration_requested event per (iteration, params)."""
        encoded = [(iteration, dict(self._json("param", key, value)[:2] for key, value in params.items()))
                   for iteration, params in requests]
        for iteration, params_json in encoded:
            self._emit("iteration_requested", {"iteration": iteration, "params": params_json})
        self._writer.sync(f"the iteration requests of run {self.uid}")

    # params, secrets, inputs ------------------------------------------------------------------

    def get_param(self, key: str, default: Any = None) -> Any:
        """The param's value; a missing one takes `default`, which is recorded as a param."""
        if key in self.parameters:
            return self.parameters[key]
        logged_key, text, logged = self._json("param", key, default)
        value = self._plain("param", key, default, logged)
        self._emit("param", {"key": logged_key, "value": text})
        self.parameters[key] = value
        self._logged_params[logged_key] = logged
        return value

    def mask_secrets(self, text: str) -> str:
        """`text` with this run's secret values replaced by `***` (as in everything the run logs)."""
        return self._redact(text)

    def get_secret(self, key: str, default: str | None = None) -> str | None:
        """The secret's value (never logged); `default` when the run was given no such key."""
        return self._secrets.get(key, default)

    def get_input(self, key: str, url: str = "") -> DataItem:
        """The input `key` as a DataItem (MLRun's get_input); when the run was not given `key`, a
        DataItem for `url` (not recorded as an input of the run), else KeyError naming the key."""
        if key not in self.inputs:
            if url:
                return DataItem(key, url, kind="input")
            known = ", ".join(sorted(self.inputs)) or "none"
            raise KeyError(f"input {key!r} was not given to this run (inputs: {known})")
        return DataItem(key, self.inputs[key], sha256=self._input_digests.get(key), kind="input")

    # MLRun's context members ------------------------------------------------------------------

    def get_dataitem(self, url: str) -> DataItem:
        """MLRun's get_dataitem: a DataItem for `url` (a path or file:// URI), keyed by the url."""
        return DataItem(url, url, kind="input")

    @property
    def artifact_path(self) -> str:
        """MLRun's artifact_path: the artifact store's root as a file:// URI. Runbus keeps bodies
        by content there; calls that take an `artifact_path` (log_model, log_dataset) accept it."""
        return self._store.root.as_uri()

    out_path = artifact_path  # MLRun's older name for the same

    def is_logging_worker(self) -> bool:
        """MLRun's is_logging_worker: True (a Runbus run is never one of several workers of a job)."""
        return True

    def commit(self, message: str = "", completed: bool = False) -> None:
        """MLRun's commit: push what the run logged so far (its console output too) to the bus,
        waiting at most the writer's flush_timeout_s (EventsNotWritten says why they are not
        there). `message` is kept as the annotation 'message', as MLRun does. `completed` ends
        nothing: the runtime, or the script's end, finishes the run (once); on a finished run there
        is nothing left to push."""
        if message:
            self.set_annotation("message", message)
        if self._finished:
            return
        self.flush_output()
        self._writer.sync(f"the events of run {self.uid}")

    def to_dict(self) -> dict[str, Any]:
        """The run in MLRun's shape, as this context has logged it so far (plain JSON data, secret
        values masked as in the log; the secrets are never in it): metadata (uid, name, project,
        labels, iteration), spec (parameters, inputs, handler), status (state, results, error,
        artifacts as MLRun's artifact dicts)."""
        return json.loads(json.dumps({
            "metadata": {"uid": self.uid, "name": self.name, "project": self._redact(self.project),
                         "labels": dict(self.labels), "iteration": self.iteration},
            "spec": {"parameters": self.logged_parameters,
                     "inputs": {self._redact(k): self._redact(v) for k, v in self.inputs.items()},
                     "handler": self._redact(self.handler)},
            "status": {"state": self.state, "results": dict(self.results), "error": self.error,
                       "artifacts": [item.mlrun_dict(self._redact(self.project), self.iteration, self.uid)
                                     for item in list(self.artifacts.values())]},
        }))

    def to_json(self) -> str:
        """`to_dict()` as JSON text (MLRun's to_json)."""
        return json.dumps(self.to_dict())

    # results, metrics, labels ----------------------------------------------------------------

    def log_result(self, key: str, value: Any) -> None:
        """Log a JSON value; InvalidValue (a TypeError) names the key when it cannot be logged."""
        logged_key, text, plain = self._json("result", key, value)
        self._emit("result", {"key": logged_key, "value": text})
        self.results[logged_key] = plain

    def log_results(self, results: Mapping[str, Any]) -> None:
        """Log several results; all are validated before any is logged."""
        encoded = [self._json("result", key, value) for key, value in _items("log_results", results)]
        for key, text, plain in encoded:
            self._emit("result", {"key": key, "value": text})
            self.results[key] = plain

    def log_metric(self, key: str, value: float, step: int | None = None,
                   timestamp: float | None = None) -> None:
        """One point: `step` within int64, `timestamp` in seconds since the epoch (1970..2262)."""
        self._emit("metric", *self._metric(key, value, step, timestamp))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None,
                    timestamp: float | None = None) -> None:
        """Several points; all are validated before any is logged."""
        points = [self._metric(key, value, step, timestamp) for key, value in _items("log_metrics", metrics)]
        for point, now in points:
            self._emit("metric", point, now)

    def _metric(self, key: str, value: Any, step: Any, timestamp: Any) -> tuple[MetricPoint, float]:
        """The metric event's payload (as a MetricPoint), validated, and the time it was logged."""
        logged_key = self._metric_keys.get(key)
        if logged_key is None:  # the hot path: the same few keys, checked and masked once each
            logged_key = self._redact(check_key("metric", key))
            if len(self._metric_keys) < _KNOWN_KEYS:
                self._metric_keys[key] = logged_key
        number = value if type(value) is float else to_number("metric", key, value)
        if not (step is None or (type(step) is int and INT64_MIN <= step <= INT64_MAX)):
            step = to_step("metric", key, step)
        now = time.time()
        return (logged_key, number, step, now if timestamp is None else to_timestamp("metric", key, timestamp)), now

    def set_label(self, key: str, value: Any, replace: bool = True) -> None:
        """Set a label (its value as str); the key and value must be valid UTF-8 text."""
        checked_key, checked_value = check_label(key, value)
        logged_key, text = self._redact(checked_key), self._redact(checked_value)
        if not replace and logged_key in self.labels:
            return
        self._emit("label", {"key": logged_key, "value": text})
        self.labels[logged_key] = text

    # artifacts --------------------------------------------------------------------------------

    def log_artifact(self, item: Artifact | str, body: bytes | str | None = None,
                     local_path: str | None = None, labels: Mapping[str, str] | None = None,
                     format: str | None = None, **meta: Any) -> DataItem:
        """Store the artifact's body and log its address; returns a DataItem for it."""
        if isinstance(item, Artifact):
            artifact = item
            if labels:
                artifact.labels.update(labels)
            if format:
                artifact.format = format
        else:
            check_artifact_key(item)
            artifact = Artifact(item, body=body, local_path=local_path, format=format,
                                labels=dict(labels or {}))
        artifact.meta.update(meta)
        check_artifact_key(artifact.key)
        check_key("artifact", artifact.key)
        check_text("artifact", artifact.key, artifact.kind, "kind")
        if artifact.format is not None:
            check_text("artifact", artifact.key, artifact.format, "format")
        labels_str = check_text_map(f"artifact {artifact.key!r} label", artifact.labels, self._redact,
                                    MAX_LABEL_CHARS)
        self._meta_json(artifact.key, artifact.meta)  # refused before any body is stored
        data = artifact.render()
        stored = self._store.put_file(artifact.local_path) if data is None else self._store.put_bytes(data)
        for name, (extra_data, extra_format) in artifact.extra_bodies().items():
            extra = self._store.put_bytes(extra_data)
            artifact.meta[name] = {"uri": extra.uri, "sha256": extra.sha256, "format": extra_format}
        meta_json = self._meta_json(artifact.key, artifact.meta)
        logged_key, logged_format = self._redact(artifact.key), self._redact.optional(artifact.format)
        self._emit("artifact", {
            "key": logged_key, "kind": artifact.kind, "uri": stored.uri,
            "sha256": stored.sha256, "size": stored.size, "format": logged_format,
            "labels": labels_str, "meta": meta_json})
        logged = DataItem(logged_key, stored.uri, logged_format, artifact.kind, stored.sha256,
                          stored.size, labels_str, json.loads(meta_json), store_root=str(self._store.root))
        self.artifacts[logged_key] = logged
        return logged

    def log_dataset(self, key: str, df: pd.DataFrame, tag: str = "", local_path: str | None = None,
                    artifact_path: str | None = None, upload: bool = True,
                    labels: Mapping[str, str] | None = None, format: str = "", preview: int | None = None,
                    stats: bool | None = None, db_key: str | None = None, target_path: str = "",
                    extra_data: Any = None, label_column: str | None = None, **meta: Any) -> DataItem:
        """Store a DataFrame whole (format 'csv' or 'parquet'), with a preview of its first rows
        (`preview`, 20) and per-column statistics. MLRun's arguments in MLRun's order; `tag`,
        `db_key` and `label_column` are kept in the meta; `local_path`, `artifact_path`, `upload`,
        `target_path` and `extra_data` are accepted and unused (bodies go to the content store)."""
        meta.update({name: value for name, value in (("tag", tag), ("db_key", db_key),
                                                     ("label_column", label_column)) if value})
        return self.log_artifact(DatasetArtifact(key, df, format=format or "csv",
                                                 preview_rows=20 if preview is None else preview,
                                                 stats=True if stats is None else stats,
                                                 labels=dict(labels or {})), **meta)

    def log_model(self, key: str, body: bytes | str | None = None, framework: str | None = None, tag: str = "",
                  model_dir: str | None = None, model_file: str | None = None, algorithm: str | None = None,
                  metrics: Mapping[str, Any] | None = None, parameters: Mapping[str, Any] | None = None,
                  artifact_path: str | None = None, upload: bool = True,
                  labels: Mapping[str, str] | None = None, db_key: str | None = None, **meta: Any) -> DataItem:
        """Store a model body, or the file `model_file` (in `model_dir` when given), with its
        metrics, parameters and framework. MLRun's arguments in MLRun's order; `tag`, `algorithm`
        and `db_key` are kept in the meta; `artifact_path` and `upload` are accepted and unused."""
        if model_dir and model_file:
            model_file = f"{model_dir.rstrip('/')}/{model_file}"
        meta.update({name: value for name, value in (("tag", tag), ("algorithm", algorithm),
                                                     ("db_key", db_key)) if value})
        model = ModelArtifact(key, body=body, model_file=model_file, metrics=dict(metrics or {}),
                              parameters=dict(parameters or {}), framework=framework,
                              labels=dict(labels or {}))
        return self.log_artifact(model, **meta)

    def set_annotation(self, key: str, value: Any, replace: bool = True) -> None:
        """MLRun's run annotation: kept on this context (`annotations`), not in the log (Runbus
        records labels, which runs are filtered by; an annotation is not one)."""
        if self._annotations is None:
            self._annotations = {}
        if replace or key not in self._annotations:
            self._annotations[key] = value

    @property
    def annotations(self) -> dict[str, Any]:
        """The annotations set on this context (MLRun's run annotations; not logged)."""
        return dict(self._annotations or {})

    # child iterations (MLRun's get_child_context) ----------------------------------------------

    def get_child_context(self, with_parent_params: bool = False, **params: Any) -> ChildContext:
        """A child iteration of this run (iteration 1, 2, ... in the order asked), started, with
        `params` (and this run's params first with `with_parent_params`). Use it as a context
        manager: leaving the block ends the child (completed, or error with the exception).
        `child.mark_as_best()` picks the best. When this run finishes, children still open are
        ended and this run records its iterations as a hyper-param sweep does: iteration_results,
        and with a best child, best_iteration and that child's results and artifacts."""
        if self.iteration != 0:
            raise ValueError(f"run {self.uid} is iteration {self.iteration}: an iteration cannot have children")
        if self._iterations_recorder is None:
            raise RuntimeError(f"run {self.uid} was made without an iterations recorder: it cannot have children")
        prepare = getattr(self._iterations_recorder, "prepare", None)
        if prepare is not None:
            prepare()  # loads what recording needs now: a script's run records them at exit
        with self._emit_lock:
            if self._finished:
                raise RunFinishedError(f"run {self.uid} has finished ({self.state}): no child can start")
            children = self._children = self._children or []
            child = ChildContext(
                self._writer, self._store, uid=uuid.uuid4().hex, name=self.name, project=self.project,
                handler=self.handler, runtime=self.runtime,
                params={**(self.parameters if with_parent_params else {}), **params}, inputs=self.inputs,
                input_digests=self._input_digests, secrets=self._secrets, labels=self.labels,
                parent_uid=self.uid, iteration=len(children) + 1, code_ref=self.code_ref,
                iterations_recorder=self._iterations_recorder, sign=self._sign)
            child._parent = self
            children.append(child)
        child.start()
        return child

    def mark_as_best(self) -> None:
        """Only a child iteration can be marked best (see get_child_context): ValueError here."""
        raise ValueError(f"run {self.uid} is not a child iteration: only a child can be marked as best")

    def _settle_children(self, error: BaseException | str | None, state: str | None) -> BaseException | str | None:
        """Before this run ends: end its open children as it ends, and record its iterations.
        Returns the run's error (a failure to record them when there was none)."""
        if not self._children:
            return error
        children, self._children = self._children, None
        for child in children:
            if child.state == "running":
                child.finish(error=None if error is None else f"parent run {self.uid} ended first",
                             state=state, flush=False)
        iterations = {c.iteration: (c.state, c.logged_parameters, dict(c.results)) for c in children}
        best = self._best_child
        artifacts = list(children[best - 1].artifacts.values()) if best else []
        try:
            assert self._iterations_recorder is not None  # checked when the first child was made
            self._iterations_recorder(self, iterations, best, artifacts)
        except Exception as exc:
            return error if error is not None else exc
        return error

    # internals --------------------------------------------------------------------------------

    def _json(self, kind: str, key: str, value: Any) -> tuple[str, str, Any]:
        """(key, JSON text, plain value) as logged: validated, secret values masked (in the key
        and in every string of the value, dict keys included)."""
        text, plain = to_json(kind, key, value, self._redact or None)
        return self._redact(key), text, plain

    def _plain(self, kind: str, key: str, value: Any, logged: Any) -> Any:
        """The value a handler sees: as given (numpy as Python), not masked."""
        return to_json(kind, key, value)[1] if self._redact else logged

    def _meta_json(self, key: str, meta: Mapping[str, Any]) -> str:
        """Artifact meta as JSON (anything not JSON-able as its str), checked like a result value."""
        try:
            plain = json.loads(json.dumps(meta, default=str))
        except (ValueError, RecursionError):
            raise InvalidValue(f"artifact {key!r}: meta cannot be logged (nests too deep or refers "
                               f"to itself)") from None
        return to_json("artifact", key, plain, self._redact or None)[0]

    @property
    def logged_parameters(self) -> dict[str, Any]:
        """The params as the log holds them (secret values masked)."""
        return dict(self._logged_params)

    # console output ----------------------------------------------------------------------------

    def log_output(self, stream: str, text: str) -> None:
        """Add console output (any part of a line) of `stream` ("stdout", "stderr" or "logger")
        to the run's log; thread-safe and cheap (see producers.console.RunOutput: lines are sent
        in batches, secret values masked). After the run finished it is dropped with a note on stderr."""
        if stream not in STREAMS:
            raise ValueError(f"log_output: stream {stream!r} is not one of {', '.join(sorted(STREAMS))}")
        if type(text) is not str:
            raise TypeError(f"log_output: text must be str, not {type(text).__name__}")
        self._output.write(stream, text)

    def flush_output(self) -> None:
        """Send the console output buffered so far (an unfinished line as a line of its own)."""
        self._output.flush()

    def _logger_line(self, level: int, text: str) -> None:
        self._output.write("logger", f"[{logging.getLevelName(level).lower()}] {text}\n")

    def _emit_log(self, payload: dict[str, Any], ts: float, text_chars: int) -> None:
        self._emit("log", payload, ts, text_chars=text_chars)

    def _emit(self, event_type: str, payload: dict[str, Any] | MetricPoint, ts: float | None = None, *,
              last: bool = False, text_chars: int = 0) -> None:
        # wait for room holding no lock; RunFinishedError names what was not logged
        self._writer.wait_for_room()
        with self._emit_lock:
            if self._finished:
                key = payload[0] if type(payload) is tuple else payload.get("key")
                what = event_type if key is None else f"{event_type} {key!r}"
                raise RunFinishedError(f"run {self.uid} has finished ({self.state}): {what} was not logged")
            self._writer.emit(self.uid, next(self._seq), event_type, payload, ts, self.stream, wait=False,
                              text_chars=text_chars)
            if last:
                self._finished = True

    def _heartbeat(self) -> None:
        # called while the run is tracked: from start() until finish() has its events on the bus
        self._writer.emit(self.uid, next(self._beat_seq), "heartbeat",
                          {"interval_s": self._writer.heartbeat_interval_s},
                          stream=self.heartbeat_stream, wait=False, urgent=True)

    def __repr__(self) -> str:
        return f"RunContext(name={self.name!r}, uid={self.uid!r}, state={self.state!r})"


class ChildContext(RunContext):
    """A child iteration of a run (`RunContext.get_child_context`): a context manager that ends the
    child when its block ends, and `mark_as_best()`."""

    _parent: RunContext

    def __enter__(self) -> ChildContext:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.state != "running":
            return
        aborted = exc is not None and not isinstance(exc, Exception)
        # the parent's end syncs the bus; a child's end need not wait for it (as a sweep iteration)
        self.finish(error=exc, state="aborted" if aborted else None, flush=False)

    def mark_as_best(self) -> None:
        """Make this child the parent's best iteration (the last one marked wins)."""
        self._parent._best_child = self.iteration


def _printable(text: str) -> str:
    """`text` with lone surrogates (from surrogateescape'd bytes) as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _bounded(text: str) -> str:
    """At most _MAX_ERROR_CHARS of `text`: its head and its tail, which holds the error itself."""
    if len(text) <= _MAX_ERROR_CHARS:
        return text
    half = _MAX_ERROR_CHARS // 2
    return f"{text[:half]}\n... ({len(text) - 2 * half} characters left out) ...\n{text[-half:]}"


def _items(call: str, mapping: object) -> list[tuple[Any, Any]]:
    """The (key, value) pairs of `mapping`; InvalidValue naming `call` when it is not a mapping."""
    if not isinstance(mapping, Mapping):
        raise InvalidValue(f"{call} takes a mapping of key -> value, got {type(mapping).__name__}")
    return list(mapping.items())
