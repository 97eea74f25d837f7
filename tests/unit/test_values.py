from __future__ import annotations

import numpy as np
import pytest

from producers.values import numeric_or_none, to_json, to_number


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
