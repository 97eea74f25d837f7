"""Console output of runs: buffered into `log` events, and captured from stdout and stderr.

`RunOutput` is a run's buffer (RunContext.log_output writes into it): the caller only appends the
text to a queue; the text is cut into lines, masked and sent as one `log` event per batch on the
writer's thread (every flush interval), or by the caller once the queue holds more than
`_QUEUED_CHARS` characters, which also waits for room in the writer (memory stays bounded).

`capture_console(context, fd_level=...)` copies this process's stdout and stderr into a run while
still writing them to the terminal:
- Python level (in-process runs): sys.stdout and sys.stderr are replaced by a tee that hands each
  write to the run registered for the writing thread (a thread with none writes only to the
  terminal), so concurrent runs in threads each get their own thread's output. Logging handlers
  that hold the original sys.stdout or sys.stderr (configured before the capture) are pointed at the
  tee while any capture is active; warnings are printed to sys.stderr and so are captured too.
  Writes that bypass sys.stdout (to its .buffer, to fd 1, by C code or a child process) are not.
- fd level (a script-level run): fds 1 and 2 are pipes read by a thread that copies everything to
  the original fds and into the run: every thread, C code and child processes are captured.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from producers.context import RunContext

STREAMS = frozenset({"stdout", "stderr", "logger"})
LINE_MAX_CHARS = 8 * 1024  # a longer line is split into pieces; all but the last end with LINE_CONTINUES
LINE_CONTINUES = " [line continues]"
EVENT_MAX_LINES = 1000  # lines in one log event
EVENT_MAX_CHARS = 64 * 1024  # characters of text in one log event (a line is at most LINE_MAX_CHARS)
_QUEUED_CHARS = 64 * 1024  # text queued by writers before the writing thread cuts it into lines itself
_QUEUED_WRITES = 2000
FD_DRAIN_S = 2.0  # how long leaving an fd-level capture waits for children that still hold the pipe


class _Writer(Protocol):
    def every_interval(self, key: str, tick: Callable[[], None]) -> None: ...
    def stop_interval(self, key: str) -> None: ...


def _note(message: str) -> None:
    """A note to the process's original stderr (never into a run's log)."""
    stream = sys.__stderr__
    if stream is not None:
        with contextlib.suppress(Exception):
            stream.write(f"runbus: {message}\n")
            stream.flush()


class RunOutput:
    """A run's console output on its way to the log as `log` events (thread-safe).

    Lines are split on "\\n" ("\\r\\n" counts as one line break); a carriage return inside a line
    keeps what a terminal shows (the text after the last "\\r", as a progress bar leaves it). A line
    longer than LINE_MAX_CHARS is split into pieces that end with LINE_CONTINUES, nothing is cut
    away. Secret values are masked in the joined text, so a value written in several pieces (or
    across a line break) is masked too. Lone surrogates (undecodable bytes) become backslash escapes.
    """

    def __init__(self, emit: Callable[[dict[str, Any], float, int], None], redact: Any,
                 writer: _Writer, key: str, what: str) -> None:
        self._emit = emit  # (payload, ts, characters of text) -> one log event on the run's stream
        self._redact = redact
        self._writer = writer
        self._key = key
        self._what = what
        self._queue: deque[tuple[float, str, str]] = deque()
        self._queued_chars = 0  # approximate (updated without a lock): only decides when to cut lines
        self._lock = threading.Lock()
        self._partial: dict[str, list[str]] = {}  # stream -> pieces of its unfinished line
        self._partial_chars: dict[str, int] = {}
        self._ticking = False
        self._closed = False
        self._noted = False

    def write(self, stream: str, text: str) -> None:
        """Queue `text` (any part of a line) of `stream`; after `close` it is dropped with a note."""
        if self._closed:
            self._dropped(text)
            return
        self._queue.append((time.time(), stream, text))
        self._queued_chars += len(text)
        if not self._ticking:
            self._ticking = True
            self._writer.every_interval(self._key, self.tick)
        if self._queued_chars > _QUEUED_CHARS or len(self._queue) > _QUEUED_WRITES:
            with self._lock:
                self._send(self._lines())

    def tick(self) -> None:
        """Send the complete lines queued so far (on the writer thread: never waits for the lock)."""
        if self._closed:
            self._writer.stop_interval(self._key)
            return
        if not self._queue or not self._lock.acquire(blocking=False):
            return
        try:
            self._send(self._lines())
        finally:
            self._lock.release()

    def flush(self) -> None:
        """Send everything queued, an unfinished line as a line of its own (nothing after `close`)."""
        with self._lock:
            if self._closed:
                self._queue.clear()
                return
            self._send(self._lines() + self._unfinished())

    def close(self) -> None:
        """Flush, then drop (with a note) whatever is written later."""
        try:
            self.flush()
        finally:
            self._closed = True
            self._writer.stop_interval(self._key)

    # under self._lock -----------------------------------------------------------------------------

    def _lines(self) -> list[tuple[float, str, str, bool]]:
        """The queued text as raw lines: (ts, stream, text, continues on the next line)."""
        lines: list[tuple[float, str, str, bool]] = []
        queue = self._queue
        self._queued_chars = 0
        while queue:
            ts, stream, text = queue.popleft()
            pieces = self._partial.setdefault(stream, [])
            if "\n" not in text:
                pieces.append(text)
                self._partial_chars[stream] = self._partial_chars.get(stream, 0) + len(text)
                if self._partial_chars[stream] > LINE_MAX_CHARS + self._redact.longest_match:
                    self._cut_long(ts, stream, lines)
                continue
            parts = text.split("\n")
            pieces.append(parts[0])
            lines.append((ts, stream, _shown("".join(pieces)), False))
            lines.extend((ts, stream, _shown(part), False) for part in parts[1:-1])
            pieces.clear()
            self._partial_chars[stream] = len(parts[-1])
            if parts[-1]:
                pieces.append(parts[-1])
                if len(parts[-1]) > LINE_MAX_CHARS + self._redact.longest_match:
                    self._cut_long(ts, stream, lines)
        return lines

    def _cut_long(self, ts: float, stream: str, lines: list[tuple[float, str, str, bool]]) -> None:
        """Send the head of an unfinished line that has grown too long (after dropping what a
        carriage return overwrote); keep its tail, long enough that a secret value written across
        the cut is still masked whole."""
        text = "".join(self._partial[stream])
        overwritten = text.rfind("\r", 0, len(text) - 1)  # a trailing "\r" may start a "\r\n"
        text = text[overwritten + 1:]
        cut = 0
        if len(text) > LINE_MAX_CHARS + self._redact.longest_match:
            cut = self._redact.cut_point(text, len(text) - self._redact.longest_match)
            if cut > 0:
                lines.append((ts, stream, _escaped(text[:cut]), True))
        self._partial[stream] = [text[cut:]]
        self._partial_chars[stream] = len(text) - cut

    def _unfinished(self) -> list[tuple[float, str, str, bool]]:
        now = time.time()
        lines = [(now, stream, _shown("".join(pieces)), False)
                 for stream, pieces in self._partial.items() if "".join(pieces)]
        self._partial.clear()
        self._partial_chars.clear()
        return lines

    def _send(self, raw: list[tuple[float, str, str, bool]]) -> None:
        if not raw:
            return
        batch: list[dict[str, Any]] = []
        chars = 0
        for ts, stream, text in self._masked(raw):
            if batch and (len(batch) >= EVENT_MAX_LINES or chars + len(text) > EVENT_MAX_CHARS):
                self._emit({"lines": batch}, batch[0]["ts"], chars)
                batch, chars = [], 0
            batch.append({"ts": ts, "stream": stream, "text": text})
            chars += len(text)
        self._emit({"lines": batch}, batch[0]["ts"], chars)

    def _masked(self, raw: list[tuple[float, str, str, bool]]) -> Iterator[tuple[float, str, str]]:
        """Mask runs of consecutive lines of one stream joined (a secret may span a line break),
        then split lines longer than LINE_MAX_CHARS."""
        start = 0
        while start < len(raw):
            end = start + 1
            while end < len(raw) and raw[end][1] == raw[start][1] and not raw[end - 1][3]:
                end += 1
            group = raw[start:end]
            if self._redact:
                masked = self._redact("\n".join(line[2] for line in group)).split("\n")
                if len(masked) != len(group):  # a mask joined lines: they take the group's last time
                    group = [(group[-1][0], group[-1][1], text, False) for text in masked[:-1]] + [
                        (group[-1][0], group[-1][1], masked[-1], group[-1][3])]
                else:
                    group = [(ts, stream, text, continues)
                             for (ts, stream, _, continues), text in zip(group, masked, strict=True)]
            for ts, stream, text, continues in group:
                yield from ((ts, stream, piece) for piece in _pieces(text, continues))
            start = end

    def _dropped(self, text: str) -> None:
        if not self._noted and text.strip():
            self._noted = True
            _note(f"{self._what} has finished: console output written after its end is not logged")


def _shown(line: str) -> str:
    """What a terminal shows of a raw line: no trailing "\\r", only the text after the last "\\r";
    lone surrogates as backslash escapes."""
    if "\r" in line:
        line = line.rstrip("\r")
        line = line[line.rfind("\r") + 1:]
    return _escaped(line)


def _escaped(text: str) -> str:
    """`text` with lone surrogates (from undecodable bytes) as backslash escapes."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _pieces(text: str, continues: bool) -> list[str]:
    """`text` in pieces of at most LINE_MAX_CHARS; every piece but the last of a finished line
    ends with LINE_CONTINUES."""
    if len(text) <= LINE_MAX_CHARS and not continues:
        return [text]
    size = LINE_MAX_CHARS - len(LINE_CONTINUES)
    pieces = [text[i:i + size] + LINE_CONTINUES for i in range(0, len(text), size)] or [LINE_CONTINUES]
    if not continues:
        pieces[-1] = pieces[-1][:-len(LINE_CONTINUES)]
    return pieces


# Python-level capture ------------------------------------------------------------------------------

# thread ident -> where that thread's writes to sys.stdout / sys.stderr also go
_targets: dict[int, Callable[[str, str], None]] = {}
_install_lock = threading.Lock()
_installed: list[_Tee] = []
_users = 0


class _Tee:
    """Stands in for sys.stdout or sys.stderr: writes to the original, then to the writing thread's run."""

    def __init__(self, original: IO[str], stream: str) -> None:
        self._original = original
        self._stream = stream
        self._failed = False

    def write(self, text: str) -> int:
        written = self._original.write(text)
        target = _targets.get(threading.get_ident())
        if target is not None and type(text) is str and text:
            try:
                target(self._stream, text)
            except Exception as exc:  # the program's print must go on; say once why the run misses it
                if not self._failed:
                    self._failed = True
                    _note(f"console output is not logged: {type(exc).__name__}: {exc}")
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


def _handlers() -> list[logging.StreamHandler[Any]]:
    loggers = [logging.getLogger()] + [logger for logger in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(logger, logging.Logger)]
    return [handler for logger in loggers for handler in list(logger.handlers)
            if isinstance(handler, logging.StreamHandler)]


def _install() -> None:
    global _users
    with _install_lock:
        _users += 1
        if _users > 1:
            return
        tees = {}
        for name in ("stdout", "stderr"):
            original = getattr(sys, name)
            if original is not None:
                tee = _Tee(original, name)
                setattr(sys, name, tee)
                _installed.append(tee)
                tees[id(original)] = tee
        for handler in _handlers():
            tee = tees.get(id(handler.stream))
            if tee is not None:
                handler.setStream(tee)  # type: ignore[arg-type]


def _uninstall() -> None:
    global _users
    with _install_lock:
        _users -= 1
        if _users > 0:
            return
        ours = {id(tee): tee for tee in _installed}
        for handler in _handlers():
            tee = ours.get(id(handler.stream))
            if tee is not None:
                handler.setStream(tee._original)
        for tee in _installed:
            # restored only when still in place: whoever replaced it since keeps it (the tee then
            # only passes writes through, no thread being registered)
            if getattr(sys, tee._stream) is tee:
                setattr(sys, tee._stream, tee._original)
        _installed.clear()


@contextlib.contextmanager
def _python_capture(target: Callable[[str, str], None]) -> Iterator[None]:
    ident = threading.get_ident()
    _install()
    previous = _targets.get(ident)
    _targets[ident] = target
    try:
        yield
    finally:
        if previous is None:
            _targets.pop(ident, None)
        else:
            _targets[ident] = previous
        _uninstall()


@contextlib.contextmanager
def uncaptured() -> Iterator[None]:
    """While active, this thread's writes to sys.stdout and sys.stderr reach only the terminal
    (a run's logger, whose lines the run already has, uses it). fd-level capture still sees them."""
    ident = threading.get_ident()
    target = _targets.pop(ident, None)
    try:
        yield
    finally:
        if target is not None:
            _targets[ident] = target


# fd-level capture ----------------------------------------------------------------------------------

class _FdPump:
    """fd `fd` redirected into a pipe; a thread copies the pipe to the original fd and to `target`."""

    def __init__(self, fd: int, stream: str, target: Callable[[str, str], None]) -> None:
        self.fd = fd
        self.stream = stream
        self.target: Callable[[str, str], None] | None = target
        self.saved = os.dup(fd)
        read_end, write_end = os.pipe()
        try:
            os.dup2(write_end, fd)
        finally:
            os.close(write_end)
        self._read_end = read_end
        self._failed = False
        self.thread = threading.Thread(target=self._pump, name=f"runbus-capture-{stream}", daemon=True)
        self.thread.start()

    def restore(self) -> None:
        """Point the fd back at the original (the pipe ends once no child holds it any more)."""
        os.dup2(self.saved, self.fd)

    def _pump(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
        terminal = True
        try:
            while True:
                data = os.read(self._read_end, 65536)
                if terminal:
                    terminal = _write_all(self.saved, data)
                text = decoder.decode(data, final=not data)
                target = self.target
                if text and target is not None:
                    try:
                        target(self.stream, text)
                    except Exception as exc:  # keep reading: a writer blocked on a full pipe never ends
                        if not self._failed:
                            self._failed = True
                            _note(f"{self.stream} is not logged: {type(exc).__name__}: {exc}")
                if not data:
                    return
        finally:
            os.close(self._read_end)
            os.close(self.saved)


def _write_all(fd: int, data: bytes) -> bool:
    """Write `data` to `fd`; False once the fd is gone (a closed terminal): stop writing there."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        return False
    return True


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()


def _has_fd(stream: Any, fd: int) -> bool:
    try:
        return stream is not None and stream.fileno() == fd
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return False


@contextlib.contextmanager
def _fd_capture(target: Callable[[str, str], None]) -> Iterator[None]:
    _flush_python_streams()
    pumps: list[_FdPump] = []
    try:
        for fd, stream in ((1, "stdout"), (2, "stderr")):
            pumps.append(_FdPump(fd, stream, target))
        yield
    finally:
        _flush_python_streams()
        for pump in pumps:
            pump.restore()
        deadline = time.monotonic() + FD_DRAIN_S
        for pump in pumps:
            pump.thread.join(max(0.0, deadline - time.monotonic()))
            # a child still holds the pipe: its later output reaches only the terminal
            pump.target = None


@contextlib.contextmanager
def capture_console(context: RunContext, *, fd_level: bool) -> Iterator[None]:
    """Copy this process's stdout and stderr into `context`'s log while active (see the module doc).

    `fd_level` captures at the file-descriptor level (all threads, C code, child processes); where
    sys.stdout or sys.stderr has no file descriptor (Jupyter) it falls back to the Python level for
    the calling thread. On exit the streams are restored and the run's buffered output is flushed.
    """
    use_fds = fd_level and _has_fd(sys.stdout, 1) and _has_fd(sys.stderr, 2)
    capture = _fd_capture if use_fds else _python_capture
    try:
        with capture(context.log_output):
            yield
    finally:
        context.flush_output()
