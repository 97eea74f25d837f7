"""Rerun a recorded run from its run_started event: same handler, params, inputs, labels, secrets."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from engine.bootstrap import services
from engine.loader import load_handler
from engine.run import RunObject
from engine.runspec import RunSpec
from engine.runtimes import local
from engine.secrets import SecretSource, from_environment, resolve_all
from producers.artifact_store import file_sha256
from producers.data_item import DataItem


class InputChanged(ValueError):
    """An input's content differs from what the recorded run read (with strict=True)."""


def rerun(uid: str, params: Mapping[str, Any] | None = None, strict: bool = False,
          secrets: Sequence[SecretSource] = ()) -> RunObject:
    """Execute run `uid` again in this process; the new run records `rerun_of`.

    Inputs are checked against their recorded sha256: a change is a warning, or InputChanged
    with `strict`. Secret values come from `secrets`, then the environment, by recorded key.
    """
    svc = services()
    db = svc.run_db()
    record = db.read_run(uid)
    started = json.loads(db.sql("SELECT payload FROM events WHERE run_uid = ? AND type = 'run_started'",
                                [record["uid"]]).payload[0])
    _check_inputs(record["uid"], started["inputs"], started["input_digests"], strict)
    values = {**from_environment(started["secret_keys"]), **resolve_all(secrets)}
    missing = [key for key in started["secret_keys"] if key not in values]
    if missing:
        warnings.warn(f"rerun of {record['uid']}: no value for secret(s) {', '.join(missing)}", stacklevel=2)
    recorded_params = {key: json.loads(value) for key, value in started["params"].items()}
    handler = load_handler(started["handler"])
    spec = RunSpec(svc.settings, handler, started["handler"], started["name"], started["project"], "local",
                   {**recorded_params, **(params or {})}, started["inputs"], started["input_digests"],
                   {k: v for k, v in values.items() if k in started["secret_keys"]}, started["labels"],
                   started["code_ref"], extra={"rerun_of": record["uid"]})
    context = spec.new_context()
    local.execute(handler, context)
    return RunObject.from_context(context)


def _check_inputs(uid: str, inputs: Mapping[str, str], digests: Mapping[str, str], strict: bool) -> None:
    for key, uri in inputs.items():
        recorded = digests.get(key)
        if recorded is None:
            continue
        path = DataItem(key, uri).local()
        try:
            current = file_sha256(path)
        except FileNotFoundError:
            current = "missing"
        if current != recorded:
            message = (f"input {key!r} ({path}) changed since run {uid}: sha256 {recorded[:12]}... "
                       f"is now {current[:12]}")
            if strict:
                raise InputChanged(message)
            warnings.warn(message, stacklevel=3)
