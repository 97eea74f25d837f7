"""RunObject: what `function.run()` returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from producers.context import RunContext
from producers.data_item import DataItem

if TYPE_CHECKING:
    from rich.console import Console


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

    @classmethod
    def from_context(cls, context: RunContext) -> RunObject:
        """The run as its context logged it (secret values masked, as in the log)."""
        return cls(context.uid, context.name, context.project, context.state, dict(context.results),
                   dict(context.artifacts), dict(context.labels), context.logged_parameters,
                   context.error, context.traceback, context.iteration)

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
                   int(record["iteration"]))

    @property
    def outputs(self) -> dict[str, Any]:
        """Results and artifact URIs in one mapping, as MLRun's run.outputs."""
        return {**self.results, **{key: item.uri for key, item in self.artifacts_by_key.items()}}

    @property
    def artifacts(self) -> list[dict[str, Any]]:
        return [{"key": a.key, "kind": a.kind, "uri": a.uri, "sha256": a.sha256, "size": a.size,
                 "format": a.format, "labels": a.labels} for a in self.artifacts_by_key.values()]

    def artifact(self, key: str) -> DataItem:
        if key not in self.artifacts_by_key:
            known = ", ".join(self.artifacts_by_key) or "none"
            raise KeyError(f"run {self.uid} has no artifact {key!r} (artifacts: {known})")
        return self.artifacts_by_key[key]

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
