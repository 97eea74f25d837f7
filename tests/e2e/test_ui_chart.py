"""A chart's PNG (the companion body its artifact's meta names) is shown on the run page and in the
report, beside its CSV rows, and served only from the content store by its sha256."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from engine import NewRun, get_run_db, new_function
from engine.api import session
from engine.ui.app import create_app
from engine.ui.report import report_html
from engine.ui.store import HeldRunDB
from producers.artifacts import ChartArtifact
from projections import open_projection
from tests.support.serving import http_get, served_in_thread


def _charted(context: Any) -> None:
    context.log_artifact(ChartArtifact("curve", data=[[1, 2], [3, 4]], header=["x", "y"]))


def test_the_run_page_and_the_report_show_a_charts_image(home: Path) -> None:
    uid = new_function().run(NewRun(handler=_charted, name="charted")).uid
    meta = get_run_db().read_run(uid)["artifacts"][0]["meta"]
    svc = session().services
    png = svc.artifact_store.read_verified("curve", meta["chart"]["sha256"])
    assert png.startswith(b"\x89PNG")
    with open_projection(svc.settings.db_path) as con, served_in_thread(create_app(HeldRunDB(svc, con))) as base:
        status, page = http_get(f"{base}/runs/{uid}")
        assert status == 200
        image = re.search(rb'<img class="artifact" src="([^"]+)" alt="curve \(image\)"', page)
        assert image is not None and image.group(1).decode().endswith("/curve?part=chart")
        assert http_get(base + image.group(1).decode().replace("&amp;", "&")) == (200, png)
        assert b"<td>1</td>" in page or b">1<" in page  # the CSV rows are still shown
        assert http_get(f"{base}/artifacts/{uid}/curve?part=nosuch")[0] == 404
        assert http_get(f"{base}/artifacts/{uid}/curve?part=")[1].startswith(b"x,y")  # no part: the CSV body
    html, _ = report_html(get_run_db(), svc.settings.artifact_root, uids=[uid])
    assert 'alt="curve (image)"' in html and "data:image/png;base64," in html
