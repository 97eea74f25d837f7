"""The one place Runbus reads its RUNBUS_* settings."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


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
    (seconds without a request after which the projection service exits)."""
    env = os.environ if env is None else env
    home = Path(env.get("RUNBUS_HOME") or ".runbus").expanduser().resolve()
    return Settings(
        home=home,
        bus_url=env.get("RUNBUS_BUS") or "embedded",
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
    )


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
