"""The benchmark table: which rows one run prints, how MLflow's figure sits beside Runbus's, and
the header that names what the figures were measured on."""

from __future__ import annotations

from benchmarks.common import Sizes
from benchmarks.report import Header, Row, markdown, ratio, rows, table_rows

HEADER = Header("AMD EPYC 7B13", 2, "Linux-6.1-x86_64", "3.11.9", "2026-11-28 05:30 UTC", "ffbe6ab", "MLflow 3.17.2")


def _row(**changes: object) -> Row:
    fields: dict[str, object] = {"workload": "1", "key": "k", "label": "a figure", "fmt": "{:,.2f} us",
                                 "n": "1,000 points", "repeats": 3, "target": ("<=", 10), "mlflow_key": "m",
                                 "mlflow_way": "mlflow.log_metric"}
    fields.update(changes)
    return Row(**fields)  # type: ignore[arg-type]


def test_ratio_reads_above_one_when_runbus_is_ahead_for_times_and_for_rates() -> None:
    assert ratio(_row(), runbus=2.0, mlflow=20.0) == 10.0
    assert ratio(_row(lower_is_better=False), runbus=200.0, mlflow=20.0) == 10.0
    assert ratio(_row(), runbus=None, mlflow=20.0) is None
    assert ratio(_row(), runbus=0.0, mlflow=20.0) is None


def test_rows_this_run_did_not_measure_are_left_out_and_failed_ones_say_so() -> None:
    found = [_row(key="measured"), _row(key="not_measured"), _row(key="broken")]
    cells = table_rows(found, {"measured": 4.0}, {"m": 40.0}, {"broken": "failed"})
    assert [c["key"] for c in cells] == ["measured", "broken"]
    measured, broken = cells
    texts = (measured["runbus_text"], measured["mlflow_text"], measured["ratio_text"])
    assert texts == ("4.00 us", "40.00 us", "10.0x")
    assert measured["met_text"] == "yes" and measured["n"] == "1,000 points" and measured["repeats"] == 3
    assert broken["runbus_text"] == "failed" and broken["ratio"] is None


def test_a_compared_row_without_mlflow_figure_says_why_and_an_uncompared_row_stays_blank() -> None:
    cells = table_rows([_row(key="a"), _row(key="b", mlflow_key=None, mlflow_way="")], {"a": 1.0, "b": 1.0}, {},
                       {}, mlflow_missing="failed")
    assert [c["mlflow_text"] for c in cells] == ["failed", ""]


def test_without_mlflow_each_runbus_figure_is_shown_once_with_no_mlflow_way() -> None:
    found = [_row(key="a", mlflow_key="m1"), _row(key="a", mlflow_key="m2"), _row(key="b")]
    alone = table_rows(found, {"a": 1.0, "b": 2.0}, {}, {})
    assert [(c["key"], c["mlflow_way"]) for c in alone] == [("a", ""), ("b", "")]
    failed = table_rows(found, {"a": 1.0, "b": 2.0}, {}, {}, mlflow_missing="failed")
    assert [c["mlflow_text"] for c in failed] == ["failed", "failed", "failed"]


def test_a_missed_target_is_marked_and_scale_applies_before_comparing() -> None:
    per_million = _row(key="rebuild_s", fmt="{:,.2f} s", target=("<=", 6), scale=1_000_000 / 40_000)
    cells = table_rows([_row(key="slow"), per_million], {"slow": 12.0, "rebuild_s": 0.3}, {}, {})
    assert [c["met_text"] for c in cells] == ["MISSED", "MISSED"]  # 0.3 s for 40k events is 7.5 s per 1M


def test_markdown_is_headed_by_machine_date_and_commit_and_gives_each_rows_n_and_repeats() -> None:
    cells = table_rows([_row(key="a", label="with | pipe"), _row(key="b", repeats=1)], {"a": 1.0, "b": 2.0},
                       {"m": 3.0}, {})
    text = markdown(cells, HEADER, ["a note"])
    title, _, machine, date, compared = text.splitlines()[:5]
    assert "2 cpus (AMD EPYC 7B13)" in title and "2026-11-28 05:30 UTC" in title and "ffbe6ab" in title
    assert "AMD EPYC 7B13" in machine and "Python 3.11.9" in machine
    assert "ffbe6ab" in date and "MLflow 3.17.2" in compared
    lines = [line for line in text.splitlines() if line.startswith("| 1 |")]
    assert lines[0].split(" | ")[1:4] == ["with \\| pipe", "1,000 points", "median of 3"]
    assert lines[1].split(" | ")[3] == "1"
    assert text.rstrip().endswith("- a note")


def test_every_compared_row_gives_both_sides_the_same_n_and_repeats() -> None:
    sizes = Sizes()
    compared = [row for row in rows(sizes) if row.mlflow_key]
    assert {row.workload for row in compared} == {"1", "2", "3"}
    for row in compared:
        if row.workload in ("1", "2"):
            assert row.repeats == sizes.repeat
        else:
            assert row.repeats == sizes.queries and int(row.n.split()[0].replace(",", "")) in sizes.mlflow_query_runs
    ways = {row.mlflow_way for row in compared if row.workload == "1"}
    assert any("log_batch" in way for way in ways) and any("synchronous=False" in way for way in ways)
