"""A progress line for sweeps in a terminal: done / failed / running and the best value so far."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class SweepProgress:
    def __init__(self, total: int, quiet: bool = False) -> None:
        console = Console(stderr=True)
        self._bar = None
        if not quiet and console.is_terminal:
            self._bar = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}", markup=False), TimeElapsedColumn(),
                                 console=console, transient=False)
            self._task = self._bar.add_task("sweep", total=total, status="")

    def update(self, done: int, failed: int, running: int, best: str | None) -> None:
        if self._bar is not None:
            status = f"done {done}  failed {failed}  running {running}  best {best or '-'}"
            self._bar.update(self._task, completed=done + failed, status=status)

    def __enter__(self) -> SweepProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
