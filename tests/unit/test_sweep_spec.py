from __future__ import annotations

import pytest

from engine.sweep.selection import Selector, StopCondition
from engine.sweep.spec import SweepSpec


def test_grid_is_the_cartesian_product_in_order() -> None:
    spec = SweepSpec.from_options({"a": [1, 2], "b": ["x", "y", "z"]}, {})
    sets = spec.param_sets()
    assert len(sets) == 6
    assert sets[0] == {"a": 1, "b": "x"} and sets[-1] == {"a": 2, "b": "z"}


def test_list_takes_the_ith_values_together() -> None:
    spec = SweepSpec.from_options({"a": [1, 2, 3], "b": [4, 5, 6]}, {"strategy": "list"})
    assert spec.param_sets() == [{"a": 1, "b": 4}, {"a": 2, "b": 5}, {"a": 3, "b": 6}]


def test_list_with_unequal_lengths_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"equal length, got a=3, b=2"):
        SweepSpec.from_options({"a": [1, 2, 3], "b": [4, 5]}, {"strategy": "list"})


def test_random_draws_max_iterations_sets_reproducibly() -> None:
    options = {"strategy": "random", "max_iterations": 7, "seed": 42}
    first = SweepSpec.from_options({"a": list(range(100)), "b": [0.1, 0.2]}, options).param_sets()
    again = SweepSpec.from_options({"a": list(range(100)), "b": [0.1, 0.2]}, options).param_sets()
    other = SweepSpec.from_options({"a": list(range(100)), "b": [0.1, 0.2]}, {**options, "seed": 7}).param_sets()
    assert len(first) == 7 and first == again and first != other
    assert all(s["a"] in range(100) and s["b"] in (0.1, 0.2) for s in first)


def test_random_needs_max_iterations() -> None:
    with pytest.raises(ValueError, match="max_iterations"):
        SweepSpec.from_options({"a": [1]}, {"strategy": "random"})


@pytest.mark.parametrize(("options", "message"), [
    ({"strategy": "bayes"}, "strategy 'bayes'"),
    ({"max_errors": 0}, "max_errors"),
    ({"selector": "best.loss"}, "selector 'best.loss'"),
    ({"stop_condition": "accuracy >="}, "does not parse"),
    ({"stop_condition": "abs(s) > 1"}, "'abs\\(s\\)' is not allowed"),
    ({"stop_condition": "s.real > 1"}, "'s.real' is not allowed"),
    ({"colour": "red"}, "unknown sweep option"),
])
def test_bad_options_name_themselves(options: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        SweepSpec.from_options({"a": [1, 2]}, options)


def test_selector_skips_missing_and_non_numeric_results_and_handles_negatives() -> None:
    candidates = {1: {"loss": -1.0}, 2: {"loss": -5}, 3: {"loss": "n/a"}, 4: {}, 5: {"loss": True},
                  6: {"loss": float("nan")}}
    assert Selector.parse("min.loss").best(candidates) == 2
    assert Selector.parse("max.loss").best(candidates) == 1
    assert Selector.parse("loss").best(candidates) == 1  # a bare name means max
    assert Selector.parse("min.loss").best({1: {}, 2: {"loss": "x"}}) is None


def test_stop_condition_is_evaluated_safely() -> None:
    condition = StopCondition("accuracy >= 0.9 and loss < 1")
    assert condition.met({"accuracy": 0.95, "loss": 0.5})
    assert not condition.met({"accuracy": 0.5, "loss": 0.5})
    assert not condition.met({"loss": 0.5})  # a missing result never stops the sweep
    with pytest.raises(ValueError):
        StopCondition("__import__('os').system('true')").met({})
    with pytest.raises(ValueError):
        StopCondition("accuracy.__class__").met({"accuracy": 1})
    assert StopCondition("acc[0] > 0.5 and by['x'] == 1").met({"acc": [0.9], "by": {"x": 1}})  # indexing results
    for results, error in (({"accuracy": "high"}, "TypeError"), ({"accuracy": 0}, "ZeroDivisionError")):
        with pytest.raises(ValueError, match=f"stop_condition '1 / accuracy > 2' failed: {error}"):
            StopCondition("1 / accuracy > 2").met(results)


def test_best_so_far_agrees_with_the_selector_whatever_the_arrival_order() -> None:
    from engine.sweep.selection import BestSoFar

    candidates = {1: {"loss": 3.0}, 2: {"loss": -2}, 3: {}, 4: {"loss": -2}, 5: {"loss": "x"}, 6: {"loss": 7}}
    for text in ("min.loss", "max.loss"):
        selector = Selector.parse(text)
        for order in ([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], [4, 1, 6, 2, 5, 3]):
            best = BestSoFar(selector)
            for iteration in order:
                best.offer(iteration, candidates[iteration])
            assert best.iteration == selector.best(candidates), (text, order)
