"""Choosing the best iteration ('min.loss', 'max.accuracy', 'accuracy') and stop conditions."""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from simpleeval import EvalWithCompoundTypes, InvalidExpression, NameNotDefined


@dataclass(frozen=True)
class Selector:
    key: str
    mode: str  # "min" or "max"

    @classmethod
    def parse(cls, text: str) -> Selector:
        mode, sep, key = text.partition(".")
        if not sep:
            return cls(text, "max")
        if mode not in ("min", "max") or not key:
            raise ValueError(f"selector {text!r} must look like 'min.<result>', 'max.<result>' or '<result>'")
        return cls(key, mode)

    def value(self, results: Mapping[str, Any]) -> float | None:
        """The selected result as a number; None when it is missing or not a real number."""
        value = results.get(self.key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return None
        return float(value)

    def best(self, candidates: Mapping[int, Mapping[str, Any]]) -> int | None:
        """The iteration whose result is best; the earliest wins a tie; None if none qualifies."""
        scored = [(value, iteration) for iteration, results in candidates.items()
                  if (value := self.value(results)) is not None]
        if not scored:
            return None
        pick = min if self.mode == "min" else max
        best_value = pick(value for value, _ in scored)
        return min(iteration for value, iteration in scored if value == best_value)


class BestSoFar:
    """The best iteration as results arrive, in O(1) each; agrees with `Selector.best`."""

    def __init__(self, selector: Selector | None) -> None:
        self.selector = selector
        self.iteration: int | None = None
        self.value: float | None = None

    def offer(self, iteration: int, results: Mapping[str, Any]) -> None:
        if self.selector is None or (value := self.selector.value(results)) is None:
            return
        better = (self.value is None or (value < self.value if self.selector.mode == "min" else value > self.value)
                  or (value == self.value and self.iteration is not None and iteration < self.iteration))
        if better:
            self.iteration, self.value = iteration, value

    def describe(self) -> str | None:
        if self.selector is None or self.iteration is None:
            return None
        return f"{self.selector.key}={self.value:g} (iter {self.iteration})"


class StopCondition:
    """A boolean expression over one iteration's results, e.g. 'accuracy >= 0.9 and loss < 1'.

    Evaluated by simpleeval: names, numbers, comparisons and boolean logic; no calls, no attribute
    access, nothing that reaches Python objects.
    """

    def __init__(self, expression: str) -> None:
        """ValueError when `expression` does not parse, or calls a function or reads an attribute
        (refused here, before any iteration runs, rather than by the first evaluation); a result
        that is a list or a mapping may be indexed (`acc[0] > 0.9`)."""
        self.expression = expression
        self._evaluator = EvalWithCompoundTypes(functions={})
        try:
            parsed = self._evaluator.parse(expression)
        except (SyntaxError, InvalidExpression) as exc:
            raise ValueError(f"stop_condition {expression!r} does not parse: {exc}") from None
        for node in ast.walk(parsed):
            if isinstance(node, (ast.Call, ast.Attribute)):
                raise ValueError(f"stop_condition {expression!r}: {ast.unparse(node)!r} is not allowed (result "
                                 "names, numbers, indexing, comparisons, arithmetic and and/or/not only)")

    def met(self, results: Mapping[str, Any]) -> bool:
        """True when the expression holds; a result it names that is missing makes it False.
        ValueError naming the expression when it cannot be evaluated on these results (a text
        compared with a number, a division by zero...)."""
        self._evaluator.names = dict(results)
        try:
            return bool(self._evaluator.eval(self.expression))
        except NameNotDefined:
            return False
        except Exception as exc:  # simpleeval raises what Python would: TypeError, ZeroDivisionError...
            raise ValueError(f"stop_condition {self.expression!r} failed: {type(exc).__name__}: {exc}") from None
