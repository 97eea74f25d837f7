"""What the projection service prints in the foreground is escaped by the command line's one rule
(`engine.terminal.neutral`), on one line, without loading rich."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from engine.projection_service import _stopped
from engine.settings import load_settings
from engine.terminal import neutral


def test_the_terminal_module_loads_rich_only_when_a_console_is_made() -> None:
    done = subprocess.run([sys.executable, "-c", "import sys, engine.terminal as t; t.neutral('x'); "
                           "print('rich' in sys.modules); t.plain_console(); print('rich' in sys.modules)"],
                          capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["False", "True"]


def test_neutral_keeps_line_breaks_for_cells_and_escapes_them_for_one_line() -> None:
    text = "a\nb\tc\x1b[31m\u202e\u2028"
    assert neutral(text) == "a\nb\tc\\x1b[31m\\u202e\u2028"
    assert neutral(text, one_line=True) == "a\\nb\\tc\\x1b[31m\\u202e\\u2028"


def test_the_line_of_a_failed_service_stays_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home\nwith a break\x1b[2J"
    monkeypatch.setenv("RUNBUS_HOME", str(home))
    line = _stopped(load_settings(), duckdb.IOException("disk gone\x1b]8;;x\x07\nhint below"))
    assert line.splitlines() == [line]
    assert line.endswith("stopped: disk gone\\x1b]8;;x\\x07")
    assert "home\\nwith a break\\x1b[2J" in line
