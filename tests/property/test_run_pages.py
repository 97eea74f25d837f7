"""A page of runs (`limit`/`offset`) is exactly that slice of the whole sorted listing, whatever the
sort column, ties, missing or text values (projections.run_query cuts a page with LIMIT/OFFSET)."""

from __future__ import annotations

from typing import Any

import duckdb
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.bus.memory import MemoryBus
from projections.projector import Projector
from projections.query import read_only_query
from projections.run_query import RunFilter, RunOrder, find_runs
from tests.support.foreign import CODEC, envelope, started

_T0 = 1_750_000_000.0
_SORTS = ("name", "-name", "started_at", "-started_at", "result.loss", "-result.loss", "param.opt",
          "-param.opt", "result.nothing", "state")

_run = st.fixed_dictionaries({
    "name": st.sampled_from("abc"),
    "project": st.sampled_from(["p", "q"]),
    "ts": st.integers(0, 3),  # few start times: ties are broken by uid
    "loss": st.one_of(st.none(), st.sampled_from(["0.5", "0.1", "-2", "1e3", '"high"'])),
    "opt": st.one_of(st.none(), st.sampled_from(['"sgd"', '"adam"', "3"])),
})


def _fold(runs: list[dict[str, Any]]) -> duckdb.DuckDBPyConnection:
    bus, con = MemoryBus(), duckdb.connect(":memory:")
    for i, run in enumerate(runs):
        uid = f"u{i:02d}"
        events = [envelope(uid, 0, "run_started", started(name=run["name"], project=run["project"]),
                           ts=_T0 + run["ts"])]
        for seq, (kind, key) in enumerate((("result", "loss"), ("param", "opt")), start=1):
            value = run["loss" if key == "loss" else "opt"]
            if value is not None:
                events.append(envelope(uid, seq, kind, {"key": key, "value": value}))
        bus.append([(uid, CODEC.encode_batch(events))])
    Projector(bus, con).catch_up()
    return con


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs=st.lists(_run, min_size=0, max_size=9), sort=st.sampled_from(_SORTS),
       project=st.sampled_from([None, "p"]), limit=st.integers(0, 6), offset=st.integers(0, 6))
def test_a_page_is_the_slice_of_the_whole_listing(runs: list[dict[str, Any]], sort: str, project: str | None,
                                                  limit: int, offset: int) -> None:
    con = _fold(runs)

    def fetch(sql: str, params: Any = None) -> pd.DataFrame:
        return read_only_query(con, sql, params)

    run_filter, order = RunFilter(project=project), RunOrder.parse(sort)
    whole = find_runs(fetch, run_filter, order)
    page = find_runs(fetch, run_filter, order, limit=limit, offset=offset)
    assert page.uid.tolist() == whole.uid.tolist()[offset:offset + limit]
    if len(page):  # an empty answer's text columns are objects, a slice keeps the whole's dtypes
        expected = whole.iloc[offset:offset + limit].reset_index(drop=True)
        pd.testing.assert_frame_equal(page.reset_index(drop=True), expected)
