"""The one place Runbus reads its RUNBUS_* settings."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from producers.bus.kafka_security import (
    PLAINTEXT,
    KafkaSecurity,
    KafkaSecurityError,
    Secret,
    has_login,
    login_refused,
    masked_address,
)


class SettingsError(ValueError):
    """A RUNBUS_* variable has a value Runbus cannot use."""


@dataclass(frozen=True)
class Settings:
    home: Path
    bus_url: str
    project: str = "default"
    db_timeout_s: float = 60.0
    db_linger_s: float = 0.25
    flush_interval_s: float = 0.2
    flush_timeout_s: float = 120.0
    heartbeat_interval_s: float = 5.0
    dask_workers: int = 2
    kafka_topic: str = "runbus-events"
    kafka_partitions: int = 6
    projections: tuple[str, ...] = ()
    capture_console: bool = True
    projection: str = "service"
    projection_idle_s: float = 300.0
    kafka_security: KafkaSecurity = PLAINTEXT

    def __repr__(self) -> str:
        """The fields as a dataclass shows them, with any password in the bus URL as ***."""
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["bus_url"] = masked_address(self.bus_url)
        return f"{type(self).__name__}({', '.join(f'{name}={value!r}' for name, value in shown.items())})"

    @property
    def db_path(self) -> Path:
        return self.home / "runbus.duckdb"

    @property
    def log_path(self) -> Path:
        return self.home / "log.sqlite"

    @property
    def artifact_root(self) -> Path:
        return self.home / "artifacts"

    @property
    def spill_dir(self) -> Path:
        """Where writers keep what the bus refused until a writer delivers it."""
        return self.home / "spill"


def _number(env: Mapping[str, str], name: str, default: float, kind: type = float,
            minimum: float = 0.0, inclusive: bool = False) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a {kind.__name__}") from None
    if not math.isfinite(value):
        raise SettingsError(f"{name}={raw!r} must be a finite number")
    if value < minimum or (value == minimum and not inclusive):
        raise SettingsError(f"{name}={raw!r} must be {'at least' if inclusive else 'more than'} {minimum:g}")
    return value


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment: RUNBUS_HOME (default ./.runbus), RUNBUS_BUS (default: the
    embedded log in RUNBUS_HOME), RUNBUS_PROJECT, RUNBUS_DB_TIMEOUT, RUNBUS_DB_LINGER, RUNBUS_FLUSH_INTERVAL,
    RUNBUS_FLUSH_TIMEOUT (how long a run's end waits for the bus), RUNBUS_HEARTBEAT_INTERVAL,
    RUNBUS_DASK_WORKERS, RUNBUS_KAFKA_TOPIC, RUNBUS_KAFKA_PARTITIONS,
    RUNBUS_PROJECTIONS (user projections: "module:Class" separated by commas),
    RUNBUS_CAPTURE_CONSOLE (0 turns off keeping a run's stdout and stderr as log events),
    RUNBUS_PROJECTION ('service', the default: reads go to the home's projection service, the one
    writer of the projection; 'inprocess': this process folds and reads the file itself, for
    single-process use), RUNBUS_PROJECTION_IDLE
    (seconds without a request after which the projection service exits), and Kafka's security
    (see `kafka_security`)."""
    env = os.environ if env is None else env
    home = Path(env.get("RUNBUS_HOME") or ".runbus").expanduser().resolve()
    return Settings(
        home=home,
        bus_url=_bus_url(env),
        project=env.get("RUNBUS_PROJECT") or "default",
        db_timeout_s=_number(env, "RUNBUS_DB_TIMEOUT", 60.0),
        db_linger_s=_number(env, "RUNBUS_DB_LINGER", 0.25, inclusive=True),
        flush_interval_s=_number(env, "RUNBUS_FLUSH_INTERVAL", 0.2),
        flush_timeout_s=_number(env, "RUNBUS_FLUSH_TIMEOUT", 120.0),
        heartbeat_interval_s=_number(env, "RUNBUS_HEARTBEAT_INTERVAL", 5.0),
        dask_workers=int(_number(env, "RUNBUS_DASK_WORKERS", 2, int)),
        kafka_topic=env.get("RUNBUS_KAFKA_TOPIC") or "runbus-events",
        kafka_partitions=int(_number(env, "RUNBUS_KAFKA_PARTITIONS", 6, int)),
        projections=tuple(p.strip() for p in (env.get("RUNBUS_PROJECTIONS") or "").split(",") if p.strip()),
        capture_console=_flag(env, "RUNBUS_CAPTURE_CONSOLE", True),
        projection=_choice(env, "RUNBUS_PROJECTION", ("service", "inprocess")),
        projection_idle_s=_number(env, "RUNBUS_PROJECTION_IDLE", 300.0),
        kafka_security=kafka_security(env),
    )


# The variable of each KafkaSecurity field (the password's is one of two).
KAFKA_SECURITY_VARIABLES = {
    "protocol": "RUNBUS_KAFKA_SECURITY_PROTOCOL", "mechanism": "RUNBUS_KAFKA_SASL_MECHANISM",
    "user": "RUNBUS_KAFKA_USER", "password": "RUNBUS_KAFKA_PASSWORD", "ca_file": "RUNBUS_KAFKA_CA_FILE",
    "cert_file": "RUNBUS_KAFKA_CERT_FILE", "key_file": "RUNBUS_KAFKA_KEY_FILE"}


def kafka_security(env: Mapping[str, str]) -> KafkaSecurity:
    """How every Kafka client of this process connects: RUNBUS_KAFKA_SECURITY_PROTOCOL (PLAINTEXT,
    the default; SSL, SASL_PLAINTEXT, SASL_SSL), RUNBUS_KAFKA_SASL_MECHANISM (PLAIN, SCRAM-SHA-256,
    SCRAM-SHA-512), RUNBUS_KAFKA_USER, the password in RUNBUS_KAFKA_PASSWORD or in the file named by
    RUNBUS_KAFKA_PASSWORD_FILE (one of them; the file's final newline is not part of it), and for TLS
    RUNBUS_KAFKA_CA_FILE (the CA that signs the brokers' certificates; default: the system's),
    RUNBUS_KAFKA_CERT_FILE and RUNBUS_KAFKA_KEY_FILE (a client certificate, PEM). SettingsError names
    the variable of a value or combination that cannot work."""
    def text(field: str) -> str | None:
        return (env.get(KAFKA_SECURITY_VARIABLES[field]) or "").strip() or None

    def path(field: str) -> str | None:
        raw = text(field)
        return None if raw is None else str(Path(raw).expanduser().resolve())

    names = dict(KAFKA_SECURITY_VARIABLES)
    try:
        password = None
        if env.get("RUNBUS_KAFKA_PASSWORD") and env.get("RUNBUS_KAFKA_PASSWORD_FILE"):
            raise SettingsError("RUNBUS_KAFKA_PASSWORD and RUNBUS_KAFKA_PASSWORD_FILE are both set: set one")
        if env.get("RUNBUS_KAFKA_PASSWORD_FILE"):
            names["password"] = "RUNBUS_KAFKA_PASSWORD_FILE"
            password = Secret.from_file(str(Path(env["RUNBUS_KAFKA_PASSWORD_FILE"].strip()).expanduser().resolve()))
        elif env.get("RUNBUS_KAFKA_PASSWORD"):
            password = Secret.from_env("RUNBUS_KAFKA_PASSWORD", env)
        mechanism = text("mechanism")
        return KafkaSecurity(protocol=(text("protocol") or "PLAINTEXT").upper(),
                             mechanism=None if mechanism is None else mechanism.upper(), user=text("user"),
                             password=password, ca_file=path("ca_file"), cert_file=path("cert_file"),
                             key_file=path("key_file"))
    except KafkaSecurityError as exc:
        raise SettingsError(exc.explain(names)) from None


def _bus_url(env: Mapping[str, str]) -> str:
    """RUNBUS_BUS (default 'embedded'); SettingsError, the URL masked, when it carries a login (a
    password there would be shown wherever the URL is: the login belongs in RUNBUS_KAFKA_*)."""
    url = env.get("RUNBUS_BUS") or "embedded"
    if has_login(url):
        raise SettingsError(login_refused(f"RUNBUS_BUS={masked_address(url)!r}"))
    return url


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (the first when unset)."""
    raw = (env.get(name) or "").strip().lower()
    if raw == "":
        return choices[0]
    if raw not in choices:
        raise SettingsError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return raw


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not a flag: use 1 or 0")
