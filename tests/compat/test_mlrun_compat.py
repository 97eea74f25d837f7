"""MLRun code with only the import lines changed: MLRun's documented local-run patterns, each as
MLRun users write them, checked against MLRun's behaviour (best_iteration counted from 1, the
iterations header row, output('return') for a handler's return value...).

Where MLRun would say `import mlrun` / `from mlrun import ...`, these import from `engine`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from engine import NewRun, get_run_db, new_function, new_task, run_function
from engine.rerun import UntrustedRun
from engine.run import RunObject
from engine.task import HyperParamOptions
from tests.support import handlers

TRAIN = '''
def train(context, p1=1, p2="xx"):
    context.log_result("accuracy", p1 * 2)
    context.log_result("loss", p1 * 3)
    context.set_label("category", "tests")
    context.log_artifact("model.txt", body=b"abc is 123", labels={"framework": "xgboost"})
    return "my resp"
'''

MYCLS = '''
class MyCls:
    def __init__(self, context, a1=1):
        self.context = context
        self.a1 = a1

    def mtd(self, context, x=1):
        context.log_result("a1", self.a1)
        context.log_result("product", self.a1 * x)
        return self.context is context
'''


def _seed_with_model(context, p1=1):
    context.log_result("loss", p1 * 3)
    context.log_artifact("model", body=f"model for p1={p1}".encode())


@pytest.fixture
def train_py(tmp_path: Path) -> Path:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    return script


# new_function ----------------------------------------------------------------------------------

def test_new_function_takes_the_name_first_and_runs_a_handler_of_its_command_file(home: Path, train_py: Path) -> None:
    fn = new_function("trainer", command=str(train_py))
    assert fn.name == "trainer" and fn.command == str(train_py)

    run = fn.run(handler="train", params={"p1": 5}, local=True)

    assert run.state() == "completed" and run.metadata.name == "trainer"
    assert run.status.results == {"accuracy": 10, "loss": 15, "return": "my resp"}
    assert get_run_db().read_run(run.uid())["handler"] == f"{train_py}:train"


@pytest.mark.parametrize("kind", ["", "local", "job", "handler", None])
def test_kinds_that_run_locally(home: Path, train_py: Path, kind: str | None) -> None:
    fn = new_function("trainer", "proj", "v1", kind, str(train_py), "mlrun/mlrun")
    assert fn.project == "proj" and fn.tag == "v1" and fn.image == "mlrun/mlrun"
    run = fn.run(handler="train", params={"p1": 2}, local=True, watch=False, out_path="/tmp/out",
                 artifact_path="/tmp/art", workdir=str(train_py.parent))
    assert run.state() == "completed" and run.output("accuracy") == 4
    assert run.metadata.project == "proj"


def test_kind_dask_is_the_dask_runtime_and_an_unknown_kind_is_refused_by_name(home: Path) -> None:
    assert new_function("sweeper", kind="dask").runtime == "dask://"
    assert new_function(command="dask://scheduler:8786").runtime == "dask://scheduler:8786"
    with pytest.raises(ValueError, match="function kind 'nuclio' is not supported"):
        new_function("serving", kind="nuclio")
    with pytest.raises(ValueError, match="kind 'job' runs locally"):
        new_function(kind="job", command="dask://")


def test_a_schedule_is_refused_rather_than_ignored(home: Path) -> None:
    with pytest.raises(ValueError, match="schedule"):
        new_function().run(NewRun(handler=handlers.seed_like), schedule="0 * * * *")


# run_function ----------------------------------------------------------------------------------

def test_run_function_with_hyperparams_and_selector(home: Path, train_py: Path) -> None:
    fn = new_function("trainer", command=str(train_py), kind="job")
    run = run_function(fn, handler="train", params={"p2": "yy"}, hyperparams={"p1": [5, 2, 3]},
                       selector="min.loss", local=True)

    assert run.state() == "completed"
    assert run.output("best_iteration") == 2  # counted from 1: p1=2 has the lowest loss
    assert run.status.results["loss"] == 6 and run.status.results["accuracy"] == 4
    children = get_run_db().list_runs(parent=run.uid())
    assert sorted(children.iteration) == [1, 2, 3]


def test_run_function_by_the_name_of_a_function_made_here(home: Path, train_py: Path) -> None:
    new_function("by-name-trainer", command=str(train_py))
    run = run_function("by-name-trainer", handler="train", params={"p1": 3}, inputs={},
                       hyper_param_options=HyperParamOptions(selector="max.accuracy"),
                       hyperparams={"p1": [1, 3]})
    assert run.output("best_iteration") == 2 and run.output("accuracy") == 6
    with pytest.raises(ValueError, match="function 'nobody' was not made by new_function"):
        run_function("nobody")


def test_run_function_takes_a_base_task_labels_and_returns(home: Path) -> None:
    task = new_task(name="based", params={"p1": 4}).set_label("team", "a")
    run = run_function(new_function(), handler=handlers.seed_like, base_task=task, labels={"stage": "dev"},
                       returns=["reply"])
    assert run.metadata.name == "based" and run.metadata.labels == {"team": "a", "stage": "dev"}
    assert run.output("reply") == "my resp" and run.output("return") is None  # MLRun: returns name it


# the task --------------------------------------------------------------------------------------

def test_new_task_takes_mlruns_keywords_and_has_metadata_and_spec_views(home: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text("a\n1\n")
    task = new_task(name="demo", project="proj", handler=handlers.seed_like, params={"p1": 5},
                    inputs={"data": str(data)}, outputs=["accuracy"], in_path="/in", out_path="/out",
                    artifact_path="/art", secrets=[{"kind": "inline", "source": {"TOKEN": "s3cr3t-value"}}],
                    returns=None)

    assert task.metadata.name == "demo" and task.metadata.project == "proj"
    assert task.spec.parameters == {"p1": 5} and task.spec.inputs == {"data": str(data)}
    assert task.spec.handler is handlers.seed_like and task.spec.output_path == "/out"
    assert task.spec.param_file is None and task.spec.hyperparams == {}

    task.metadata.name = "renamed"
    task.metadata.labels["owner"] = "me"
    task.spec.parameters["p1"] = 2
    task.spec.inputs = {"other": str(data)}
    assert task.name == "renamed" and task.labels == {"owner": "me"} and task.params == {"p1": 2}
    assert task.inputs == {"other": str(data)}

    run = new_function().run(task)
    assert run.metadata.name == "renamed" and run.spec.parameters == {"p1": 2}
    assert run.spec.inputs == {"other": data.resolve().as_uri()}
    assert run.spec.handler == "tests.support.handlers:seed_like"


def test_task_spec_writes_hyperparams_selector_and_param_file_through(home: Path, tmp_path: Path) -> None:
    task = new_task(handler=handlers.seed_like)
    task.spec.hyperparams = {"p1": [5, 2, 3]}
    task.spec.selector = "min.loss"
    assert task.hyper_params == {"p1": [5, 2, 3]} and task.hyper_options["selector"] == "min.loss"
    run = new_function().run(task)
    assert run.output("best_iteration") == 2

    task.spec.param_file = str(tmp_path / "params.json")
    assert task.param_file == str(tmp_path / "params.json")
    with pytest.raises(ValueError, match="hyperparams and param_file cannot be used together"):
        new_function().run(task)


def test_task_to_dict_is_mlruns_shape_and_holds_no_secret_value(home: Path) -> None:
    task = (new_task(name="demo", handler=handlers.seed_like, params={"p1": 5}, selector="max.accuracy")
            .with_secrets("inline", {"TOKEN": "s3cr3t-value"}).set_label("type", "demo"))
    as_dict = task.to_dict()
    assert as_dict["metadata"] == {"name": "demo", "project": None, "labels": {"type": "demo"}}
    assert as_dict["spec"]["parameters"] == {"p1": 5} and as_dict["spec"]["handler"] == "seed_like"
    assert as_dict["spec"]["hyper_param_options"] == {"selector": "max.accuracy"}
    assert "s3cr3t-value" not in json.dumps(as_dict) and "TOKEN" in json.dumps(as_dict)


def test_with_param_file_csv_is_one_iteration_a_row(home: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.csv"
    params.write_text("p1,p2\n5,a\n2,b\n3,c\n")
    task = NewRun(handler=handlers.seed_like).with_param_file(str(params), "min.loss")
    assert task.spec.param_file == str(params)

    run = new_function().run(task)

    assert run.state() == "completed" and run.output("best_iteration") == 2
    assert run.status.iterations[0] == ["state", "iter", "param.p1", "param.p2", "output.accuracy", "output.loss"]
    assert run.status.iterations[1:] == [["completed", 1, 5, "a", 10, 15], ["completed", 2, 2, "b", 4, 6],
                                         ["completed", 3, 3, "c", 6, 9]]


def test_with_param_file_json_dict_of_lists_is_a_grid(home: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"p1": [1, 2], "p2": ["a", "b", "c"]}))
    run = new_function().run(NewRun(handler=handlers.seed_like).with_param_file(str(params), "max.accuracy"))
    assert len(run.status.iterations) == 1 + 6
    assert run.output("best_iteration") == 4  # the first iteration with p1=2 (a tie goes to the earliest)


def test_with_param_file_json_list_of_dicts_is_one_iteration_a_dict(home: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    params.write_text(json.dumps([{"p1": 7}, {"p1": 1, "p2": "z"}]))
    run = new_function().run(NewRun(handler=handlers.seed_like).with_param_file(str(params), "min.loss"))
    assert [row[:3] for row in run.status.iterations[1:]] == [["completed", 1, 7], ["completed", 2, 1]]
    assert run.output("best_iteration") == 2


def test_with_param_file_refuses_a_strategy_the_file_cannot_give(home: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.csv"
    params.write_text("p1\n1\n")
    with pytest.raises(ValueError, match=f"param_file '{params}': strategy 'grid' needs a JSON file"):
        new_function().run(NewRun(handler=handlers.seed_like).with_param_file(str(params), strategy="grid"))


# the run object --------------------------------------------------------------------------------

def test_run_status_metadata_spec_and_outputs(home: Path, train_py: Path) -> None:
    run = new_function("trainer", command=str(train_py)).run(
        new_task(params={"p1": 5}, labels={"type": "demo"}), handler="train")

    assert run.status.state == "completed" and run.status.error is None
    assert run.status.results == {"accuracy": 10, "loss": 15, "return": "my resp"}
    assert run.output("accuracy") == 10 and run.output("return") == "my resp"
    assert run.output("model.txt") == run.artifact("model.txt").url and run.output("missing") is None
    assert run.outputs == {"accuracy": 10, "loss": 15, "return": "my resp", "model.txt": run.output("model.txt")}
    [model] = run.status.artifacts
    assert model["kind"] == "artifact" and model["metadata"]["key"] == "model.txt"
    assert model["metadata"]["tree"] == run.uid() and model["spec"]["target_path"] == run.output("model.txt")
    assert run.metadata.uid == run.uid() and run.metadata.iteration == 0
    assert run.metadata.labels == {"type": "demo", "category": "tests"}
    assert run.spec.parameters == {"p1": 5} and run.spec.handler == f"{train_py}:train"
    assert run.status.iterations == []  # not a sweep
    as_dict = run.to_dict()
    assert as_dict["metadata"]["uid"] == run.uid() and as_dict["status"]["results"]["loss"] == 15
    json.dumps(as_dict)  # plain data


def test_uid_and_state_are_both_attributes_and_mlruns_methods(home: Path) -> None:
    run = new_function().run(NewRun(handler=handlers.seed_like))
    assert run.uid() == run.uid and run.state() == run.state == "completed"
    assert isinstance(run.uid(), str) and type(run.uid()) is str and len(run.uid) == 32
    assert get_run_db().read_run(run.uid)["uid"] == run.uid()  # usable where a str is
    same = RunObject.from_record(get_run_db().read_run(run.uid))
    assert same.uid() == run.uid() and same.state() == "completed" and same.spec.handler == run.spec.handler


def test_an_error_run_has_its_error_in_status(home: Path) -> None:
    run = new_function().run(NewRun(handler=handlers.scored, params={"x": 1, "fail_on": 1}))
    assert run.state() == "error" and "bad x=1" in run.status.error


def test_data_items_have_url_and_meta(home: Path) -> None:
    def handler(context):
        context.log_model("model", body=b"weights", framework="sklearn", metrics={"acc": 0.9},
                          artifact_path="/ignored", db_key="my-model", tag="v1")
        context.log_dataset("data", pd.DataFrame({"a": [1, 2]}), db_key="my-data")

    run = new_function().run(NewRun(handler=handler))
    model = run.artifact("model")
    assert model.url == model.uri and model.get() == b"weights"
    assert model.meta["metrics"] == {"acc": 0.9} and model.meta["db_key"] == "my-model" and model.meta["tag"] == "v1"
    assert run.artifact("data").meta["db_key"] == "my-data" and run.artifact("data").as_df().a.tolist() == [1, 2]
    assert run.status.artifacts[1]["spec"]["db_key"] == "my-data"


def test_a_sweep_parent_holds_the_best_iterations_artifacts(bus_home: Path) -> None:
    task = NewRun(handler=_seed_with_model).with_hyper_params({"p1": [5, 2, 3]}, "min.loss")
    run = new_function().run(task)
    assert run.output("best_iteration") == 2
    assert run.artifact("model").get() == b"model for p1=2"
    assert run.artifact("model").meta["link_iteration"] == 2
    assert {a["metadata"]["key"] for a in run.status.artifacts} == {"model", "iteration_results",
                                                                    "parallel_coordinates"}
    record = get_run_db().read_run(run.uid)  # in the log too, not only in this object
    assert {a["key"] for a in record["artifacts"]} >= {"model"}


# child contexts --------------------------------------------------------------------------------

def _children_handler(context, values=(4, 9, 2)):
    best = None
    for value in values:
        with context.get_child_context(x=value) as child:
            child.log_result("score", value)
            child.log_artifact("model", body=f"model {value}".encode())
            if best is None or value > best:
                child.mark_as_best()
                best = value
    context.log_result("count", len(values))


def test_child_contexts_give_the_parent_best_iteration_results_and_iterations(home: Path) -> None:
    run = new_function().run(NewRun(handler=_children_handler))

    assert run.state() == "completed", run.status.error
    assert run.output("best_iteration") == 2  # the second child (x=9), counted from 1
    assert run.output("score") == 9 and run.output("count") == 3
    assert run.status.iterations == [["state", "iter", "param.x", "output.score"], ["completed", 1, 4, 4],
                                     ["completed", 2, 9, 9], ["completed", 3, 2, 2]]
    assert run.artifact("model").get() == b"model 9"
    children = get_run_db().list_runs(parent=run.uid()).sort_values("iteration")
    assert children.iteration.tolist() == [1, 2, 3] and set(children.state) == {"completed"}


def test_a_child_that_raises_is_an_error_and_an_open_child_ends_with_its_parent(home: Path) -> None:
    def handler(context):
        try:
            with context.get_child_context(x=1):
                raise RuntimeError("child failed")
        except RuntimeError:
            pass
        context.get_child_context(x=2).log_result("left", "open")

    run = new_function().run(NewRun(handler=handler))
    assert run.state() == "completed" and "best_iteration" not in run.status.results
    assert [row[:3] for row in run.status.iterations[1:]] == [["error", 1, 1], ["completed", 2, 2]]
    child = get_run_db().read_run(get_run_db().list_runs(parent=run.uid(), sort_by="iteration").uid[0])
    assert child["state"] == "error" and "child failed" in child["error"]


def test_only_a_child_can_be_best_and_a_child_has_no_children(home: Path) -> None:
    def handler(context):
        with pytest.raises(ValueError, match="only a child can be marked as best"):
            context.mark_as_best()
        with context.get_child_context() as child, pytest.raises(ValueError, match="cannot have children"):
            child.get_child_context()

    assert new_function().run(NewRun(handler=handler)).state() == "completed"


def test_set_annotation_is_accepted(home: Path) -> None:
    def handler(context):
        context.set_annotation("owner", "me")
        return context.annotations

    assert new_function().run(NewRun(handler=handler)).output("return") == {"owner": "me"}


# handlers by string ----------------------------------------------------------------------------

def test_a_module_function_handler(home: Path) -> None:
    run = new_function().run(handler="json.dumps", params={"obj": [1, 2]})
    assert run.output("return") == "[1, 2]" and run.spec.handler == "json:dumps"
    assert new_function().run(handler="tests.support.handlers.seed_like").output("accuracy") == 2


def test_a_class_method_handler_with_init_args(home: Path, tmp_path: Path) -> None:
    script = tmp_path / "mycls.py"
    script.write_text(MYCLS)
    fn = new_function("mycls", command=str(script), kind="job")

    run = fn.run(handler="MyCls::mtd", params={"_init_args": {"a1": 7}, "x": 3}, local=True)

    assert run.state() == "completed", run.status.error
    assert run.status.results == {"a1": 7, "product": 21, "return": True}  # the constructor got the context
    assert run.spec.handler == f"{script}:MyCls::mtd"
    again = get_run_db().rerun(run.uid())  # this home's own, unchanged code: no trust needed
    assert again.status.results == run.status.results
    script.write_text(MYCLS.replace("self.a1 * x", "self.a1 * x * 100"))
    with pytest.raises(UntrustedRun, match="changed since the run"):
        get_run_db().rerun(run.uid())


def test_a_class_method_handler_names_what_is_missing(home: Path, tmp_path: Path) -> None:
    script = tmp_path / "mycls.py"
    script.write_text(MYCLS)
    with pytest.raises(LookupError, match="has no method 'nope'"):
        new_function(command=str(script)).run(handler="MyCls::nope")
    with pytest.raises(LookupError, match="has no class 'Other'"):
        new_function(command=str(script)).run(handler="Other::mtd")


# names -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, field", [
    (lambda: new_function("a/b"), "function name"),
    (lambda: new_function("ok", project="p/q"), "project"),
    (lambda: new_task(name="a/b"), "run name"),
    (lambda: new_task(name="   "), "run name"),
    (lambda: new_function().run(NewRun(handler=handlers.seed_like), name="x/y"), "run name"),
])
def test_names_with_a_slash_or_blank_are_refused_naming_the_field(home: Path, call, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field} "):
        call()


# commands --------------------------------------------------------------------------------------

JOB = '''
import argparse
from engine import get_or_create_ctx

parser = argparse.ArgumentParser()
parser.add_argument("--xyz", type=int, default=0)
parser.add_argument("--tag", default="none")
args = parser.parse_args()
context = get_or_create_ctx("job")
print("xyz is", args.xyz)
context.log_result("xyz_squared", args.xyz ** 2)
context.log_result("tag", args.tag)
'''


@pytest.fixture
def job_py(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))  # the script imports engine
    script = tmp_path / "job.py"
    script.write_text(JOB)
    return script


def test_a_command_with_params_in_argv_runs_as_one_run(home: Path, job_py: Path) -> None:
    fn = new_function("job", command=f"{job_py} --xyz {{xyz}}", args=["--tag", "{tag}"])
    run = fn.run(params={"xyz": 7, "tag": "t1"}, local=True)
    assert run.state() == "completed", run.status.error
    assert run.status.results == {"xyz_squared": 49, "tag": "t1"}
    assert run.metadata.name == "job" and run.spec.parameters == {"xyz": 7, "tag": "t1"}


def test_a_command_file_without_a_handler_runs_as_a_script(home: Path, job_py: Path) -> None:
    run = new_function(command=str(job_py), kind="job").run()
    assert run.state() == "completed" and run.output("xyz_squared") == 0 and run.metadata.name == "job"
    failing = job_py.parent / "fails.py"
    failing.write_text("import sys\nsys.exit(3)\n")
    run = new_function(command=str(failing)).run()
    assert run.state() == "error" and "exited with code 3" in run.status.error


def test_a_sweep_over_a_command(home: Path, job_py: Path) -> None:
    run = run_function(new_function(command=f"{job_py} --xyz {{xyz}}"), hyperparams={"xyz": [2, -5, 3]},
                       selector="max.xyz_squared")
    assert run.state() == "completed", run.status.error
    assert run.output("best_iteration") == 2 and run.output("xyz_squared") == 25
    assert [row[:3] for row in run.status.iterations[1:]] == [["completed", 1, 2], ["completed", 2, -5],
                                                              ["completed", 3, 3]]


def test_run_logs_prints_and_returns_the_runs_console_output(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def handler(context):
        print("hello from the handler")
        context.logger.info("a logger line")

    run = new_function().run(NewRun(handler=handler))
    capsys.readouterr()

    text = run.logs()

    assert "hello from the handler\n" in text and "a logger line" in text
    assert capsys.readouterr().out.strip() == text.strip()
    assert get_run_db().get_log(run.uid()) == ("completed", text)
    assert run.logs(db=get_run_db(), offset=len(text)) == ""


KIDS = '''
from engine import get_or_create_ctx

context = get_or_create_ctx("kids")
for value in (1, 3, 2):
    with context.get_child_context(x=value) as child:
        child.log_result("score", value)
        if value == 3:
            child.mark_as_best()
'''


def test_child_contexts_in_a_script_of_its_own(home: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    script = tmp_path / "kids.py"
    script.write_text(KIDS)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    parent = get_run_db().list_runs(name="kids", parent=None)
    parent = parent[parent.iteration == 0].uid.iloc[0]
    run = RunObject.from_record(get_run_db().read_run(parent))
    assert run.output("best_iteration") == 2 and run.output("score") == 3


def test_a_best_artifact_whose_body_is_gone_is_not_linked_and_the_parent_still_ends(home: Path) -> None:
    def handler(context):
        with context.get_child_context(x=1) as child:
            child.log_result("score", 1)
            Path(child.log_artifact("model", body=b"a body that goes away").local()).unlink()
            child.mark_as_best()

    with pytest.warns(UserWarning, match="artifact 'model' of iteration 1 is not linked"):
        run = new_function().run(NewRun(handler=handler))
    assert run.state() == "completed" and run.output("best_iteration") == 1 and run.output("model") is None


@pytest.mark.dask
def test_kind_dask_runs_the_sweep_on_dask_and_links_the_best_model(home: Path) -> None:
    fn = new_function("sweeper", kind="dask")
    run = run_function(fn, handler=_seed_with_model, hyperparams={"p1": [5, 2, 3]}, selector="min.loss")
    assert run.state() == "completed", run.status.error
    assert run.output("best_iteration") == 2 and run.artifact("model").get() == b"model for p1=2"
    children = get_run_db().list_runs(parent=run.uid())
    assert set(children.runtime) == {"dask://"}


def test_a_child_with_parent_params_and_a_task_from_a_base(home: Path) -> None:
    def handler(context, p1=0, p2="xx"):
        with context.get_child_context(with_parent_params=True, p2="child") as child:
            child.log_result("seen", [child.parameters["p1"], child.parameters["p2"]])

    base = new_task(name="base", params={"p1": 3}, labels={"team": "a"})
    task = new_task(base=base, handler=handler, params={"p2": "parent"})
    assert base.params == {"p1": 3}  # the base is copied, not changed
    run = new_function().run(task)
    assert run.metadata.name == "base" and run.spec.parameters == {"p1": 3, "p2": "parent"}
    child = get_run_db().list_runs(parent=run.uid()).uid[0]
    assert get_run_db().read_run(child)["results"] == {"seen": [3, "child"]}


# inputs as handler arguments -------------------------------------------------------------------

@pytest.fixture
def data_csv(tmp_path: Path) -> Path:
    data = tmp_path / "data.csv"
    data.write_text("a,b\n1,x\n2,y\n3,z\n")
    return data


def test_an_input_is_passed_to_the_argument_of_its_name_as_a_data_item(home: Path, data_csv: Path) -> None:
    def train(context, dataset, label_column="b"):
        context.log_result("kind", type(dataset).__name__)
        context.log_result("url", dataset.url)
        context.log_result("labels", dataset.as_df()[label_column].tolist())

    run = run_function(new_function(), handler=train, inputs={"dataset": str(data_csv)})

    assert run.state() == "completed", run.status.error
    assert run.status.results == {"kind": "DataItem", "url": data_csv.resolve().as_uri(), "labels": ["x", "y", "z"]}


FRAMES = '''
from __future__ import annotations


def train(context, table: pandas.DataFrame, other: DataFrame | None = None):
    context.log_result("types", [type(table).__name__, type(other).__name__])
'''


def test_an_input_annotated_as_a_dataframe_is_passed_as_one(home: Path, data_csv: Path, tmp_path: Path) -> None:
    def train(context, table: pd.DataFrame, raw=None):
        context.log_result("type", type(table).__name__)
        context.log_result("sum", int(table.a.sum()))

    run = new_function().run(handler=train, inputs={"table": str(data_csv)})
    assert run.status.results == {"type": "DataFrame", "sum": 6}, run.status.error

    script = tmp_path / "frames.py"  # annotations as text naming what the module never imported
    script.write_text(FRAMES)
    run = new_function(command=str(script)).run(handler="train", inputs={"table": str(data_csv),
                                                                         "other": str(data_csv)})
    assert run.output("types") == ["DataFrame", "DataFrame"], run.status.error


def test_inputs_bind_as_mlrun_binds_them(home: Path, data_csv: Path) -> None:
    def train(context, path="", shared=0, **rest):
        context.log_result("path", path)  # no annotation and a str default: the local path
        context.log_result("shared", shared)  # a param wins over the input of its name
        context.log_result("rest", sorted(f"{key}:{type(value).__name__}" for key, value in rest.items()))
        context.log_result("unbound", context.get_input("extra").url)

    def strict(context, dataset=None):
        context.log_result("extra", context.get_input("extra").as_df().shape[0])

    run = new_function().run(handler=train, params={"shared": 7, "p": 1},
                             inputs={"path": str(data_csv), "shared": str(data_csv), "extra": str(data_csv)})
    assert run.state() == "completed", run.status.error
    assert run.output("path") == str(data_csv.resolve()) and run.output("shared") == 7
    assert run.output("rest") == ["extra:DataItem", "p:int"]
    run = new_function().run(handler=strict, inputs={"extra": str(data_csv)})  # no argument named 'extra'
    assert run.state() == "completed" and run.output("extra") == 3, run.status.error


def test_each_sweep_iteration_gets_its_inputs_as_arguments(home: Path, data_csv: Path) -> None:
    def train(context, dataset: pd.DataFrame, scale=1):
        context.log_result("total", int(dataset.a.sum()) * scale)

    run = run_function(new_function(), handler=train, inputs={"dataset": str(data_csv)},
                       hyperparams={"scale": [1, 3, 2]}, selector="max.total")
    assert run.state() == "completed", run.status.error
    assert run.output("best_iteration") == 2 and run.output("total") == 18


# MLRun's context members -----------------------------------------------------------------------

def test_context_paths_get_input_with_a_url_and_cheap_members(home: Path, data_csv: Path) -> None:
    from engine.api import session

    def handler(context):
        context.log_model("model", body=b"weights", artifact_path=context.artifact_path)
        context.log_result("paths", [context.artifact_path, context.out_path])
        context.log_result("rows", len(context.get_input("data", url=str(data_csv)).as_df()))
        context.log_result("by_url", len(context.get_dataitem(data_csv.as_uri()).as_df()))
        context.log_result("worker", context.is_logging_worker())
        with pytest.raises(KeyError, match="input 'missing' was not given"):
            context.get_input("missing")

    run = new_function().run(NewRun(handler=handler))
    root = session().services.artifact_store.root.as_uri()
    assert run.state() == "completed", run.status.error
    assert run.output("paths") == [root, root] and run.artifact("model").get() == b"weights"
    assert run.output("rows") == 3 and run.output("by_url") == 3 and run.output("worker") is True


def test_context_to_dict_is_mlruns_shape_without_secrets(home: Path, data_csv: Path) -> None:
    seen = []

    def handler(context, p1=0, note=""):
        context.set_label("owner", "me")
        context.log_result("echo", note)
        context.log_artifact("model", body=b"m")
        seen.append(context.to_dict())

    task = (NewRun(name="shape", handler=handler, params={"p1": 5, "note": "key s3cr3t-value"},
                   inputs={"data": str(data_csv)}).with_secrets("inline", {"TOKEN": "s3cr3t-value"}))
    run = new_function().run(task)

    [as_dict] = seen
    assert as_dict["metadata"] == {"uid": run.uid(), "name": "shape", "project": run.metadata.project,
                                   "labels": {"owner": "me"}, "iteration": 0}
    assert as_dict["spec"] == {"parameters": {"p1": 5, "note": "key ***"},
                               "inputs": {"data": data_csv.resolve().as_uri()}, "handler": run.spec.handler}
    assert as_dict["status"]["state"] == "running" and as_dict["status"]["results"] == {"echo": "key ***"}
    assert as_dict["status"]["artifacts"] == run.status.artifacts
    assert "s3cr3t-value" not in json.dumps(as_dict)


COMMITS = '''
import json, sys, time
from pathlib import Path
from engine import get_or_create_ctx

folder = Path(sys.argv[1])
context = get_or_create_ctx("committer")
context.log_result("before", 1)
context.log_model("model", body=b"weights", artifact_path=context.artifact_path)
context.commit("checkpoint", completed=False)
(folder / "committed").write_text(json.dumps({"uid": context.uid, "out_path": context.out_path}))
deadline = time.time() + 120
while not (folder / "go").exists() and time.time() < deadline:
    time.sleep(0.05)
context.log_result("rows", len(context.get_input("data", url=str(folder / "data.csv")).as_df()))
context.commit(completed=True)
context.log_result("after", context.to_dict()["status"]["state"])
'''


def test_commit_in_a_script_puts_what_was_logged_on_the_bus_and_ends_nothing(home: Path, tmp_path: Path,
                                                                              data_csv: Path) -> None:
    import os
    import subprocess
    import sys

    from engine.api import session
    from tests.support.polling import wait_until

    script = tmp_path / "commits.py"
    script.write_text(COMMITS)
    # the writer's own interval would send the events a minute later: only commit() sends them now
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "RUNBUS_FLUSH_INTERVAL": "60"}
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_until(lambda: (tmp_path / "committed").exists() or process.poll() is not None, "the commit")
        committed = json.loads((tmp_path / "committed").read_text())
        record = get_run_db().read_run(committed["uid"])
        assert record["state"] == "running" and record["results"] == {"before": 1}
        assert [a["key"] for a in record["artifacts"]] == ["model"]
        assert committed["out_path"] == session().services.artifact_store.root.as_uri()
    finally:
        (tmp_path / "go").touch()
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    run = RunObject.from_record(get_run_db().read_run(committed["uid"]))
    assert run.state() == "completed" and run.status.results == {"before": 1, "rows": 3, "after": "running"}


# run.logs() and status.iterations ----------------------------------------------------------------

def test_run_logs_prints_control_characters_as_runbus_logs_does(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import signal

    from typer.testing import CliRunner

    from engine.cli import app

    def handler(context):
        print("\x1b]0;pwned\x07\x1b[2Jcleared\tand tabbed")

    run = new_function().run(NewRun(handler=handler))
    capsys.readouterr()

    text = run.logs()

    printed = capsys.readouterr().out
    assert "\x1b]0;pwned\x07\x1b[2Jcleared\tand tabbed\n" in text  # returned as the log holds it
    assert "\x1b" not in printed and "\x07" not in printed and "\\x1b]0;pwned\\x07\\x1b[2Jcleared\t" in printed
    on_sigterm = signal.getsignal(signal.SIGTERM)  # `runbus logs` sets its own
    try:
        shown = CliRunner().invoke(app, ["logs", run.uid()])  # in this process: it holds the projection
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)
    assert shown.exit_code == 0, shown.output
    assert printed == shown.output


def test_iterations_keep_ints_when_another_iteration_has_no_output(home: Path) -> None:
    run = run_function(new_function(), handler=handlers.scored, params={"fail_on": 2},
                       hyperparams={"x": [1, 2, 3]}, selector="max.score")
    header, *rows = run.status.iterations
    score = header.index("output.score")
    assert [row[score] for row in rows] == [1, None, 3]
    assert [type(row[score]) for row in rows] == [int, type(None), int]
    assert [row[header.index("param.x")] for row in rows] == [1, 2, 3]
