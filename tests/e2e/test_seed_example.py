"""The seed tutorial's example, unchanged but for imports, through the whole pipeline."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest

from engine import NewRun, get_run_db, new_function
from engine.loader import load_handler

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-value-do-not-log"


@pytest.fixture
def seed_run(home: Path, tmp_path: Path):
    handler = load_handler(f"{ROOT}/examples/quickstart.py:handler")
    secrets = tmp_path / "secrets.txt"
    secrets.write_text(f"PASSWORD={SECRET}\n")
    task = NewRun(handler=handler, name="demo", params={"p1": 5}).with_secrets(
        "file", str(secrets)).set_label("type", "demo")
    return new_function().run(task)


def test_seed_run_is_queryable_with_sql(seed_run) -> None:
    db = get_run_db()
    assert seed_run.state == "completed"
    results = db.sql("SELECT key, value_num FROM results WHERE uid = ? AND key <> 'return' ORDER BY key",
                     [seed_run.uid])
    assert dict(zip(results.key, results.value_num, strict=False)) == {"accuracy": 10, "loss": 15}
    labels = db.sql("SELECT key, value FROM labels WHERE uid = ?", [seed_run.uid])
    assert dict(zip(labels.key, labels.value, strict=False)) == {"category": "tests", "type": "demo"}
    run = db.sql("SELECT state, return_value, labels FROM runs WHERE uid = ?", [seed_run.uid]).iloc[0]
    assert run.state == "completed"
    assert json.loads(run.return_value) == "my resp"
    assert json.loads(run.labels) == {"category": "tests", "type": "demo"}


def test_seed_artifacts_hold_what_the_handler_logged(seed_run) -> None:
    artifacts = get_run_db().sql("SELECT * FROM artifacts WHERE uid = ? ORDER BY key", [seed_run.uid])
    by_key = {row.key: row for row in artifacts.itertuples()}
    assert set(by_key) == {"model.txt", "myfig", "mydf.csv"}
    assert json.loads(by_key["model.txt"].labels) == {"framework": "xgboost"}
    assert seed_run.artifact("model.txt").get() == b"abc is 123"
    assert by_key["myfig"].format == "png"
    assert seed_run.artifact("myfig").get().startswith(b"\x89PNG")
    frame = seed_run.artifact("mydf.csv").as_df()
    assert frame.to_dict("list") == {"A": [10, 11, 12], "B": [100, 110, 120]}
    assert pd.read_csv(io.BytesIO(Path(seed_run.artifact("mydf.csv").local()).read_bytes())).shape == (3, 2)


def test_the_run_object_carries_results_and_outputs(seed_run) -> None:
    assert seed_run.results == {"accuracy": 10, "loss": 15, "return": "my resp"}
    assert seed_run.outputs["model.txt"].startswith("file://")
    assert "<table" in seed_run._repr_html_()
    assert seed_run.error is None


def test_a_secret_value_appears_in_no_file_and_no_table(seed_run, home: Path) -> None:
    db = get_run_db()
    for table in ("runs", "params", "results", "labels", "artifacts", "events", "metrics"):
        text = db.sql(f"SELECT * FROM {table}").to_csv()
        assert SECRET not in text, table
    assert "PASSWORD" in db.sql("SELECT payload FROM events WHERE type = 'run_started'").payload[0]
    for path in home.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
