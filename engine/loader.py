"""Finding handlers: from a callable, 'file.py:function', or 'package.module:function'."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class HandlerNotFound(LookupError):
    """The handler reference does not name a function Runbus can load."""


def load_handler(reference: str, command: str | None = None) -> Callable[..., Any]:
    """Load `reference`; a bare function name is looked up in the `command` file."""
    if command and ":" not in reference:
        reference = f"{command}:{reference}"
    location, sep, name = reference.rpartition(":")
    if not sep or not location or not name:
        raise HandlerNotFound(f"handler {reference!r} must look like 'file.py:function' or "
                              f"'module:function'")
    module = _load_file(location) if location.endswith(".py") else _import(location)
    handler = getattr(module, name, None)
    if not callable(handler):
        raise HandlerNotFound(f"{location!r} has no function {name!r}")
    return handler


def _load_file(path: str) -> Any:
    file = Path(path).resolve()
    if not file.is_file():
        raise HandlerNotFound(f"handler file {path!r} does not exist")
    module_name = "runbus_handler_" + hashlib.sha1(str(file).encode()).hexdigest()[:12]
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, file)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(file.parent))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    finally:
        sys.path.remove(str(file.parent))
    return module


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise HandlerNotFound(f"cannot import {module!r}: {exc}") from None


def describe_handler(handler: Callable[..., Any]) -> tuple[str, str | None]:
    """A reference to reload the handler later, and its code reference (file@sha256)."""
    name = getattr(handler, "__qualname__", getattr(handler, "__name__", repr(handler)))
    module = getattr(handler, "__module__", None) or ""
    try:
        source_file = inspect.getsourcefile(handler)
    except TypeError:
        source_file = None
    code_ref = None
    if source_file and Path(source_file).is_file():
        digest = hashlib.sha256(Path(source_file).read_bytes()).hexdigest()
        code_ref = f"{source_file}@sha256:{digest}"
    if (module == "__main__" or module.startswith("runbus_handler_")) and source_file \
            and Path(source_file).is_file():
        return f"{source_file}:{name}", code_ref
    return f"{module}:{name}", code_ref
