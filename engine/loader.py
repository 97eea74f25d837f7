"""Finding handlers by string, in MLRun's forms: 'file.py:function', 'package.module:function',
'package.module.function', and 'Class::method' (a class in the command file, or
'file.py:Class::method', 'package.module.Class::method'), whose instance is made per run from the
run's `_init_args` param."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib
import importlib.util
import inspect
import json
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producers.context import RUN_MAC

CODE_KEY_FILE = "code.key"
_CODE_REF = re.compile(r"(?P<path>.+)@sha256:(?P<sha256>[0-9a-f]{64})(?:#mac:(?P<mac>[0-9a-f]{64}))?", re.DOTALL)


class HandlerNotFound(LookupError):
    """The handler reference does not name a function Runbus can load."""


def load_handler(reference: str, command: str | None = None) -> Callable[..., Any]:
    """Load `reference`; a name with no location is looked up in the `command` file, or else read
    as 'package.module.function'. HandlerNotFound names what is missing."""
    location, name, method = _locate(reference, command)
    module = _load_file(location) if location.endswith(".py") else _import(location)
    found = _attribute(module, name)
    if method is not None:
        if not inspect.isclass(found):
            raise HandlerNotFound(f"handler {reference!r}: {location!r} has no class {name!r}")
        return MethodHandler(found, method)
    if not callable(found):
        raise HandlerNotFound(f"handler {reference!r}: {location!r} has no function {name!r}")
    return found


class MethodHandler:
    """The handler 'Class::method': each run makes an instance, passing the run's `_init_args` param
    (a dict) as keyword arguments and the context when the constructor takes `context` (as MLRun
    does), then calls the method with the run's params by name."""

    def __init__(self, cls: type, method: str) -> None:
        if not callable(getattr(cls, method, None)):
            raise HandlerNotFound(f"class {cls.__qualname__!r} has no method {method!r}")
        self.cls, self.method = cls, method
        # where the code lives, for runtimes that ship a script's handler by value (Dask)
        self.__module__ = cls.__module__
        self.__qualname__ = self.__name__ = f"{cls.__qualname__}::{method}"

    def __call__(self, context: Any, **params: Any) -> Any:
        from engine.runtimes.local import call_handler  # the runtimes import this module

        init_args = context.parameters.get("_init_args") or {}
        if not isinstance(init_args, dict):
            raise TypeError(f"param '_init_args' must be a dict of {self.cls.__qualname__}'s arguments, "
                            f"got {type(init_args).__name__}")
        init_args = dict(init_args)
        parameters = inspect.signature(self.cls).parameters
        if "context" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            init_args.setdefault("context", context)
        return call_handler(getattr(self.cls(**init_args), self.method), context)

    def __repr__(self) -> str:
        return f"MethodHandler({self.__qualname__})"


def _locate(reference: str, command: str | None = None) -> tuple[str, str, str | None]:
    """(location, name, method) of a handler reference: the file or module, the attribute path in
    it, and the method of a 'Class::method' reference (else None)."""
    base, _, method = reference.partition("::") if "::" in reference else (reference, "", None)
    location, sep, name = base.rpartition(":")
    if not sep:
        location, name = "", base
        if base.endswith(".py") and not command:
            raise HandlerNotFound(f"handler {reference!r} names a file, not a function in it: "
                                  f"'{base}:function' (or run the file as a command)")
        if command:
            location = command
        elif "." in base:
            location, _, name = base.rpartition(".")
    if not location or not name or method == "":
        raise HandlerNotFound(f"handler {reference!r} must look like 'file.py:function', 'module:function', "
                              f"'module.function' or 'Class::method' (with a command file)")
    return location, name, method


def _attribute(module: Any, name: str) -> Any:
    found = module
    for part in name.split("."):
        found = getattr(found, part, None)
    return found


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


def describe_handler(handler: Callable[..., Any], home: Path | None = None) -> tuple[str, str | None]:
    """A reference to reload the handler later, and its code reference: the source file, its
    sha256 and a MAC of both under the key of Runbus home `home` (default: RUNBUS_HOME), as
    'path@sha256:<hex>#mac:<hex>'. The MAC is what later tells a run this home recorded from one
    that reached the log from elsewhere. None when the handler has no source file."""
    name = getattr(handler, "__qualname__", getattr(handler, "__name__", repr(handler)))
    module = getattr(handler, "__module__", None) or ""
    try:
        source_file = inspect.getsourcefile(handler.cls if isinstance(handler, MethodHandler) else handler)
    except TypeError:
        source_file = None
    has_source = bool(source_file) and Path(str(source_file)).is_file()
    if (module == "__main__" or module.startswith("runbus_handler_")) and has_source:
        reference = f"{source_file}:{name}"
    else:
        reference = f"{module}:{name}"
    if not has_source:
        return reference, None
    digest = hashlib.sha256(Path(str(source_file)).read_bytes()).hexdigest()
    mac = code_mac(_home(home), reference, str(source_file), digest)
    return reference, f"{source_file}@sha256:{digest}#mac:{mac}"


@dataclass(frozen=True)
class CodeRef:
    """A parsed code reference: the handler's source file, its sha256 and the home's MAC (if any)."""

    path: str
    sha256: str
    mac: str | None


def parse_code_ref(code_ref: str | None) -> CodeRef | None:
    """The parts of a recorded code reference, or None when it is absent or malformed."""
    found = _CODE_REF.fullmatch(code_ref) if isinstance(code_ref, str) else None
    return CodeRef(found["path"], found["sha256"], found["mac"]) if found else None


def code_mac(home: Path, reference: str, path: str, sha256: str) -> str:
    """HMAC-SHA256, under home's code key, of a handler reference and its source's path and sha256."""
    message = "\n".join(("runbus code", reference, path, sha256)).encode("utf-8", "surrogateescape")
    return hmac.new(_code_key(home), message, hashlib.sha256).hexdigest()


# the run_started fields a rerun or a resume takes from the log (host and heartbeat_interval_s are not)
SIGNED_RUN_FIELDS = ("name", "project", "handler", "runtime", "params", "inputs", "input_digests", "secret_keys",
                     "labels", "parent_uid", "iteration", "code_ref", "extra")


class RunSigner:
    """HMAC-SHA256, under home's code key (read on first use), of a run's uid and its run_started
    payload's SIGNED_RUN_FIELDS (its extra without RUN_MAC), canonical JSON: what a run recorded by
    this home says it ran with. A rerun trusts params, inputs and secret keys from the log only under
    it; a code_ref's own MAC covers the code alone, so it could be copied onto anyone's params. The
    uid is signed too: a signed payload copied onto another run is that run's no more."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._key: bytes | None = None

    def __call__(self, run_uid: str, started: Mapping[str, Any]) -> str:
        if self._key is None:
            self._key = _code_key(self.home)
        return hmac.new(self._key, _signed_run(run_uid, started), hashlib.sha256).hexdigest()

    def signed(self, run_uid: str, started: Mapping[str, Any]) -> bool:
        """Whether run `run_uid`'s run_started payload `started` carries this home's signature of it."""
        signature = recorded_run_mac(started)
        return signature is not None and hmac.compare_digest(signature, self(run_uid, started))


def recorded_run_mac(started: Mapping[str, Any]) -> str | None:
    """The signature a run_started payload carries (see RunSigner), or None when it has none."""
    text = (started.get("extra") or {}).get(RUN_MAC)
    try:
        mac = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return mac if isinstance(mac, str) and re.fullmatch(r"[0-9a-f]{64}", mac) else None


def _signed_run(run_uid: str, started: Mapping[str, Any]) -> bytes:
    fields = {name: started.get(name) for name in SIGNED_RUN_FIELDS}
    fields["extra"] = {key: value for key, value in (started.get("extra") or {}).items() if key != RUN_MAC}
    fields["uid"] = run_uid
    return b"runbus run\n" + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def handler_source(reference: str) -> Path | None:
    """The local source file `reference` would load its handler from, found without running any
    of its code (packages on the way are not imported); None when there is no such file."""
    try:
        location = _locate(reference)[0]
    except HandlerNotFound:
        return None
    if location.endswith(".py"):
        file = Path(location)
        return file.resolve() if file.is_file() else None
    return _module_file(location)


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    search: list[str] | None = None
    spec = None
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        loaded = sys.modules.get(name)
        spec = getattr(loaded, "__spec__", None) if loaded is not None else None
        if spec is None:
            spec = _find_spec(name, search)
        if spec is None:
            return None
        search = list(spec.submodule_search_locations or [])
    origin = spec.origin if spec is not None and spec.has_location else None
    return Path(origin).resolve() if origin and Path(origin).is_file() else None


def _find_spec(name: str, search: list[str] | None) -> Any:
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        try:
            spec = find_spec(name, search)
        except (ImportError, ValueError):
            continue
        if spec is not None:
            return spec
    return None


def _home(home: Path | None) -> Path:
    if home is not None:
        return home
    from engine.settings import load_settings

    return load_settings().home


def _code_key(home: Path) -> bytes:
    """Home's secret code key, created (readable by the owner only) on first use."""
    path = home / CODE_KEY_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    home.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=home, prefix=".code-key-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_hex(32).encode())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # atomic: two first runs end up with the same key
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path.read_bytes()
