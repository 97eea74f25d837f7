"""The web app's routes: each page reads one view of the held projection and renders a template."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from engine.ui.api import api_routes
from engine.ui.data import compare_view, run_view, sweep_view
from engine.ui.pages import ServerLinks, render
from engine.ui.previews import body_path, media_type
from engine.ui.runs_query import PAGE_SIZES, STATES, RunsQuery, fetch_runs
from engine.ui.sections import compare_charts, run_context, sweep_context
from engine.ui.store import HeldRunDB
from projections.query import resolve_uid

MAX_SQL_ROWS = 1000
_LINKS = ServerLinks()
# served bodies never run as pages of this site (an SVG or HTML artifact could carry scripts)
_BODY_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}


def page(template: str, status: int = 200, **context: object) -> HTMLResponse:
    return HTMLResponse(render(template, **{"links": _LINKS, **context}), status_code=status)


def not_found(message: str) -> HTMLResponse:
    return page("error.html", 404, title="Not found", message=message, nav="")


def create_app(store: HeldRunDB, host: str = "127.0.0.1") -> Starlette:
    """The read-only UI over a projection this process holds, answering requests addressed to `host`
    (or to loopback names); other Host headers are refused, so a page of another site that rebinds
    its name to this address cannot read the data."""
    store_root = store.services.settings.artifact_root

    def runs(request: Request) -> Response:
        query = RunsQuery.from_params(request.query_params)
        error = ""
        with store.reader() as fetch:
            try:
                result = fetch_runs(fetch, query)
            except (ValueError, duckdb.Error) as exc:
                error = str(exc)
                query = RunsQuery(size=query.size)
                result = fetch_runs(fetch, query)
        return page("runs.html", title="Runs", nav="runs", page=result, states=STATES, sizes=PAGE_SIZES,
                    error=error)

    def run(request: Request) -> Response:
        uid = request.path_params["uid"]
        with store.reader() as fetch:
            try:
                full = resolve_uid(fetch, uid)
            except KeyError as exc:
                return not_found(exc.args[0])
            if full != uid:
                return RedirectResponse(_LINKS.run(full))
            view = run_view(fetch, full)
        return page("run.html", title=f"{view.run['name']} {full[:8]}", nav="runs",
                    **run_context(view, store_root, _LINKS))

    def sweep(request: Request) -> Response:
        uid = request.path_params["uid"]
        with store.reader() as fetch:
            try:
                full = resolve_uid(fetch, uid)
            except KeyError as exc:
                return not_found(exc.args[0])
            view = sweep_view(fetch, full, store_root)
        return page("sweep.html", title=f"sweep {view.parent['name']}", nav="runs", **sweep_context(view, _LINKS))

    def compare(request: Request) -> Response:
        wanted = request.query_params.getlist("uid") + re.split(r"[\s,]+", request.query_params.get("uids", ""))
        wanted = list(dict.fromkeys(u.strip() for u in wanted if u.strip()))
        context: dict[str, object] = {"uid_text": " ".join(wanted), "view": None, "charts": [], "error": ""}
        if wanted:
            with store.reader() as fetch:
                try:
                    uids = list(dict.fromkeys(resolve_uid(fetch, u) for u in wanted))
                except KeyError as exc:
                    uids, context["error"] = [], exc.args[0]
                if len(uids) >= 2:
                    view = compare_view(fetch, uids)
                    context.update(view=view, uid_text=" ".join(uids))
                elif not context["error"]:
                    context["error"] = "pick at least two different runs to compare"
        if context["view"] is not None:
            context["charts"] = compare_charts(context["view"])  # type: ignore[arg-type]
        return page("compare.html", title="Compare", nav="compare", **context)

    def sql(request: Request) -> Response:
        text = request.query_params.get("q", "").strip()
        as_of = request.query_params.get("as_of", "").strip()
        context: dict[str, object] = {"sql": text, "as_of": as_of, "columns": None, "rows": [], "total": 0,
                                      "error": ""}
        if text:
            try:
                frame = store.at(as_of or None).sql(text)
            except (ValueError, TypeError, duckdb.Error) as exc:
                context["error"] = str(exc)
            else:
                context.update(columns=[str(c) for c in frame.columns], total=len(frame),
                               rows=frame.head(MAX_SQL_ROWS).astype(object).where(frame.notna(), None).values.tolist())
        return page("sql.html", title="SQL", nav="sql", **context)

    def artifact(request: Request) -> Response:
        uid, key = request.path_params["uid"], request.path_params["key"]
        with store.reader() as fetch:
            rows = fetch("SELECT uid, key, kind, uri, sha256, size, format FROM artifacts WHERE uid = ? AND key = ?",
                         [uid, key]).to_dict("records")
        path: Path | None = body_path(rows[0], store_root) if rows else None
        if path is None:
            return not_found(f"run {uid!r} has no artifact {key!r} whose body is on this machine")
        mime = media_type(rows[0])
        download = "download" in request.query_params or mime == "application/octet-stream"
        return FileResponse(path, media_type=mime, headers=_BODY_HEADERS,
                            filename=Path(key).name if download else None,
                            content_disposition_type="attachment" if download else "inline")

    def home(request: Request) -> Response:
        return RedirectResponse("/runs")

    routes = [Route("/", home), Route("/runs", runs), Route("/runs/{uid}", run), Route("/sweeps/{uid}", sweep),
              Route("/compare", compare), Route("/sql", sql), Route("/artifacts/{uid}/{key:path}", artifact),
              *api_routes(store)]
    hosts = ["*"] if host in ("0.0.0.0", "::", "") else sorted({host, "127.0.0.1", "localhost", "::1", "[::1]"})
    return Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)])

