"""DataItem: a handle on an input or artifact body, by URI or local path."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

import pandas as pd

_READERS = {
    "csv": pd.read_csv,
    "parquet": pd.read_parquet,
    "json": pd.read_json,
    "jsonl": lambda src: pd.read_json(src, lines=True),
}


@dataclass(frozen=True)
class DataItem:
    """`.local()` gives a local path, `.get()` the bytes, `.as_df()` a DataFrame."""

    key: str
    uri: str
    format: str | None = None
    kind: str = "artifact"
    sha256: str | None = None
    size: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    store_root: str | None = None  # where to find the body by sha256 when the URI is from another machine

    def local(self) -> str:
        parsed = urlparse(self.uri)
        if parsed.scheme in ("", "file"):
            path = Path(unquote(parsed.path) if parsed.scheme == "file" else self.uri)
            if not path.exists() and self.sha256 and self.store_root:
                stored = Path(self.store_root) / self.sha256[:2] / self.sha256
                if stored.exists():
                    return str(stored)
            return str(path)
        raise ValueError(f"{self.key!r}: only local files and file:// URIs are supported, got {self.uri!r}")

    def get(self) -> bytes:
        return Path(self.local()).read_bytes()

    def as_df(self, **read_options: Any) -> pd.DataFrame:
        fmt = self.format or PurePosixPath(self.key).suffix.lstrip(".") or \
            PurePosixPath(self.local()).suffix.lstrip(".")
        reader = _READERS.get(fmt.lower())
        if reader is None:
            raise ValueError(f"{self.key!r}: cannot read format {fmt!r} as a DataFrame "
                             f"(known: {', '.join(_READERS)})")
        return reader(io.BytesIO(self.get()), **read_options)

    def __str__(self) -> str:
        return self.uri
