"""Console output of runs: buffered into `log` events, and captured from stdout and stderr.

`RunOutput` is a run's buffer (RunContext.log_output writes into it): a writer only appends the text
to a queue; the text is cut into lines, masked and sent as `log` events (one per batch of lines) on
the writer's thread every flush interval, or by a writer whose queue is full, which then also waits
for room in the writer (memory stays bounded).

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
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from producers.context import RunContext

STREAMS = frozenset({"stdout", "stderr", "logger"})
LINE_MAX_CHARS = 8 * 1024  # a longer line is split into pieces; all but the last end with LINE_CONTINUES
LINE_CONTINUES = " [line continues]"
EVENT_MAX_LINES = 4096  # lines in one log event
EVENT_MAX_CHARS = 64 * 1024  # characters in the chunks of one log event, a line break after each line
_QUEUED_WRITES = 1024  # pieces a stream's queue holds before the writing thread sends them itself
_BIG_WRITE = 16 * 1024  # a piece this long is sent at once by the thread that wrote it
_ORDER = ("stdout", "stderr", "logger")
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

    Writers only append the text to the stream's queue; lines are cut, masked and sent (one `log`
    event per batch) on the writer's thread every flush interval, or by the writer of a queue that
    holds more than _QUEUED_WRITES pieces (or a piece of more than _BIG_WRITE characters), which also
    waits for room in the writer: memory stays bounded. A line's `ts` is when its batch was cut (at
    most a flush interval after it was written); within a batch, the lines of each stream keep their
    order, and stdout comes before stderr and the logger.

    Lines are split on "\n" ("\r\n" counts as one line break); a carriage return inside a line keeps
    what a terminal shows (the text after the last "\r", as a progress bar leaves it). A line longer
    than LINE_MAX_CHARS is split into pieces that end with LINE_CONTINUES: nothing is cut away.
    Secret values are masked in the text of the batch as a whole, so a value written in several
    pieces (or across a line break) is masked too. Lone surrogates (undecodable bytes) become
    backslash escapes.
    """

    def __init__(self, emit: Callable[[dict[str, Any], float, int], None], redact: Any,
                 writer: _Writer, key: str, what: str) -> None:
        self._emit = emit  # (payload, ts, characters of text) -> one log event on the run's stream
        self._redact = redact
        self._writer = writer
        self._key = key
        self._what = what
        # appended to by writers, taken from the front under the lock: each list operation is atomic
        self.queues: dict[str, list[str]] = {stream: [] for stream in _ORDER}
        self._partial = dict.fromkeys(_ORDER, "")  # each stream's unfinished line (unmasked)
        self._lock = threading.Lock()
        self._ticking = False
        self.closed = False
        self._noted = False

    def write(self, stream: str, text: str) -> None:
        """Queue `text` (any part of a line) of `stream`; after `close` it is dropped with a note."""
        if self.closed:
            self.dropped(text)
            return
        queue = self.queues[stream]
        queue.append(text)
        if not self._ticking:
            self.start_ticking()
        if len(queue) > _QUEUED_WRITES or len(text) > _BIG_WRITE:
            self.overflow()

    def start_ticking(self) -> None:
        """Have the writer's thread send the complete lines every flush interval (until `close`)."""
        self._ticking = True
        self._writer.every_interval(self._key, self.tick)

    def overflow(self) -> None:
        """Send what is queued now, in the writing thread (which waits for room in the writer)."""
        with self._lock:
            if not self.closed:
                self._send(self._take(final=False))

    def tick(self) -> None:
        """Send the complete lines queued so far (on the writer thread: never waits for the lock)."""
        if self.closed:
            self._writer.stop_interval(self._key)
            return
        if not any(self.queues.values()) or not self._lock.acquire(blocking=False):
            return
        try:
            self._send(self._take(final=False))
        finally:
            self._lock.release()

    def flush(self) -> None:
        """Send everything queued, an unfinished line as a line of its own (nothing after `close`)."""
        with self._lock:
            if not self.closed:
                self._send(self._take(final=True))

    def close(self) -> None:
        """Flush, then drop (with a note) whatever is written later."""
        try:
            self.flush()
        finally:
            self.closed = True
            self._writer.stop_interval(self._key)
            for queue in self.queues.values():
                queue.clear()

    def dropped(self, text: str) -> None:
        """Output that came after the run's end: say so once on stderr."""
        if not self._noted and text.strip():
            self._noted = True
            _note(f"{self._what} has finished: console output written after its end is not logged")

    # under self._lock -----------------------------------------------------------------------------

    def _take(self, final: bool) -> list[tuple[str, str, bool]]:
        """The queued text as blocks of complete lines: (stream, lines joined by "\n", whether the
        last line continues in the next block). With `final`, unfinished lines count as complete."""
        blocks: list[tuple[str, str, bool]] = []
        for stream in _ORDER:
            queue = self.queues[stream]
            count = len(queue)
            if not count and not (final and self._partial[stream]):
                continue
            pieces = queue[:count]
            del queue[:count]  # what another thread appended meanwhile stays for the next time
            data = self._partial[stream] + _joined(pieces)
            if final:
                self._partial[stream] = ""
                if data:
                    blocks.append((stream, data[:-1] if data.endswith("\n") else data, False))
                continue
            end = data.rfind("\n")
            if end >= 0:
                blocks.append((stream, data[:end], False))
            partial = data[end + 1:]
            if len(partial) > LINE_MAX_CHARS + self._redact.longest_match:
                partial = self._cut_long(stream, partial, blocks)
            self._partial[stream] = partial
        return blocks

    def _cut_long(self, stream: str, text: str, blocks: list[tuple[str, str, bool]]) -> str:
        """Send the head of an unfinished line that has grown too long (after dropping what a
        carriage return overwrote); returns its tail, long enough that a secret value written
        across the cut is still masked whole."""
        overwritten = text.rfind("\r", 0, len(text) - 1)  # a trailing "\r" may start a "\r\n"
        text = text[overwritten + 1:]
        if len(text) <= LINE_MAX_CHARS + self._redact.longest_match:
            return text
        cut = self._redact.cut_point(text, len(text) - self._redact.longest_match)
        if cut > 0:
            blocks.append((stream, text[:cut], True))
        return text[cut:]

    def _send(self, blocks: list[tuple[str, str, bool]]) -> None:
        """One `log` event per EVENT_MAX_LINES lines or EVENT_MAX_CHARS characters: a chunk per
        stream's run of lines."""
        if not blocks:
            return
        now = time.time()
        chunks: list[dict[str, Any]] = []
        lines = chars = 0
        for stream, block, continues in blocks:
            texts = _lines_of(self._redact(block) if self._redact else block, continues)
            size = sum(map(len, texts)) + len(texts)
            if lines + len(texts) <= EVENT_MAX_LINES and chars + size <= EVENT_MAX_CHARS:  # the usual case
                chunks.append({"ts": now, "stream": stream, "text": "\n".join(texts)})
                lines, chars = lines + len(texts), chars + size
                continue
            start = 0
            for index, text in enumerate(texts):
                if lines >= EVENT_MAX_LINES or chars + len(text) + 1 > EVENT_MAX_CHARS:
                    if index > start:
                        chunks.append({"ts": now, "stream": stream, "text": "\n".join(texts[start:index])})
                    self._emit({"chunks": chunks}, now, chars)
                    chunks, lines, chars, start = [], 0, 0, index
                lines += 1
                chars += len(text) + 1
            chunks.append({"ts": now, "stream": stream, "text": "\n".join(texts[start:])})
        self._emit({"chunks": chunks}, now, chars)


def _joined(pieces: list[Any]) -> str:
    """The pieces as one string (a stream that took bytes or other objects: as text)."""
    try:
        return "".join(pieces)
    except TypeError:
        return "".join(p if isinstance(p, str) else p.decode("utf-8", "backslashreplace")
                       if isinstance(p, (bytes, bytearray)) else str(p) for p in pieces)


def _lines_of(block: str, continues: bool) -> list[str]:
    """The lines of a (masked) block as the log keeps them: what a terminal shows of each (no
    "\r", only the text after a line's last "\r"), lone surrogates as backslash escapes, lines
    longer than LINE_MAX_CHARS in pieces that end with LINE_CONTINUES (the last one too when the
    line `continues` in the next block)."""
    if not block.isascii():
        block = block.encode("utf-8", "backslashreplace").decode("utf-8")
    lines = block.split("\n")
    if "\r" in block:
        lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in lines]
    if not continues and max(map(len, lines)) <= LINE_MAX_CHARS:
        return lines
    size = LINE_MAX_CHARS - len(LINE_CONTINUES)
    out: list[str] = []
    for index, line in enumerate(lines):
        last_continues = continues and index == len(lines) - 1
        if len(line) <= LINE_MAX_CHARS and not last_continues:
            out.append(line)
            continue
        pieces = [line[i:i + size] + LINE_CONTINUES for i in range(0, len(line), size)] or [LINE_CONTINUES]
        if not last_continues:
            pieces[-1] = pieces[-1][:-len(LINE_CONTINUES)]
        out.extend(pieces)
    return out


# Python-level capture ------------------------------------------------------------------------------

# stream -> thread ident -> that run's queue for the stream: where the thread's writes to
# sys.stdout / sys.stderr also go; and the RunOutput of each routed queue (by id)
_routes: dict[str, dict[int, list[str]]] = {"stdout": {}, "stderr": {}}
_owners: dict[int, RunOutput] = {}
_get_ident = threading.get_ident
_install_lock = threading.Lock()
_installed: list[_Tee] = []
_users = 0


class _Tee:
    """Stands in for sys.stdout or sys.stderr: writes to the original, then queues the text for the
    writing thread's run (a cheap append: the run's RunOutput does the rest elsewhere)."""

    def __init__(self, original: IO[str], stream: str) -> None:
        self._original = original
        self._stream = stream
        self._routes = _routes[stream]

    def write(self, text: str) -> int:
        # the hot path of every print: kept to an append and two length checks
        written = self._original.write(text)
        queue = self._routes.get(_get_ident())
        if queue is not None:
            queue.append(text)
            if len(queue) > _QUEUED_WRITES or len(text) > _BIG_WRITE:
                _overflow(queue)
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


_failed: list[str] = []


def _overflow(queue: list[str]) -> None:
    """Send a full queue from the printing thread; the program's print goes on whatever happens."""
    output = _owners.get(id(queue))
    if output is None:  # no longer routed
        queue.clear()
        return
    if output.closed:
        for queue in output.queues.values():
            queue.clear()
        output.dropped("output")
        return
    try:
        output.overflow()
    except Exception as exc:  # say once why the run misses some of its output
        if not _failed:
            _failed.append(str(exc))
            _note(f"console output is not logged: {type(exc).__name__}: {exc}")


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
def _python_capture(output: RunOutput) -> Iterator[None]:
    ident = _get_ident()
    _install()
    previous = {stream: routes.get(ident) for stream, routes in _routes.items()}
    with _install_lock:
        for stream, routes in _routes.items():
            routes[ident] = output.queues[stream]
            _owners[id(output.queues[stream])] = output
    output.start_ticking()
    try:
        yield
    finally:
        with _install_lock:
            for stream, routes in _routes.items():
                if previous[stream] is None:
                    routes.pop(ident, None)
                else:
                    routes[ident] = previous[stream]  # type: ignore[assignment]
            routed = {id(queue) for routes in _routes.values() for queue in routes.values()}
            for stream in _routes:
                if id(output.queues[stream]) not in routed:
                    _owners.pop(id(output.queues[stream]), None)
        _uninstall()


@contextlib.contextmanager
def uncaptured() -> Iterator[None]:
    """While active, this thread's writes to sys.stdout and sys.stderr reach only the terminal
    (a run's logger, whose lines the run already has, uses it). fd-level capture still sees them."""
    ident = _get_ident()
    taken = {stream: routes.pop(ident, None) for stream, routes in _routes.items()}
    try:
        yield
    finally:
        for stream, route in taken.items():
            if route is not None:
                _routes[stream][ident] = route


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
    output = getattr(context, "_output", None)
    if not use_fds and not isinstance(output, RunOutput):
        raise TypeError(f"capture_console needs a RunContext, not {type(context).__name__}")
    try:
        with _fd_capture(context.log_output) if use_fds else _python_capture(output):  # type: ignore[arg-type]
            yield
    finally:
        context.flush_output()
