"""The web app's routes: each page reads one snapshot of the projection and renders a template.

Every page of every site the user has open can send requests here, so (`AccessGuard`): GET
changes nothing and runs no SQL; a request that runs SQL or reaches the API must carry the
instance's access token (`Authorization: Bearer`) or come from this UI's own pages (the browser's
Sec-Fetch-Site / Origin say so), and API bodies must be JSON. Served beyond loopback, every
request needs the token: `/?token=...` once sets it as a cookie for that browser.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qs, urlencode

import duckdb
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.ui.api import api_routes
from engine.ui.data import compare_view, run_view, sweep_view
from engine.ui.pages import ServerLinks, render
from engine.ui.previews import body_path, companion_image, media_type
from engine.ui.runs_page import PAGE_SIZES, STATES, RunsQuery, fetch_runs
from engine.ui.sections import compare_charts, run_context, sweep_context
from engine.ui.store import UIStore
from producers.artifacts import artifact_meta
from producers.bus import BusError
from projections.database import ProjectionBusy
from projections.query import resolve_uid

MAX_SQL_ROWS = 1000
MAX_FORM_BYTES = 1_000_000
TOKEN_HEADER_PREFIX = "Bearer "
_LINKS = ServerLinks()
# served bodies never run as pages of this site (an SVG or HTML artifact could carry scripts)
_BODY_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}


# no page of this UI shows inside another site's frame, where a click could be stolen
_PAGE_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"}


def page(template: str, status: int = 200, **context: object) -> HTMLResponse:
    return HTMLResponse(render(template, **{"links": _LINKS, **context}), status_code=status, headers=_PAGE_HEADERS)


def not_found(message: str) -> HTMLResponse:
    return page("error.html", 404, title="Not found", message=message, nav="")


def _unavailable(request: Request, exc: Exception) -> Response:
    """A page whose reads the projection did not answer (busy, stopped or hung, or a service that
    refuses this UI's settings, ServiceRefused): 503 and the one line that says why and what to do,
    not a server error (JSON under /api/)."""
    lines = str(exc).strip().splitlines()
    message = lines[0] if lines else ""
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message, "type": type(exc).__name__}, status_code=503)
    return page("error.html", 503, title="Projection unavailable", message=message, nav="")


def create_app(store: UIStore, host: str = "127.0.0.1", token: str | None = None,
               viewer_token: str | None = None, public_names: Sequence[str] = ()) -> Starlette:
    """The read-only UI over `store` (see engine.ui.store: the projection service's sessions, the
    file opened per request, or a connection the caller holds).

    Bound to loopback, it answers requests addressed to `host` or to loopback names (a page of
    another site that rebinds its name to this address is refused). Bound beyond loopback it needs
    `token` on every request (ValueError without one). SQL and the API need `token` or a request
    from the UI's own pages (see `AccessGuard`). `viewer_token` admits like `token` but only to
    read: pages, SQL and the read API, never an edit. `public_names`: the names a reverse proxy
    serves the UI under (they are let in, and every request then needs a token).
    """
    wide = not is_loopback(host) or bool(public_names)
    if viewer_token is not None and (not viewer_token or viewer_token == token):
        raise ValueError("the viewer token must be given and differ from the access token")
    if wide and not token:
        raise ValueError(f"serving on {host!r} reaches beyond this machine: an access token is required")
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

    async def edit(request: Request) -> Response:
        """POST (a form from the run page, through AccessGuard): set/remove labels or set the note,
        written as an amendment event; then back to the run page (which shows it in its history)."""
        fields = await _form(request)
        if fields is None:
            return page("error.html", 415, title="Not a form", nav="runs",
                        message="an edit takes a form post (application/x-www-form-urlencoded)")
        try:
            full = await run_in_threadpool(_apply_edit, store, request.path_params["uid"], fields)
        except KeyError as exc:
            return not_found(str(exc.args[0]) if exc.args else "no such run")
        except (ValueError, TypeError, BusError) as exc:
            return page("error.html", 400, title="Edit refused", message=str(exc).splitlines()[0], nav="runs")
        return RedirectResponse(_LINKS.run(full), status_code=303)

    def sweep(request: Request) -> Response:
        uid = request.path_params["uid"]
        with store.reader() as fetch:
            try:
                view = sweep_view(fetch, resolve_uid(fetch, uid), store_root)
            except KeyError as exc:
                return not_found(exc.args[0])
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

    async def sql(request: Request) -> Response:
        """GET shows the form (filled from ?q= and ?as_of=, not run); POST runs it."""
        fields = request.query_params
        if request.method == "POST":
            fields = await _form(request)
            if fields is None:
                return page("error.html", 415, title="Not a form", nav="sql",
                            message="the SQL page takes a form post (application/x-www-form-urlencoded)")
        text, as_of = fields.get("q", "").strip(), fields.get("as_of", "").strip()
        context: dict[str, object] = {"sql": text, "as_of": as_of, "columns": None, "rows": [], "total": 0,
                                      "error": ""}
        if text and request.method == "POST":
            try:
                frame = await run_in_threadpool(store.at(as_of or None).sql, text)
            except (ValueError, TypeError, duckdb.Error) as exc:
                context["error"] = str(exc)
            else:
                context.update(columns=[str(c) for c in frame.columns], total=len(frame),
                               rows=frame.head(MAX_SQL_ROWS).astype(object).where(frame.notna(), None).values.tolist())
        return page("sql.html", title="SQL", nav="sql", **context)

    def artifact(request: Request) -> Response:
        """An artifact's body from the content store (checked against its sha256), or with ?part=
        the companion image its meta names (a chart's PNG)."""
        uid, key, part = request.path_params["uid"], request.path_params["key"], request.query_params.get("part")
        with store.reader() as fetch:
            rows = fetch("SELECT uid, key, kind, uri, sha256, size, format, meta FROM artifacts "
                         "WHERE uid = ? AND key = ?", [uid, key]).to_dict("records")
        path: Path | None = None
        if rows and part:
            rows[0]["meta"] = artifact_meta(rows[0]["meta"])
            found = companion_image(rows[0], store_root, part)
            if found is not None:
                rows[0], path = found
        elif rows:
            path = body_path(rows[0], store_root)
        if path is None:
            return not_found(f"run {uid!r} has no artifact {key!r}{f' image {part!r}' if part else ''} whose body is "
                             "on this machine")
        mime = media_type(rows[0])
        download = "download" in request.query_params or mime == "application/octet-stream"
        return FileResponse(path, media_type=mime, headers=_BODY_HEADERS,
                            filename=Path(key).name if download else None,
                            content_disposition_type="attachment" if download else "inline")

    def home(request: Request) -> Response:
        return RedirectResponse("/runs")

    routes = [Route("/", home), Route("/runs", runs), Route("/runs/{uid}", run),
              Route("/runs/{uid}/edit", edit, methods=["POST"]), Route("/sweeps/{uid}", sweep),
              Route("/compare", compare), Route("/sql", sql, methods=["GET", "POST"]),
              Route("/artifacts/{uid}/{key:path}", artifact), *api_routes(store)]
    # beyond loopback the token, not the name the client used, is what lets a request in
    hosts = ["*"] if wide and host in ("0.0.0.0", "::", "") else sorted(
        {host, "127.0.0.1", "localhost", "::1", "[::1]", *public_names})
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=hosts),
                  Middleware(AccessGuard, token=token, require_token=wide, viewer_token=viewer_token)]
    return Starlette(routes=routes, middleware=middleware, exception_handlers={ProjectionBusy: _unavailable})


def _apply_edit(store: UIStore, uid: str, fields: dict[str, str]) -> str:
    """Write the edit a run page's form asks for (what=labels: "set" as key=value words, "remove"
    as keys; what=note: "note"); returns the run's full uid. KeyError for an unknown run,
    ValueError/InvalidValue naming the field or key that is wrong."""
    from engine.api import EngineRunDB

    editor = EngineRunDB(store.services)
    what = fields.get("what")
    if what == "note":
        return editor.set_note(uid, fields.get("note", ""))
    if what != "labels":
        raise ValueError(f"edit: 'what' must be labels or note, got {what!r}")
    labels = {}
    for word in fields.get("set", "").split():
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise ValueError(f"label {word!r} must look like key=value")
        labels[key] = value
    removed = fields.get("remove", "").replace(",", " ").split()
    if not labels and not removed:
        raise ValueError("edit: give labels to set (key=value) or keys to remove")
    return editor.set_labels(uid, labels, removed)


def is_loopback(host: str) -> bool:
    """True when `host` (an address or name to listen on) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def _form(request: Request) -> dict[str, str] | None:
    """An urlencoded form body as {field: last value}; None for any other content type."""
    if _media_type(request) != "application/x-www-form-urlencoded":
        return None
    body = (await request.body())[:MAX_FORM_BYTES].decode("utf-8", "replace")
    return {key: values[-1] for key, values in parse_qs(body, keep_blank_values=True).items()}


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


class AccessGuard:
    """Who may do what (pure ASGI middleware, before any route runs).

    - A request another site's page made (Sec-Fetch-Site cross-site/same-site, or an Origin that is
      not this server's) is refused, except a plain navigation to a page (a link followed).
    - SQL, POSTs and `/api/*` need the token (`Authorization: Bearer`, or the cookie in a
      browser) or a same-origin request from the UI's own pages; API POST bodies must be JSON.
    - With `require_token` (served beyond loopback) every request needs the token;
      `?token=<token>` on any page sets the cookie and redirects to the page without it.
    - The viewer token admits the same way but only to read: a request that carries it (and not
      the access token) is refused any change (every POST but the read-only SQL ones).
    """

    def __init__(self, app: ASGIApp, token: str | None, require_token: bool,
                 viewer_token: str | None = None) -> None:
        self.app = app
        self.token = token
        self.require_token = require_token
        self.viewer_token = viewer_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answer = self.check(Request(scope))
        await (answer or self.app)(scope, receive, send)

    def check(self, request: Request) -> Response | None:
        """None to let the request through, else the refusal (or the token's redirect)."""
        site = request.headers.get("sec-fetch-site")
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        safe = request.method in ("GET", "HEAD")
        api = request.url.path.startswith("/api/")
        navigation = safe and not api and request.headers.get("sec-fetch-mode") == "navigate"
        if (site in ("cross-site", "same-site") or (origin is not None and origin != own)) and not navigation:
            return _refuse(request, 403, "a request from another site's page is refused")
        bearer_given = request.headers.get("authorization", "").removeprefix(TOKEN_HEADER_PREFIX)
        cookie_given = request.cookies.get(_cookie_name(request))
        bearer = self._valid(bearer_given)
        full = bearer or self._valid(cookie_given)
        viewer = not full and (self._viewer(bearer_given) or self._viewer(cookie_given))
        if viewer and not safe and request.url.path not in _READ_ONLY_POSTS:
            return _refuse(request, 403, "the viewer token reads only: editing needs the access token")
        bearer = bearer or (viewer and self._viewer(bearer_given))
        authorized = full or viewer
        given = request.query_params.get("token")
        if given is not None and safe:
            return self._admit(request, given)
        if self.require_token and not authorized:
            return _refuse(request, 401, "this runbus ui needs its access token: open /?token=<token> once, "
                                         "or send 'Authorization: Bearer <token>'")
        same_origin = site == "same-origin" or (site is None and origin == own)
        if (api or not safe) and not (bearer or same_origin or (safe and site == "none")):
            return _refuse(request, 403, "SQL and the API need the instance's token ('Authorization: Bearer', "
                                         "from RUNBUS_HOME/ui.token) or a request from the UI's own pages")
        if api and not safe and _media_type(request) != "application/json":
            return _refuse(request, 415, "the API takes JSON bodies (Content-Type: application/json)")
        return None

    def _valid(self, candidate: str | None) -> bool:
        return _matches(candidate, self.token)

    def _viewer(self, candidate: str | None) -> bool:
        return _matches(candidate, self.viewer_token)

    def _admit(self, request: Request, given: str) -> Response:
        if not (self._valid(given) or self._viewer(given)):
            return _refuse(request, 401, "the access token given in the URL is not this runbus ui's")
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        answer = RedirectResponse(request.url.path + ("?" + urlencode(rest) if rest else ""), status_code=303)
        answer.set_cookie(_cookie_name(request), given, httponly=True, samesite="strict", path="/")
        return answer


_READ_ONLY_POSTS = frozenset({"/sql", "/api/sql"})  # POSTs that only read (SQL runs read-only)


def _matches(candidate: str | None, token: str | None) -> bool:
    return bool(token and candidate) and hmac.compare_digest(str(candidate).encode(), token.encode())


def _cookie_name(request: Request) -> str:
    # cookies are shared by every port of a host: one name per server
    return f"runbus_ui_{request.url.port or 80}"


def _refuse(request: Request, status: int, message: str) -> Response:
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message, "type": "PermissionError"}, status_code=status)
    return page("error.html", status, title="Refused", message=message, nav="")

