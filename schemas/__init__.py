"""Avro schemas of every Runbus event and the codec that reads and writes them."""

from schemas.codec import DecodeError, EventCodec, load_event_schema
from schemas.events import EVENT_TYPES, SCHEMA_VERSION, Event

__all__ = ["EVENT_TYPES", "SCHEMA_VERSION", "DecodeError", "Event", "EventCodec", "load_event_schema"]
