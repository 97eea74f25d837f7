"""Composition root: builds the bus, writer, artifact store and query API from settings.
Nothing else in Runbus constructs infrastructure."""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from engine.settings import Settings, SettingsError, load_settings
from producers.artifact_store import ArtifactStore
from producers.bus import Bus
from producers.spill import SpillDelivery, deliver_spill, make_private_folder
from producers.writer import BackgroundWriter
from projections import Projector
from projections.database import configure as configure_projection
from projections.user import UserProjection
from schemas import EventCodec

if TYPE_CHECKING:
    from projections.client import ServiceClient
    from projections.query import RunDB


def make_bus(url: str, settings: Settings) -> Bus:
    """The bus named by `url`: 'embedded' (the log in RUNBUS_HOME), 'sqlite:///path', or
    'kafka://host:port[,host:port]'."""
    if url in ("embedded", ""):
        from producers.bus.embedded import EmbeddedBus

        return EmbeddedBus(settings.log_path)
    if url.startswith("sqlite://"):
        from producers.bus.embedded import EmbeddedBus

        return EmbeddedBus(Path(url.removeprefix("sqlite://")))
    if url.startswith("kafka://"):
        from producers.bus.kafka import KafkaBus

        return KafkaBus(url.removeprefix("kafka://"), topic=settings.kafka_topic,
                        partitions=settings.kafka_partitions)
    raise SettingsError(f"RUNBUS_BUS={url!r} is not a bus URL: use 'embedded', "
                        f"'sqlite:///path/to/log.sqlite' or 'kafka://host:port'")


ENTRY_POINT_GROUP = "runbus.projections"


def load_user_projections(references: tuple[str, ...]) -> list[UserProjection]:
    """User projections named in settings ("module:Class") and installed under the entry point group."""
    found: list[Any] = [ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)]
    for reference in references:
        module_name, sep, attribute = reference.partition(":")
        if not sep:
            raise SettingsError(f"RUNBUS_PROJECTIONS entry {reference!r} must look like 'module:Class'")
        try:
            found.append(getattr(importlib.import_module(module_name), attribute))
        except (ImportError, AttributeError) as exc:
            raise SettingsError(f"RUNBUS_PROJECTIONS entry {reference!r} cannot be loaded: {exc}") from None
    projections = [item() if isinstance(item, type) else item for item in found]
    for projection in projections:
        if not isinstance(projection, UserProjection) or not projection.name:
            raise SettingsError(f"{projection!r} is not a UserProjection with a name")
    return projections


@dataclass
class Services:
    settings: Settings
    codec: EventCodec
    bus: Bus
    writer: BackgroundWriter
    artifact_store: ArtifactStore
    user_projections: list[UserProjection]
    _reads: ServiceClient | None = field(default=None, repr=False)

    def run_db(self, as_of: int | datetime | str | None = None) -> RunDB:
        """The query API: answered by the home's projection service (RUNBUS_PROJECTION=service)
        or folded in this process (inprocess)."""
        from projections.query import RunDB

        return RunDB(self.bus, self.settings.db_path, self.codec, self.settings.db_timeout_s,
                     self.user_projections, as_of, source=self.reads())

    def reads(self) -> ServiceClient | None:
        """Where this process's reads are answered: the projection service's client, or None
        (RUNBUS_PROJECTION=inprocess: this process folds the file itself)."""
        if self.settings.projection == "inprocess":
            return None
        if self._reads is None:
            from engine.projection_service import service_client

            self._reads = service_client(self.settings, self.bus)
        return self._reads

    def projector(self, con: duckdb.DuckDBPyConnection, batch_size: int = 50_000) -> Projector:
        return Projector(self.bus, con, self.codec, batch_size, self.user_projections)

    def deliver_spill(self) -> SpillDelivery:
        """Append to the bus what writers on it kept in RUNBUS_HOME/spill (it refused them, or was
        away when their process ended); each file is deleted once delivered. Files of live writers
        and of other buses stay. Raises the bus's error (BusRefused) when it still refuses."""
        return deliver_spill(self.settings.spill_dir, self.bus)

    def close(self) -> None:
        """Flush (bounded by RUNBUS_FLUSH_TIMEOUT: what is left goes to the spill file) and close."""
        self.writer.close(self.settings.flush_timeout_s)
        self.bus.close()


_lock = threading.Lock()
_services: dict[Settings, Services] = {}


def bootstrap(settings: Settings | None = None) -> Services:
    """New services built from `settings` (the environment's when None); the caller closes them."""
    settings = settings or load_settings()
    make_private_folder(settings.home)  # a home this creates is readable by its owner only
    make_private_folder(settings.artifact_root)
    configure_projection(settings.db_linger_s, settings.heartbeat_interval_s)
    codec = EventCodec()
    bus = make_bus(settings.bus_url, settings)
    # the writer delivers what earlier writers on this bus kept in the spill folder
    return Services(settings, codec, bus,
                    BackgroundWriter(bus, codec, settings.flush_interval_s,
                                     heartbeat_interval_s=settings.heartbeat_interval_s,
                                     spill_dir=settings.spill_dir,
                                     flush_timeout_s=settings.flush_timeout_s),
                    ArtifactStore(settings.artifact_root),
                    load_user_projections(settings.projections))


def services(settings: Settings | None = None) -> Services:
    """The process's services for the current settings (built once per distinct settings)."""
    settings = settings or load_settings()
    with _lock:
        found = _services.get(settings)
        if found is None:
            found = _services[settings] = bootstrap(settings)
        return found


def _forget_services_in_child() -> None:
    # a forked child builds services of its own: the parent's writer thread does not exist in
    # it, and a bus connection must not be shared between processes
    global _lock
    _lock = threading.Lock()
    _services.clear()


os.register_at_fork(after_in_child=_forget_services_in_child)


def reset_services() -> None:
    """Close every cached service (tests and long-lived processes that change settings)."""
    with _lock:
        for found in _services.values():
            found.close()
        _services.clear()
