from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest

from producers.bus import Bus, BusError
from producers.bus.base import BusRefused
from producers.bus.kafka import KafkaBus
from tests.contract.bus_contract import BusContract, read_all
from tests.kafka_support import unique_topic

pytestmark = pytest.mark.kafka


class TestKafkaBus(BusContract):
    """The contract on a fresh 3-partition topic per test, so per-key order spans partitions."""

    @pytest.fixture(autouse=True)
    def _topic(self, kafka_bootstrap: str) -> Iterator[None]:
        self.bootstrap = kafka_bootstrap
        self.topic = unique_topic()
        self.opened: list[Bus] = []
        yield
        for bus in self.opened:
            bus.close()

    def make_bus(self) -> Bus:
        bus = self.bus_factory()()
        self.opened.append(bus)
        return bus

    def make_bus_same(self, bus: Bus) -> Bus:
        return self.make_bus()

    def bus_factory(self) -> object:
        return functools.partial(KafkaBus, self.bootstrap, topic=self.topic, partitions=3)


def test_a_broker_that_is_down_raises_bus_error_naming_it() -> None:
    with pytest.raises(BusError, match=r"127\.0\.0\.1:1\b"):
        KafkaBus("127.0.0.1:1", topic=unique_topic(), connect_timeout_s=2)


def test_the_topic_is_created_with_the_requested_partitions(kafka_bootstrap: str) -> None:
    with KafkaBus(kafka_bootstrap, topic=unique_topic(), partitions=5) as bus:
        assert bus.partitions() == [0, 1, 2, 3, 4]
        assert bus.end_offsets() == {p: 0 for p in range(5)}


def test_an_append_with_a_record_over_the_size_limit_raises_bus_refused_and_stores_none_after_it(
        kafka_bootstrap: str) -> None:
    """A real partial append: the producer refuses the oversized record at send, the append raises
    BusRefused, and what it stored is some of the records before it, in batch order (the bus
    contract); the bus goes on."""
    with KafkaBus(kafka_bootstrap, topic=unique_topic(), partitions=1) as bus:
        too_large = b"x" * (9 * 1024 * 1024)
        with pytest.raises(BusRefused, match="append of 4 records failed"):
            bus.append([("k", b"1"), ("k", b"2"), ("k", too_large), ("k", b"3")])
        bus.append([("k", b"4")])
        values = [r.value for r in read_all(bus, sum(bus.end_offsets().values()))]
        assert values[-1] == b"4"
        assert values[:-1] in ([], [b"1"], [b"1", b"2"])
