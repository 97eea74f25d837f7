"""The UI server's JSON API: SQL for API clients (with the token in ui.token) and the pages' live
updates (run states and counts, log lines)."""

from __future__ import annotations

import json
import os
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.ui.pages import fmt_value, run_duration
from engine.ui.runs_page import RunsQuery, page_values
from engine.ui.store import UIStore
from projections.database import ProjectionBusy
from projections.errors import error_payload
from projections.run_query import count_runs
from projections.wire import to_ipc

MAX_JSON_ROWS = 10_000
MAX_LOG_LINES = 2000  # console lines one poll of a run's log returns
ARROW_STREAM = "application/vnd.apache.arrow.stream"


def frame_json(frame: pd.DataFrame, limit: int = MAX_JSON_ROWS) -> dict[str, Any]:
    """{"columns": [...], "rows": [[...]], "total": n}: JSON values, times as ISO text, NaN as null."""
    split = json.loads(frame.head(limit).to_json(orient="split", index=False, date_format="iso",
                                                 default_handler=str))
    return {"columns": [str(c) for c in frame.columns], "rows": split["data"], "total": len(frame)}


def api_routes(store: UIStore) -> list[Route]:
    async def sql(request: Request) -> Response:
        """POST {"sql", "params"?, "as_of"?} -> the frame (Arrow stream if asked for, else JSON)."""
        try:
            body = await request.json()
            query, params, as_of = str(body["sql"]), body.get("params") or [], body.get("as_of")
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": 'send JSON {"sql": ..., "params": [...], "as_of": ...}',
                                 "type": "ValueError"}, status_code=400)
        try:
            frame = await run_in_threadpool(store.at(as_of).sql, query, params)
        except ProjectionBusy as exc:
            return JSONResponse(error_payload(exc), status_code=503)
        except (ValueError, LookupError, TypeError, duckdb.Error) as exc:
            return JSONResponse(error_payload(exc), status_code=400)
        if ARROW_STREAM in request.headers.get("accept", ""):
            table = pa.Table.from_pandas(frame, preserve_index=False)  # pandas metadata: the dtypes come back
            return Response(to_ipc(table), media_type=ARROW_STREAM)
        return JSONResponse(frame_json(frame))

    def ping(request: Request) -> Response:
        return JSONResponse({"ok": True, "pid": os.getpid(), "db_path": str(store.db_path)})

    def live(request: Request) -> Response:
        """The runs page's poll: the total under its filters and the named runs' state and values."""
        query = RunsQuery.from_params(request.query_params)
        uids = request.query_params.getlist("live")[:500]
        try:
            run_filter = query.run_filter()
        except ValueError as exc:
            return JSONResponse(error_payload(exc), status_code=400)
        try:
            with store.reader() as fetch:
                total = count_runs(fetch, run_filter)
                rows = fetch("SELECT uid, state, started_at, duration_s FROM runs WHERE uid IN "
                             "(SELECT unnest(?::VARCHAR[]))", [uids]).to_dict("records") if uids else []
                values = page_values(fetch, [row["uid"] for row in rows])
        except duckdb.Error as exc:  # e.g. a time filter that does not parse
            return JSONResponse(error_payload(exc), status_code=400)
        runs = {row["uid"]: {"state": row["state"], "duration": run_duration(row),
                             "values": {k: fmt_value(v) for k, v in values.get(row["uid"], {}).items()}}
                for row in rows}
        return JSONResponse({"total": total, "runs": runs})

    def log(request: Request) -> Response:
        """The run page's poll of a run's console: {"state", "lines": [[line_no, stream, text], ...],
        "more"} for the lines numbered above ?after= (at most MAX_LOG_LINES; "more" when there are)."""
        try:
            after = int(request.query_params.get("after", "0"))
        except ValueError:
            return JSONResponse({"error": "after must be a line number", "type": "ValueError"}, status_code=400)
        try:
            _, state, lines = store.log_lines(request.path_params["uid"], after, MAX_LOG_LINES)
        except KeyError as exc:
            return JSONResponse(error_payload(exc), status_code=404)
        rows = [[int(n), str(stream), str(text)]
                for n, stream, text in zip(lines.line_no, lines.stream, lines.text, strict=True)]
        return JSONResponse({"state": state, "lines": rows, "more": len(rows) == MAX_LOG_LINES})

    return [Route("/api/sql", sql, methods=["POST"]), Route("/api/ping", ping), Route("/api/runs/live", live),
            Route("/api/runs/{uid}/log", log)]
