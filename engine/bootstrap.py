"""Composition root: builds the bus, writer, artifact store and query API from settings.
Nothing else in Runbus constructs infrastructure.

The rule: each process entry point reads its settings once, builds its Services with `bootstrap()`
and passes them down explicitly; it closes them when it ends. There is no module-level locator
and no registry of handles. The entry points:

- the CLI: one typer callback builds the command's Services and closes them at exit
  (engine.cli); `runbus ui` hands them to `engine.ui.server.serve(svc=...)`;
- the projection service process (engine.projection_service.main);
- a Dask worker: the worker plugin builds the worker's Services at setup, and each iteration
  sent to the worker runs with them (engine.runtimes.dask);
- the library API (MLRun's names take no handle): the one process-level session of engine.api,
  built on first use and rebuilt in a forked child. Only the library's entry points call
  `engine.api.session()` (new_function, run_function, get_run_db, resume, get_or_create_ctx, and
  a forked child's first call on an inherited script run); what they create (functions, run
  specs' contexts, sweeps, EngineRunDB with its rerun/resume) carries its Services from then on.

Everything below an entry point takes a `Services` (or the parts it needs) as an argument.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.settings import Settings, SettingsError, load_settings
from producers.spill import SpillDelivery, deliver_spill, make_private_folder

# What building services needs (DuckDB, Arrow, Avro) is imported by bootstrap() and the methods
# that use it: importing this module stays cheap for an entry point that may not build services
# (`runbus --help`) or builds only part of them (the projection service process).
if TYPE_CHECKING:
    import duckdb

    from engine.loader import RunSigner
    from producers.artifact_store import ArtifactStore
    from producers.bus import Bus
    from producers.writer import BackgroundWriter
    from projections.client import ServiceClient
    from projections.projector import Projector
    from projections.query import RunDB
    from projections.user import UserProjection
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
                        partitions=settings.kafka_partitions, security=settings.kafka_security)
    from producers.bus.kafka_security import masked_address  # ssl: only on this path

    raise SettingsError(f"RUNBUS_BUS={masked_address(url)!r} is not a bus URL: use 'embedded', "
                        f"'sqlite:///path/to/log.sqlite' or 'kafka://host:port'")


ENTRY_POINT_GROUP = "runbus.projections"


def load_user_projections(references: tuple[str, ...]) -> list[UserProjection]:
    """User projections named in settings ("module:Class") and installed under the entry point group."""
    found: list[Any] = [ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)]
    if not found and not references:
        return []
    from projections.user import UserProjection

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
    _signer: RunSigner | None = field(default=None, repr=False)

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

    def run_signer(self) -> RunSigner:
        """What signs the run_started of every run this process starts (`engine.loader.RunSigner`,
        one for the process: it reads the home's code key once)."""
        if self._signer is None:
            from engine.loader import RunSigner

            self._signer = RunSigner(self.settings.home)
        return self._signer

    def projector(self, con: duckdb.DuckDBPyConnection, batch_size: int = 50_000) -> Projector:
        """A projector folding this bus into `con` (the caller holds the projection file)."""
        from projections.projector import Projector

        return Projector(self.bus, con, self.codec, batch_size, self.user_projections)

    def deliver_spill(self) -> SpillDelivery:
        """Append to the bus what writers on it kept in RUNBUS_HOME/spill (it refused them, or was
        away when their process ended); each file is deleted once delivered. Files of live writers
        and of other buses stay. Raises the bus's error (BusRefused) when it still refuses."""
        return deliver_spill(self.settings.spill_dir, self.bus)

    def close(self) -> None:
        """Flush (bounded by RUNBUS_FLUSH_TIMEOUT: what is left goes to the spill file) and close."""
        self.writer.close(self.settings.flush_timeout_s)
        if self._reads is not None:
            self._reads.close()
        self.bus.close()


def bootstrap(settings: Settings | None = None, *, bus: Bus | None = None) -> Services:
    """New services built from `settings` (the environment's when None); the caller closes them.
    `bus`: use this bus (e.g. producers.bus.memory.MemoryBus in unit tests) instead of the one
    RUNBUS_BUS names; it is closed with the services."""
    from producers.artifact_store import ArtifactStore
    from producers.writer import BackgroundWriter
    from projections.database import configure as configure_projection
    from schemas import EventCodec

    settings = settings or load_settings()
    make_private_folder(settings.home)  # a home this creates is readable by its owner only
    make_private_folder(settings.artifact_root)
    configure_projection(settings.db_linger_s, settings.heartbeat_interval_s)
    codec = EventCodec()
    bus = bus if bus is not None else make_bus(settings.bus_url, settings)
    # the writer delivers what earlier writers on this bus kept in the spill folder
    return Services(settings, codec, bus,
                    BackgroundWriter(bus, codec, settings.flush_interval_s,
                                     heartbeat_interval_s=settings.heartbeat_interval_s,
                                     spill_dir=settings.spill_dir,
                                     flush_timeout_s=settings.flush_timeout_s),
                    ArtifactStore(settings.artifact_root),
                    load_user_projections(settings.projections))

