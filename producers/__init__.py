"""Producers: the run context, artifacts and their store, and the bus writers."""

from producers.context import RunContext
from producers.data_item import DataItem

__all__ = ["DataItem", "RunContext"]
