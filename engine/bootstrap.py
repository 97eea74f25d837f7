"""Composition root: builds the bus, writer, artifact store and query API from settings.
Nothing else in Runbus constructs infrastructure."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from engine.settings import Settings, SettingsError, load_settings
from producers.artifact_store import ArtifactStore
from producers.bus import Bus
from producers.writer import BackgroundWriter
from projections import RunDB
from schemas import EventCodec


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


@dataclass
class Services:
    settings: Settings
    codec: EventCodec
    bus: Bus
    writer: BackgroundWriter
    artifact_store: ArtifactStore

    def run_db(self) -> RunDB:
        return RunDB(self.bus, self.settings.db_path, self.codec, self.settings.db_timeout_s)

    def close(self) -> None:
        self.writer.close()
        self.bus.close()


_lock = threading.Lock()
_services: dict[Settings, Services] = {}


def services(settings: Settings | None = None) -> Services:
    """The process's services for the current settings (built once per distinct settings)."""
    settings = settings or load_settings()
    with _lock:
        found = _services.get(settings)
        if found is None:
            settings.home.mkdir(parents=True, exist_ok=True)
            codec = EventCodec()
            bus = make_bus(settings.bus_url, settings)
            found = Services(settings, codec, bus,
                             BackgroundWriter(bus, codec, settings.flush_interval_s,
                                              heartbeat_interval_s=settings.heartbeat_interval_s),
                             ArtifactStore(settings.artifact_root))
            _services[settings] = found
        return found


def reset_services() -> None:
    """Close every cached service (tests and long-lived processes that change settings)."""
    with _lock:
        for found in _services.values():
            found.close()
        _services.clear()
