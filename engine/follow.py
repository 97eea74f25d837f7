"""The long-lived projector service (`runbus project --follow`).

It holds the DuckDB file only while it folds a batch (about a second at most), then releases
it, so queries from other processes (CLI, `get_run_db()`) get their turn and see data at most a
few seconds old. Each turn also judges silent runs (see projections.tables): a run whose heartbeats
stopped shows 'lost' within a turn of its 3rd missed interval, though no event arrives.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from engine.bootstrap import Services
from producers.bus import lag
from projections import open_projection


def follow(svc: Services, stop: threading.Event, report: Callable[[int, int], None],
           hold_s: float = 1.0, idle_s: float = 0.5) -> int:
    """Fold new events until `stop` is set; `report(applied_total, lag)` after each turn."""
    total = 0
    while not stop.is_set():
        applied = 0
        with open_projection(svc.settings.db_path, svc.settings.db_timeout_s) as con:
            projector = svc.projector(con)
            deadline = time.monotonic() + hold_s
            while not stop.is_set() and time.monotonic() < deadline:
                consumed = projector.run_once()
                applied += consumed
                if consumed == 0:
                    break
            projector.judge_silent_runs()
            positions = projector.positions()
        total += applied
        report(total, lag(svc.bus, positions))
        if applied == 0:
            stop.wait(idle_s)
    return total
