"""`runbus report`: one self-contained HTML file (runs table, run pages, charts, sweeps) to attach
to a ticket or an email. CSS is inline, charts are inline SVG, images are data: URIs, no scripts."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine.ui.data import run_view, sweep_view
from engine.ui.pages import ReportLinks, render
from engine.ui.runs_page import page_values, run_row
from engine.ui.sections import run_context, sweep_context
from projections.query import Query, RunDB, resolve_uid


def report_html(db: RunDB, store_root: str | Path, limit: int = 100, uids: list[str] | None = None) -> tuple[str, int]:
    """The report's HTML and how many runs it holds: the newest `limit` runs, or the given runs
    (uid prefixes) with their sweep iterations."""
    with db.reader() as fetch:
        rows = _runs(fetch, limit, uids)
        included = {row["uid"] for row in rows}
        links = ReportLinks(included)
        values = page_values(fetch, list(included))
        for row in rows:
            row["values"] = values.get(row["uid"], {})
        views = [run_view(fetch, row["uid"]) for row in rows]
        sweeps = {view.run["uid"]: sweep_view(fetch, view.run["uid"], store_root) for view in views if view.is_sweep}
    sections = [(run_context(view, store_root, links, inline=True),
                 sweep_context(sweeps[view.run["uid"]], links) if view.run["uid"] in sweeps else None)
                for view in views]
    columns = sorted({k for row in rows for k in row["values"] if k.startswith("result.") and k != "result.return"})
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return render("report.html", title=f"runbus report, {len(rows)} runs", links=links, rows=rows,
                  columns=columns[:8], sections=sections, written=written), len(rows)


def write_report(db: RunDB, out: str | os.PathLike[str], store_root: str | Path, limit: int = 100,
                 uids: list[str] | None = None) -> int:
    """Write the report to `out` (atomically); returns the number of runs in it."""
    html, count = report_html(db, store_root, limit, uids)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(target)
    return count


def _runs(fetch: Query, limit: int, uids: list[str] | None) -> list[dict[str, Any]]:
    columns = "uid, name, iteration, parent_uid, state, labels, started_at, duration_s, finished_at, extra"
    if uids:
        chosen = [resolve_uid(fetch, uid) for uid in uids]
        frame = fetch(f"SELECT {columns} FROM runs WHERE uid IN (SELECT unnest(?::VARCHAR[])) "
                      f"OR parent_uid IN (SELECT unnest(?::VARCHAR[])) ORDER BY started_at DESC", [chosen, chosen])
    else:
        frame = fetch(f"SELECT {columns} FROM runs ORDER BY started_at DESC LIMIT ?", [int(limit)])
    return [run_row(record) for record in frame.to_dict("records")]
