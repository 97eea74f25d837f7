"""Kafka bus: one topic, records keyed by run uid so each run's records stay in one partition, in order.

The topic is created on construction (brokers may forbid auto-creation). Appends go through one
idempotent producer (acks=all) and return once every record is acknowledged. Reads use a consumer
without a group that is assigned every partition and seeks to the positions it is given; committed
positions are stored as the group's offsets through the admin API, so no group membership is needed.
Clients are created lazily and again after a fork.

Every client connects as `security` says (KafkaSecurity: SASL, TLS). What retrying cannot fix is
BusRefused, with its cause in one line: a refused login or certificate within moments (kafka-python
alone retries both until the bootstrap times out, without saying why), and a missing ACL with the
operations the user's ACLs do allow on the topic.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from kafka.admin import KafkaAdminClient, OffsetSpec
from kafka.codec import has_lz4
from kafka.consumer import KafkaConsumer
from kafka.errors import (
    AuthorizationError,
    IllegalSaslStateError,
    InvalidRecordError,
    InvalidTopicError,
    KafkaConfigurationError,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    SaslAuthenticationFailedError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnsupportedSaslMechanismError,
    UnsupportedVersionError,
)
from kafka.net.compat import KafkaNetClient
from kafka.net.inet import create_connection
from kafka.net.manager import KafkaConnectionManager
from kafka.net.selector import NetworkSelector
from kafka.net.transport import KafkaSSLTransport, KafkaTCPTransport
from kafka.producer import KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition

from producers.bus.base import Bus, BusError, BusRecord, BusRefused
from producers.bus.kafka_security import PLAINTEXT, KafkaSecurity, has_login, login_refused, masked_address

T = TypeVar("T")

# Measured on Avro events: gzip appends ~20% faster than no compression (the pure-Python CRC32C runs
# over fewer bytes); lz4 and the `crc32c` C package, when installed, add another ~30%.
_COMPRESSION = "lz4" if has_lz4() else "gzip"
_FAST_CRC = importlib.util.find_spec("crc32c") is not None  # else CRC checks halve read throughput
_PRODUCER = {"enable_idempotence": True, "acks": "all", "linger_ms": 10, "batch_size": 512 * 1024,
             "max_request_size": 8 * 1024 * 1024, "max_in_flight_requests_per_connection": 5,
             "compression_type": _COMPRESSION, "delivery_timeout_ms": 60_000, "max_block_ms": 30_000,
             "allow_auto_create_topics": False}
# fetches of at most 8 MB (2 MB a partition): the projection service holds what it fetched while it
# folds, and larger ones raised its peak RSS over 1M events by ~20 MB at no gain in events/s
_CONSUMER = {"group_id": None, "enable_auto_commit": False, "auto_offset_reset": "earliest",
             "fetch_min_bytes": 1, "fetch_max_wait_ms": 100, "fetch_max_bytes": 8 * 1024 * 1024,
             "max_partition_fetch_bytes": 2 * 1024 * 1024, "check_crcs": _FAST_CRC,
             "allow_auto_create_topics": False}
_MIN_POLL_MS = 50  # a poll with timeout 0 only returns what is already buffered
_CATCH_UP_S = 10.0  # how long a read keeps polling for records the broker says exist
_FLUSH_GRACE_S = 5.0
# What the broker says "no" to for good: retrying the same records cannot succeed. Everything else
# (timeouts, leader changes, a broker away) may pass, and the writer retries it.
_REFUSALS = (AuthorizationError, SaslAuthenticationFailedError, MessageSizeTooLargeError,
             RecordListTooLargeError, InvalidRecordError, InvalidTopicError, PolicyViolationError,
             UnsupportedVersionError, KafkaConfigurationError)
_LOGIN_REFUSALS = (SaslAuthenticationFailedError, UnsupportedSaslMechanismError, IllegalSaslStateError)


def _certificate_refused(exc: BaseException | None) -> ssl.SSLCertVerificationError | None:
    """The certificate check that failed a TLS handshake (kafka-python wraps it in its own error)."""
    while exc is not None:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _final(exc: BaseException | None) -> bool:
    """A connection failure the next attempt cannot mend: a refused login or certificate."""
    return isinstance(exc, _LOGIN_REFUSALS) or _certificate_refused(exc) is not None


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class _LastWords:
    """A transport that hands on the bytes it read together with the end of the stream.

    kafka-python 3.0 drops them, and a broker that refuses a login sends its answer and closes the
    connection at once: the answer (why) was lost and the login retried as a broken connection. The
    next read sees the end of the stream again."""

    def _sock_recv(self) -> tuple[bytes, Exception | None]:
        data, error = super()._sock_recv()  # type: ignore[misc]
        return (data, None) if data and error is not None else (data, error)


class _TCPTransport(_LastWords, KafkaTCPTransport):
    pass


class _SSLTransport(_LastWords, KafkaSSLTransport):
    pass


class _Connections(KafkaConnectionManager):
    """kafka-python's connection manager, made to give up on a refused login or certificate.

    kafka-python 3.0 keeps a node's authentication failure so that the next attempt raises it
    (`_auth_failures`), but a refused SASL login reaches it only through the connection's init
    future, and a refused certificate as a retriable KafkaConnectionError: both are retried until
    the bootstrap times out, reported as 'Unable to bootstrap'. Here both are kept as that node's
    failure, and the last failure of any kind is kept for the message."""

    last_failure: BaseException | None = None

    async def _build_transport(self, node: Any, timeout_at: float | None = None) -> KafkaTCPTransport:
        # kafka-python's own, with the transports above
        sock = await create_connection(self._net, node.host, node.port, self.config["socket_options"],
                                       proxy_url=self.config["proxy_url"], timeout_at=timeout_at)
        if self.ssl_enabled:
            ssl_config = {key: value for key, value in self.config.items() if key.startswith("ssl_")}
            transport: KafkaTCPTransport = _SSLTransport(self._net, sock, host=node.host, **ssl_config)
        else:
            transport = _TCPTransport(self._net, sock, host=node.host)
        try:
            await transport.handshake()
        except Exception as exc:
            raise KafkaConnectionError(f"Handshake failed: {exc}") from exc
        return transport

    async def _connect(self, node: Any, conn: Any, **kwargs: Any) -> None:
        await super()._connect(node, conn, **kwargs)
        if conn.init_future.failed():
            self.last_failure = conn.init_future.exception
            if _final(self.last_failure):
                self._auth_failures[node.node_id] = self.last_failure


class KafkaBus(Bus):
    """The log is topic `topic` on the brokers `bootstrap` ("host:port[,host:port]")."""

    def __init__(self, bootstrap: str, topic: str = "runbus-events", partitions: int = 6,
                 connect_timeout_s: float = 10.0, client_id: str | None = None,
                 replication: int = 1, security: KafkaSecurity = PLAINTEXT) -> None:
        """Check that a broker answers and create the topic if it is missing (a user the ACLs do
        not let create it may use it when it exists); BusRefused when the broker refuses the
        login, its certificate is not trusted or the ACLs refuse, BusError otherwise (also for an
        address that carries a login: credentials come from the security settings only)."""
        if has_login(bootstrap):
            raise BusError(login_refused(f"the Kafka URL {masked_address(f'kafka://{bootstrap}')}"))
        self.bootstrap, self.topic, self.url = bootstrap, topic, f"kafka://{bootstrap}"
        self.security = security
        self._timeout_ms = int(connect_timeout_s * 1000)
        self._common: dict[str, Any] = {
            "bootstrap_servers": bootstrap.split(","), "bootstrap_timeout_ms": self._timeout_ms,
            "request_timeout_ms": max(self._timeout_ms, 30_000), "client_id": client_id or f"runbus-{os.getpid()}",
            "reconnect_backoff_max_ms": 1000,  # the default (30 s) stalls recovery after a broker restart
            **security.client_config()}
        self._create_refused: BaseException | None = None
        self._lock, self._read_lock = threading.Lock(), threading.Lock()
        self._reset_clients()
        try:
            self._create_topic(partitions, replication)
        except BaseException:
            self.close()
            raise

    # -- clients --------------------------------------------------------------------------------

    def _reset_clients(self) -> None:
        self._pid = os.getpid()
        self._admin_client: KafkaAdminClient | None = None
        self._producer_client: KafkaProducer | None = None
        self._consumer_client: KafkaConsumer | None = None
        self._parts: list[int] = []
        self._next: dict[int, int] = {}  # where the read consumer stands, per partition

    def _open(self, cls: Callable[..., T], **config: Any) -> T:
        """A client of `cls`; its IO thread is stopped if it cannot bootstrap (kafka-python leaks it)."""
        made: list[tuple[KafkaNetClient, _Connections]] = []

        def net_client(**kwargs: Any) -> KafkaNetClient:
            net = NetworkSelector(**kwargs)
            connections = _Connections(net, **kwargs)
            made.append((KafkaNetClient(net=net, manager=connections, **kwargs), connections))
            return made[-1][0]

        try:
            return cls(**self._common, **config, kafka_client=net_client)
        except Exception as exc:
            for client, _ in made:
                client.close()
            last = next((c.last_failure for _, c in reversed(made) if c.last_failure is not None), None)
            raise self._not_connected(exc, exc if _final(exc) else last) from exc

    def _not_connected(self, exc: Exception, cause: BaseException | None) -> BusError:
        """Why no client could connect, in one line."""
        where = f"Kafka at {self.bootstrap}"
        if isinstance(cause, IllegalSaslStateError):
            return BusRefused(f"{where} takes no SASL login on this listener ({self.security.describe()}): "
                              f"{_one_line(cause)}; is it a listener without SASL?")
        if isinstance(cause, _LOGIN_REFUSALS):
            return BusRefused(f"{where} refused the login of {self.security.describe()}: {_one_line(cause)}")
        refused = _certificate_refused(cause)
        if refused is not None:
            return BusRefused(f"{where}: the broker's TLS certificate fails verification against "
                              f"{self.security.trusted()}: {_one_line(refused.verify_message or refused)}")
        last = f" (last connection error: {_one_line(cause)})" if cause is not None and cause is not exc else ""
        return BusError(f"Kafka brokers at {self.bootstrap} did not answer within {self._timeout_ms / 1000:g}s "
                        f"over {self.security.protocol}: {_one_line(exc)}{last}")

    def _refused(self, what: str, exc: BaseException) -> BusRefused:
        """The ACLs refuse `what`: say so with the operations they do allow this user on the topic."""
        allowed = self._allowed_operations()
        may = "" if allowed is None else f"; on topic {self.topic!r} its ACLs allow {', '.join(allowed) or 'nothing'}"
        return BusRefused(f"Kafka at {self.bootstrap}: {self.security.describe()} may not {what} "
                          f"({_one_line(exc)}){may}")

    def _allowed_operations(self) -> list[str] | None:
        """What the broker says this user may do on the topic (None when it cannot be asked)."""
        try:
            (info,) = self._admin().describe_topics([self.topic])
        except Exception:  # only for a message: the refusal itself is what matters
            return None
        if info.get("error_code") == TopicAuthorizationFailedError.errno:
            return []
        operations = info.get("authorized_operations")
        return sorted(operations) if isinstance(operations, list) else None

    def _client(self, name: str, cls: Callable[..., T], config: Mapping[str, Any]) -> T:
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's IO threads do not exist here
                self._reset_clients()
            client = getattr(self, name)
            if client is None:
                client = self._open(cls, **config)
                setattr(self, name, client)
            return client

    def _admin(self) -> KafkaAdminClient:
        return self._client("_admin_client", KafkaAdminClient, {})

    def _producer(self) -> KafkaProducer:
        return self._client("_producer_client", KafkaProducer, _PRODUCER)

    def _consumer(self) -> KafkaConsumer:
        return self._client("_consumer_client", KafkaConsumer, _CONSUMER)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """`fn()`, retried while Kafka says the error is transient; BusError when it gives up."""
        deadline = time.monotonic() + self._timeout_ms / 1000
        while True:
            try:
                return fn()
            except AuthorizationError as exc:
                raise self._refused(what, exc) from exc
            except KafkaError as exc:
                if not getattr(exc, "retriable", False) or time.monotonic() >= deadline:
                    raise BusError(f"Kafka at {self.bootstrap}: cannot {what}: {exc}") from exc
                time.sleep(0.2)

    def _create_topic(self, partitions: int, replication: int) -> None:
        """Create the topic unless it exists (then its partition count stays), and wait for leaders."""
        spec = {self.topic: {"num_partitions": partitions, "replication_factor": replication}}

        def create() -> None:
            try:
                self._admin().create_topics(spec, timeout_ms=self._timeout_ms)
            except TopicAlreadyExistsError:
                pass
            except TopicAuthorizationFailedError as exc:
                self._create_refused = exc  # a user who may not create it may use it: partitions() tells
                return
            self._admin().wait_for_topics([self.topic], timeout_ms=self._timeout_ms)

        self._call(f"create topic {self.topic!r} ({partitions} partitions, replication {replication})", create)
        self.partitions()

    # -- Bus ------------------------------------------------------------------------------------

    def append(self, records: Sequence[tuple[str | None, bytes]]) -> None:
        """Send every record (key = run uid) and return once all are acknowledged; BusRefused when
        the broker refuses for good (authorization, record too large...), BusError otherwise.

        A failed append may still have stored some records: callers retry, readers deduplicate."""
        if not records:
            return
        producer = self._producer()
        try:
            futures = [producer.send(self.topic, key=None if key is None else key.encode(), value=value)
                       for key, value in records]
            producer.flush(timeout=_PRODUCER["delivery_timeout_ms"] / 1000 + _FLUSH_GRACE_S)
            failed = next((f.exception for f in futures if not f.succeeded()), None)
        except KafkaError as exc:
            failed = exc
        if failed is not None:
            self._drop("_producer_client")  # an idempotent producer may be unusable after a failure
            what = f"write {len(records)} records to topic {self.topic!r} (it needs WRITE)"
            if isinstance(failed, AuthorizationError):
                raise self._refused(what, failed)
            if not isinstance(failed, _REFUSALS) and not getattr(failed, "retriable", False):
                # kafka-python reports a refused producer id (ClusterAuthorizationFailed) as a bare
                # KafkaError: the broker's own list of what this user may do decides
                allowed = self._allowed_operations()
                if allowed is not None and "WRITE" not in allowed:
                    raise self._refused(what, failed)
            kind = BusRefused if isinstance(failed, _REFUSALS) else BusError
            raise kind(f"Kafka at {self.bootstrap}, topic {self.topic!r}: append of {len(records)} records "
                       f"failed: {_one_line(failed)}")

    def partitions(self) -> list[int]:
        (info,) = self._call("describe topic", lambda: self._admin().describe_topics([self.topic]))
        if info.get("error_code") == TopicAuthorizationFailedError.errno:
            raise self._refused(f"describe topic {self.topic!r} (it needs DESCRIBE)",
                                TopicAuthorizationFailedError(self.topic))
        if info.get("error_code") or not info.get("partitions"):
            if self._create_refused is not None:
                raise BusRefused(f"Kafka topic {self.topic!r} on {self.bootstrap} does not exist and "
                                 f"{self.security.describe()} may not create it (it needs CREATE)")
            raise BusError(f"Kafka topic {self.topic!r} on {self.bootstrap} is unknown or has no partitions")
        self._parts = sorted(p["partition_index"] for p in info["partitions"])
        return list(self._parts)

    def end_offsets(self) -> dict[int, int]:
        specs = {TopicPartition(self.topic, p): OffsetSpec.LATEST for p in self.partitions()}
        found = self._call("list offsets", lambda: self._admin().list_partition_offsets(specs))
        return {tp.partition: found[tp].offset for tp in specs}

    def read(self, positions: Mapping[int, int], max_records: int = 10_000,
             timeout: float = 0.0) -> list[BusRecord]:
        """Up to `max_records` records from `positions` on, in order per partition.

        Records the broker already holds are returned even with `timeout` 0; unreturned fetched
        records stay buffered for the next read from the position that follows."""
        with self._read_lock:
            consumer = self._consumer()
            parts = self._parts or self.partitions()
            if set(positions) - set(parts):
                parts = self.partitions()
            if set(parts) != {tp.partition for tp in consumer.assignment()}:
                consumer.assign([TopicPartition(self.topic, p) for p in parts])
                self._next = {}
            for p in parts:
                if self._next.get(p) != positions.get(p, 0):
                    consumer.seek(TopicPartition(self.topic, p), positions.get(p, 0))
                    self._next[p] = positions.get(p, 0)
            deadline, checked = time.monotonic() + timeout, False
            while True:
                wait_ms = max(_MIN_POLL_MS, int((deadline - time.monotonic()) * 1000))
                try:
                    fetched = consumer.poll(timeout_ms=wait_ms, max_records=max_records)
                except AuthorizationError as exc:
                    raise self._refused(f"read topic {self.topic!r} (it needs READ)", exc) from exc
                except KafkaError as exc:
                    raise BusError(f"Kafka at {self.bootstrap}: read failed: {exc}") from exc
                if fetched:
                    return self._records(fetched)
                if time.monotonic() >= deadline:
                    if checked or all(end <= self._next.get(p, 0) for p, end in self.end_offsets().items()):
                        return []
                    deadline, checked = time.monotonic() + _CATCH_UP_S, True

    def _records(self, fetched: Mapping[TopicPartition, list[Any]]) -> list[BusRecord]:
        out: list[BusRecord] = []
        for tp, batch in sorted(fetched.items(), key=lambda item: item[0].partition):
            # a key is anyone's bytes: one that is not UTF-8 must reach the projector's dead letters
            out.extend(BusRecord(tp.partition, r.offset,
                                 None if r.key is None else r.key.decode("utf-8", "surrogateescape"),
                                 r.value, r.timestamp / 1000) for r in batch)
            self._next[tp.partition] = batch[-1].offset + 1
        return out

    def commit(self, group: str, positions: Mapping[int, int]) -> None:
        """Store `positions` as `group`'s committed offsets (the group must have no active members)."""
        offsets = {TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1) for p, o in positions.items()}
        if not offsets:
            return

        def alter() -> dict[int, str]:
            errors = self._admin().alter_group_offsets(group, offsets)
            failed = {tp.partition: err for tp, err in errors.items() if err.errno != 0}
            for err in failed.values():  # per partition: a coordinator still loading, a refused ACL...
                if err.retriable or issubclass(err, AuthorizationError):
                    raise err(f"group {group!r}")
            return {partition: err.__name__ for partition, err in failed.items()}

        failed = self._call(f"commit offsets of group {group!r}", alter)
        if failed:
            raise BusError(f"Kafka at {self.bootstrap}: commit for group {group!r} failed: {failed}")

    def committed(self, group: str) -> dict[int, int]:
        found = self._call("list offsets", lambda: self._admin().list_group_offsets({group: None}))
        return {tp.partition: meta.offset for tp, meta in found.get(group, {}).items()
                if tp.topic == self.topic and meta.offset >= 0}

    def _drop(self, name: str) -> None:
        with self._lock:
            client, pid = getattr(self, name), self._pid
            setattr(self, name, None)
        if client is not None and pid == os.getpid():
            with contextlib.suppress(Exception):  # best effort: the client is dropped anyway
                client.close(timeout=0) if name == "_producer_client" else client.close()

    def close(self) -> None:
        """Close every client; nothing is pending, as `append` returns only once all is acknowledged."""
        for name in ("_producer_client", "_consumer_client", "_admin_client"):
            self._drop(name)
