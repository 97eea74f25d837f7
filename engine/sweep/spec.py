"""What a sweep runs: the parameter sets of a strategy, and the options that steer it."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.sweep.selection import Selector, StopCondition

if TYPE_CHECKING:  # read_param_file imports it: a sweep without a param file never loads pandas
    import pandas as pd

STRATEGIES = ("grid", "list", "random")
_OPTIONS = {"selector", "strategy", "stop_condition", "max_errors", "parallel_runs", "max_iterations",
            "seed", "quiet"}


@dataclass(frozen=True)
class SweepSpec:
    hyperparams: dict[str, list[Any]]
    strategy: str = "grid"
    selector: str | None = None
    stop_condition: str | None = None
    max_errors: int | None = None
    parallel_runs: int | None = None
    max_iterations: int | None = None
    seed: int | None = None
    quiet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_options(cls, hyperparams: Mapping[str, Any], options: Mapping[str, Any]) -> SweepSpec:
        """Validate the user's options; an unknown option or a bad value names itself."""
        unknown = set(options) - _OPTIONS
        if unknown:
            raise TypeError(f"unknown sweep option(s): {', '.join(sorted(unknown))} "
                            f"(known: {', '.join(sorted(_OPTIONS))})")
        if not hyperparams:
            raise ValueError("hyperparams is empty: give at least one param with a list of values")
        values = hyper_values(hyperparams)
        for key, candidates in values.items():
            if not candidates:
                raise ValueError(f"hyper-param {key!r} has no values")
        strategy = options.get("strategy") or "grid"
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        for name in ("max_errors", "parallel_runs", "max_iterations"):
            number = options.get(name)
            if number is not None and (not isinstance(number, int) or number < 1):
                raise ValueError(f"{name} must be a positive integer, got {number!r}")
        spec = cls(values, strategy, options.get("selector"), options.get("stop_condition"),
                   options.get("max_errors"), options.get("parallel_runs"),
                   options.get("max_iterations"), options.get("seed"), bool(options.get("quiet")))
        spec.param_sets()  # raise now for unequal list lengths and the like
        if spec.selector:
            Selector.parse(spec.selector)
        if spec.stop_condition:
            StopCondition(spec.stop_condition)
        return spec

    def param_sets(self) -> list[dict[str, Any]]:
        """The parameter set of each iteration, in iteration order (iteration 1 first)."""
        keys = list(self.hyperparams)
        if self.strategy == "grid":
            return [dict(zip(keys, combo, strict=False)) for combo in itertools.product(*self.hyperparams.values())]
        if self.strategy == "list":
            lengths = {key: len(v) for key, v in self.hyperparams.items()}
            if len(set(lengths.values())) > 1:
                detail = ", ".join(f"{k}={n}" for k, n in lengths.items())
                raise ValueError(f"strategy 'list' needs lists of equal length, got {detail}")
            return [dict(zip(keys, combo, strict=False)) for combo in zip(*self.hyperparams.values(), strict=False)]
        if self.max_iterations is None:
            raise ValueError("strategy 'random' needs max_iterations")
        chooser = random.Random(self.seed)
        return [{key: chooser.choice(self.hyperparams[key]) for key in keys}
                for _ in range(self.max_iterations)]

    def describe(self) -> dict[str, Any]:
        """The spec as JSON-able data, recorded on the parent run."""
        return {"hyperparams": self.hyperparams, "strategy": self.strategy, "selector": self.selector,
                "stop_condition": self.stop_condition, "max_errors": self.max_errors,
                "parallel_runs": self.parallel_runs, "max_iterations": self.max_iterations,
                "seed": self.seed}

    @classmethod
    def from_description(cls, described: Mapping[str, Any]) -> SweepSpec:
        return cls(**{k: v for k, v in described.items() if k in cls.__dataclass_fields__})


def read_param_file(path: str, strategy: str | None = None) -> tuple[dict[str, list[Any]], str]:
    """The hyperparams and strategy of a param file, read as MLRun reads one: a CSV file is one
    iteration a row (strategy 'list'; its header names the params); a JSON dict of lists is a
    'grid' unless `strategy` says 'list' or 'random'; a JSON list of dicts is one iteration a dict
    (a key a dict lacks is None there). ValueError names the file when it cannot be used so."""
    import pandas as pd

    file = Path(path.removeprefix("file://"))
    try:
        if file.suffix.lower() == ".csv":
            if strategy not in (None, "list"):
                raise ValueError(f"strategy {strategy!r} needs a JSON file of lists; a CSV file is one "
                                 f"iteration a row (strategy 'list')")
            return _columns(pd.read_csv(file)), "list"
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # pandas' ParserError is a ValueError
        raise ValueError(f"param_file {path!r}: {exc}") from None
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        return {str(key): values for key, values in data.items()}, strategy or "grid"
    if isinstance(data, list) and all(isinstance(row, dict) for row in data) and strategy in (None, "list"):
        return _columns(pd.DataFrame(data)), "list"
    raise ValueError(f"param_file {path!r}: expected a JSON dict of lists, or a list of dicts "
                     f"(strategy 'list'), got {type(data).__name__} for strategy {strategy!r}")


def _columns(frame: pd.DataFrame) -> dict[str, list[Any]]:
    """Each column's values as Python values, a missing cell as None."""
    plain = frame.astype(object).where(frame.notna(), None)
    return {str(column): plain[column].tolist() for column in plain.columns}


def hyper_values(hyperparams: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Each param's values as a list; TypeError naming a param whose values are not a list (text
    is one value, not a list of characters), or saying `hyperparams` is not a mapping."""
    if not isinstance(hyperparams, Mapping):
        raise TypeError(f"hyperparams must be a mapping of param -> list of values, got {type(hyperparams).__name__}")
    values: dict[str, list[Any]] = {}
    for key, candidates in hyperparams.items():
        if isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__iter__"):
            raise TypeError(f"hyper-param {key!r}: expected a list of values, got {candidates!r}")
        values[key] = list(candidates)
    return values
