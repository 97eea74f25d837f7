"""The bus interface and its backends (one module each)."""

from producers.bus.base import Bus, BusError, BusRecord, lag

__all__ = ["Bus", "BusError", "BusRecord", "lag"]
