"""Follows a sweep's iterations on the bus: which started, their results, how they ended."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from producers.bus import Bus
from schemas import DecodeError, EventCodec


@dataclass
class ChildRun:
    uid: str
    iteration: int
    state: str = "running"
    results: dict[str, Any] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)


class ChildWatcher:
    """Reads the bus from `positions` and keeps the runs whose parent is `parent_uid`."""

    def __init__(self, bus: Bus, codec: EventCodec, parent_uid: str, positions: dict[int, int]) -> None:
        self.bus, self.codec, self.parent_uid = bus, codec, parent_uid
        self.positions = dict(positions)
        self.children: dict[str, ChildRun] = {}

    def poll(self, timeout: float = 0.0) -> None:
        while True:
            records = self.bus.read(self.positions, 10_000, timeout)
            for record in records:
                self.positions[record.partition] = record.offset + 1
                try:
                    events = self.codec.decode_all(record.value)
                except DecodeError:
                    continue
                for event in events:
                    self._apply(event.run_uid, event.type, event.payload)
            if len(records) < 10_000:
                return
            timeout = 0.0

    def _apply(self, uid: str, kind: str, payload: dict[str, Any]) -> None:
        if kind == "run_started":
            if payload["parent_uid"] == self.parent_uid:
                self.children[uid] = ChildRun(uid, payload["iteration"])
            return
        child = self.children.get(uid)
        if child is None:
            return
        child.last_seen = time.monotonic()
        if kind == "result":
            child.results[payload["key"]] = json.loads(payload["value"])
        elif kind == "run_finished":
            child.state = payload["state"]

    def wait_finished(self, uid: str, timeout: float) -> ChildRun | None:
        """The child once its run_finished is on the bus; None if it did not arrive in time."""
        deadline = time.monotonic() + timeout
        while True:
            child = self.children.get(uid)
            if child is not None and child.state != "running":
                return child
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.poll(min(remaining, 0.5))

    def unfinished(self) -> list[ChildRun]:
        return [child for child in self.children.values() if child.state == "running"]
