"""Artifact bodies and their inline previews: images shown, tables as rows, text as text."""

from __future__ import annotations

import base64
import codecs
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from producers.artifact_store import ArtifactStore, ArtifactUnavailable
from producers.data_item import DataItem

IMAGE_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "gif": "image/gif",
               "webp": "image/webp", "svg": "image/svg+xml"}
TEXT_FORMATS = {"txt", "text", "log", "json", "jsonl", "md", "yaml", "yml", "py", "toml", "ini", "cfg",
                "xml", "html", "sh", "sql", "r", "tsv"}
TABLE_FORMATS = {"csv", "parquet"}
PREVIEW_ROWS = 50
PREVIEW_TEXT_BYTES = 32_768
INLINE_IMAGE_BYTES = 5_000_000   # larger images are linked, not embedded, in a report


@dataclass
class Preview:
    """How an artifact shows inline: kind is image, table, text or none (download only)."""

    kind: str
    src: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    text: str = ""
    note: str = ""
    image: str = ""  # a companion image's src, shown above (a chart's PNG beside its CSV)


def artifact_item(row: dict[str, Any], store_root: str | Path) -> DataItem:
    """A DataItem for an artifacts-table row: its body comes from the content store, by sha256."""
    size = row.get("size")
    size = -1 if size is None else size  # a row of the artifacts table is a logged body, whatever its kind says
    return DataItem(row["key"], row["uri"], row.get("format"), row.get("kind") or "artifact", row.get("sha256"),
                    size, {}, {}, str(store_root))


def artifact_format(row: dict[str, Any]) -> str:
    fmt = row.get("format") or PurePosixPath(str(row["key"])).suffix.lstrip(".")
    return str(fmt or "").lower()


def body_path(row: dict[str, Any], store_root: str | Path) -> Path | None:
    """The content store's file holding the row's body, checked against its recorded sha256; None
    when the store does not hold those bytes (the row's uri is never looked at)."""
    try:
        return verified_body(row, store_root)
    except ArtifactUnavailable:
        return None


def verified_body(row: dict[str, Any], store_root: str | Path) -> Path:
    """Like `body_path`, but raises ArtifactUnavailable saying why (naming the artifact key)."""
    return ArtifactStore(store_root).verified_path(str(row["key"]), row.get("sha256"))


def media_type(row: dict[str, Any]) -> str:
    fmt = artifact_format(row)
    if fmt in IMAGE_TYPES:
        return IMAGE_TYPES[fmt]
    if fmt in TEXT_FORMATS or fmt == "csv":
        return "text/plain; charset=utf-8"
    return "application/octet-stream"


def data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def preview(row: dict[str, Any], store_root: str | Path, image_src: Callable[[dict[str, Any], Path], str]) -> Preview:
    """The inline preview of one artifact; `image_src` gives an image's URL (or data: URI), for the
    artifact's body or (a row with "part") for the companion image its meta names."""
    try:
        path = verified_body(row, store_root)
    except ArtifactUnavailable as exc:
        return Preview("none", note=f"body unavailable: {exc}")
    fmt = artifact_format(row)
    try:
        if fmt in IMAGE_TYPES:
            return Preview("image", src=image_src(row, path))
        if fmt in TABLE_FORMATS:
            shown = _table(path, fmt)
        elif fmt in TEXT_FORMATS or ((row.get("size") or 0) <= PREVIEW_TEXT_BYTES and _looks_like_text(path)):
            shown = _text(path)
        else:
            shown = Preview("none")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return Preview("none", note=f"no preview: {exc}")
    companion = companion_image(row, store_root)
    if companion is not None:
        image_row, image_path = companion
        shown.image = image_src(image_row, image_path)
    return shown


def companion_image(row: dict[str, Any], store_root: str | Path,
                    part: str | None = None) -> tuple[dict[str, Any], Path] | None:
    """The first companion image the artifact's meta names (a chart's PNG: meta[part] = {"sha256",
    "format"}), or the one named `part`: (a row for it, its "part" set, and its file, checked against
    its sha256 by the store); None when there is none the store holds. The meta is the log's: only its
    sha256 names a file, and only image formats count."""
    meta = row.get("meta")
    if not isinstance(meta, dict):
        return None
    for name, value in meta.items():
        if (part is not None and name != part) or not isinstance(value, dict):
            continue
        fmt = str(value.get("format") or "").lower()
        if fmt not in IMAGE_TYPES:
            continue
        image_row = {**row, "part": name, "sha256": value.get("sha256"), "format": fmt}
        try:
            return image_row, verified_body(image_row, store_root)
        except ArtifactUnavailable:
            continue
    return None


def _table(path: Path, fmt: str) -> Preview:
    if fmt == "parquet":
        frame = pd.read_parquet(path)
        total = len(frame)
        frame = frame.head(PREVIEW_ROWS)
    else:
        frame = pd.read_csv(path, nrows=PREVIEW_ROWS + 1)
        total = len(frame)
        frame = frame.head(PREVIEW_ROWS)
    note = f"first {PREVIEW_ROWS} rows" if total > PREVIEW_ROWS else ""
    return Preview("table", columns=[str(c) for c in frame.columns],
                   rows=frame.astype(object).where(frame.notna(), None).values.tolist(), note=note)


def _text(path: Path) -> Preview:
    with path.open("rb") as body:
        data = body.read(PREVIEW_TEXT_BYTES + 1)
    text = data[:PREVIEW_TEXT_BYTES].decode("utf-8", errors="replace")
    return Preview("text", text=text, note=f"first {PREVIEW_TEXT_BYTES // 1024} KB" if len(data) > PREVIEW_TEXT_BYTES
                   else "")


def _looks_like_text(path: Path) -> bool:
    with path.open("rb") as body:
        head = body.read(1024)
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut last character is fine
    except UnicodeDecodeError:
        return False
    return True
