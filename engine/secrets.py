"""Secret sources: values are resolved when a run starts and never written anywhere."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

SECRET_KINDS = ("file", "env", "inline")


@dataclass(frozen=True)
class SecretSource:
    """Where a run's secrets come from; an inline source holds the values, so no repr shows it."""

    kind: str
    source: Any = field(repr=False)

    def __post_init__(self) -> None:
        if self.kind not in SECRET_KINDS:
            raise ValueError(f"secret kind {self.kind!r} is not one of {', '.join(SECRET_KINDS)}")
        if self.kind == "inline" and isinstance(self.source, Mapping):
            for key in self.source:
                check_secret_key(str(key))

    def resolve(self) -> dict[str, str]:
        if self.kind == "file":
            path = Path(self.source)
            if not path.is_file():
                raise FileNotFoundError(f"secrets file {str(path)!r} does not exist")
            return {k: v or "" for k, v in dotenv_values(path).items()}
        if self.kind == "env":
            names = self.source.split(",") if isinstance(self.source, str) else list(self.source)
            missing = [n for n in names if n not in os.environ]
            if missing:
                raise KeyError(f"secret environment variable(s) not set: {', '.join(missing)}")
            return {n: os.environ[n] for n in names}
        if not isinstance(self.source, Mapping):
            raise TypeError("inline secrets must be a dict of key -> value")
        return {str(k): str(v) for k, v in self.source.items()}


def resolve_all(sources: Sequence[SecretSource]) -> dict[str, str]:
    """Merge every source's secrets; later sources win."""
    merged: dict[str, str] = {}
    for source in sources:
        merged.update(source.resolve())
    for key in merged:
        check_secret_key(key)
    return merged


def check_secret_key(key: str) -> str:
    """`key` if it is valid UTF-8 text (the run records its secret keys); ValueError naming it otherwise."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"secret key {key!r} is not valid UTF-8 text ({exc.reason} at index {exc.start})") from None
    return key


def from_environment(keys: Sequence[str]) -> dict[str, str]:
    """The values of the recorded secret keys that the environment holds (for reruns and resumes)."""
    return {key: os.environ[key] for key in keys if key in os.environ}
