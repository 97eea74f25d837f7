"""The web UI and the report as a user sees them: `runbus ui` in its own process, driven by
Debian's headless Chromium through Playwright. A missing browser fails these tests (run
`make browser`). Screenshots of each page go to tests/screenshots/ (ignored by git)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from engine import NewRun, get_run_db, new_function
from engine.api import close_session
from engine.loader import load_handler
from engine.run import RunObject
from engine.ui.render import runs_table_html
from engine.ui.report import write_report
from producers.bus.memory import MemoryBus
from projections import ProjectionBusy, open_projection
from projections.client import ServiceClient
from projections.service import ServiceAddress
from tests.support.polling import wait_until
from tests.support.ui_seed import curves, seed

ROOT = Path(__file__).resolve().parents[2]
RUNBUS = str(Path(sys.executable).parent / "runbus")
SHOTS = ROOT / "tests" / "screenshots"
SEEDED_RUNS = 8  # demo, the sweep parent and its 3 iterations, 2 runs with metric curves, 1 failed run


@dataclass
class UI:
    home: Path
    url: str
    uids: dict[str, str]
    env: dict[str, str]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ui(home: Path, env: dict[str, str], log: Path, *options: str,
             host: str = "127.0.0.1") -> tuple[subprocess.Popen[bytes], str]:
    """`runbus ui` on a free port, once it answers its API with the token it keeps in ui.token."""
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen([RUNBUS, "ui", "--host", host, "--port", str(port), *options], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"runbus ui exited with {process.returncode}: {log.read_text()}")
        try:
            token = (home / "ui.token").read_text()
            request = urllib.request.Request(url + "/api/ping", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    pytest.fail(f"runbus ui did not answer within 60s: {log.read_text()}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UI]:
    """The seed example, its sweep and two metric runs, then `runbus ui` serving them."""
    base = tmp_path_factory.mktemp("ui")
    home = base / "runbus-home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RUNBUS_HOME", str(home))
        patch.delenv("RUNBUS_BUS", raising=False)
        patch.setenv("RUNBUS_FLUSH_INTERVAL", "0.05")
        close_session()
        uids = seed()
        env = {**os.environ, "RUNBUS_DB_TIMEOUT": "10"}
        process, url = start_ui(home, env, base / "ui.log")
        try:
            yield UI(home, url, uids, env)
        finally:
            stop(process)
            stop_service(home)
            close_session()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab; every request it makes must stay on this machine (no CDN, no network)."""
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    requested: list[str] = []
    tab.on("request", lambda request: requested.append(request.url))
    yield tab
    context.close()
    outside = [u for u in requested if not u.startswith(("http://127.0.0.1:", "data:", "file:", "about:"))]
    assert not outside, f"the page fetched from outside this machine: {outside}"


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def row_of(page: Page, uid: str):
    return page.locator(f"table.runs tbody tr[data-uid='{uid}']")


def test_runs_page_lists_the_seed_runs_and_filters_them(ui: UI, page: Page) -> None:
    page.goto(ui.url + "/runs")
    rows = page.locator("table.runs tbody tr")
    expect(rows).to_have_count(SEEDED_RUNS)
    expect(page.locator("#total")).to_have_text(f"{SEEDED_RUNS} runs")
    demo = row_of(page, ui.uids["demo"])
    expect(demo.locator("td.name")).to_have_text("demo")
    expect(demo.locator("td.state")).to_have_text("completed")
    expect(demo.locator("td.labels")).to_contain_text("type=demo")
    expect(row_of(page, ui.uids["sweep"]).locator("td.name a.chip")).to_have_text("sweep")
    curves = row_of(page, ui.uids["curves_slow"])
    expect(curves.locator("td.labels")).to_contain_text("note=<b>not bold</b>")  # shown as text, not markup
    assert curves.locator("td.labels b").count() == 0
    shot(page, "runs")

    page.fill("input[name=where]", "result.loss < 10")
    page.click("form.filters button[type=submit]")
    expect(rows).to_have_count(3)  # iterations 2 (loss 6) and 3 (loss 9), and the sweep parent (loss 6)
    page.click("th a:has-text('loss')")
    expect(rows.first.locator("td[data-col='result.loss']")).to_have_text("6")
    expect(rows.last.locator("td[data-col='result.loss']")).to_have_text("9")


def test_sweep_page_marks_iteration_2_best_and_links_each_iteration(ui: UI, page: Page) -> None:
    page.goto(ui.url + "/runs")
    row_of(page, ui.uids["sweep"]).locator("a.chip:has-text('sweep')").click()
    expect(page.locator("h1")).to_contain_text("Sweep handler")
    iterations = page.locator("table.iterations tbody tr")
    expect(iterations).to_have_count(3)
    best = page.locator("table.iterations tr.best")
    expect(best).to_have_count(1)
    expect(best).to_have_attribute("data-iter", "2")
    expect(best.locator("td").first).to_contain_text("2 ★ best")
    expect(page.locator(".best-mark").first).to_have_text("★ best iteration: 2")
    chart = page.locator("figure.chart[data-metric=parallel_coordinates] svg")
    expect(chart).to_be_visible()
    shot(page, "sweep")

    best.locator("a.uid").click()
    expect(page.locator("h1")).to_contain_text("handler")
    expect(page.locator(".lineage")).to_contain_text("sweep")
    expect(page.locator("table.kv").first).to_contain_text("iteration2")


def test_run_page_shows_the_plot_the_table_and_the_text(ui: UI, page: Page) -> None:
    page.goto(f"{ui.url}/runs/{ui.uids['demo'][:8]}")
    expect(page.locator("h1")).to_contain_text("demo")
    image = page.locator("[data-artifact=myfig] img")
    expect(image).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    assert image.evaluate("img => img.naturalWidth") > 100
    table = page.locator("[data-artifact='mydf.csv'] table tbody tr")
    expect(table).to_have_count(3)
    expect(table.first.locator("td")).to_have_text(["10", "100"])
    expect(page.locator("[data-artifact='model.txt'] pre")).to_have_text("abc is 123")
    expect(page.locator("table.events tbody tr").first).to_contain_text("run_started")
    shot(page, "run")


def test_run_page_of_a_failed_run_shows_the_error_and_its_traceback(ui: UI, page: Page) -> None:
    page.goto(f"{ui.url}/runs/{ui.uids['broken']}")
    expect(page.locator("h1 .badge")).to_have_text("error")
    expect(page.locator("p.error")).to_have_text("ValueError: no data in <input>")
    expect(page.locator("pre.traceback")).to_contain_text("Traceback (most recent call last)")
    expect(page.locator("pre.traceback")).to_contain_text('raise ValueError("no data in <input>")')


def test_metric_charts_render_with_a_marker_per_point(ui: UI, page: Page) -> None:
    page.goto(f"{ui.url}/runs/{ui.uids['curves_slow']}")
    for key in ("loss", "accuracy"):
        chart = page.locator(f"figure.chart[data-metric={key}]")
        expect(chart.locator("svg")).to_be_visible()
        expect(chart.locator("figcaption")).to_have_text("6 points")
        assert chart.locator("svg").bounding_box()["width"] > 200
        markers = chart.locator("svg use")
        assert markers.count() >= 6
        assert all(markers.nth(i).bounding_box()["width"] > 0 for i in range(6))
    shot(page, "run-metrics")


def test_sql_box_answers_and_refuses_writes(ui: UI, page: Page) -> None:
    page.goto(ui.url + "/sql?q=select+count(*)+from+runs")
    expect(page.locator("textarea[name=q]")).to_have_value("select count(*) from runs")
    assert page.locator("table.sql-result").count() == 0  # a GET fills the form, it runs nothing
    with page.expect_request(lambda request: request.url.endswith("/sql")) as sent:
        page.click("button:has-text('Run')")
    assert sent.value.method == "POST"
    expect(page.locator("table.sql-result th")).to_have_text("count_star()")
    expect(page.locator("table.sql-result tbody td")).to_have_text(str(SEEDED_RUNS))
    shot(page, "sql")
    page.fill("textarea[name=q]", "drop table runs")
    page.click("button:has-text('Run')")
    expect(page.locator("#sql-error")).to_contain_text("read-only: DROP statements are refused")


def test_compare_highlights_differences_and_overlays_curves(ui: UI, page: Page) -> None:
    page.goto(ui.url + "/runs")
    for uid in (ui.uids["curves_slow"], ui.uids["curves_fast"]):
        row_of(page, uid).locator("input[type=checkbox]").check()
    page.click("button:has-text('Compare selected')")
    expect(page.locator("h1")).to_have_text("Compare runs")
    expect(page.locator("tr[data-key='params.lr']")).to_have_class(re.compile(r"\bdiff\b"))
    assert sorted(page.locator("tr[data-key='params.lr'] td").all_inner_texts()) == ["0.1", "0.5"]
    expect(page.locator("tr[data-key='run.state']")).not_to_have_class(re.compile(r"\bdiff\b"))
    expect(page.locator("figure.chart[data-metric=loss]")).to_have_attribute("data-series", "2")
    shot(page, "compare")


def test_queries_from_other_processes_answer_while_the_ui_serves(ui: UI) -> None:
    with pytest.raises(ProjectionBusy), open_projection(ui.home / "runbus.duckdb", timeout_s=0.5):
        pass  # the projection service holds the file: every reader, the UI too, is its client
    listed = subprocess.run([RUNBUS, "runs", "--format", "json", "--limit", "100"], env=ui.env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "demo" in {run["name"] for run in json.loads(listed.stdout)}
    shown = subprocess.run([RUNBUS, "show", ui.uids["demo"][:8]], env=ui.env, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["results"] == {"accuracy": 10, "loss": 15, "return": "my resp"}
    refused = subprocess.run([RUNBUS, "sql", "DELETE FROM runs"], env=ui.env, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 1 and "read-only" in refused.stderr
    db = get_run_db()
    assert db.read_run(ui.uids["curves_fast"])["metrics"] == {"accuracy": 1.0, "loss": pytest.approx(1 / 3.5)}
    assert list(db.list_runs(parent=ui.uids["sweep"], sort_by="result.loss").iteration) == [2, 3, 1]


def test_report_is_one_self_contained_file(ui: UI, page: Page, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    done = subprocess.run([RUNBUS, "report", "--out", str(out)], env=ui.env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    html = out.read_text()
    assert "data:image/png;base64," in html and "<svg" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the report links outside itself"
    assert "<script" not in html and "<link" not in html
    page.goto(out.as_uri())
    expect(page.locator("table.runs tbody tr")).to_have_count(SEEDED_RUNS)
    image = page.locator(f"#run-{ui.uids['demo']} [data-artifact=myfig] img")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    expect(page.locator(f"#sweep-{ui.uids['sweep']} tr.best")).to_have_attribute("data-iter", "2")
    expect(page.locator(f"#run-{ui.uids['curves_slow']} figure.chart[data-metric=loss] svg")).to_be_visible()
    shot(page, "report")


def test_notebook_views_share_the_ui_look(ui: UI, page: Page) -> None:
    db = get_run_db()
    run_html = RunObject.from_record(db.read_run(ui.uids["demo"]))._repr_html_()
    table_html = runs_table_html(db.list_runs())
    page.set_content(f"<body style='margin:1rem'>{run_html}<hr>{table_html}</body>")
    card = page.locator(".rb .card").first
    expect(card.locator(".badge")).to_have_text("completed")
    expect(card.locator("table.kv").first).to_contain_text("p15")
    expect(page.locator(".rb table.runs tbody tr")).to_have_count(SEEDED_RUNS)
    assert "state-completed{" in run_html.replace(" ", "") and "state-completed{" in table_html.replace(" ", "")
    shot(page, "notebook")


def test_a_running_run_updates_without_a_reload(ui: UI, page: Page) -> None:
    # last of the tests on the seeded UI: it adds a run
    job = subprocess.Popen([sys.executable, "-c", "from engine import NewRun, new_function\n"
                            "from tests.support.ui_seed import slow\n"
                            "new_function().run(NewRun(handler=slow, name='slow', params={'seconds': 6}))"],
                           cwd=ROOT, env=ui.env)
    try:
        deadline = time.monotonic() + 30
        while get_run_db().list_runs(name="slow", state="running").empty:
            assert time.monotonic() < deadline, "the slow run never showed up as running"
            time.sleep(0.2)
        page.goto(ui.url + "/runs")
        slow = page.locator("table.runs tbody tr", has_text="slow")
        expect(slow.locator("td.state")).to_have_text("running")
        page.evaluate("window.notReloaded = true")
        expect(slow.locator("td.state")).to_have_text("completed", timeout=30_000)
        assert page.evaluate("window.notReloaded") is True
        shot(page, "runs-live")
    finally:
        assert job.wait(timeout=60) == 0


def _open_files(pid: int) -> set[Path]:
    """The files process `pid` has open now (Linux /proc)."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            found.add(Path(os.readlink(fd)))
        except OSError:
            continue  # closed meanwhile
    return found


def stop_service(home: Path) -> None:
    """Stop the projection service of `home`, if one runs, and wait until it has released the file."""
    pid = ServiceClient(ServiceAddress.of(home), MemoryBus(), start=None, timeout_s=10).stop()
    if pid is not None:
        wait_until(lambda: not Path(f"/proc/{pid}").exists() or (home / "runbus.duckdb").resolve()
                   not in _open_files(pid), f"the projection service {pid} released the file")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads open files from /proc")
@pytest.mark.parametrize("projection", ["service", "inprocess"])
def test_the_ui_holds_no_file_and_withdraws_when_stopped(tmp_path: Path, projection: str) -> None:
    """The UI is one reader among others: while it serves, it holds no DuckDB file (the projection
    service does, or nobody between requests) and another process's query answers; one UI per
    home; once stopped its ui.json and ui.token are gone."""
    home = tmp_path / "home"
    env = {**os.environ, "RUNBUS_HOME": str(home), "RUNBUS_PROJECTION": projection,
           "RUNBUS_PROJECTION_IDLE": "60", "RUNBUS_DB_TIMEOUT": "5"}
    env.pop("RUNBUS_BUS", None)
    db_file = home.resolve() / "runbus.duckdb"
    process, url = start_ui(home, env, tmp_path / "ui.log")
    try:
        announced = json.loads((home / "ui.json").read_text())
        assert announced["pid"] == process.pid and url.endswith(f":{announced['port']}")
        wait_until(lambda: db_file not in _open_files(process.pid), "the UI holds no projection file")
        if projection == "service":
            holder = ServiceClient(ServiceAddress.of(home), MemoryBus(), start=None, timeout_s=10).ping()["pid"]
            assert db_file in _open_files(int(holder))
        listed = subprocess.run([RUNBUS, "runs"], env=env, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr  # answered while the UI serves, without stopping it
        second = subprocess.run([RUNBUS, "ui", "--port", str(free_port())], env=env, capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 1 and "a runbus ui already serves" in second.stderr
        assert json.loads((home / "ui.json").read_text())["pid"] == process.pid
    finally:
        stop(process)
        stop_service(home)
    assert process.returncode == 0
    assert not (home / "ui.json").exists() and not (home / "ui.token").exists()
    with open_projection(db_file, timeout_s=5, linger_s=0) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (0,)


def test_report_without_a_ui_reads_the_projection_itself(home: Path, tmp_path: Path) -> None:
    handler = load_handler(f"{ROOT}/examples/quickstart.py:handler")
    run = new_function().run(NewRun(handler=handler, name="solo", params={"p1": 4}))
    out = tmp_path / "solo.html"
    assert write_report(get_run_db(), out, home / "artifacts") == 1
    html = out.read_text()
    assert f'id="run-{run.uid}"' in html and "data:image/png;base64," in html
    assert "<td>110</td>" in html  # the mydf.csv preview


def test_the_ui_serves_the_embedded_and_the_kafka_projection_alike(bus_home: Path, tmp_path: Path) -> None:
    run = new_function().run(NewRun(handler=curves, name="on-the-bus", params={"lr": 0.2}))
    process, url = start_ui(bus_home, {**os.environ, "RUNBUS_DB_TIMEOUT": "10"}, tmp_path / "ui.log")
    try:
        with urllib.request.urlopen(f"{url}/runs?name=on-the-bus", timeout=30) as response:
            page = response.read().decode()
        assert f'data-uid="{run.uid}"' in page and "completed" in page
        assert get_run_db().read_run(run.uid)["params"] == {"lr": 0.2}  # while the UI serves
    finally:
        stop(process)


def test_a_page_past_the_end_shows_the_last_and_a_run_with_no_sweep_has_no_sweep_page(ui: UI) -> None:
    """/runs?page=99999 said "page 99999 of 2" over no run; /sweeps/<a plain run> showed an empty sweep."""
    with urllib.request.urlopen(f"{ui.url}/runs?page=99999", timeout=30) as response:
        body = response.read().decode()
    shown = re.search(r"page (\d+) of (\d+)<", body)
    assert shown is not None and shown.group(1) == shown.group(2), shown
    assert ui.uids["demo"][:8] in body or ui.uids["sweep"][:8] in body  # the last page has runs
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{ui.url}/sweeps/{ui.uids['demo']}", timeout=30)
    assert missing.value.code == 404
    with urllib.request.urlopen(f"{ui.url}/sweeps/{ui.uids['sweep']}", timeout=30) as response:
        assert response.status == 200
