"""Notebook views (`_repr_html_`) in the UI's look: one run as a card, a runs frame as the UI's table."""

from __future__ import annotations

from typing import Any

import pandas as pd

from engine.ui.pages import render
from engine.ui.runs_page import run_row


def run_html(run: Any) -> str:
    """A RunObject (engine.run) as HTML: state, params, results, labels, artifacts, error."""
    return render("notebook_run.html", run=run)


def runs_table_html(frame: pd.DataFrame) -> str:
    """A runs frame (`get_run_db().list_runs()` or `sql("SELECT * FROM runs ...")`) as the UI's table."""
    rows = [run_row({"uid": str(record.get("uid", "")), "name": record.get("name", ""),
                     "iteration": record.get("iteration", ""), "state": record.get("state", ""),
                     "labels": record.get("labels"), "extra": record.get("extra"),
                     "started_at": record.get("started_at"), "duration_s": record.get("duration_s")})
            for record in frame.to_dict("records")]
    return render("notebook_runs.html", rows=rows, count=len(rows))

