"""Findings 12 and 13 (CLI parts): the CLI prints user data literally and errors on one line.

Run names, labels and error messages carrying rich markup, OSC 8 hyperlinks, raw escape
sequences, C1 controls and bidi overrides are printed as the text they are (controls shown as
escapes) by `runbus runs`, `runbus sql`, `runbus run` and `runbus show`, piped or on a (forced)
terminal. DuckDB errors and an unusable RUNBUS_HOME are one line naming the statement or the path.
`runbus show` prints valid JSON; uid prefixes are literal (no LIKE wildcards); rerun of a run
whose code is not verified needs --trust.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from engine import NewRun, get_run_db, new_function
from engine.api import session
from tests.e2e.test_ui import RUNBUS
from tests.hostile.test_ui_cross_site import recorded_ui
from tests.support import foreign
from tests.support.polling import line_within

MARKUP = "bad[/red]markup"
LINK = "[link=http://evil.example]click[/link]"
ESCAPES = "\x1b[31mRED\x1b[0m \x1b]8;;http://evil.example\x07osc\x1b]8;;\x07 \x9b31m \u202etxt.exe"
RAW = ("\x1b", "\x9b", "\u202e", "\x07")
# run names may not hold '/' (refused at the call, as MLRun does): these reach the CLI through the SDK;
# MARKUP and LINK as names only come from the log (a forged run_started)
MARKUP_NAME = "bad[red]markup"
ESCAPES_NAME = ESCAPES.replace("http://evil.example", "evil.example")

JOB = """
def train(context, lr=0.1):
    context.log_result("accuracy", 0.5 + lr)

def fails(context):
    raise RuntimeError("no data [/red] \\x1b[2J\\x1b]8;;http://evil.example\\x07here")
"""


def hostile(context: Any) -> None:
    context.set_label("link", LINK)
    context.set_label("escapes", ESCAPES)
    context.log_result("note", MARKUP + " " + ESCAPES)
    context.log_metric("nan", float("nan"))
    context.log_metric("inf", float("inf"))
    context.log_result("minus_inf", float("-inf"))


@pytest.fixture
def cli(home: Path, tmp_path: Path):
    (tmp_path / "job.py").write_text(JOB)
    env = {**os.environ, "RUNBUS_HOME": str(home), "COLUMNS": "400"}

    def run(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RUNBUS, *args], cwd=tmp_path, env={**env, **extra_env}, capture_output=True,
                              text=True, timeout=120)

    return run


def assert_literal(output: str) -> None:
    assert not any(raw in output for raw in RAW), f"raw control characters printed: {output!r}"
    assert "\x1b]8;" not in output  # no terminal hyperlink


def test_runs_and_sql_print_names_and_labels_literally(home: Path, cli) -> None:
    for name in (MARKUP_NAME, ESCAPES_NAME):
        new_function().run(NewRun(handler=hostile, name=name))
    for name in (MARKUP, LINK):
        uid = uuid.uuid4().hex
        foreign.append(session().services.bus, uid, [
            foreign.envelope(uid, 0, "run_started", foreign.started(name=name)),
            foreign.envelope(uid, 1, "run_finished", foreign.finished())])
    for terminal in ({}, {"FORCE_COLOR": "1", "TERM": "xterm-256color"}):
        for args in (("runs",), ("sql", "SELECT name, labels FROM runs ORDER BY name")):
            done = cli(*args, **terminal)
            assert done.returncode == 0, done.stderr
            out = done.stdout if not terminal else _without_styles(done.stdout)
            assert_literal(out)
            assert MARKUP in out and LINK in out and "http://evil.example" in out
            assert "\\x1b[31mRED\\x1b[0m" in out and "\\u202etxt.exe" in out


def _without_styles(text: str) -> str:
    """Forced-terminal output minus rich's own SGR styling (ESC [ digits;... m) around cells."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_run_prints_its_summary_and_error_literally(cli) -> None:
    done = cli("run", "job.py:train", "--name", MARKUP_NAME, "--label", f"k={LINK}")
    assert done.returncode == 0, done.stderr
    assert MARKUP_NAME in done.stdout and LINK in done.stdout
    failed = cli("run", "job.py:fails", "--name", ESCAPES_NAME)
    assert failed.returncode == 1
    assert_literal(failed.stdout + failed.stderr)
    assert "no data [/red] \\x1b[2J" in failed.stdout + failed.stderr
    assert "MarkupError" not in failed.stderr


def test_duckdb_errors_are_one_line_naming_the_statement(cli) -> None:
    for statement, words in (("SELECT * FROM nosuchtable", "nosuchtable"), ("SELEC 1", "SELEC"),
                             ("SELECT 1/0::INT, 'a'::INT", "'a'")):
        done = cli("sql", statement)
        assert done.returncode == 1, done.stdout
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
        assert words in lines[0] and "Traceback" not in done.stderr


def test_an_unusable_runbus_home_is_one_line_naming_the_path(home: Path, cli) -> None:
    (home / "log.sqlite").mkdir(parents=True)  # the embedded log cannot be opened
    done = cli("runs")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(home) in lines[0] and "Traceback" not in done.stderr, done.stderr


UNWRITABLE = Path("/sys/fs")  # exists, and sysfs refuses new files even to root


@pytest.mark.skipif(not UNWRITABLE.is_dir(), reason="no sysfs here")
def test_a_runbus_home_nobody_may_write_is_one_line_naming_the_path(cli) -> None:
    done = cli("runs", RUNBUS_HOME=str(UNWRITABLE))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(UNWRITABLE) in lines[0] and "Traceback" not in done.stderr, done.stderr


def test_show_prints_valid_json_for_nan_and_infinity(cli) -> None:
    run = new_function().run(NewRun(handler=hostile, name=ESCAPES_NAME))
    done = cli("show", run.uid)
    assert done.returncode == 0, done.stderr
    assert_literal(done.stdout)

    def refuse(constant: str) -> None:
        raise AssertionError(f"invalid JSON constant {constant} printed")

    shown = json.loads(done.stdout, parse_constant=refuse)
    assert shown["metrics"] == {"inf": None, "nan": None}
    assert shown["results"]["minus_inf"] is None
    assert shown["name"] == ESCAPES_NAME and shown["labels"]["escapes"] == ESCAPES  # the value survives


def test_uid_prefixes_match_literally(home: Path, cli) -> None:
    run = new_function().run(NewRun(handler=hostile, name="only"))
    db = get_run_db()
    for wildcard in ("%", "_", run.uid[:3] + "%", "_" + run.uid[1:6]):
        with pytest.raises(KeyError, match="no run with uid"):
            db.read_run(wildcard)
    assert db.read_run(run.uid[:6])["uid"] == run.uid
    done = cli("show", "%")
    assert done.returncode == 1 and "no run with uid '%'" in done.stderr
    with recorded_ui("token") as (served, _):
        for wildcard in ("%25", "_", "%25" + run.uid[-3:]):
            with pytest.raises(urllib.error.HTTPError) as missing:
                urllib.request.urlopen(f"{served.url}/runs/{wildcard}", timeout=30)
            assert missing.value.code == 404, wildcard
        for name_filter, shown in (("%25", False), ("_", False), ("nl", True)):  # the name filter is literal too
            with urllib.request.urlopen(f"{served.url}/runs?name={name_filter}", timeout=30) as response:
                assert (f'data-uid="{run.uid}"' in response.read().decode()) is shown, name_filter


def test_rerun_of_changed_code_needs_trust_and_says_so_on_one_line(cli, tmp_path: Path) -> None:
    assert cli("run", "job.py:train").returncode == 0
    uid = json.loads(cli("runs", "--format", "json").stdout)[0]["uid"]
    (tmp_path / "job.py").write_text(JOB.replace("0.5 + lr", "0.25 + lr"))  # not the code that ran
    refused = cli("rerun", uid)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "--trust" in lines[0] and "Traceback" not in refused.stderr
    trusted = cli("rerun", uid, "--trust")
    assert trusted.returncode == 0, trusted.stderr
    assert "0.35" in trusted.stdout


def test_sweep_progress_prints_the_best_value_literally(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from engine.progress import SweepProgress

    monkeypatch.setenv("FORCE_COLOR", "1")  # rich draws the bar only on a terminal
    with SweepProgress(3) as progress:
        progress.update(1, 0, 2, MARKUP)
    assert MARKUP in capsys.readouterr().err


def test_tail_names_a_record_that_is_not_events_and_goes_on(home: Path, cli) -> None:
    foreign.append(session().services.bus, "junk", b"\x00not avro \x1b[2J\x1b]8;;http://evil.example\x07")
    new_function().run(NewRun(handler=hostile, name="after-junk"))
    tail = subprocess.Popen([RUNBUS, "tail", "--from-start", "--type", "run_started"], cwd=home,
                            env={**os.environ, "RUNBUS_HOME": str(home)}, stdout=subprocess.PIPE, text=True)
    try:
        first = line_within(tail.stdout, "tail named the undecodable record")
        second = line_within(tail.stdout, "tail went on to the run after it")
    finally:
        tail.terminate()
        tail.wait(10)
    assert first.startswith("undecodable record at 0:0:") and "run_started" in second and "after-junk" in second
    assert_literal(first + second)
