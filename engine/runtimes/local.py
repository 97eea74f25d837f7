"""Local runtime: the handler runs in this process, in the calling thread."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

from producers.console import capture_console as console_capture
from producers.context import RunContext


def call_handler(handler: Callable[..., Any], context: RunContext) -> Any:
    """Call `handler`, passing `context` and params by argument name."""
    signature = inspect.signature(handler)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    kwargs: dict[str, Any] = {}
    if "context" in signature.parameters:
        kwargs["context"] = context
    for key, value in context.parameters.items():
        if key != "context" and (accepts_any or key in signature.parameters):
            kwargs[key] = value
    return handler(**kwargs)


def execute(handler: Callable[..., Any], context: RunContext, flush: bool = True,
            capture_console: bool = True) -> RunContext:
    """Run the handler and record how it ended: completed, error (with traceback) or aborted.

    `sys.exit()` in the handler ends the handler, not the caller: exit code 0 (or None) is
    'completed', any other is 'error'. Ctrl-C (and any other BaseException) is 'aborted', then raised.
    With `flush`, every event of the run is on the bus when this returns (EventsNotWritten says
    why when they are not: they are then kept in the spill file, or still queued).
    With `capture_console` (the caller passes its settings' RUNBUS_CAPTURE_CONSOLE) what the handler's thread
    prints, logs and warns while it runs is also kept in the run's log (Python level: the calling
    thread only, so concurrent runs in threads each keep their own).
    """
    context.start()
    try:
        with console_capture(context, fd_level=False) if capture_console else contextlib.nullcontext():
            value = call_handler(handler, context)
    except SystemExit as exc:
        context.finish(error=None if exc.code in (None, 0) else exc, flush=flush)
    except Exception as exc:
        context.finish(error=exc, flush=flush)
    except BaseException as exc:  # Ctrl-C and friends: record, then let them through
        context.finish(error=exc, state="aborted")
        raise
    else:
        context.finish(return_value=value, flush=flush)
    return context
