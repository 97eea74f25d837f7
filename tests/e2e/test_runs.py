"""Running handlers: failures, bad input, params and inputs, as a user sees them."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import NewRun, get_run_db, new_function


def test_a_handler_that_raises_ends_in_error_with_its_traceback(home: Path) -> None:
    def train(context, p1=1):
        context.log_result("before", p1)
        raise ValueError("diverged at epoch 3")

    run = new_function().run(NewRun(handler=train, params={"p1": 2}))

    assert run.state == "error"
    assert "ValueError: diverged at epoch 3" in run.error
    row = get_run_db().read_run(run.uid)
    assert row["state"] == "error"
    assert "diverged at epoch 3" in row["traceback"] and "def train" not in row["error"]
    assert 'raise ValueError("diverged at epoch 3")' in row["traceback"]
    assert row["results"] == {"before": 2}


def test_a_result_that_cannot_be_serialized_names_the_key_and_keeps_earlier_events(home: Path) -> None:
    def train(context):
        context.log_result("accuracy", 0.9)
        context.log_metric("loss", 0.1, step=1)
        context.log_result("model", object())

    run = new_function().run(NewRun(handler=train))

    assert run.state == "error"
    assert "TypeError" in run.error and "'model'" in run.error
    row = get_run_db().read_run(run.uid)
    assert row["results"] == {"accuracy": 0.9}
    assert row["metrics"] == {"loss": 0.1}
    seqs = get_run_db().sql("SELECT seq FROM events WHERE run_uid = ? ORDER BY position", [run.uid]).seq
    assert list(seqs) == list(range(len(seqs)))


def test_an_artifact_key_that_escapes_the_store_is_refused(home: Path) -> None:
    def train(context):
        context.log_artifact("../escape.txt", body=b"x")

    run = new_function().run(NewRun(handler=train))
    assert run.state == "error"
    assert "'../escape.txt' would escape the artifact store" in run.error
    assert not (home / "escape.txt").exists() and not (home.parent / "escape.txt").exists()


def test_params_are_injected_by_name_and_get_param_records_defaults(home: Path) -> None:
    def train(context, p1=1, p2="xx"):
        context.log_result("p1", p1)
        context.log_result("lr", context.get_param("lr", 0.01))
        return p2

    run = new_function().run(NewRun(handler=train, params={"p1": 5, "p2": "yy"}))

    assert run.results == {"p1": 5, "lr": 0.01, "return": "yy"}
    params = get_run_db().read_run(run.uid)["params"]
    assert params == {"p1": 5, "p2": "yy", "lr": 0.01}


def test_inputs_secrets_and_metrics(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data.csv"
    data.write_text("x,y\n1,2\n3,4\n")
    monkeypatch.setenv("API_TOKEN", "tok")

    def train(context):
        frame = context.get_input("data").as_df()
        context.log_result("rows", len(frame))
        context.log_result("token_ok", context.get_secret("API_TOKEN") == "tok")
        for step in range(5):
            context.log_metric("loss", 1.0 / (step + 1), step=step)
        context.log_metrics({"acc": 0.5, "f1": 0.4}, step=5)

    task = NewRun(handler=train).with_input("data", str(data)).with_secrets("env", ["API_TOKEN"])
    run = new_function().run(task)

    assert run.results == {"rows": 2, "token_ok": True}
    metrics = get_run_db().sql("SELECT key, step, value FROM metrics WHERE uid = ? ORDER BY key, step",
                               [run.uid])
    assert list(metrics.key) == ["acc", "f1"] + ["loss"] * 5
    assert list(metrics.step[2:]) == [0, 1, 2, 3, 4]


def test_log_dataset_and_log_model(home: Path) -> None:
    import pandas as pd

    def train(context):
        frame = pd.DataFrame({"a": range(50), "b": [x * 0.5 for x in range(50)]})
        context.log_dataset("train-set", frame, preview=5)
        context.log_model("model", body=b"weights", metrics={"acc": 0.9}, framework="sklearn")

    run = new_function().run(NewRun(handler=train))
    assert run.state == "completed", run.error
    artifacts = {a["key"]: a for a in get_run_db().read_run(run.uid)["artifacts"]}
    dataset = artifacts["train-set"]
    assert dataset["kind"] == "dataset" and dataset["meta"]["rows"] == 50
    assert "stats" in dataset["meta"] and "preview" in dataset["meta"]
    assert run.artifact("train-set").as_df().shape == (50, 2)
    model = artifacts["model"]
    assert model["kind"] == "model" and model["labels"] == {"framework": "sklearn"}
    assert model["meta"]["metrics"] == {"acc": 0.9}
    assert run.artifact("model").get() == b"weights"


def test_a_handler_loaded_from_a_file(home: Path, tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text("def handler(context, n=1):\n    context.log_result('double', n * 2)\n")

    run = new_function(command=str(script)).run(params={"n": 21}, handler="handler")

    assert run.results == {"double": 42}
    assert get_run_db().read_run(run.uid)["handler"] == f"{script}:handler"
