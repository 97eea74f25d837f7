"""Content-addressed store of artifact bodies: each body is kept once, under its sha256.

The store is the only place an artifact body is ever read from: the address an event records (its
uri) is never opened, and a body is handed out only when its bytes still hash to the recorded sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERIFIED_LIMIT = 10_000


class ArtifactUnavailable(ValueError):
    """An artifact's body cannot be handed out: not in the content store, or not the recorded bytes."""


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


def is_sha256(value: object) -> bool:
    """Whether `value` is a sha256 as the store writes it: 64 lowercase hex digits."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


class ArtifactStore:
    """Bodies live at ROOT/ab/abcdef... (sha256); URIs are file:// URLs."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def put_bytes(self, data: bytes) -> StoredBody:
        digest = hashlib.sha256(data).hexdigest()
        target = self._path(digest)
        if not self._holds(digest):
            self._write_atomically(target, lambda out: out.write(data))
        else:
            _touch(target)
        return StoredBody(target.as_uri(), digest, len(data))

    def put_file(self, path: str | os.PathLike[str]) -> StoredBody:
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"artifact file {str(source)!r} does not exist")
        digest = file_sha256(source)
        target = self._path(digest)
        if not self._holds(digest):
            self._write_atomically(target, lambda out: _copy(source, out))
        else:
            _touch(target)
        return StoredBody(target.as_uri(), digest, source.stat().st_size)

    def put_stream(self, source: BinaryIO, expected_sha256: str | None = None) -> StoredBody:
        """Store the stream's bytes (hashed while copied, never held whole in memory); with
        `expected_sha256`, a body that hashes otherwise is refused and nothing is stored."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in iter(lambda: source.read(_CHUNK), b""):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            found = digest.hexdigest()
            if expected_sha256 is not None and found != expected_sha256:
                raise ArtifactUnavailable(f"body named {expected_sha256!r} has sha256 {found}: refused")
            target = self._path(found)
            if not self._holds(found):
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target)
            else:
                _touch(target)
            return StoredBody(target.as_uri(), found, size)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def remove_unreferenced(self, referenced: Collection[str], older_than_s: float = 3600.0,
                            now: float | None = None) -> list[str]:
        """Remove the bodies whose sha256 is not in `referenced` and that were last stored more
        than `older_than_s` ago; returns their digests, sorted.

        The grace period spares a body a job has just stored (or stored again: storing a body the
        store holds touches it) whose artifact event the caller's `referenced` could not know yet.
        Files that are not bodies (partial writes, other names) are left alone."""
        cutoff = (time.time() if now is None else now) - older_than_s
        keep = set(referenced)
        removed = []
        for folder in self.root.glob("[0-9a-f][0-9a-f]"):
            if folder.is_symlink() or not folder.is_dir():
                continue
            for body in folder.iterdir():
                digest = body.name
                if not is_sha256(digest) or digest[:2] != folder.name or digest in keep:
                    continue
                status = body.lstat()
                if stat.S_ISREG(status.st_mode) and status.st_mtime < cutoff:
                    body.unlink(missing_ok=True)
                    removed.append(digest)
        return sorted(removed)

    def _not_regular(self, key: str, sha256: object) -> ArtifactUnavailable:
        return ArtifactUnavailable(f"artifact {key!r}: body {sha256} in the artifact store is not a regular file")

    def verified_path(self, key: str, sha256: object) -> Path:
        """The store's file holding artifact `key`'s body, checked to hash to `sha256`; raises
        ArtifactUnavailable (naming the key) when the store has no such regular file inside it, or
        its bytes changed."""
        path = self._inside(key, sha256)
        try:
            status = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            raise ArtifactUnavailable(f"artifact {key!r}: body {sha256} is not in the artifact store") from None
        if not stat.S_ISREG(status.st_mode):
            raise self._not_regular(key, sha256)
        if not _VERIFIED.holds(path, status, str(sha256)):
            raise ArtifactUnavailable(f"artifact {key!r}: body in the artifact store does not match its "
                                      f"recorded sha256 {sha256} (changed after it was logged)")
        return path

    def read_verified(self, key: str, sha256: object) -> bytes:
        """Artifact `key`'s body, read once from the store and checked against `sha256`."""
        path = self._inside(key, sha256)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise ArtifactUnavailable(f"artifact {key!r}: body {sha256} is not in the artifact store") from None
        except OSError as exc:
            raise ArtifactUnavailable(f"artifact {key!r}: body {sha256} cannot be read from the artifact store: "
                                      f"{exc.strerror}") from None
        with os.fdopen(fd, "rb") as body:
            if not stat.S_ISREG(os.fstat(body.fileno()).st_mode):
                raise self._not_regular(key, sha256)
            data = body.read()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ArtifactUnavailable(f"artifact {key!r}: body in the artifact store does not match its "
                                      f"recorded sha256 {sha256} (changed after it was logged)")
        return data

    def _inside(self, key: str, sha256: object) -> Path:
        """The body's path, refused unless `sha256` is a digest and no part of the path is a link
        leading elsewhere."""
        if not is_sha256(sha256):
            raise ArtifactUnavailable(f"artifact {key!r}: recorded sha256 {sha256!r} is not a sha256 digest")
        path = self._path(str(sha256))
        if path.parent.resolve() != path.parent:
            raise ArtifactUnavailable(f"artifact {key!r}: store directory {path.parent} is a link out of the "
                                      f"artifact store")
        return path

    def _holds(self, digest: str) -> bool:
        try:
            self.verified_path(digest, digest)
        except ArtifactUnavailable:
            return False
        return True

    def _path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def _write_atomically(self, target: Path, write: Callable[[BinaryIO], object]) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class _VerifiedBodies:
    """Files already hashed, by identity and change time, so pages that show many bodies do not
    hash them on every view; a file written since (new ctime) is hashed again."""

    def __init__(self) -> None:
        self._seen: set[tuple[object, ...]] = set()
        self._lock = threading.Lock()

    def holds(self, path: Path, status: os.stat_result, sha256: str) -> bool:
        identity = (str(path), status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns,
                    status.st_ctime_ns, sha256)
        with self._lock:
            if identity in self._seen:
                return True
        try:
            with open(path, "rb") as body:
                if os.fstat(body.fileno()).st_ino != status.st_ino:
                    return False  # replaced between the stat and the open
                found = _stream_sha256(body)
        except OSError:
            return False
        if found != sha256:
            return False
        with self._lock:
            if len(self._seen) >= _VERIFIED_LIMIT:
                self._seen.clear()
            self._seen.add(identity)
        return True


_VERIFIED = _VerifiedBodies()


def _touch(body: Path) -> None:
    """Mark a body as stored now (see `ArtifactStore.remove_unreferenced`); a read-only store stays as it is."""
    with contextlib.suppress(OSError):
        os.utime(body)


def _copy(source: Path, out: BinaryIO) -> None:
    with source.open("rb") as src:
        shutil.copyfileobj(src, out)


def _stream_sha256(source: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: source.read(_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as src:
        return _stream_sha256(src)
