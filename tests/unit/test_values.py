from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from producers.values import MAX_DEPTH, check_key, numeric_or_none, to_json, to_number, to_step, to_timestamp


@pytest.mark.parametrize(("value", "plain"), [
    (5, 5), (0.5, 0.5), (True, True), ("x", "x"), (None, None), ([1, "a"], [1, "a"]),
    ({"a": {"b": [1]}}, {"a": {"b": [1]}}), (np.float32(0.5), 0.5), (np.int64(3), 3),
    (np.array([[1, 2], [3, 4]]), [[1, 2], [3, 4]]), ({"m": np.float64(1.5)}, {"m": 1.5}),
])
def test_json_able_values_and_numpy_become_plain_python(value: object, plain: object) -> None:
    assert to_json("result", "k", value)[1] == plain


def test_a_value_that_is_not_json_able_names_its_key() -> None:
    with pytest.raises(TypeError, match="result 'model'"):
        to_json("result", "model", object())


def test_a_metric_that_is_not_a_number_names_its_key() -> None:
    with pytest.raises(TypeError, match="metric 'loss'"):
        to_number("metric", "loss", "high")


def test_keys_must_be_strings() -> None:
    with pytest.raises(TypeError, match="key must be a non-empty string"):
        to_json("result", 3, 1)


@pytest.mark.parametrize(("value", "number"), [(3, 3.0), (-2.5, -2.5), (True, None), ("3", None),
                                               (float("nan"), None), ([1], None)])
def test_value_num_is_set_for_real_numbers_only(value: object, number: float | None) -> None:
    assert numeric_or_none(value) == number


LONE = "\udc80"


@pytest.mark.parametrize("value", [LONE, [f"a{LONE}"], {"k": {"x": LONE}}, {f"k{LONE}": 1}])
def test_a_lone_surrogate_anywhere_in_a_value_is_refused_naming_the_key(value: object) -> None:
    with pytest.raises(TypeError, match=r"result 'name': .*not valid UTF-8"):
        to_json("result", "name", value)


def test_a_key_with_a_lone_surrogate_is_refused() -> None:
    with pytest.raises(TypeError, match=r"result 'k\\udc80': key is not valid UTF-8"):
        check_key("result", f"k{LONE}")


def test_nesting_is_bounded_with_a_type_error_not_a_recursion_error() -> None:
    value: object = 1
    for _ in range(1000):
        value = [value]
    with pytest.raises(TypeError, match=f"result 'deep': value nests deeper than {MAX_DEPTH} levels"):
        to_json("result", "deep", value)
    nested: object = 1
    for _ in range(MAX_DEPTH - 1):
        nested = {"d": nested}
    assert to_json("result", "ok", nested)[1] == nested


def test_secret_strings_in_a_value_are_masked_but_numbers_and_keys_are_not() -> None:
    text, plain = to_json("result", "tok", {"a": ["x-tok-y", 10], "tok": "tok"}, lambda s: s.replace("tok", "***"))
    assert plain == {"a": ["x-***-y", 10], "***": "***"}
    assert json.loads(text) == plain


@pytest.mark.parametrize(("step", "expected"), [(None, None), (3, 3), (np.int64(4), 4), (5.0, 5),
                                               (2**63 - 1, 2**63 - 1)])
def test_steps_are_int64(step: object, expected: int | None) -> None:
    assert to_step("metric", "m", step) == expected


@pytest.mark.parametrize("step", [2**63, -(2**63) - 1, 1.5, "1", math.nan])
def test_a_step_outside_int64_or_not_an_integer_is_refused(step: object) -> None:
    with pytest.raises(TypeError, match="metric 'm': step"):
        to_step("metric", "m", step)


@pytest.mark.parametrize("timestamp", [pytest.param(time.time_ns(), id="now-in-ns"),
                                       pytest.param(time.time() * 1000, id="now-in-ms"),
                                       math.nan, math.inf, -math.inf, 1e20, -1.0,
                                       9.21e9])  # 9.21e9: the projection could not hold it
def test_a_metric_timestamp_outside_1970_to_2262_seconds_is_refused(timestamp: float) -> None:
    with pytest.raises(TypeError, match=r"metric 'm': timestamp .* between 1970 and 2262"):
        to_timestamp("metric", "m", timestamp)


def test_metric_timestamps_in_seconds_are_kept() -> None:
    now = time.time()
    assert to_timestamp("metric", "m", now) == now and to_timestamp("metric", "m", 0) == 0.0
