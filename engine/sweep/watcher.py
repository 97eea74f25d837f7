"""Follows a sweep's iterations on the bus: which started, their results, how they ended."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from producers.bus import Bus
from producers.subscription import Subscription
from schemas import EventCodec

# An iteration is finished when a run of it ended so (a 'lost' one, or one still running, is not):
# it is not run again, by a resumed sweep nor after its worker died.
FINISHED_STATES = ("completed", "error", "aborted")


@dataclass
class ChildRun:
    uid: str
    iteration: int
    state: str = "running"
    results: dict[str, Any] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    interval_s: float | None = None  # the child's own heartbeat interval, as it recorded it
    started: float = field(default_factory=time.monotonic)  # when its run_started was read (monotonic)

    def lost_after(self, fallback_interval_s: float) -> float:
        """Seconds of silence after which this child counts as lost: 3 of its heartbeat intervals."""
        return 3 * (self.interval_s or fallback_interval_s)


class ChildWatcher:
    """Reads the bus from `positions` and keeps the runs whose parent is `parent_uid`."""

    def __init__(self, bus: Bus, codec: EventCodec, parent_uid: str, positions: dict[int, int]) -> None:
        self.parent_uid = parent_uid
        # records that are not events concern the projector (its dead letters), not the sweep
        self._subscription = Subscription(bus, codec, positions)
        self.children: dict[str, ChildRun] = {}

    def poll(self, timeout: float = 0.0) -> None:
        while True:
            deliveries = self._subscription.poll(10_000, timeout)
            for delivery in deliveries:
                for event in delivery.events:
                    self._apply(event.run_uid, event.type, event.payload)
            if len(deliveries) < 10_000:
                return
            timeout = 0.0

    def _apply(self, uid: str, kind: str, payload: dict[str, Any]) -> None:
        if kind == "run_started":
            if payload["parent_uid"] == self.parent_uid:
                self.children[uid] = ChildRun(uid, payload["iteration"],
                                              interval_s=_interval(payload.get("heartbeat_interval_s")))
            return
        child = self.children.get(uid)
        if child is None:
            return
        child.last_seen = time.monotonic()
        if child.state == "lost" and kind != "run_finished":
            child.state = "running"  # it was not dead: wait for its own end again
        if kind == "heartbeat":
            child.interval_s = _interval(payload.get("interval_s")) or child.interval_s
        elif kind == "result":
            with contextlib.suppress(ValueError):  # not JSON: the projection quarantines it too
                child.results[payload["key"]] = json.loads(payload["value"])
        elif kind == "run_finished" and (payload["state"] != "lost" or child.state == "running"):
            child.state = payload["state"]  # a 'lost' verdict never overrides the child's own end

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

    def catch_up(self, until: Mapping[int, int], timeout: float) -> bool:
        """Read the bus up to `until` (end offsets, e.g. `bus.end_offsets()` now); False if that
        took longer than `timeout`."""
        deadline = time.monotonic() + timeout
        positions = self._subscription.positions
        while any(positions.get(p, 0) < end for p, end in until.items()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.poll(min(remaining, 0.5))
        return True

    def finished(self, iterations: Collection[int]) -> dict[int, ChildRun]:
        """Of `iterations`, those with a run this watcher saw finish (FINISHED_STATES): iteration -> run."""
        wanted = set(iterations)
        return {child.iteration: child for child in self.children.values()
                if child.iteration in wanted and child.state in FINISHED_STATES}

    def unfinished(self) -> list[ChildRun]:
        return [child for child in self.children.values() if child.state == "running"]


def _interval(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and 0 < value < float("inf") else None
