"""RunObject: what `function.run()` returns, with MLRun's views of it (`status`, `metadata`, `spec`,
`output()`, `uid()`, `state()`, `to_dict()`, `logs()`) over the same fields."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from producers.context import RunContext
from producers.data_item import DataItem

if TYPE_CHECKING:
    from rich.console import Console

    from projections.query import RunDB


class CallableText(str):
    """A str that also answers a call with itself: `run.uid` is Runbus's attribute and `run.uid()`
    MLRun's method, both the same text (likewise `run.state`)."""

    def __call__(self) -> str:
        return str(self)


@dataclass
class RunObject:
    uid: str
    name: str
    project: str
    state: str
    results: dict[str, Any] = field(default_factory=dict)
    artifacts_by_key: dict[str, DataItem] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None
    iteration: int = 0
    handler: str = ""
    inputs: dict[str, str] = field(default_factory=dict)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("uid", "state") and isinstance(value, str):
            value = CallableText(value)
        super().__setattr__(name, value)

    @classmethod
    def from_context(cls, context: RunContext) -> RunObject:
        """The run as its context logged it (secret values masked, as in the log)."""
        return cls(context.uid, context.name, context.project, context.state, dict(context.results),
                   dict(context.artifacts), dict(context.labels), context.logged_parameters,
                   context.error, context.traceback, context.iteration, context.handler,
                   {key: context.mask_secrets(uri) for key, uri in context.inputs.items()})

    @classmethod
    def from_record(cls, record: dict[str, Any], store_root: str | None = None) -> RunObject:
        """A run object from a projection record (`RunDB.read_run`)."""
        artifacts = {a["key"]: DataItem(a["key"], a["uri"], a["format"], a["kind"], a["sha256"],
                                        a["size"], a["labels"], a["meta"], store_root)
                     for a in record["artifacts"]}
        return cls(record["uid"], record["name"], record["project"], record["state"],
                   dict(record["results"]), artifacts, dict(record["labels"]), dict(record["params"]),
                   record["error"] if isinstance(record["error"], str) else None,
                   record["traceback"] if isinstance(record["traceback"], str) else None,
                   int(record["iteration"]), str(record.get("handler") or ""), dict(record.get("inputs") or {}))

    @property
    def outputs(self) -> dict[str, Any]:
        """Results and artifact URIs in one mapping, as MLRun's run.outputs."""
        return {**self.results, **{key: item.uri for key, item in self.artifacts_by_key.items()}}

    def output(self, key: str) -> Any:
        """MLRun's run.output(key): the result `key` (a handler's return value is 'return'), else
        the URI of the artifact `key`, else None."""
        if key in self.results:
            return self.results[key]
        item = self.artifacts_by_key.get(key)
        return item.uri if item is not None else None

    @property
    def artifacts(self) -> list[dict[str, Any]]:
        return [{"key": a.key, "kind": a.kind, "uri": a.uri, "sha256": a.sha256, "size": a.size,
                 "format": a.format, "labels": a.labels} for a in self.artifacts_by_key.values()]

    def artifact(self, key: str) -> DataItem:
        if key not in self.artifacts_by_key:
            known = ", ".join(self.artifacts_by_key) or "none"
            raise KeyError(f"run {self.uid} has no artifact {key!r} (artifacts: {known})")
        return self.artifacts_by_key[key]

    # MLRun's views ------------------------------------------------------------------------------

    @property
    def metadata(self) -> SimpleNamespace:
        """MLRun's run.metadata: uid, name, project, labels, iteration (a snapshot)."""
        return SimpleNamespace(uid=str(self.uid), name=self.name, project=self.project, labels=dict(self.labels),
                               iteration=self.iteration)

    @property
    def spec(self) -> SimpleNamespace:
        """MLRun's run.spec: parameters, inputs, handler (a snapshot)."""
        return SimpleNamespace(parameters=dict(self.parameters), inputs=dict(self.inputs), handler=self.handler)

    @property
    def status(self) -> SimpleNamespace:
        """MLRun's run.status: state, results, error, artifacts (MLRun-shaped dicts: kind,
        metadata.key, spec.target_path...) and iterations (a header row, then a row per
        iteration; empty for a run that has none). A snapshot."""
        return SimpleNamespace(state=str(self.state), results=dict(self.results), error=self.error,
                               artifacts=[self._mlrun_artifact(item) for item in self.artifacts_by_key.values()],
                               iterations=self._iterations())

    def _mlrun_artifact(self, item: DataItem) -> dict[str, Any]:
        return item.mlrun_dict(self.project, self.iteration, str(self.uid))

    def _iterations(self) -> list[list[Any]]:
        table = self.artifacts_by_key.get("iteration_results")
        if table is None:
            return []
        from engine.sweep.summary import iterations_rows  # pandas and the sweep code only when asked

        header, *rows = iterations_rows(table.as_df())
        for column in range(len(header)):
            cells = [row[column] for row in rows]
            # a column with a missing cell is read as floats: 1 comes back as 1.0 (the CSV writes
            # it so), and whole numbers there were ints when logged far more often than not
            if None in cells and all(type(cell) is float and cell.is_integer() for cell in cells if cell is not None):
                for row in rows:
                    row[column] = None if row[column] is None else int(row[column])
        return [header, *rows]

    def to_dict(self) -> dict[str, Any]:
        """The run in MLRun's shape: {'metadata': ..., 'spec': ..., 'status': ...}."""
        return {"metadata": vars(self.metadata), "spec": vars(self.spec),
                "status": {**vars(self.status), "traceback": self.traceback}}

    def logs(self, watch: bool = True, db: RunDB | None = None, offset: int = 0) -> str:
        """Print the run's console output (from character `offset`, through `db` or `get_run_db()`)
        with terminal control characters shown as escapes, as `runbus logs` prints it, and return
        it as the log holds it. MLRun's `watch` is accepted: a run object is made when its run has
        ended."""
        from engine.terminal import neutral

        if db is None:
            from engine.api import get_run_db

            db = get_run_db()
        _state, text = db.get_log(str(self.uid), offset)
        print(neutral(text), end="" if text.endswith("\n") or not text else "\n")
        return text

    def show(self, console: Console | None = None) -> None:
        """Print a summary of the run (state, params, results, labels, artifacts, error) as plain
        text: markup and terminal control characters in user data are printed literally."""
        from rich.table import Table

        from engine.terminal import literal, plain_console

        table = Table(title=literal(f"run {self.name} ({self.uid})"), show_header=False)
        rows = [("state", self.state), ("params", json.dumps(self.parameters, default=str)),
                ("results", json.dumps(self.results, default=str)), ("labels", json.dumps(self.labels)),
                ("artifacts", ", ".join(self.artifacts_by_key) or "-")]
        if self.error:
            rows.append(("error", self.error))
        for name, value in rows:
            table.add_row(name, literal(value))
        (console or plain_console()).print(table)

    def _repr_html_(self) -> str:
        """The run as a card in the web UI's look (state, params, results, labels, artifacts)."""
        from engine.ui.render import run_html

        return run_html(self)

    def __repr__(self) -> str:
        return f"RunObject(name={self.name!r}, uid={self.uid!r}, state={self.state!r}, results={self.results!r})"
