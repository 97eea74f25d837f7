"""RunContext: what a handler receives. Every call on it becomes an event on the bus."""

from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
import time
import traceback as tb
import uuid
from collections.abc import Mapping
from typing import Any

import pandas as pd

from producers.artifact_store import ArtifactStore, check_artifact_key
from producers.artifacts import Artifact, DatasetArtifact, ModelArtifact
from producers.data_item import DataItem
from producers.values import check_key, to_json, to_number
from producers.writer import BackgroundWriter


class RunContext:
    """The run's identity, inputs and the logging calls of the MLRun context API."""

    def __init__(self, writer: BackgroundWriter, artifact_store: ArtifactStore, *, uid: str,
                 name: str, project: str = "default", handler: str = "", runtime: str = "local",
                 params: Mapping[str, Any] | None = None, inputs: Mapping[str, str] | None = None,
                 input_digests: Mapping[str, str] | None = None,
                 secrets: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None,
                 parent_uid: str | None = None, iteration: int = 0, code_ref: str | None = None,
                 extra: Mapping[str, Any] | None = None) -> None:
        self._writer = writer
        self._store = artifact_store
        # this context's own stream of the run's events: a resumed run, or the reaper writing
        # about it, never collides with the seq numbers of another process
        self.stream = uuid.uuid4().hex
        self._seq = itertools.count()
        # seq numbers must reach the writer in order; heartbeats come from the writer's thread
        self._emit_lock = threading.Lock()
        self.uid, self.name, self.project = uid, name, project
        self.handler, self.runtime = handler, runtime
        self.parent_uid, self.iteration, self.code_ref = parent_uid, iteration, code_ref
        self._params_json = {key: to_json("param", key, value)[0] for key, value in (params or {}).items()}
        self.parameters: dict[str, Any] = {k: json.loads(v) for k, v in self._params_json.items()}
        self.inputs: dict[str, str] = dict(inputs or {})
        self._input_digests = dict(input_digests or {})
        self._secrets = dict(secrets or {})
        self.labels: dict[str, str] = {k: str(v) for k, v in (labels or {}).items()}
        self._extra = {k: json.dumps(v) for k, v in (extra or {}).items()}
        self.results: dict[str, Any] = {}
        self.artifacts: dict[str, DataItem] = {}
        self.state = "created"
        self.error: str | None = None
        self.traceback: str | None = None
        self.return_value: Any = None
        self._started = 0.0
        self.logger = logging.getLogger(f"runbus.run.{name}")

    # lifecycle (called by the runtime) -------------------------------------------------------

    def start(self) -> None:
        """Emit run_started; params, inputs, secret keys and labels as given."""
        self._started = time.time()
        self.state = "running"
        self._emit("run_started", {
            "name": self.name, "project": self.project, "handler": self.handler,
            "runtime": self.runtime, "params": self._params_json, "inputs": self.inputs,
            "input_digests": self._input_digests, "secret_keys": sorted(self._secrets),
            "labels": self.labels, "parent_uid": self.parent_uid, "iteration": self.iteration,
            "host": socket.gethostname(), "code_ref": self.code_ref, "extra": self._extra,
            "heartbeat_interval_s": self._writer.heartbeat_interval_s,
        })
        self._writer.track(self.uid, self._heartbeat)

    def resume(self) -> None:
        """Continue a run started by another process (on this context's own stream)."""
        self._started = time.time()
        self.state = "running"
        self._writer.track(self.uid, self._heartbeat)

    def finish(self, return_value: Any = None, error: BaseException | str | None = None,
               state: str | None = None, flush: bool = True) -> None:
        """Emit run_finished and (with `flush`) wait until everything the run logged is on the bus.

        `error` is the exception that ended the run, or a message when no exception did.
        """
        self._writer.untrack(self.uid)
        return_json = None
        if error is None and return_value is not None:
            try:
                return_json, self.return_value = to_json("result", "return", return_value)
            except TypeError as exc:
                error = exc
            else:
                self._emit("result", {"key": "return", "value": return_json})
                self.results["return"] = self.return_value
        if isinstance(error, str):
            self.error = error
        elif error is not None:
            self.error = f"{type(error).__name__}: {error}"
            self.traceback = "".join(tb.format_exception(error))
        self.state = state or ("error" if error is not None else "completed")
        self._emit("run_finished", {
            "state": self.state, "error": self.error, "traceback": self.traceback,
            "return_value": return_json, "duration_s": time.time() - self._started})
        if flush:
            self._writer.flush()

    def request_iterations(self, requests: list[tuple[int, Mapping[str, Any]]]) -> None:
        """Ask for sweep iterations: one iteration_requested event per (iteration, params)."""
        for iteration, params in requests:
            encoded = {key: to_json("param", key, value)[0] for key, value in params.items()}
            self._emit("iteration_requested", {"iteration": iteration, "params": encoded})
        self._writer.flush()

    # params, secrets, inputs ------------------------------------------------------------------

    def get_param(self, key: str, default: Any = None) -> Any:
        """The param's value; a missing one takes `default`, which is recorded as a param."""
        if key in self.parameters:
            return self.parameters[key]
        text, value = to_json("param", key, default)
        self.parameters[key] = value
        self._emit("param", {"key": key, "value": text})
        return value

    def get_secret(self, key: str, default: str | None = None) -> str | None:
        """The secret's value (never logged); `default` when the run was given no such key."""
        return self._secrets.get(key, default)

    def get_input(self, key: str) -> DataItem:
        if key not in self.inputs:
            known = ", ".join(sorted(self.inputs)) or "none"
            raise KeyError(f"input {key!r} was not given to this run (inputs: {known})")
        return DataItem(key, self.inputs[key], sha256=self._input_digests.get(key), kind="input")

    # results, metrics, labels ----------------------------------------------------------------

    def log_result(self, key: str, value: Any) -> None:
        text, plain = to_json("result", key, value)
        self._emit("result", {"key": key, "value": text})
        self.results[key] = plain

    def log_results(self, results: Mapping[str, Any]) -> None:
        """Log several results; all are validated before any is logged."""
        encoded = [(key, *to_json("result", key, value)) for key, value in results.items()]
        for key, text, plain in encoded:
            self._emit("result", {"key": key, "value": text})
            self.results[key] = plain

    def log_metric(self, key: str, value: float, step: int | None = None,
                   timestamp: float | None = None) -> None:
        number = to_number("metric", key, value)
        if step is not None:
            step = int(step)
        now = time.time()
        payload = {"key": key, "value": number, "step": step,
                   "timestamp": now if timestamp is None else float(timestamp)}
        self._emit("metric", payload, now)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None,
                    timestamp: float | None = None) -> None:
        numbers = {key: to_number("metric", key, value) for key, value in metrics.items()}
        for key, number in numbers.items():
            self.log_metric(key, number, step, timestamp)

    def set_label(self, key: str, value: Any, replace: bool = True) -> None:
        check_key("label", key)
        if not replace and key in self.labels:
            return
        self.labels[key] = str(value)
        self._emit("label", {"key": key, "value": str(value)})

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
        data = artifact.render()
        stored = self._store.put_file(artifact.local_path) if data is None else self._store.put_bytes(data)
        for name, (extra_data, extra_format) in artifact.extra_bodies().items():
            extra = self._store.put_bytes(extra_data)
            artifact.meta[name] = {"uri": extra.uri, "sha256": extra.sha256, "format": extra_format}
        meta_json = json.dumps(artifact.meta, default=str)
        labels_str = {str(k): str(v) for k, v in artifact.labels.items()}
        self._emit("artifact", {
            "key": artifact.key, "kind": artifact.kind, "uri": stored.uri,
            "sha256": stored.sha256, "size": stored.size, "format": artifact.format,
            "labels": labels_str, "meta": meta_json})
        logged = DataItem(artifact.key, stored.uri, artifact.format, artifact.kind, stored.sha256,
                          stored.size, labels_str, json.loads(meta_json))
        self.artifacts[artifact.key] = logged
        return logged

    def log_dataset(self, key: str, df: pd.DataFrame, format: str = "csv", preview: int = 20,
                    stats: bool = True, labels: Mapping[str, str] | None = None,
                    **meta: Any) -> DataItem:
        """Store a DataFrame whole, with a preview of its first rows and per-column statistics."""
        return self.log_artifact(DatasetArtifact(key, df, format=format, preview_rows=preview,
                                                 stats=stats, labels=dict(labels or {})), **meta)

    def log_model(self, key: str, body: bytes | str | None = None, model_file: str | None = None,
                  metrics: Mapping[str, Any] | None = None,
                  parameters: Mapping[str, Any] | None = None,
                  labels: Mapping[str, str] | None = None, framework: str | None = None,
                  **meta: Any) -> DataItem:
        model = ModelArtifact(key, body=body, model_file=model_file, metrics=dict(metrics or {}),
                              parameters=dict(parameters or {}), framework=framework,
                              labels=dict(labels or {}))
        return self.log_artifact(model, **meta)

    # internals --------------------------------------------------------------------------------

    def _emit(self, event_type: str, payload: dict[str, Any], ts: float | None = None) -> None:
        with self._emit_lock:
            self._writer.emit(self.uid, next(self._seq), event_type, payload, ts, self.stream)

    def _heartbeat(self) -> None:
        self._emit("heartbeat", {"interval_s": self._writer.heartbeat_interval_s})

    def __repr__(self) -> str:
        return f"RunContext(name={self.name!r}, uid={self.uid!r}, state={self.state!r})"
