"""Local runtime: the handler runs in this process, in the calling thread."""

from __future__ import annotations

import contextlib
import inspect
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from producers.console import capture_console as console_capture
from producers.context import RunContext
from producers.data_item import DataItem


def call_handler(handler: Callable[..., Any], context: RunContext) -> Any:
    """Call `handler` with its arguments bound by name, as MLRun does: `context`, then each param,
    then each input (a param wins over an input of the same name). An input is passed as a DataItem;
    as `item.as_df()` when the argument is annotated pandas.DataFrame, and as its local path when
    the argument has no annotation and a str default. A handler with `**kwargs` gets every param and
    input. An input no argument takes stays available through `context.get_input(key)`."""
    signature = _signature(handler)
    arguments = signature.parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in arguments.values())
    kwargs: dict[str, Any] = {}
    if "context" in arguments:
        kwargs["context"] = context
    for key, value in context.parameters.items():
        if key != "context" and (accepts_any or key in arguments):
            kwargs[key] = value
    for key in context.inputs:
        if key not in kwargs and key != "context" and (accepts_any or key in arguments):
            kwargs[key] = _input_value(context.get_input(key), arguments.get(key))
    return handler(**kwargs)


def _signature(handler: Callable[..., Any]) -> inspect.Signature:
    """The handler's signature, string annotations (`from __future__ import annotations`) resolved
    where they can be; where they cannot, they stay strings."""
    try:
        return inspect.signature(handler, eval_str=True)
    except Exception:  # an annotation naming what the handler's module does not define
        return inspect.signature(handler)


def _input_value(item: DataItem, argument: inspect.Parameter | None) -> Any:
    """What MLRun's type-hint parsing passes for an input: a DataItem, a DataFrame for an argument
    annotated pandas.DataFrame, a local path for one with no annotation and a str default."""
    if argument is None:
        return item
    annotation = argument.annotation
    if _is_dataframe(annotation):
        return item.as_df()
    if annotation is inspect.Parameter.empty and type(argument.default) is str:
        return item.local()
    return item


def _is_dataframe(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # Optional[pd.DataFrame]
        return any(_is_dataframe(member) for member in typing.get_args(annotation))
    if isinstance(annotation, str):  # unresolved: 'pd.DataFrame', 'DataFrame | None', 'Optional[pd.DataFrame]'
        inner = annotation.strip()
        if inner.startswith(("Optional[", "typing.Optional[")) and inner.endswith("]"):
            inner = inner[inner.index("[") + 1:-1]
        return any(member.strip().rsplit(".", 1)[-1] == "DataFrame" for member in inner.split("|"))
    pandas = sys.modules.get("pandas")  # a DataFrame class in an annotation: pandas is imported already
    return pandas is not None and isinstance(annotation, type) and issubclass(annotation, pandas.DataFrame)


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
