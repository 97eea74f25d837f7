"""Artifact kinds a handler can log. Each one turns its content into bytes to store."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from producers.artifact_store import check_artifact_key
from producers.data_item import DataItem

if TYPE_CHECKING:  # imported by the artifacts that hold a DataFrame, when they are made
    import pandas as pd


class Artifact:
    """A body (bytes, str or a local file) with a key, a kind, a format, labels and metadata."""

    kind = "artifact"
    default_format: str | None = None

    def __init__(self, key: str, body: bytes | str | None = None, local_path: str | None = None,
                 format: str | None = None, labels: dict[str, str] | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        self.key = check_artifact_key(key)
        self.body = body
        self.local_path = local_path
        self.format = format or self.default_format or _suffix(key) or _suffix(local_path)
        self.labels = dict(labels or {})
        self.meta = dict(meta or {})

    def render(self) -> bytes | None:
        """The bytes to store, or None when the body is the file at `local_path`."""
        if self.body is None:
            if self.local_path is None:
                raise ValueError(f"artifact {self.key!r} has neither a body nor a local_path")
            return None
        if isinstance(self.body, str):
            return self.body.encode()
        if isinstance(self.body, (bytes, bytearray, memoryview)):
            return bytes(self.body)
        raise TypeError(f"artifact {self.key!r}: body must be bytes or str, "
                        f"got {type(self.body).__name__}")

    def extra_bodies(self) -> dict[str, tuple[bytes, str]]:
        """Companion bodies (name -> (bytes, format)) stored beside the main one; the artifact's
        meta names each (meta[name] = {"uri", "sha256", "format"}: see `bodies_named`)."""
        return {}


def bodies_named(payload: Mapping[str, Any]) -> list[str]:
    """The sha256 of each body an artifact event's payload names, each once: its own, then the
    companion bodies its meta (JSON text) lists (`Artifact.extra_bodies`: a chart's PNG). The
    payload is read as anyone may have written it: a meta that is no JSON object names no companion,
    and a name is any text (whether it is a sha256 the store holds is the store's to check)."""
    meta = payload.get("meta")
    found = meta if isinstance(meta, Mapping) else artifact_meta(meta)
    named = [payload.get("sha256"), *(value.get("sha256") for value in found.values() if isinstance(value, Mapping))]
    return list(dict.fromkeys(name for name in named if isinstance(name, str)))


def artifact_meta(text: object) -> dict[str, Any]:
    """An artifact's meta, JSON text as its event holds it, as a dict; {} when it is none (the log's,
    so anything: not JSON, not an object, or nested deeper than the parser goes)."""
    try:
        found = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        return {}
    return found if isinstance(found, dict) else {}


class PlotArtifact(Artifact):
    """A matplotlib figure, stored as PNG."""

    kind = "plot"
    default_format = "png"

    def __init__(self, key: str, body: Any = None, title: str | None = None, dpi: int = 100,
                 **kwargs: Any) -> None:
        super().__init__(key, **kwargs)
        self.format = "png"
        self.figure, self.dpi = body, dpi
        if title:
            self.meta["title"] = title

    def render(self) -> bytes:
        if self.figure is None or not hasattr(self.figure, "savefig"):
            raise TypeError(f"artifact {self.key!r}: PlotArtifact body must be a matplotlib figure")
        out = io.BytesIO()
        self.figure.savefig(out, format="png", dpi=self.dpi, bbox_inches="tight")
        return out.getvalue()


class TableArtifact(Artifact):
    """A table as CSV, from a DataFrame, from rows with a header, or from CSV text."""

    kind = "table"
    default_format = "csv"

    def __init__(self, key: str, body: str | bytes | list[list[Any]] | None = None,
                 df: pd.DataFrame | None = None, header: list[str] | None = None,
                 visible: bool = False, **kwargs: Any) -> None:
        super().__init__(key, **kwargs)
        self.format = "csv"
        self.df = _as_frame(key, body, df, header)
        self.csv_text = body if isinstance(body, (str, bytes)) else None
        self.meta["visible"] = visible
        if self.df is not None:
            self.meta.update(rows=len(self.df), columns=[str(c) for c in self.df.columns])

    def render(self) -> bytes:
        if self.df is not None:
            return self.df.to_csv(index=False).encode()
        if self.csv_text is not None:
            return self.csv_text.encode() if isinstance(self.csv_text, str) else self.csv_text
        raise ValueError(f"artifact {self.key!r}: TableArtifact needs body, df or rows with header")


class ChartArtifact(TableArtifact):
    """Chart data (a header and rows) stored as CSV, plus a rendered line chart as PNG."""

    kind = "chart"

    def __init__(self, key: str, data: list[list[Any]] | None = None,
                 header: list[str] | None = None, title: str | None = None, **kwargs: Any) -> None:
        super().__init__(key, body=data or [], header=header, **kwargs)
        self.title = title or key

    def add_row(self, row: list[Any]) -> None:
        import pandas as pd

        self.df = pd.concat([self.df, pd.DataFrame([row], columns=self.df.columns)],
                            ignore_index=True)
        self.meta["rows"] = len(self.df)

    def extra_bodies(self) -> dict[str, tuple[bytes, str]]:
        import pandas as pd
        from matplotlib.figure import Figure  # matplotlib is slow to import; only charts need it

        figure = Figure(figsize=(6, 4))
        axes = figure.subplots()
        frame = self.df if self.df is not None else pd.DataFrame()
        if len(frame.columns) >= 2 and len(frame):
            frame.plot(x=frame.columns[0], ax=axes, marker="o")
        axes.set_title(self.title)
        out = io.BytesIO()
        figure.savefig(out, format="png", bbox_inches="tight")
        return {"chart": (out.getvalue(), "png")}


class DatasetArtifact(Artifact):
    """A DataFrame stored whole (CSV or Parquet) with a preview and per-column statistics."""

    kind = "dataset"

    def __init__(self, key: str, df: pd.DataFrame, format: str = "csv", preview_rows: int = 20,
                 stats: bool = True, **kwargs: Any) -> None:
        if format not in ("csv", "parquet"):
            raise ValueError(f"dataset {key!r}: format must be 'csv' or 'parquet', got {format!r}")
        super().__init__(key, format=format, **kwargs)
        import pandas as pd

        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"dataset {key!r}: df must be a pandas DataFrame")
        self.df = df
        self.meta.update(
            rows=len(df), columns={str(c): str(t) for c, t in df.dtypes.items()},
            preview=df.head(preview_rows).to_json(orient="split", date_format="iso",
                                                  default_handler=str),
        )
        if stats and len(df.columns):
            self.meta["stats"] = df.describe(include="all").to_json(default_handler=str)

    def render(self) -> bytes:
        if self.format == "parquet":
            out = io.BytesIO()
            self.df.to_parquet(out, index=False)
            return out.getvalue()
        return self.df.to_csv(index=False).encode()


class ModelArtifact(Artifact):
    """A trained model file or body, with its metrics, parameters and framework."""

    kind = "model"

    def __init__(self, key: str, body: bytes | str | None = None, model_file: str | None = None,
                 metrics: dict[str, Any] | None = None, parameters: dict[str, Any] | None = None,
                 framework: str | None = None, **kwargs: Any) -> None:
        super().__init__(key, body=body, local_path=model_file, **kwargs)
        self.meta.update(metrics=dict(metrics or {}), parameters=dict(parameters or {}),
                         framework=framework)
        if framework:
            self.labels.setdefault("framework", framework)


class LinkArtifact(Artifact):
    """A logged artifact of another run (MLRun links a sweep's best iteration's artifacts to its
    parent), logged again under its key: the same stored body, kind, format, labels and meta, plus
    `link_iteration` in the meta. The body is read from the content store, verified."""

    def __init__(self, target: DataItem, iteration: int | None = None, **kwargs: Any) -> None:
        meta = {**target.meta, "link_iteration": iteration} if iteration is not None else dict(target.meta)
        super().__init__(target.key, local_path=target.local(), format=target.format,
                         labels={**target.labels, **kwargs.pop("labels", {})}, meta=meta, **kwargs)
        self.kind = target.kind


def _suffix(path: str | None) -> str | None:
    return PurePosixPath(path).suffix.lstrip(".").lower() or None if path else None


def _as_frame(key: str, body: Any, df: pd.DataFrame | None,
              header: list[str] | None) -> pd.DataFrame | None:
    if df is None and not isinstance(body, list):
        return None
    import pandas as pd

    if df is not None:
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"artifact {key!r}: df must be a pandas DataFrame")
        return df
    if isinstance(body, list):
        if header is None:
            if not body:
                raise ValueError(f"artifact {key!r}: rows need a header")
            header, body = body[0], body[1:]
        return pd.DataFrame(body, columns=header)
    return None


__all__ = ["Artifact", "ChartArtifact", "DatasetArtifact", "LinkArtifact", "ModelArtifact", "PlotArtifact",
           "TableArtifact"]
