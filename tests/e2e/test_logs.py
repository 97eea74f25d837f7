"""A run's console output as users read it: `runbus logs [--follow]`, get_log, and the Logs tab of
the run page (Chromium), which follows a running run and shows log text as text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect

from engine import NewRun, get_run_db, new_function
from tests.e2e.test_ui import start_ui, stop
from tests.support.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]
RUNBUS = str(Path(sys.executable).parent / "runbus")

# A run that prints a first batch, waits for the file `go`, prints a second, waits for `stop`.
TALKER = """
import time
from pathlib import Path
from engine import NewRun, new_function

def talker(context):
    print("first line")
    print("<script>window.pwned = 1</script><b>bold?</b>")
    context.logger.info("from the logger")
    while not Path("go").exists():
        time.sleep(0.05)
    for i in range(3):
        print(f"second batch {i}", flush=True)
    print("<img src=x onerror='window.pwned = 2'>")
    while not Path("stop").exists():
        time.sleep(0.05)

new_function().run(NewRun(handler=talker, name="talker"))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _start_talker(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    (folder / "talker.py").write_text(textwrap.dedent(TALKER))
    job = subprocess.Popen([sys.executable, "talker.py"], cwd=folder, env=_env(), stdout=subprocess.DEVNULL)
    running = wait_until(lambda: get_run_db().list_runs(name="talker", state="running").uid.tolist(),
                         "the talker run is running")
    return job, running[0]


def _noisy(context) -> None:
    print("plain")
    print("colour \x1b[31mred\x1b[0m and a bell \x07 and a \u202e bidi override")
    context.log_metric("m", 1.0)


def test_runbus_logs_prints_the_log_with_control_characters_as_escapes(bus_home: Path) -> None:
    uid = new_function().run(NewRun(handler=_noisy, name="noisy")).uid
    shown = subprocess.run([RUNBUS, "logs", uid[:8]], capture_output=True, text=True, timeout=120, env=_env())
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [
        "plain", "colour \\x1b[31mred\\x1b[0m and a bell \\x07 and a \\u202e bidi override"]
    assert "\x1b" not in shown.stdout
    state, text = get_run_db().get_log(uid)
    assert state == "completed"
    assert text.startswith("plain\ncolour \x1b[31mred")
    assert get_run_db().get_log(uid, offset=len("plain\n")) == (state, text[len("plain\n"):])
    assert get_run_db().get_log(uid, offset=len(text)) == (state, "")


def test_runbus_logs_follow_prints_new_lines_until_the_run_ends(home: Path, tmp_path: Path) -> None:
    job, uid = _start_talker(tmp_path)
    follower = subprocess.Popen([RUNBUS, "logs", uid, "--follow"], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "first line\n"  # printed while the run still runs
        (tmp_path / "go").touch()
        (tmp_path / "stop").touch()
        guard = threading.Timer(120, follower.kill)  # a follower that never ends fails the test
        guard.start()
        rest = follower.stdout.read()
        guard.cancel()
        assert follower.wait() == 0
        assert rest.splitlines() == ["<script>window.pwned = 1</script><b>bold?</b>", "[info] from the logger",
                                     "second batch 0", "second batch 1", "second batch 2",
                                     "<img src=x onerror='window.pwned = 2'>"]
    finally:
        (tmp_path / "stop").touch()
        assert job.wait(timeout=60) == 0
        if follower.poll() is None:
            follower.kill()


def test_the_logs_tab_follows_a_running_run_and_shows_markup_as_text(home: Path, tmp_path: Path,
                                                                    browser: Browser) -> None:
    job, uid = _start_talker(tmp_path)
    wait_until(lambda: "first line" in get_run_db().get_log(uid)[1], "the first line is in the log")
    process, url = start_ui(home, _env(), tmp_path / "ui.log")
    context = browser.new_context()
    try:
        db = get_run_db()
        assert "first line" in db.get_log(uid)[1]  # read while the UI serves the same home
        with pytest.raises(urllib.error.HTTPError) as refused:  # the API needs the token or the UI's own page
            urllib.request.urlopen(f"{url}/api/runs/{uid}/log", timeout=30)
        assert refused.value.code == 403
        token = (home / "ui.token").read_text()
        request = urllib.request.Request(f"{url}/api/runs/{uid[:10]}/log?after=1",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            polled = json.loads(answer.read())
        assert polled["state"] == "running" and polled["lines"][0] == [
            2, "stdout", "<script>window.pwned = 1</script><b>bold?</b>"]
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.goto(f"{url}/runs/{uid}")
        log = page.locator("pre.log")
        expect(log).to_be_hidden()  # the Run tab is shown first
        page.get_by_role("button", name="Logs").click()
        expect(log).to_contain_text("first line")
        expect(log).to_contain_text("<script>window.pwned = 1</script><b>bold?</b>")
        assert page.locator("pre.log b, pre.log script").count() == 0
        page.evaluate("window.notReloaded = true")
        (tmp_path / "go").touch()
        expect(log).to_contain_text("<img src=x onerror='window.pwned = 2'>", timeout=30_000)  # appended as text
        assert page.evaluate("window.notReloaded") is True
        assert page.locator("pre.log img").count() == 0
        assert page.evaluate("window.pwned") is None
        page.screenshot(path=str(tmp_path / "logs.png"), full_page=True)
        assert page.locator("pre.log span.log-logger").inner_text() == "[info] from the logger\n"
    finally:
        context.close()
        (tmp_path / "stop").touch()
        stop(process)
        assert job.wait(timeout=60) == 0
