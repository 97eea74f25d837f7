"""Rerun a recorded run from its run_started event: same handler, params, inputs, labels, secrets.

What a run_started says is data someone wrote to the log, not an instruction to run code: the
handler it names is loaded only when it is trusted (see `handler_distrust`) or the caller says
`trust=True` (`--trust`).
"""

from __future__ import annotations

import hmac
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.archive import IMPORTED_FROM
from engine.bootstrap import Services
from engine.loader import (
    RunSigner,
    code_mac,
    describe_handler,
    handler_source,
    load_handler,
    parse_code_ref,
    recorded_run_mac,
)
from engine.run import RunObject
from engine.runspec import RunSpec
from engine.runtimes import local
from engine.secrets import SecretSource, from_environment, resolve_all
from producers.artifact_store import file_sha256
from producers.data_item import DataItem


class InputChanged(ValueError):
    """An input's content differs from what the recorded run read (with strict=True)."""


class UntrustedRun(ValueError):
    """A recorded run's handler is not known to be this home's own code; running it needs --trust."""


def rerun(svc: Services, uid: str, params: Mapping[str, Any] | None = None, strict: bool = False,
          secrets: Sequence[SecretSource] = (), trust: bool = False) -> RunObject:
    """Execute run `uid` again in this process, read and recorded through `svc`; the new run
    records `rerun_of`.

    Without `trust`, raises UntrustedRun (before loading anything) unless the handler is this
    home's own code, unchanged (`check_handler_trusted`). Inputs are checked against their recorded
    sha256: a change is a warning, or InputChanged with `strict`. Secret values come from
    `secrets`, then the environment, by recorded key.
    """
    db = svc.run_db()
    record = db.read_run(uid)
    started = json.loads(db.sql("SELECT payload FROM events WHERE run_uid = ? AND type = 'run_started'",
                                [record["uid"]]).payload[0])
    # trust first: the recorded input paths come from the log too, and hashing one may never end
    vouched = check_handler_trusted(started, trust, record["uid"], svc.settings.home)
    _check_inputs(record["uid"], started["inputs"], started["input_digests"], strict)
    values = {**from_environment(started["secret_keys"]), **resolve_all(secrets)}
    missing = [key for key in started["secret_keys"] if key not in values]
    if missing:
        warnings.warn(f"rerun of {record['uid']}: no value for secret(s) {', '.join(missing)}", stacklevel=2)
    recorded_params = {key: json.loads(value) for key, value in started["params"].items()}
    handler = load_handler(started["handler"])
    reference, code_ref = describe_handler(handler, svc.settings.home)  # the code that runs now
    spec = RunSpec(svc.settings, handler, reference, started["name"], started["project"], "local",
                   {**recorded_params, **(params or {})}, started["inputs"], started["input_digests"],
                   {k: v for k, v in values.items() if k in started["secret_keys"]}, started["labels"],
                   code_ref, extra={"rerun_of": record["uid"]}, signed=vouched)
    context = spec.new_context(svc)
    local.execute(handler, context, capture_console=spec.settings.capture_console)
    return RunObject.from_context(context)


def check_handler_trusted(started: Mapping[str, Any], trust: bool, run_uid: str, home: Path) -> bool:
    """Raise UntrustedRun unless `trust` or the run_started payload `started` of run `run_uid` names a
    handler the Runbus home `home` may load (see `handler_distrust`); whether home vouches for it
    (False: only `trust` let it through, so what runs from it must not be signed as this home's own,
    or a rerun of the rerun would need no --trust). Nothing of the handler is run by this check."""
    reason = handler_distrust(started, home, run_uid)
    if reason and trust:
        return False
    if reason:
        raise UntrustedRun(f"run {run_uid or '?'}: will not load handler {started.get('handler')!r}: {reason}; "
                           f"pass --trust (trust=True) to run it anyway")
    return True


def handler_distrust(started: Mapping[str, Any], home: Path, run_uid: str) -> str | None:
    """Why the handler of run_started payload `started` is not trusted, or None when it is: the run
    was not imported, its code reference carries home's MAC over (handler, source path, sha256), the
    handler still loads from that very file, whose bytes still hash to that sha256, and the payload
    carries home's signature over run `run_uid` and what it ran with (`RunSigner`: params, inputs,
    secret keys, runtime, code reference...), so none of it was written by anyone else. A module:function
    handler is held to the same rule as a file handler (its module's source file)."""
    reference = str(started.get("handler") or "")
    extra = started.get("extra") or {}
    if IMPORTED_FROM in extra:
        return f"the run was imported (from {_json_text(extra[IMPORTED_FROM])}), so its handler is another machine's"
    code = parse_code_ref(started.get("code_ref"))
    if code is None:
        return "the run recorded no code digest for it"
    source = handler_source(reference)
    if source is None:
        return "it is not loadable from a source file on this machine"
    if source != Path(code.path).resolve():
        return f"it loads from {source} here, not from the recorded {code.path}"
    try:
        current = file_sha256(source)
    except OSError as exc:
        return f"its source {source} cannot be read: {exc.strerror}"
    if current != code.sha256:
        return f"its source {source} changed since the run (sha256 {code.sha256[:12]}... is now {current[:12]}...)"
    if code.mac is None or not hmac.compare_digest(code.mac, code_mac(home, reference, code.path, code.sha256)):
        return ("its code reference was not recorded by this Runbus home (the run reached the log from "
                "another home, machine or process)")
    if recorded_run_mac(started) is None:
        return ("the run carries no signature over its params and inputs (it was recorded before Runbus signed "
                "them, or not by Runbus)")
    if not RunSigner(home).signed(run_uid, started):
        return ("its params, inputs, secret keys or code reference are not the ones this Runbus home recorded "
                "for this run (its signature does not match them)")
    return None


def _json_text(value: object) -> str:
    try:
        return str(json.loads(str(value)))
    except ValueError:
        return str(value)


def _check_inputs(uid: str, inputs: Mapping[str, str], digests: Mapping[str, str], strict: bool) -> None:
    for key, uri in inputs.items():
        recorded = digests.get(key)
        if recorded is None:
            continue
        path = DataItem(key, uri, kind="input").local()
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
