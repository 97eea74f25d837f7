"""The `runbus` command line.

Its composition root is `_build_services`: the typer callback builds the command's Services once
from the environment's settings and closes them when the command ends; every command takes them
from its context (`_svc(ctx)`) and passes them down.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from engine.bootstrap import Services, bootstrap
from engine.terminal import json_escaped, literal, neutral, plain_console

if TYPE_CHECKING:  # the commands import what they use: `project --follow` stays small
    import pandas as pd

    from engine.run import RunObject

app = typer.Typer(help="Runbus: experiment tracking as an event log.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
console = plain_console()
errors = plain_console(stderr=True)
LOG_LINES_PER_READ = 10_000  # `runbus logs` reads a run's lines in pages of this many
LOG_POLL_S = 0.5  # how often `runbus logs --follow` looks for new lines


@app.callback()
def _build_services(ctx: typer.Context) -> None:
    # the command's services, built once from the environment and closed when the command ends
    svc = bootstrap()
    ctx.obj = svc
    ctx.call_on_close(svc.close)


def _svc(ctx: typer.Context) -> Services:
    """The services the callback built for this command."""
    found = ctx.find_object(Services)
    if found is None:
        raise RuntimeError(f"runbus {ctx.command_path}: no services were built for the command")
    return found


def json_text(value: Any) -> str:
    """Indented, valid JSON (NaN and infinities as null); control characters escaped."""
    text = json.dumps(_finite(value), indent=2, ensure_ascii=False, allow_nan=False, default=str)
    return json_escaped(text)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalar
        return _finite(value.item())
    return value


def _parse_value(text: str) -> Any:
    """'5' -> 5, '0.1' -> 0.1, 'true' -> True, '[1,2]' -> [1, 2], anything else stays a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{what} {item!r} must look like key=value")
        pairs[key] = value
    return pairs


def print_frame(frame: pd.DataFrame, fmt: str = "table", title: str | None = None) -> None:
    """Print a DataFrame as a rich table, CSV or JSON records."""
    if fmt == "csv":
        text = frame.to_csv(index=False)
        sys.stdout.write(neutral(text) if sys.stdout.isatty() else text)  # a file gets the data as it is
    elif fmt == "json":
        sys.stdout.write(frame.to_json(orient="records", date_format="iso", default_handler=str) + "\n")
    elif fmt == "table":
        table = Table(title=literal(title) if title else None)
        for column in frame.columns:
            table.add_column(literal(column), overflow="fold")
        for row in frame.itertuples(index=False):
            table.add_row(*(Text("") if _is_missing(v) else literal(v) for v in row))
        # piped (make demo, CI logs): rich would assume 80 columns and fold every cell
        (console if console.is_terminal else Console(width=160, markup=False, highlight=False)).print(table)
    else:
        raise typer.BadParameter(f"format {fmt!r} is not one of table, csv, json")


def _is_missing(value: Any) -> bool:
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


@app.command()
def run(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="FILE.py:HANDLER, module:handler, or a script FILE.py")],
    args: Annotated[list[str] | None, typer.Argument(help="the script's own arguments (after --)")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="key=value (JSON values parsed)")] = None,
    name: Annotated[str | None, typer.Option(help="run name (default: the handler's name)")] = None,
    label: Annotated[list[str] | None, typer.Option(help="key=value label")] = None,
    input: Annotated[list[str] | None, typer.Option("--input", "-i", help="key=path input")] = None,
    secrets: Annotated[Path | None, typer.Option(help="file of KEY=VALUE secrets")] = None,
    hyper: Annotated[list[str] | None, typer.Option(help="sweep: key=v1,v2,... (repeat per param)")] = None,
    selector: Annotated[str | None, typer.Option(help="best iteration: min.<result> or max.<result>")] = None,
    strategy: Annotated[str, typer.Option(help="grid, list or random")] = "grid",
    max_iterations: Annotated[int | None, typer.Option(help="iterations of a random sweep")] = None,
    stop_condition: Annotated[str | None, typer.Option(help="e.g. 'accuracy >= 0.9'")] = None,
    parallel_runs: Annotated[int | None, typer.Option(help="iterations at once")] = None,
    runtime: Annotated[str | None, typer.Option(help="dask:// or dask://host:port (default: in-process)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Run a handler once (or a sweep with --hyper) and print its results. A script FILE.py (no
    :HANDLER) runs in a subprocess as one run, with ARGS; its get_or_create_ctx joins that run."""
    from engine.function import Function
    from engine.task import RunTemplate

    svc = _svc(ctx)

    task = RunTemplate(handler=target, name=name,
                       params={k: _parse_value(v) for k, v in _pairs(param, "param").items()},
                       inputs=_pairs(input, "input"), labels=_pairs(label, "label"))
    if secrets:
        task.with_secrets("file", str(secrets))
    script = target.endswith(".py") and ":" not in target
    if script or args:
        if not script:
            raise typer.BadParameter(f"{target!r} takes no arguments: only a script FILE.py does")
        if hyper or runtime:
            raise typer.BadParameter("--hyper and --runtime need a handler: FILE.py:HANDLER")
        from engine.run import RunObject
        from engine.runtimes.command import run_script
        from engine.script import Terminated

        try:
            context = run_script(svc, target, args or [], task)
        except Terminated:
            errors.print("runbus: terminated by SIGTERM: the script was stopped and its run recorded aborted")
            raise typer.Exit(128 + signal.SIGTERM) from None
        # the run as the log holds it: the script's own process logged its results
        _finish(RunObject.from_record(svc.run_db().read_run(context.uid), str(svc.artifact_store.root)))
        return
    if hyper:
        values = {k: [_parse_value(x) for x in v.split(",")] for k, v in _pairs(hyper, "hyper").items()}
        task.with_hyper_params(values, selector, strategy, max_iterations=max_iterations,
                               stop_condition=stop_condition, parallel_runs=parallel_runs, quiet=quiet)
    result = Function(command=runtime, svc=svc).run(task)
    _finish(result)


@app.command()
def resume(
    ctx: typer.Context,
    parent_uid: Annotated[str, typer.Argument(help="uid (or prefix) of the sweep's parent run")],
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    trust: Annotated[bool, typer.Option(help="run the handler and runtime the log names even when they "
                                             "are not this home's own (imported or changed code)")] = False,
) -> None:
    """Finish a sweep whose driver died: run only the iterations that never finished."""
    from engine.rerun import UntrustedRun
    from engine.run import RunObject
    from engine.sweep.runner import resume_sweep

    try:
        resumed = resume_sweep(_svc(ctx), parent_uid, quiet=quiet, trust=trust)
    except UntrustedRun as exc:
        errors.print(literal(f"error: {exc}"))
        raise typer.Exit(2) from None
    _finish(RunObject.from_context(resumed))


def _finish(result: RunObject) -> None:
    """Show the run (its error and traceback among the rest); one line on stderr and status 1 when
    it did not complete (a script's own traceback is on stderr already, as it wrote it)."""
    result.show(console)
    if result.state != "completed":
        errors.print(literal(f"error: run {result.name} ({result.uid[:8]}) ended in state {result.state}"
                             + _error_line(result.error)))
        raise typer.Exit(1)


def _error_line(error: str | None) -> str:
    """': ' and a run's error on one line: its first line, and for a command that exited with a
    status, the last line it wrote (its exception, as a rule) too."""
    lines = [line.strip() for line in (error or "").strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if lines[0].startswith("command exited") and len(lines) > 1:
        return f": {lines[0]}: {lines[-1]}"
    return f": {lines[0]}"


@app.command()
def runs(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option(help="only runs with this name")] = None,
    label: Annotated[list[str] | None, typer.Option(help="key or key=value")] = None,
    state: Annotated[str | None, typer.Option(help="running, completed, error, ...")] = None,
    project: Annotated[str | None, typer.Option()] = None,
    parent: Annotated[str | None, typer.Option(help="only the iterations of this sweep (a uid or a unique "
                                                    "prefix of it)")] = None,
    since: Annotated[str | None, typer.Option(help="started at or after this time (ISO 8601, UTC unless it "
                                                   "says otherwise)")] = None,
    until: Annotated[str | None, typer.Option(help="started before this time (ISO 8601)")] = None,
    sort: Annotated[str | None, typer.Option(help="a runs column, result.<key> or param.<key>; '-' in front "
                                                  "for descending (default: newest first)")] = None,
    limit: Annotated[int, typer.Option(help="at most this many runs")] = 50,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
) -> None:
    """List runs, newest first (or as --sort says)."""
    frame = _svc(ctx).run_db().list_runs(name=name, project=project, labels=label, state=state, parent=parent,
                                         since=since, until=until, sort_by=sort, limit=limit)
    columns = ["uid", "name", "iteration", "state", "labels", "started_at", "duration_s"]
    shown = frame[columns].copy()
    if fmt == "json":  # labels as an object, not JSON text inside the JSON
        shown["labels"] = [json.loads(x) if isinstance(x, str) else {} for x in shown["labels"]]
    if fmt == "table":
        shown["uid"] = shown["uid"].str[:8]
        shown["duration_s"] = shown["duration_s"].round(2)
        shown["started_at"] = shown["started_at"].astype(str).str[5:19]
        shown["labels"] = [", ".join(f"{k}={v}" for k, v in json.loads(x).items()) if isinstance(x, str) else ""
                           for x in shown["labels"]]
        shown = shown.rename(columns={"iteration": "iter", "duration_s": "secs", "started_at": "started"})
    print_frame(shown, fmt, title=f"runs ({len(frame)})")


@app.command()
def show(ctx: typer.Context, uid: Annotated[str, typer.Argument(help="run uid or a unique prefix of it")]) -> None:
    """Show one run: state, params, results, labels, note, artifacts, last metric values and the
    history of its edits (amendments)."""
    record = _editor(ctx).read_run(uid)
    sys.stdout.write(json_text(record) + "\n")


@app.command()
def logs(
    ctx: typer.Context,
    uid: Annotated[str, typer.Argument(help="run uid or a unique prefix of it")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="print new lines as they come, until the "
                                                               "run ends")] = False,
) -> None:
    """Print a run's console output (stdout, stderr and its logger, in order); control characters in it
    are shown as escapes. With --follow, wait for more until the run is no longer running."""
    db = _svc(ctx).run_db()
    after, full = 0, uid
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            full, state, lines = db.log_lines(full, after, LOG_LINES_PER_READ)
            if len(lines):
                sys.stdout.write("".join(neutral(text) + "\n" for text in lines.text))
                sys.stdout.flush()
                after = int(lines.line_no.iloc[-1])
            if len(lines) < LOG_LINES_PER_READ and (not follow or state != "running"):
                return
            if len(lines) < LOG_LINES_PER_READ:
                time.sleep(LOG_POLL_S)
    except KeyboardInterrupt:
        pass


@app.command()
def sql(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="a read-only SQL query over the projection tables")],
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
    as_of: Annotated[str | None, typer.Option("--as-of", help="an events.position or a time (UTC if no zone)")] = None,
) -> None:
    """Run read-only SQL over runs, params, results, metrics, labels, artifacts, events."""
    print_frame(_svc(ctx).run_db(as_of).sql(query), fmt)


@app.command()
def rerun(
    ctx: typer.Context,
    uid: Annotated[str, typer.Argument(help="the run to execute again (uid or unique prefix)")],
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="override: key=value")] = None,
    strict: Annotated[bool, typer.Option(help="fail when an input changed since the run")] = False,
    secrets: Annotated[Path | None, typer.Option(help="file of KEY=VALUE secrets")] = None,
    trust: Annotated[bool, typer.Option(help="run it even if its handler or its origin (an import) is not "
                                             "verified here: this executes code the log names")] = False,
) -> None:
    """Execute a recorded run again: same handler, params, inputs, labels and secret keys."""
    from engine.rerun import UntrustedRun
    from engine.rerun import rerun as rerun_run
    from engine.secrets import SecretSource

    sources = [SecretSource("file", str(secrets))] if secrets else []
    overrides = {k: _parse_value(v) for k, v in _pairs(param, "param").items()}
    try:
        result = rerun_run(_svc(ctx), uid, overrides, strict, sources, trust=trust)
    except UntrustedRun as exc:
        errors.print(Text("error: ", style="red") + literal(one_line(exc)))
        raise typer.Exit(2) from None
    _finish(result)


@app.command("export")
def export_cmd(
    ctx: typer.Context,
    run: Annotated[list[str] | None, typer.Option("--run", help="only this run (a uid or a unique prefix of it) "
                                                                   "and its iterations; repeat for more")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="file to write (default: stdout)")] = None,
    with_artifacts: Annotated[Path | None, typer.Option(help="also write the artifact bodies to this .tar.gz")] = None,
) -> None:
    """Write events as an Avro object container file."""
    from engine.archive import bundle_artifacts, export_events, selected_events

    svc = _svc(ctx)
    svc.writer.flush()
    # a prefix names one run (a deleted one too: it may be exported before a purge), or it is an error
    uids = [_editor(ctx).full_uid(uid, deleted_too=True) for uid in run or []]
    events = selected_events(svc.bus, svc.codec, uids)
    if out is None:
        exported = export_events(events, svc.codec, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        with out.open("wb") as target:
            exported = export_events(events, svc.codec, target)
    message = f"exported {len(exported)} events"
    if with_artifacts:
        message += f", {bundle_artifacts(exported, with_artifacts)} artifact bodies to {with_artifacts}"
    errors.print(message)


@app.command("import")
def import_cmd(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="an Avro file written by runbus export")],
    artifacts: Annotated[Path | None, typer.Option(help="the .tar.gz written by export --with-artifacts")] = None,
) -> None:
    """Append the file's events to the current bus; events already there are skipped."""
    from engine.archive import import_events, unpack_artifacts

    svc = _svc(ctx)
    if artifacts:
        console.print(f"stored {unpack_artifacts(artifacts, svc.artifact_store)} artifact bodies")
    with file.open("rb") as source:
        report = import_events(source, svc.bus, svc.codec)
    console.print(f"imported {report.copied} events ({report.already_there} already there)")


@app.command()
def project(
    ctx: typer.Context,
    rebuild: Annotated[bool, typer.Option(help="drop the tables and fold the whole log again")] = False,
    follow: Annotated[bool, typer.Option(help="run the projection service in the foreground (it never exits "
                                              "when idle) until Ctrl-C / SIGTERM")] = False,
    sql_read_dir: Annotated[list[Path] | None, typer.Option(
        "--sql-read-dir", help="with --follow: let readers' SQL read (never write) files under this directory "
                               "(what `runbus ui --sql-read-dir` asks for); repeatable")] = None,
) -> None:
    """Bring the DuckDB projection up to date with the bus (or keep it so with --follow)."""
    svc = _svc(ctx)
    if sql_read_dir and not (follow and svc.settings.projection == "service"):
        raise typer.BadParameter("--sql-read-dir is for the projection service: runbus project --follow "
                                 "(RUNBUS_PROJECTION=service)", param_hint="--sql-read-dir")
    if follow:
        if svc.settings.projection == "service":
            _follow_as_service(svc, [str(d.resolve()) for d in sql_read_dir or []])
        else:
            _follow(svc)
        return
    started = time.perf_counter()
    source = svc.reads()
    if source is not None:  # the projection service folds; this waits for it (or has it rebuild)
        count = source.rebuild() if rebuild else source.catch_up()
    else:
        from projections import open_projection

        with open_projection(svc.settings.db_path, svc.settings.db_timeout_s) as con:
            projector = svc.projector(con)
            count = projector.rebuild() if rebuild else projector.catch_up()
    console.print(f"{'rebuilt from' if rebuild else 'applied'} {count} records "
                  f"in {time.perf_counter() - started:.2f}s")


def _follow(svc: Any) -> None:
    """RUNBUS_PROJECTION=inprocess: fold in turns, releasing the file between them."""
    import threading

    from engine.follow import follow

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    last = [0.0, -1, -1]

    def report(applied: int, lag: int) -> None:
        now = time.monotonic()
        if (applied, lag) != tuple(last[1:]) and (now - last[0] > 2 or lag == 0):
            console.print(f"projector: {applied} events applied, lag {lag}", highlight=False)
            last[:] = [now, applied, lag]

    console.print(f"projector following {svc.bus.url} into {svc.settings.db_path} (Ctrl-C to stop)")
    total = follow(svc, stop, report)
    console.print(f"projector stopped after {total} events")


def _follow_as_service(svc: Any, readable_dirs: list[str]) -> None:
    """The projection service of this home in the foreground: this process becomes the service
    (`python -m engine.projection_service --follow --foreground`, same pid), which loads none of the
    command line's libraries; once ready, it asks a service a reader started to stop and takes the
    home (engine.projection_service.serve_as_follower). When another follower serves the home (or a
    reader's service lets SQL read directories this one would not), this one exits with status 1 and
    says why, leaving that one serving."""
    import os

    from engine.projection_service import follower_refused, foreground_command, service_client

    client = service_client(svc.settings, svc.bus)
    refused = follower_refused(client, readable_dirs)
    if refused is not None:
        errors.print(Text("error: ", style="red") + literal(refused))
        raise typer.Exit(1)
    client.close()
    svc.close()  # nothing of this process outlives the exec: what it holds is closed first
    sys.stdout.flush()
    sys.stderr.flush()
    command = foreground_command(readable_dirs)
    os.execv(command[0], command)


@app.command()
def push(
    ctx: typer.Context,
    to: Annotated[str | None, typer.Option("--to", help="target bus URL, e.g. kafka://host:9092")] = None,
    source: Annotated[str | None, typer.Option("--from", help="source bus URL (default: RUNBUS_BUS)")] = None,
    spill: Annotated[bool, typer.Option("--spill", help="deliver the events this home's writers could "
                                                        "not write (RUNBUS_HOME/spill) to RUNBUS_BUS")] = False,
) -> None:
    """Copy the events of one bus to another (e.g. an offline embedded log to Kafka); never twice.
    With --spill, deliver the spill folder to this home's bus instead."""
    from engine.bootstrap import make_bus
    from engine.transfer import push as push_events

    svc = _svc(ctx)
    if spill:
        delivered = svc.deliver_spill()
        console.print(f"delivered {delivered.records} bus records from {delivered.files} spill file(s) to "
                      f"{svc.bus.url} ({delivered.skipped} file(s) in use or meant for another bus)")
        return
    if to is None:
        raise typer.BadParameter("give --to URL (or --spill)")
    source_bus = make_bus(source, svc.settings) if source else svc.bus
    target = make_bus(to, svc.settings)
    try:
        report = push_events(source_bus, target, svc.codec)
    finally:
        target.close()
    console.print(f"pushed {report.copied} events to {to} ({report.already_there} already there, "
                  f"{report.undecodable} undecodable skipped)")


@app.command()
def reap(
    ctx: typer.Context,
    silent: Annotated[float | None, typer.Option(help="seconds without events (default: 3 heartbeats)")] = None,
) -> None:
    """Mark runs whose heartbeats stopped (their process died) as 'lost'."""
    from engine.reaper import reap as reap_runs

    lost = reap_runs(_svc(ctx), silent)
    console.print(literal(f"marked {len(lost)} run(s) lost" + (": " + ", ".join(lost) if lost else "")))


@app.command()
def tail(
    ctx: typer.Context,
    run_uid: Annotated[str | None, typer.Option("--run", help="only this run's events")] = None,
    types: Annotated[str | None, typer.Option("--type", help="comma-separated event types")] = None,
    from_start: Annotated[bool, typer.Option("--from-start", help="print the log from its start")] = False,
) -> None:
    """Print events as they arrive, until Ctrl-C."""
    from producers.subscription import Subscription

    svc = _svc(ctx)
    wanted = set(types.split(",")) if types else None
    subscription = Subscription(svc.bus, svc.codec, {} if from_start else svc.bus.end_offsets())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            for delivery in subscription.poll(1000, timeout=1.0):
                if delivery.error is not None:
                    record = delivery.record
                    console.print(Text(f"undecodable record at {record.partition}:{record.offset}: ", style="red")
                                  + literal(delivery.error))
                    continue
                for event in delivery.events:
                    if (run_uid and not event.run_uid.startswith(run_uid)) or (wanted and event.type not in wanted):
                        continue
                    stamp = time.strftime("%H:%M:%S", time.localtime(event.ts))
                    console.print(literal(f"{stamp} {event.run_uid[:12]} #{event.seq:<4} {event.type:<14} "
                                          f"{json.dumps(event.payload, default=str)[:200]}"))
    except KeyboardInterrupt:
        pass


@app.command()
def ui(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on (0: any free port)")] = 8765,
    token: Annotated[str | None, typer.Option(envvar="RUNBUS_UI_TOKEN", show_envvar=True,
                                              help="access token; required with a --host beyond loopback")] = None,
    viewer_token: Annotated[str | None, typer.Option(envvar="RUNBUS_UI_VIEWER_TOKEN", show_envvar=True,
                                                     help="a second token that may read but never edit")] = None,
    public_name: Annotated[list[str] | None, typer.Option(
        "--public-name", envvar="RUNBUS_UI_PUBLIC_NAME", show_envvar=True,
        help="a host name a reverse proxy serves the UI under (repeatable); needs --token")] = None,
    sql_read_dir: Annotated[list[Path] | None, typer.Option(
        "--sql-read-dir", help="let SQL read (never write) files under this directory, as "
                               "read_csv('readonly:///DIR/file.csv'); repeatable")] = None,
) -> None:
    """Serve the web UI: pages and read-only SQL, and edits of labels and notes (a client of the
    home's projection service, like every reader)."""
    from engine.ui.server import serve

    serve(host, port, svc=_svc(ctx), token=token, readable_dirs=[str(d.resolve()) for d in sql_read_dir or []],
          viewer_token=viewer_token, public_names=public_name or [])


@app.command()
def report(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="the HTML file to write")],
    limit: Annotated[int, typer.Option(help="the newest this many runs")] = 100,
    run: Annotated[list[str] | None, typer.Option("--run", help="only this run (a uid or a unique prefix of it) "
                                                                   "and its iterations; repeat for more")] = None,
) -> None:
    """Write one self-contained HTML report: runs table, run pages, charts, sweeps."""
    from engine.ui.report import write_report

    svc = _svc(ctx)
    svc.writer.flush()
    count = write_report(svc.run_db(), out, svc.settings.artifact_root, limit, run or None)
    console.print(f"wrote {out} ({count} runs)")


def _editor(ctx: typer.Context) -> Any:
    """The query API with edits (engine.api.EngineRunDB) over the command's services."""
    from engine.api import EngineRunDB

    return EngineRunDB(_svc(ctx))


@app.command()
def delete(
    ctx: typer.Context,
    uids: Annotated[list[str], typer.Argument(help="run uids (or unique prefixes)")],
    reason: Annotated[str, typer.Option(help="why, recorded with the deletion")] = "",
) -> None:
    """Delete runs: they and their iterations leave every table (but events) until `runbus restore`;
    `runbus purge` removes them for good."""
    for uid in _editor(ctx).delete_runs(uids, reason=reason):
        console.print(literal(f"deleted {uid}"))


@app.command()
def restore(
    ctx: typer.Context,
    uids: Annotated[list[str], typer.Argument(help="deleted run uids (or unique prefixes)")],
) -> None:
    """Bring deleted runs (and their iterations) back, until a purge removed them."""
    for uid in _editor(ctx).restore_runs(uids):
        console.print(literal(f"restored {uid}"))


@app.command()
def label(
    ctx: typer.Context,
    uid: Annotated[str, typer.Argument(help="run uid or a unique prefix of it")],
    pairs: Annotated[list[str] | None, typer.Argument(help="key=value labels to set")] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", help="a label key to remove (repeatable)")] = None,
) -> None:
    """Set (key=value) and remove (--remove KEY) a run's labels, recorded as an edit: who and when."""
    if not pairs and not remove:
        raise typer.BadParameter("give key=value labels to set or --remove KEY")
    labels = _pairs(pairs, "label")
    full = _editor(ctx).set_labels(uid, labels, remove or [])
    changes = [f"{k}={v}" for k, v in labels.items()] + [f"-{k}" for k in remove or []]
    console.print(literal(f"labelled {full}: {' '.join(changes)}"))


@app.command()
def note(
    ctx: typer.Context,
    uid: Annotated[str, typer.Argument(help="run uid or a unique prefix of it")],
    text: Annotated[str, typer.Argument(help="the run's note from now on (\"\" clears it)")],
) -> None:
    """Set a run's note, recorded as an edit: who and when (the old note stays in the history)."""
    full = _editor(ctx).set_note(uid, text)
    console.print(literal(f"noted {full}"))


@app.command()
def purge(
    ctx: typer.Context,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    older_than: Annotated[float, typer.Option(help="remove only artifact bodies stored more than this "
                                                   "many seconds ago (a job may be logging one now)")] = 3600.0,
) -> None:
    """Remove deleted runs for good: rewrite the embedded log without their records and remove the
    artifact bodies no run references. On Kafka the records stay until the topic's retention."""
    db = _editor(ctx)
    uids = db.purgeable()
    rewritable = db.services.bus.epoch() is not None
    what = (f"{len(uids)} deleted run(s) and iteration(s) from {db.services.bus.url} for good" if rewritable
            else "unreferenced artifact bodies (the bus keeps its records)")
    if not yes and not typer.confirm(f"remove {what}?", default=False):
        errors.print("nothing removed")
        raise typer.Exit(1)
    report = db.purge(older_than_s=older_than)
    for uid in report.runs:
        console.print(literal(f"purged {uid}"))
    console.print(f"blanked {report.records} bus record(s) of {len(report.runs)} run(s); removed "
                  f"{len(report.bodies)} artifact bod{'y' if len(report.bodies) == 1 else 'ies'}")
    if report.log_rewritten and report.runs:
        console.print(literal("another home that projects this log (RUNBUS_BUS naming it) keeps its copy on disk "
                              "until its projection files are removed (runbus.duckdb*): it folds the log again "
                              "by itself, but DuckDB may keep freed pages' old bytes"))
    if not report.log_rewritten and uids:
        console.print(literal(f"{db.services.bus.url}: records cannot be rewritten here: the {len(uids)} deleted "
                              "run(s) stay in the topic (restorable, their bodies kept) until its retention "
                              "removes them"))


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (DuckDB's carry a caret diagram and hints below)."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    text = str(message).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main() -> None:
    warnings.showwarning = _warn
    try:
        app()
    except (KeyError, ValueError, TypeError, LookupError, RuntimeError, OSError) as exc:
        _fail(one_line(exc))
    except Exception as exc:
        if not type(exc).__module__.lstrip("_").startswith("duckdb"):
            raise
        _fail(one_line(exc))


def _warn(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
          line: str | None = None) -> None:
    """A warning as one line on stderr (Python's own shows the file and line of Runbus's code that
    raised it, and the line itself)."""
    lines = str(message).strip().splitlines()
    errors.print(Text("warning: ", style="yellow") + literal(lines[0] if lines else category.__name__))


def _fail(message: str) -> None:
    errors.print(Text("error: ", style="red") + literal(message))
    sys.exit(1)


if __name__ == "__main__":
    main()
