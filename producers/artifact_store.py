"""Content-addressed store of artifact bodies: each body is kept once, under its sha256."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class StoredBody:
    uri: str
    sha256: str
    size: int


def check_artifact_key(key: object) -> str:
    """Refuse keys that are empty or would name a path outside the store (absolute, '..')."""
    if type(key) is not str or not key.strip():
        raise ValueError(f"artifact key must be a non-empty string, got {key!r}")
    posix, windows = PurePosixPath(key), PureWindowsPath(key)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
        raise ValueError(f"artifact key {key!r} would escape the artifact store")
    return key


class ArtifactStore:
    """Bodies live at ROOT/ab/abcdef... (sha256); URIs are file:// URLs."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def put_bytes(self, data: bytes) -> StoredBody:
        digest = hashlib.sha256(data).hexdigest()
        target = self._path(digest)
        if not target.exists():
            self._write_atomically(target, lambda out: out.write(data))
        return StoredBody(target.as_uri(), digest, len(data))

    def put_file(self, path: str | os.PathLike[str]) -> StoredBody:
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"artifact file {str(source)!r} does not exist")
        digest = file_sha256(source)
        target = self._path(digest)
        if not target.exists():
            self._write_atomically(target, lambda out: _copy(source, out))
        return StoredBody(target.as_uri(), digest, source.stat().st_size)

    def _path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def _write_atomically(self, target: Path, write: object) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)  # type: ignore[operator]
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _copy(source: Path, out: object) -> None:
    with source.open("rb") as src:
        shutil.copyfileobj(src, out)  # type: ignore[arg-type]


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        for chunk in iter(lambda: src.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
