"""Editing a run from its page in the UI: labels and note through a form POST (AccessGuard decides
who may), the history of edits shown with who and when, every value escaped (they come from the
untrusted log)."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.e2e.test_ui import RUNBUS, start_ui, stop

HOSTILE = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'


@pytest.fixture
def served(home: Path, tmp_path: Path) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(url, uid of one completed run, env): `runbus ui` serving a home with one run."""
    (tmp_path / "job.py").write_text("def train(context):\n    context.log_result('accuracy', 0.9)\n")
    env = dict(os.environ)
    subprocess.run([RUNBUS, "run", "job.py:train"], cwd=tmp_path, env=env, check=True, capture_output=True,
                   timeout=120)
    uid = json.loads(runbus(env, "runs", "--format", "json"))[0]["uid"]
    process, url = start_ui(home, env, tmp_path / "ui.log")
    try:
        yield url, uid, env
    finally:
        stop(process)


def runbus(env: dict[str, str], *args: str) -> str:
    return subprocess.run([RUNBUS, *args], env=env, check=True, capture_output=True, text=True, timeout=120).stdout


def amendments(env: dict[str, str]) -> list[dict]:
    return json.loads(runbus(env, "sql", "SELECT amended_by, labels, note FROM amendments ORDER BY position",
                             "--format", "json"))


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    yield tab
    context.close()


def test_labels_and_note_edited_on_the_run_page_show_in_its_history(served, page: Page) -> None:
    url, uid, env = served
    page.goto(f"{url}/runs/{uid}")
    page.locator("details.edit summary").click()
    page.locator("form.edit-labels input[name=set]").fill("team=vision stage=dev")
    page.locator("form.edit-labels button").click()
    expect(page.locator("table.amendments tbody tr")).to_have_count(1)

    page.locator("details.edit summary").click()
    page.locator("form.edit-labels input[name=remove]").fill("stage")
    page.locator("form.edit-labels button").click()
    expect(page.locator("table.amendments tbody tr")).to_have_count(2)

    page.locator("details.edit summary").click()
    page.locator("form.edit-note textarea").fill(HOSTILE)
    page.locator("form.edit-note button").click()

    rows = page.locator("table.amendments tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.nth(0)).to_contain_text(getpass.getuser())
    expect(rows.nth(0)).to_contain_text("team")
    expect(rows.nth(1)).to_contain_text("stage")
    expect(rows.nth(2).locator("td.note")).to_have_text(HOSTILE)  # shown as text, not run
    expect(page.locator(".card td.note")).to_have_text(HOSTILE)
    assert page.title() != "pwned" and page.locator("td.note script, td.note img").count() == 0
    assert [(a["amended_by"], a["note"]) for a in amendments(env)] == [
        (getpass.getuser(), None), (getpass.getuser(), None), (getpass.getuser(), HOSTILE)]
    shown = json.loads(runbus(env, "show", uid))
    assert shown["labels"] == {"team": "vision"} and shown["note"] == HOSTILE


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_an_edit_from_another_site_or_by_get_is_refused_and_writes_nothing(served, home: Path) -> None:
    url, uid, env = served
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    body = b"what=note&note=from+elsewhere"
    assert post(f"{url}/runs/{uid}/edit", body, {**form, "Origin": "http://evil.example"}) == 403
    assert post(f"{url}/runs/{uid}/edit", body, {**form, "Sec-Fetch-Site": "cross-site"}) == 403
    assert post(f"{url}/runs/{uid}/edit", body, form) == 403  # neither the token nor the UI's own page
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/runs/{uid}/edit?what=note&note=x", timeout=30)
    assert refused.value.code == 405
    assert amendments(env) == []

    token = (home / "ui.token").read_text()
    assert post(f"{url}/runs/{uid}/edit", body, {**form, "Authorization": f"Bearer {token}"}) == 200  # after 303
    assert [a["note"] for a in amendments(env)] == ["from elsewhere"]


def test_an_edit_with_a_bad_label_or_of_an_unknown_run_says_why(served, home: Path) -> None:
    url, uid, env = served
    headers = {"Content-Type": "application/x-www-form-urlencoded",
               "Authorization": f"Bearer {(home / 'ui.token').read_text()}"}
    assert post(f"{url}/runs/{uid}/edit", b"what=labels&set=novalue", headers) == 400
    assert post(f"{url}/runs/nosuchrun/edit", b"what=note&note=x", headers) == 404
    assert amendments(env) == []


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_the_viewer_token_reads_pages_and_sql_but_never_edits(home: Path, tmp_path: Path, host: str) -> None:
    (tmp_path / "job.py").write_text("def train(context):\n    context.log_result('accuracy', 0.9)\n")
    env = {**os.environ, "RUNBUS_UI_TOKEN": "full-token-" + "x" * 20, "RUNBUS_UI_VIEWER_TOKEN": "viewer-" + "y" * 20}
    subprocess.run([RUNBUS, "run", "job.py:train"], cwd=tmp_path, env=env, check=True, capture_output=True,
                   timeout=120)
    uid = json.loads(runbus(env, "runs", "--format", "json"))[0]["uid"]
    process, url = start_ui(home, env, tmp_path / "ui.log", host=host)
    try:
        viewer = {"Authorization": f"Bearer {env['RUNBUS_UI_VIEWER_TOKEN']}"}
        with urllib.request.urlopen(urllib.request.Request(f"{url}/runs/{uid}", headers=viewer), timeout=30) as page:
            assert page.status == 200 and uid in page.read().decode()
        sql = json.dumps({"sql": "SELECT count(*) AS n FROM runs"}).encode()
        assert post(f"{url}/api/sql", sql, {**viewer, "Content-Type": "application/json"}) == 200
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        edit = b"what=note&note=by+a+viewer"
        assert post(f"{url}/runs/{uid}/edit", edit, {**form, **viewer}) == 403
        # in a browser: the viewer's cookie on the UI's own page still may not edit
        assert post(f"{url}/runs/{uid}/edit", edit, {**form, "Sec-Fetch-Site": "same-origin",
                                                     "Cookie": f"runbus_ui_{url.rsplit(':', 1)[1]}="
                                                               f"{env['RUNBUS_UI_VIEWER_TOKEN']}"}) == 403
        assert amendments(env) == []
        full = {"Authorization": f"Bearer {env['RUNBUS_UI_TOKEN']}"}
        assert post(f"{url}/runs/{uid}/edit", edit, {**form, **full}) == 200  # after 303
        assert [a["note"] for a in amendments(env)] == ["by a viewer"]
    finally:
        stop(process)


def test_behind_a_reverse_proxy_the_public_name_is_let_in_with_the_token_only(home: Path, tmp_path: Path) -> None:
    """What a TLS proxy on this machine sends (Host: its public name, X-Forwarded-Proto: https):
    pages and edits from the public origin work with the token, nothing works without it, and
    another name is refused."""
    (tmp_path / "job.py").write_text("def train(context):\n    context.log_result('accuracy', 0.9)\n")
    env = {**os.environ, "RUNBUS_UI_TOKEN": "full-token-" + "x" * 20}
    subprocess.run([RUNBUS, "run", "job.py:train"], cwd=tmp_path, env=env, check=True, capture_output=True,
                   timeout=120)
    uid = json.loads(runbus(env, "runs", "--format", "json"))[0]["uid"]
    process, url = start_ui(home, env, tmp_path / "ui.log", "--public-name", "runs.team.example")
    try:
        proxied = {"Host": "runs.team.example", "X-Forwarded-Proto": "https"}
        token = {"Authorization": f"Bearer {env['RUNBUS_UI_TOKEN']}"}

        def get(headers: dict[str, str]) -> int:
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{url}/runs/{uid}", headers=headers),
                                            timeout=30) as answer:
                    return answer.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert get({**proxied, **token}) == 200
        assert get(proxied) == 401  # a public name: every request needs the token
        assert get({**proxied, **token, "Host": "evil.example"}) == 400
        form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": "https://runs.team.example"}
        assert post(f"{url}/runs/{uid}/edit", b"what=note&note=via+proxy", {**proxied, **token, **form}) == 200
        assert [a["note"] for a in amendments(env)] == ["via proxy"]
    finally:
        stop(process)
