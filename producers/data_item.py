"""DataItem: a handle on an input or artifact body.

An input (a path or file:// URI the user chose) is read where it points. A body a run logged is read
only from the content store, by its recorded sha256, and only when the bytes still match: the URI a
logged event carries is an address someone else wrote and is never opened.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from producers.artifact_store import ArtifactStore

if TYPE_CHECKING:  # imported by as_df, the one method that needs it
    import pandas as pd

# format -> the name of the pandas reader of it (and its keyword arguments)
_READERS: dict[str, tuple[str, dict[str, Any]]] = {
    "csv": ("read_csv", {}),
    "parquet": ("read_parquet", {}),
    "json": ("read_json", {}),
    "jsonl": ("read_json", {"lines": True}),
}


@dataclass(frozen=True)
class DataItem:
    """`.local()` gives a local path, `.get()` the bytes, `.as_df()` a DataFrame.

    An item with a recorded size, or a sha256 and a kind other than "input", is a logged artifact:
    its body comes from the artifact store at `store_root` (default: the one of RUNBUS_HOME) and
    ArtifactUnavailable (a ValueError naming the key) is raised when the store does not hold the
    recorded bytes.
    """

    key: str
    uri: str
    format: str | None = None
    kind: str = "artifact"
    sha256: str | None = None
    size: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    store_root: str | None = None  # the content store holding a logged body

    @property
    def is_logged(self) -> bool:
        """Whether the body was logged by a run (read from the store) rather than a user's own path.
        Every logged artifact event records a size, so an event claiming kind "input" is still logged."""
        return self.size is not None or (self.sha256 is not None and self.kind != "input")

    @property
    def url(self) -> str:
        """The item's address (MLRun's DataItem.url): its URI."""
        return self.uri

    @property
    def suffix(self) -> str:
        """The file suffix of the key, or else of the URI (MLRun's DataItem.suffix): '.csv'."""
        return PurePosixPath(self.key).suffix or PurePosixPath(urlparse(self.uri).path).suffix

    def mlrun_dict(self, project: str, iteration: int, tree: str) -> dict[str, Any]:
        """The item as MLRun's artifact dict (kind, metadata {key, project, iter, tree, labels},
        spec {target_path, format, size, hash, db_key}, status) of the run `tree` (its uid) at
        `iteration`; a best iteration's artifact linked to a sweep's parent names its own iteration."""
        return {"kind": self.kind,
                "metadata": {"key": self.key, "project": project,
                             "iter": self.meta.get("link_iteration") or iteration, "tree": tree,
                             "labels": dict(self.labels)},
                "spec": {"target_path": self.uri, "format": self.format, "size": self.size, "hash": self.sha256,
                         "db_key": self.meta.get("db_key") or self.key},
                "status": {"state": "created"}}

    def local(self) -> str:
        if self.is_logged:
            return str(self._store().verified_path(self.key, self.sha256))
        parsed = urlparse(self.uri)
        if parsed.scheme in ("", "file"):
            return unquote(parsed.path) if parsed.scheme == "file" else self.uri
        raise ValueError(f"{self.key!r}: only local files and file:// URIs are supported, got {self.uri!r}")

    def get(self) -> bytes:
        if self.is_logged:
            return self._store().read_verified(self.key, self.sha256)
        return Path(self.local()).read_bytes()

    def as_df(self, **read_options: Any) -> pd.DataFrame:
        fmt = self.format or PurePosixPath(self.key).suffix.lstrip(".") or \
            ("" if self.is_logged else PurePosixPath(self.local()).suffix.lstrip("."))
        reader = _READERS.get(fmt.lower())
        if reader is None:
            raise ValueError(f"{self.key!r}: cannot read format {fmt!r} as a DataFrame "
                             f"(known: {', '.join(_READERS)})")
        import pandas as pd

        name, options = reader
        return getattr(pd, name)(io.BytesIO(self.get()), **{**options, **read_options})

    def _store(self) -> ArtifactStore:
        if self.store_root is not None:
            return ArtifactStore(self.store_root)
        from engine.settings import load_settings  # producers know no settings; only this default needs them

        return ArtifactStore(load_settings().artifact_root)

    def __str__(self) -> str:
        return self.uri
