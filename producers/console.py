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
- fd level (a script-level run): fds 1 and 2 are pipes read by a relay process (producers/relay.py)
  that writes everything to the original files and sends it back to a thread of this process, which
  hands it to the run: every thread, C code and child processes are captured, and what the relay
  read reaches the terminal even when this process crashes or is killed (the relay ends when the
  last writer of its pipes is gone). fds 1 and 2 that are the same file or terminal share one pipe:
  the program's exact order, logged as the stream "console".
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import io
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from producers.context import RunContext

STREAMS = frozenset({"stdout", "stderr", "console", "logger"})
LINE_MAX_CHARS = 8 * 1024  # a longer line is split into pieces; all but the last end with LINE_CONTINUES
LINE_CONTINUES = " [line continues]"
EVENT_MAX_LINES = 4096  # lines in one log event
EVENT_MAX_CHARS = 64 * 1024  # characters in the chunks of one log event, a line break after each line
_QUEUED_WRITES = 1024  # pieces a stream's queue holds before the writing thread sends them itself
_BIG_WRITE = 16 * 1024  # a piece this long is sent at once by the thread that wrote it
_ORDER = ("stdout", "stderr", "console", "logger")


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


_outputs: weakref.WeakSet[RunOutput] = weakref.WeakSet()


def _unlock_outputs() -> None:
    """In a forked child: a lock some thread of the parent held at the fork would never be released."""
    for output in list(_outputs):
        output._lock = threading.Lock()


os.register_at_fork(after_in_child=_unlock_outputs)


class RunOutput:
    """A run's console output on its way to the log as `log` events (thread-safe).

    Writers only append the text to the stream's queue; lines are cut, masked and sent (one `log`
    event per batch) on the writer's thread every flush interval, or by the writer of a queue that
    holds more than _QUEUED_WRITES pieces (or a piece of more than _BIG_WRITE characters), which also
    waits for room in the writer: memory stays bounded. A line's `ts` is when its batch was cut (at
    most a flush interval after it was written); lines keep the order in which they were completed,
    across streams too.

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
        # appended to by writers (stdout's text as it is, another stream's as (stream, text): the
        # order of writes across streams is kept), taken from the front under the lock: each list
        # operation is atomic
        self.queue: list[Any] = []
        self._partial = dict.fromkeys(_ORDER, "")  # each stream's unfinished line (unmasked)
        self._lock = threading.Lock()
        _outputs.add(self)
        self._ticking = False
        self.closed = False
        self._noted = False

    def write(self, stream: str, text: str) -> None:
        """Queue `text` (any part of a line) of `stream`; after `close` it is dropped with a note."""
        if self.closed:
            self.dropped(text)
            return
        queue = self.queue
        queue.append(text if stream == "stdout" else (stream, text))
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
        if not self.queue or not self._lock.acquire(blocking=False):
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
            self.queue.clear()

    def dropped(self, text: str) -> None:
        """Output that came after the run's end: say so once on stderr."""
        if not self._noted and text.strip():
            self._noted = True
            _note(f"{self._what} has finished: console output written after its end is not logged")

    # under self._lock -----------------------------------------------------------------------------

    def _take(self, final: bool) -> list[tuple[str, str, bool]]:
        """The queued text as blocks of complete lines, in the order the lines were completed:
        (stream, lines joined by "\n", whether the last line continues in the next block). With
        `final`, unfinished lines count as complete."""
        queue = self.queue
        count = len(queue)
        pieces = queue[:count]
        del queue[:count]  # what another thread appended meanwhile stays for the next time
        blocks: list[tuple[str, str, bool]] = []
        for stream, data in _by_stream(pieces):
            data = self._partial[stream] + data
            end = data.rfind("\n")
            if end >= 0:
                blocks.append((stream, data[:end], False))
            partial = data[end + 1:]
            if len(partial) > LINE_MAX_CHARS + self._redact.longest_match:
                partial = self._cut_long(stream, partial, blocks)
            self._partial[stream] = partial
        if final:
            for stream, partial in self._partial.items():
                if partial:
                    blocks.append((stream, partial, False))
                    self._partial[stream] = ""
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
            body, count = "\n".join(texts), len(texts)
            if lines + count <= EVENT_MAX_LINES and chars + len(body) + 1 <= EVENT_MAX_CHARS:  # the usual case
                chunks.append({"ts": now, "stream": stream, "text": body})
                lines, chars = lines + count, chars + len(body) + 1
                continue
            start, end = 0, len(body)
            while start <= end:  # cut the body at line breaks into pieces that fill the events
                cut = _fitting(body, start, EVENT_MAX_CHARS - chars, EVENT_MAX_LINES - lines)
                if cut >= start:
                    chunks.append({"ts": now, "stream": stream, "text": body[start:cut]})
                    lines += body.count("\n", start, cut) + 1
                    chars += cut - start + 1
                    start = cut + 1
                if start <= end:
                    self._emit({"chunks": chunks}, now, chars)
                    chunks, lines, chars = [], 0, 0
        self._emit({"chunks": chunks}, now, chars)


def _fitting(body: str, start: int, room_chars: int, room_lines: int) -> int:
    """Where the longest run of whole lines of `body` from `start` that holds at most `room_lines`
    lines and `room_chars` characters (a line break after each) ends: the index of the line break
    after it (len(body) for the last line), or start - 1 when not even one line fits."""
    end = len(body)
    if end - start + 1 <= room_chars:
        cut = end
    else:
        cut = body.rfind("\n", start, start + room_chars)
        if cut < 0:
            return start - 1
    if room_lines <= 0:
        return start - 1
    if body.count("\n", start, cut) + 1 > room_lines:
        cut = start - 1
        for _ in range(room_lines):
            cut = body.find("\n", cut + 1)
    return cut


def _by_stream(pieces: list[Any]) -> list[tuple[str, str]]:
    """Queued pieces as (stream, text) runs of consecutive writes of one stream."""
    if not pieces:
        return []
    try:
        return [("stdout", "".join(pieces))]  # the usual case: only stdout
    except TypeError:
        pass
    runs: list[tuple[str, str]] = []
    current, texts = "", []
    for piece in pieces:
        stream, text = piece if type(piece) is tuple else ("stdout", piece)
        if stream != current and texts:
            runs.append((current, _joined(texts)))
            texts = []
        current = stream
        texts.append(text)
    runs.append((current, _joined(texts)))
    return runs


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

# stream -> thread ident -> that run's queue (RunOutput.queue): where the thread's writes to
# sys.stdout / sys.stderr also go; and the RunOutput of each routed queue (by id)
_routes: dict[str, dict[int, list[Any]]] = {"stdout": {}, "stderr": {}}
_owners: dict[int, RunOutput] = {}
_get_ident = threading.get_ident
_install_lock = threading.Lock()
_installed: list[_Tee] = []
_users = 0


class _Tee:
    """Stands in for sys.stdout: writes to the original, then queues the text for the
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


class _StderrTee(_Tee):
    """The tee of sys.stderr: queues its text marked as stderr's (RunOutput.queue's convention)."""

    def write(self, text: str) -> int:
        written = self._original.write(text)
        queue = self._routes.get(_get_ident())
        if queue is not None:
            queue.append(("stderr", text))
            if len(queue) > _QUEUED_WRITES or len(text) > _BIG_WRITE:
                _overflow(queue)
        return written


_failed: list[str] = []


def _overflow(queue: list[Any]) -> None:
    """Send a full queue from the printing thread; the program's print goes on whatever happens."""
    output = _owners.get(id(queue))
    if output is None:  # no longer routed
        queue.clear()
        return
    if output.closed:
        output.queue.clear()
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
                tee = (_StderrTee if name == "stderr" else _Tee)(original, name)
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
        for routes in _routes.values():
            routes[ident] = output.queue
        _owners[id(output.queue)] = output
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
            if id(output.queue) not in routed:
                _owners.pop(id(output.queue), None)
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

RELAY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "relay.py")
PIPE_BYTES = 1 << 20  # the capture pipes' size (Linux's default limit for a user)
SYNC_TIMEOUT_S = 5.0  # how long leaving an fd-level capture waits for the relay to forward what it holds
_STREAM_CODES = {0: "console", 1: "stdout", 2: "stderr"}
_FINAL = (0xFFFFFFFF).to_bytes(4, "big")
_ACK = 255
_inherited: list[int] = []  # fds a forked child must not keep (the back-channel's and control's ends)


def _close_inherited() -> None:
    for fd in _inherited:
        with contextlib.suppress(OSError):
            os.close(fd)
    _inherited.clear()


os.register_at_fork(after_in_child=_close_inherited)


def _same_file(first: int, second: int) -> bool:
    """Whether two fds are the same file or terminal (`> f 2>&1`, a tty)."""
    a, b = os.fstat(first), os.fstat(second)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class _RelayCapture:
    """fds 1 and 2 redirected into pipes that only a relay process (producers/relay.py) reads: it
    writes every chunk to the original file and sends it back over a pipe, where a thread hands it
    to `target`. When fds 1 and 2 are the same file or terminal, one pipe carries both (the
    program's exact order) and its text goes to `target` as the stream "console"."""

    def __init__(self, target: Callable[[str, str], None]) -> None:
        self.target: Callable[[str, str], None] | None = target
        self.acked = threading.Event()
        merged = _same_file(1, 2)
        pipes = [(os.pipe(), (1, 2), 0)] if merged else [(os.pipe(), (1,), 1), (os.pipe(), (2,), 2)]
        for (_, write), _, _ in pipes:
            with contextlib.suppress(OSError, AttributeError):  # room for bursts while the relay pauses
                fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        control_read, self.control = os.pipe()
        self.back, back_write = os.pipe()
        child_fds = [read for (read, _), _, _ in pipes] + [control_read, back_write]
        sources = ",".join(f"{read}:{fds[0]}:{code}" for (read, _), fds, code in pipes)
        try:
            self.process = subprocess.Popen([sys.executable, "-I", "-S", RELAY_PATH, sources, str(control_read),
                                             str(back_write)], stdin=subprocess.DEVNULL, pass_fds=child_fds,
                                            process_group=0)  # Ctrl-C to the script's group misses it
        except BaseException:
            for fd in child_fds + [self.control, self.back] + [write for (_, write), _, _ in pipes]:
                os.close(fd)
            raise
        for fd in child_fds:
            os.close(fd)
        # reaped as soon as it ends (it outlives the capture while children hold the pipes)
        threading.Thread(target=self.process.wait, name="runbus-relay-reaper", daemon=True).start()
        _inherited.extend((self.control, self.back))
        self.saved = {fd: os.dup(fd) for fd in (1, 2)}
        for (_, write), fds, _ in pipes:
            for fd in fds:
                os.dup2(write, fd)
            os.close(write)
        self.pid = os.getpid()
        self.thread = threading.Thread(target=self._receive, name="runbus-console", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Have the relay forward what it holds (waiting at most SYNC_TIMEOUT_S), then point fds 1
        and 2 back at the originals; the relay goes on copying to them what children still write.
        In a forked child (which holds the pipes as any child does) it does nothing."""
        if os.getpid() != self.pid:
            return
        try:
            with contextlib.suppress(OSError):
                os.write(self.control, _FINAL)
            if not self.acked.wait(SYNC_TIMEOUT_S):
                _note(f"the console relay did not answer within {SYNC_TIMEOUT_S:.0f} s: "
                      "the run's log may miss its last output")
        finally:
            self.target = None
            for fd, saved in self.saved.items():
                os.dup2(saved, fd)
                os.close(saved)
            with contextlib.suppress(ValueError):
                _inherited.remove(self.control)
            os.close(self.control)

    def _flush_decoders(self, decoders: dict[int, codecs.IncrementalDecoder]) -> None:
        """Hand on what is left of a character cut by the end (as an escape)."""
        target = self.target
        for code, decoder in decoders.items():
            text = decoder.decode(b"", final=True)
            if text and target is not None:
                with contextlib.suppress(Exception):
                    target(_STREAM_CODES[code], text)

    def _receive(self) -> None:
        """Turn the relay's frames into `target` calls until it closes the back-channel."""
        decoders = {code: codecs.getincrementaldecoder("utf-8")(errors="backslashreplace") for code in _STREAM_CODES}
        buffer = b""
        failed = False
        try:
            while True:
                data = os.read(self.back, 1 << 20)
                if not data:
                    return
                buffer += data
                start = 0
                while len(buffer) - start >= 5:
                    size = int.from_bytes(buffer[start + 1:start + 5], "big")
                    if len(buffer) - start - 5 < size:
                        break
                    code, payload = buffer[start], buffer[start + 5:start + 5 + size]
                    start += 5 + size
                    if code == _ACK:
                        if payload == _FINAL:
                            self._flush_decoders(decoders)
                            self.acked.set()
                        continue
                    target = self.target
                    text = decoders[code].decode(payload)
                    if text and target is not None and not failed:
                        try:
                            target(_STREAM_CODES[code], text)
                        except Exception as exc:  # keep reading: the relay waits for us
                            failed = True
                            _note(f"console output is not logged: {type(exc).__name__}: {exc}")
                buffer = buffer[start:]
        finally:
            self.acked.set()  # the relay is gone (or done): nothing more will come
            with contextlib.suppress(ValueError):
                _inherited.remove(self.back)
            os.close(self.back)


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


def _start_relay(target: Callable[[str, str], None]) -> _RelayCapture | None:
    """fd-level capture, or None (with a note) when the relay process cannot start."""
    _flush_python_streams()
    try:
        return _RelayCapture(target)
    except OSError as exc:
        _note(f"console capture falls back to the Python level: cannot start {RELAY_PATH}: {exc}")
        return None


@contextlib.contextmanager
def capture_console(context: RunContext, *, fd_level: bool) -> Iterator[None]:
    """Copy this process's stdout and stderr into `context`'s log while active (see the module doc).

    `fd_level` captures at the file-descriptor level (all threads, C code, child processes); where
    sys.stdout or sys.stderr has no file descriptor (Jupyter), or the relay process cannot start, it
    falls back to the Python level for the calling thread. On exit the streams are restored and the
    run's buffered output is flushed.
    """
    use_fds = fd_level and _has_fd(sys.stdout, 1) and _has_fd(sys.stderr, 2)
    relay = _start_relay(context.log_output) if use_fds else None
    output = getattr(context, "_output", None)
    if relay is None and not isinstance(output, RunOutput):
        raise TypeError(f"capture_console needs a RunContext, not {type(context).__name__}")
    try:
        with contextlib.nullcontext() if relay is not None else _python_capture(output):  # type: ignore[arg-type]
            yield
    finally:
        try:
            if relay is not None:
                _flush_python_streams()
                relay.close()
        finally:
            context.flush_output()
