"""The console relay: a small process that copies a script's stdout and stderr pipes to the original
files and forwards them to the run's process (see producers.console, fd-level capture).

Run as `python -I -S relay.py SOURCES CONTROL_FD BACK_FD` (standard library only: it starts in
milliseconds and never imports the user's __main__). SOURCES is a comma-separated list of
`read_fd:out_fd:stream_code`. Every chunk read from a source is written in full to its out fd (one
thread: chunks never interleave), then queued for the back-channel, where it goes as a frame
(1 byte stream code, 4 bytes big-endian length, the bytes) at most FORWARD_S later. A 4-byte request
id read from the control pipe drains what the sources hold, forwards it, then answers with an ACK
frame carrying the id; id FINAL also ends the forwarding (the back-channel is closed after the ACK).

The relay outlives the run's process: it runs in a process group of its own (Ctrl-C at the
terminal does not reach it), ignores SIGINT, SIGTERM, SIGHUP and SIGQUIT (a signal to a whole
session or cgroup), SIGTTOU (a terminal with `stty tostop` would stop a background group's writes)
and a back-channel nobody reads any more, and ends once every writer of its
sources (the script and any child still holding the pipe) has closed them. When an out fd fails (a
closed terminal, `| head` that exited), its source is closed too, so the writers see the error they
would have seen without the relay.
"""

import os
import select
import signal
import sys
import time

ACK = 255
FINAL = 0xFFFFFFFF
FORWARD_S = 0.05  # how long read bytes may wait before they go to the run's process
FORWARD_BYTES = 1 << 18  # ... or how many may wait
GATHER_S = 0.002  # a pause after a read that did not fill the buffer (see Relay.run)
_READ = 1 << 16
_DRAIN_MAX = 1 << 21  # a sync reads at most this much per source (a child may never stop writing)


def _write_all(fd: int, data: bytes) -> bool:
    """Write all of `data` to `fd` (waiting while it is full); False when the fd fails."""
    view = memoryview(data)
    try:
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:  # someone made the file non-blocking
                select.select([], [fd], [])
    except OSError:
        return False
    return True


class Relay:
    def __init__(self, sources: dict[int, tuple[int, int]], control: int, back: int) -> None:
        self.sources = sources  # read fd -> (out fd, stream code)
        self.control: int | None = control
        self.back: int | None = back
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.pending_since = 0.0
        self.poller = select.poll()
        for fd in sources:
            os.set_blocking(fd, False)
            self.poller.register(fd, select.POLLIN)
        self.poller.register(control, select.POLLIN)

    def run(self) -> None:
        while self.sources:
            timeout = None
            if self.pending:
                timeout = max(0.0, self.pending_since + FORWARD_S - time.monotonic()) * 1000
            full = False
            for fd, _ in self.poller.poll(timeout):
                if fd == self.control:
                    self.sync()
                elif fd in self.sources:
                    full = self.read(fd, _READ) == _READ or full
            if not full:
                # let small writes gather in the pipe: a writer that finds no reader waiting in
                # poll() wakes nobody, so an unbuffered print costs about what it costs on a file
                time.sleep(GATHER_S)
            if self.pending and (self.pending_bytes >= FORWARD_BYTES
                                 or time.monotonic() >= self.pending_since + FORWARD_S):
                self.forward()
        self.forward()

    def read(self, fd: int, size: int) -> int:
        """Copy what `fd` holds (up to `size` bytes) to its out fd and the queue; bytes read."""
        try:
            data = os.read(fd, size)
        except BlockingIOError:
            return 0
        except OSError:
            data = b""
        out, code = self.sources[fd]
        if data and _write_all(out, data):
            if self.back is not None:
                if not self.pending:
                    self.pending_since = time.monotonic()
                self.pending.append(bytes((code,)) + len(data).to_bytes(4, "big") + data)
                self.pending_bytes += len(data)
            return len(data)
        self.poller.unregister(fd)  # end of file, or the out fd failed: writers now see EPIPE
        del self.sources[fd]
        os.close(fd)
        return 0

    def sync(self) -> None:
        """Answer the control pipe's requests once what the sources hold now is forwarded."""
        assert self.control is not None
        try:
            requests = os.read(self.control, 4096)
        except OSError:
            requests = b""
        if not requests:  # the run's process closed it (or is gone)
            self.poller.unregister(self.control)
            os.close(self.control)
            self.control = None
            return
        for fd in list(self.sources):
            drained = 0
            while fd in self.sources and drained < _DRAIN_MAX:
                got = self.read(fd, 1 << 20)
                if not got:
                    break
                drained += got
        final = False
        for start in range(0, len(requests) - 3, 4):
            request = requests[start:start + 4]
            self.pending.append(bytes((ACK,)) + (4).to_bytes(4, "big") + request)
            final = final or int.from_bytes(request, "big") == FINAL
        self.forward()
        if final and self.back is not None:
            os.close(self.back)
            self.back = None

    def forward(self) -> None:
        """Send the queued frames to the run's process; once it is gone, only relay."""
        if self.back is not None and self.pending and not _write_all(self.back, b"".join(self.pending)):
            os.close(self.back)
            self.back = None
        self.pending.clear()
        self.pending_bytes = 0


def main(argv: list[str]) -> None:
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGTTOU):
        signal.signal(number, signal.SIG_IGN)  # drain until the writers are gone
    sources = {}
    for spec in argv[1].split(","):
        read_fd, out_fd, code = map(int, spec.split(":"))
        sources[read_fd] = (out_fd, code)
    Relay(sources, int(argv[2]), int(argv[3])).run()


if __name__ == "__main__":
    main(sys.argv)
