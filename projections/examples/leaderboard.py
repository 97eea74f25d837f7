"""Example user projection: the best value of each numeric result per run name.

Enable it with RUNBUS_PROJECTIONS=projections.examples.leaderboard:Leaderboard, then
`runbus sql "SELECT * FROM leaderboard ORDER BY name, result"`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import duckdb

from projections.user import UserProjection
from schemas import Event


class Leaderboard(UserProjection):
    """leaderboard(name, result, best, best_uid, worst, values_seen): higher is better."""

    name = "leaderboard"
    version = 1

    def create(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute("CREATE TABLE IF NOT EXISTS leaderboard_runs (uid VARCHAR PRIMARY KEY, name VARCHAR)")
        con.execute("CREATE TABLE IF NOT EXISTS leaderboard (name VARCHAR, result VARCHAR, best DOUBLE, "
                    "best_uid VARCHAR, worst DOUBLE, values_seen BIGINT, PRIMARY KEY (name, result))")

    def drop(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute("DROP TABLE IF EXISTS leaderboard")
        con.execute("DROP TABLE IF EXISTS leaderboard_runs")

    def apply(self, con: duckdb.DuckDBPyConnection, events: Sequence[Event]) -> None:
        names = {e.run_uid: e.payload["name"] for e in events if e.type == "run_started"}
        if names:
            con.executemany("INSERT OR REPLACE INTO leaderboard_runs VALUES (?, ?)", list(names.items()))
        for event in events:
            if event.type != "result":
                continue
            value = json.loads(event.payload["value"])
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            row = con.execute("SELECT name FROM leaderboard_runs WHERE uid = ?", [event.run_uid]).fetchone()
            if row is None:
                continue
            con.execute("""
                INSERT INTO leaderboard VALUES (?, ?, ?, ?, ?, 1)
                ON CONFLICT (name, result) DO UPDATE SET
                    best_uid = CASE WHEN excluded.best > leaderboard.best THEN excluded.best_uid
                                    ELSE leaderboard.best_uid END,
                    best = greatest(leaderboard.best, excluded.best),
                    worst = least(leaderboard.worst, excluded.worst),
                    values_seen = leaderboard.values_seen + 1""",
                        [row[0], event.payload["key"], float(value), event.run_uid, float(value)])
