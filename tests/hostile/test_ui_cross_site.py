"""Findings 2 and 3: other sites' pages in the user's browser cannot run SQL or reach the API of
`runbus ui`, and serving beyond loopback needs an access token.

A second local HTTP server plays the other site (on another port: same-site as the UI when reached
as 127.0.0.1, cross-site as localhost). Its page, loaded in headless Chromium, tries what a hostile
page can do without the user's help: an <img> GET of /sql?q=..., no-cors fetch POSTs with a
text/plain body, a CORS fetch with a JSON body, and form POSTs to /sql and /api/sql. Each statement
either computes a marker ('pwn' || 'ed-' || 6*7) that would show in an answer had it run, or tries
a write (delete, insert, COPY TO a file). Nothing answers with the marker, every POST is refused,
the tables are unchanged and no file is written.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import NewRun, new_function
from engine.api import close_session, session
from engine.ui.app import create_app
from engine.ui.store import HeldRunDB
from projections import open_projection
from tests.e2e.test_ui import RUNBUS, free_port, start_ui, stop
from tests.hostile.test_sql import Served, fingerprint
from tests.support.handlers import seed_like
from tests.support.serving import served_in_thread

MARKER = "pwned-42"
READ = "SELECT 'pwn' || 'ed-' || 6*7 AS marker"


def attack_page(ui: str, out: Path) -> str:
    """What a hostile page does to the UI at `ui` as soon as it loads."""
    writes = [f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}/{{name}}.csv'", "EXPLAIN ANALYZE DELETE FROM runs",
              "EXPLAIN ANALYZE INSERT INTO labels VALUES ('x', 'evil', 'yes')"]
    statements = [READ] + [w.format(name=f"w{i}") for i, w in enumerate(writes)]
    sql_json = json.dumps(statements)
    plain_name = json.dumps({"sql": READ, "x": ""})[:-2]  # text/plain form: name=value reads as JSON
    return f"""<!doctype html><html><body>
<iframe name="sink1"></iframe><iframe name="sink2"></iframe>
<form id="page_form" method="POST" action="{ui}/sql" target="sink1"><input name="q" value="{READ}"></form>
<form id="api_form" method="POST" action="{ui}/api/sql" enctype="text/plain" target="sink2">
  <input name='{plain_name}' value='"}}'></form>
<script>
const ui = {json.dumps(ui)};
const statements = {sql_json};
for (const sql of statements) {{
  const img = new Image(); img.src = ui + "/sql?q=" + encodeURIComponent(sql); document.body.appendChild(img);
  fetch(ui + "/api/sql", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}},
                          body: JSON.stringify({{sql}})}}).catch(() => null);
  fetch(ui + "/api/sql", {{method: "POST", mode: "cors", headers: {{"Content-Type": "application/json"}},
                          body: JSON.stringify({{sql}})}}).catch(() => null);
}}
document.getElementById("page_form").submit();
document.getElementById("api_form").submit();
</script></body></html>"""


@dataclass
class OtherSite:
    """A plain HTTP server on another port serving one page."""

    port: int
    pages: dict[str, str] = field(default_factory=dict)


@pytest.fixture
def other_site() -> Iterator[OtherSite]:
    site = OtherSite(0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = site.pages.get(self.path, "not here").encode()
            self.send_response(200 if self.path in site.pages else 404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    site.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield site
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def seeded(home: Path) -> Path:
    """Two runs (one label each) in `home`."""
    for p1 in (1, 2):
        new_function().run(NewRun(handler=seed_like, name=f"seed{p1}", params={"p1": p1}).set_label("k", "v"))
    return home


@pytest.fixture
def served(seeded: Path, home: Path, tmp_path: Path) -> Iterator[Served]:
    """`runbus ui` in its own process over the seeded home."""
    close_session()
    process, url = start_ui(home, {**os.environ, "RUNBUS_DB_TIMEOUT": "10"}, tmp_path / "ui.log")
    try:
        yield Served(url, (home / "ui.token").read_text())
    finally:
        stop(process)


class Recorder:
    """ASGI wrapper that keeps the answers the app gave to requests without an Authorization
    header (the test's own carry one): (method, path?query, status, body).

    Chromium hides the answers to a page's cross-site <img> (opaque response blocking), so what
    the UI answered is read here, on the server side."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.answers: list[tuple[str, str, int, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or any(name == b"authorization" for name, _ in scope["headers"]):
            await self.app(scope, receive, send)
            return
        status, chunks = 0, []

        async def keep(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, keep)
        target = scope["path"] + ("?" + scope["query_string"].decode() if scope["query_string"] else "")
        self.answers.append((scope["method"], target, status, b"".join(chunks).decode("utf-8", "replace")))


@contextmanager
def recorded_ui(token: str) -> Iterator[tuple[Served, Recorder]]:
    """The UI app (engine.ui.app, on a held projection as `runbus ui` builds it) served by uvicorn
    in this process on a free loopback port, its answers recorded."""
    svc = session().services
    with open_projection(svc.settings.db_path, linger_s=0) as con:
        recorder = Recorder(create_app(HeldRunDB(svc, con), "127.0.0.1", token))
        with served_in_thread(recorder) as url:
            yield Served(url, token), recorder


@pytest.mark.parametrize("attacker_host", ["localhost", "127.0.0.1"], ids=["cross-site", "same-site"])
def test_another_sites_page_runs_no_sql_and_changes_nothing(seeded: Path, other_site: OtherSite, browser: Browser,
                                                            tmp_path: Path, attacker_host: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with recorded_ui("token-of-this-test") as (served, recorder):
        before = fingerprint(served.sql)
        other_site.pages["/attack.html"] = attack_page(served.url, out)
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"http://{attacker_host}:{other_site.port}/attack.html")
        # 4 statements x (img, no-cors fetch, CORS preflight) + 2 forms
        deadline = time.monotonic() + 30
        while len(recorder.answers) < 14 and time.monotonic() < deadline:
            page.wait_for_timeout(100)
        context.close()
        answers = list(recorder.answers)
        assert fingerprint(served.sql) == before

    kinds = sorted({(method, target.split("?")[0]) for method, target, _, _ in answers})
    assert kinds == [("GET", "/sql"), ("OPTIONS", "/api/sql"), ("POST", "/api/sql"), ("POST", "/sql")], answers
    assert len(answers) >= 14, f"the attack did not all reach the UI: {answers}"
    for method, target, status, body in answers:
        assert MARKER not in body, f"{method} {target} ran the statement: {body[:300]}"
        assert status in (403, 415) or method == "GET", f"{method} {target} was answered {status}"
    assert list(out.iterdir()) == []


def test_the_uis_own_pages_still_run_sql(served: Served, browser: Browser) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(served.url + "/sql")
    page.fill("textarea[name=q]", READ)
    page.click("button:has-text('Run')")
    expect(page.locator("table.sql-result tbody td")).to_have_text(MARKER)
    context.close()


def test_api_needs_the_token_or_the_same_origin_and_json(served: Served, home: Path) -> None:
    body = json.dumps({"sql": READ}).encode()
    assert served.post("/api/sql", body, "application/json", bearer=False)[0] == 403
    assert served.post("/api/sql", body, "text/plain")[0] == 415
    assert served.post("/sql", b"q=SELECT+1", "application/x-www-form-urlencoded", bearer=False)[0] == 403
    status, text = served.post("/api/sql", body, "application/json")
    assert status == 200 and MARKER in text
    assert stat.S_IMODE((home / "ui.token").stat().st_mode) == 0o600
    with urllib.request.urlopen(served.url + "/sql?q=" + urllib.parse.quote(READ), timeout=30) as response:
        assert MARKER not in response.read().decode()  # GET shows the form, runs nothing
        # and never inside another site's frame, where the Run click could be the other site's
        assert response.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def test_serving_beyond_loopback_needs_a_token(home: Path, tmp_path: Path, browser: Browser) -> None:
    env = {**os.environ, "RUNBUS_DB_TIMEOUT": "10"}
    env.pop("RUNBUS_UI_TOKEN", None)
    refused = subprocess.run([RUNBUS, "ui", "--host", "0.0.0.0", "--port", str(free_port())], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "--token or RUNBUS_UI_TOKEN" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (home / "ui.json").exists()

    token = "a-long-random-token-for-this-test"
    process, url = start_ui(home, {**env, "RUNBUS_UI_TOKEN": token}, tmp_path / "ui.log", host="0.0.0.0")
    try:
        assert "every request needs the access token" in (tmp_path / "ui.log").read_text()
        assert token not in (tmp_path / "ui.log").read_text()
        assert _get(url + "/runs")[0] == 401
        assert _get(url + "/runs", {"Host": "attacker.example"})[0] == 401
        assert _get(url + "/runs?token=wrong")[0] == 401
        assert _get(url + "/runs", {"Authorization": f"Bearer {token}"})[0] == 200
        status, _, headers = _get(url + "/runs?token=" + token)
        assert status == 303 and headers["location"] == "/runs" and "HttpOnly" in headers["set-cookie"]

        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{url}/sql?token={token}")
        assert page.url == url + "/sql"  # the token left the address bar for a cookie
        page.fill("textarea[name=q]", READ)
        page.click("button:has-text('Run')")
        expect(page.locator("table.sql-result tbody td")).to_have_text(MARKER)
        context.close()
    finally:
        stop(process)
