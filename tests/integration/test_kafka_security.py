"""Kafka security: settings (RUNBUS_KAFKA_*), and a secured broker (SASL_SSL, SCRAM users, ACLs)
started by these tests: writes and reads through KafkaBus, and a clear one-line error within 10 s
for a wrong password, an untrusted CA and a missing ACL, with nothing lost once access is fixed."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka.admin import (
    ACL,
    ACLOperation,
    ACLPermissionType,
    KafkaAdminClient,
    NewTopic,
    ResourcePattern,
    ResourceType,
)

from engine.bootstrap import bootstrap
from engine.settings import SettingsError, load_settings
from producers.bus.base import BusRecord, BusRefused
from producers.bus.kafka import KafkaBus
from producers.bus.kafka_security import KafkaSecurity, KafkaSecurityError, Secret
from producers.writer import BackgroundWriter, EventsNotWritten
from schemas import EventCodec
from tests.secure_kafka_support import SecureBroker, start_secure_broker
from tests.support.polling import wait_until

BOUND_S = 10.0  # the bound for a clear error


@pytest.fixture(scope="session")
def broker() -> Iterator[SecureBroker]:
    yield from start_secure_broker()


@pytest.fixture
def admin(broker: SecureBroker) -> Iterator[KafkaAdminClient]:
    client = KafkaAdminClient(**broker.admin_config())
    yield client
    client.close()


def _topic(prefix: str = "runbus-secure") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _refusal(action: Callable[[], Any]) -> tuple[BusRefused, float]:
    """The BusRefused `action` raises, and how long it took."""
    started = time.monotonic()
    with pytest.raises(BusRefused) as caught:
        action()
    return caught.value, time.monotonic() - started


def _grant(admin: KafkaAdminClient, user: str, topic: str, *operations: ACLOperation) -> None:
    pattern = ResourcePattern(ResourceType.TOPIC, topic)
    admin.create_acls([ACL(f"User:{user}", "*", op, ACLPermissionType.ALLOW, pattern) for op in operations])


def _locked_topic(admin: KafkaAdminClient, broker: SecureBroker) -> str:
    """A topic outside the users' ACLs, made by the super user, that the writer may only describe."""
    topic = _topic("locked")
    admin.create_topics([NewTopic(topic, 2, 1)])
    _grant(admin, "writer", topic, ACLOperation.DESCRIBE)
    wait_until(lambda: _may(broker, "writer", topic, "DESCRIBE"), "the writer may describe the locked topic")
    return topic


def _may(broker: SecureBroker, user: str, topic: str, operation: str) -> bool:
    """Whether the broker says `user` may do `operation` on `topic` (ACLs take effect asynchronously)."""
    client = KafkaAdminClient(bootstrap_servers=[broker.bootstrap], **broker.security(user).client_config())
    try:
        (info,) = client.describe_topics([topic])
        return operation in (info.get("authorized_operations") or [])
    finally:
        client.close()


def _read_until(bus: KafkaBus, enough: Callable[[list[BusRecord]], bool], what: str) -> list[BusRecord]:
    """The topic's records from the start, read batch after batch as a consumer would, until `enough`."""
    records: list[BusRecord] = []
    positions: dict[int, int] = {}

    def more() -> bool:
        for record in bus.read(positions, timeout=1):
            records.append(record)
            positions[record.partition] = record.offset + 1
        return enough(records)

    wait_until(more, what)
    return records


def _metric(step: int) -> dict[str, Any]:
    return {"key": "loss", "value": float(step), "step": step, "timestamp": 1.0}


# -- settings --------------------------------------------------------------------------------------

SASL = {"RUNBUS_KAFKA_SECURITY_PROTOCOL": "sasl_ssl", "RUNBUS_KAFKA_SASL_MECHANISM": "scram-sha-512",
        "RUNBUS_KAFKA_USER": "writer"}


def _settings(tmp_path: Path, **env: str) -> Any:
    return load_settings({"RUNBUS_HOME": str(tmp_path / "home"), **env})


def test_by_default_kafka_is_plaintext_with_no_user(tmp_path: Path) -> None:
    assert _settings(tmp_path).kafka_security == KafkaSecurity()
    assert KafkaSecurity().client_config() == {"security_protocol": "PLAINTEXT"}


def test_sasl_ssl_settings_become_kafka_pythons_own_keys(tmp_path: Path) -> None:
    _owner_only(tmp_path / "password", "s3cret-pw\n")
    ca = _self_signed_ca(tmp_path)
    settings = _settings(tmp_path, **SASL, RUNBUS_KAFKA_PASSWORD_FILE=str(tmp_path / "password"),
                         RUNBUS_KAFKA_CA_FILE=str(ca))
    config = settings.kafka_security.client_config()
    assert config == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                      "sasl_plain_username": "writer", "sasl_plain_password": "s3cret-pw",
                      "ssl_cafile": str(ca), "ssl_certfile": None, "ssl_keyfile": None}
    assert "s3cret-pw" not in repr(settings) and "s3cret-pw" not in repr(config)
    assert "s3cret-pw" not in str(settings.kafka_security.password)
    assert str(tmp_path / "password") in repr(settings)  # where it comes from, for a person


@pytest.mark.parametrize(("env", "named"), [
    ({"RUNBUS_KAFKA_SECURITY_PROTOCOL": "TLS"}, r"RUNBUS_KAFKA_SECURITY_PROTOCOL='TLS' is not one of"),
    ({"RUNBUS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, r"RUNBUS_KAFKA_SASL_MECHANISM must be one of"),
    ({**SASL, "RUNBUS_KAFKA_SASL_MECHANISM": "GSSAPI"}, r"RUNBUS_KAFKA_SASL_MECHANISM='GSSAPI' is not one of"),
    ({**SASL, "RUNBUS_KAFKA_USER": ""}, r"RUNBUS_KAFKA_USER must be set with RUNBUS_KAFKA_SECURITY_PROTOCOL"),
    (SASL, r"RUNBUS_KAFKA_PASSWORD must be set"),
    ({**SASL, "RUNBUS_KAFKA_PASSWORD": "a", "RUNBUS_KAFKA_PASSWORD_FILE": "/p"}, r"both set"),
    ({**SASL, "RUNBUS_KAFKA_PASSWORD_FILE": "/no/such/file"}, r"RUNBUS_KAFKA_PASSWORD_FILE='/no/such/file': the file"),
    ({"RUNBUS_KAFKA_USER": "writer"}, r"RUNBUS_KAFKA_USER is set, but RUNBUS_KAFKA_SECURITY_PROTOCOL=PLAINTEXT"),
    ({**SASL, "RUNBUS_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "RUNBUS_KAFKA_PASSWORD": "a",
      "RUNBUS_KAFKA_CA_FILE": "/etc/hostname"}, r"RUNBUS_KAFKA_CA_FILE is set, but .*does not use TLS"),
    ({"RUNBUS_KAFKA_SECURITY_PROTOCOL": "SSL", "RUNBUS_KAFKA_CA_FILE": "/no/ca.pem"}, r"CA_FILE=.*not exist"),
    ({"RUNBUS_KAFKA_SECURITY_PROTOCOL": "SSL", "RUNBUS_KAFKA_CA_FILE": "/etc/hostname"}, r"CA_FILE=.*no PEM"),
    ({"RUNBUS_KAFKA_SECURITY_PROTOCOL": "SSL", "RUNBUS_KAFKA_KEY_FILE": "/etc/hostname"},
     r"RUNBUS_KAFKA_KEY_FILE is set without RUNBUS_KAFKA_CERT_FILE"),
])
def test_a_combination_that_cannot_work_is_one_line_naming_the_variable(
        tmp_path: Path, env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named) as caught:
        _settings(tmp_path, **env)
    assert "\n" not in str(caught.value)


def _owner_only(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_password_file_others_may_read_or_change_is_refused_naming_it(tmp_path: Path, mode: int) -> None:
    _owner_only(tmp_path / "password", "s3cret-pw")
    (tmp_path / "password").chmod(mode)
    refused = rf"RUNBUS_KAFKA_PASSWORD_FILE=.*password.*mode 0{mode:o}.*chmod 600"
    with pytest.raises(SettingsError, match=refused) as caught:
        _settings(tmp_path, **SASL, RUNBUS_KAFKA_PASSWORD_FILE=str(tmp_path / "password"))
    assert "s3cret-pw" not in str(caught.value) and "\n" not in str(caught.value)
    (tmp_path / "password").chmod(0o600)
    assert _settings(tmp_path, **SASL, RUNBUS_KAFKA_PASSWORD_FILE=str(tmp_path / "password")).kafka_security


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file another owner needs root")
def test_a_mounted_secret_of_another_owner_is_read_unless_others_may_change_it(tmp_path: Path) -> None:
    mounted = tmp_path / "password"  # as Docker or Kubernetes mount a secret: root's, 0444 or 0644
    _owner_only(mounted, "s3cret-pw")
    os.chown(mounted, 65534, 65534)
    for mode in (0o444, 0o644, 0o440):
        mounted.chmod(mode)
        settings = _settings(tmp_path, **SASL, RUNBUS_KAFKA_PASSWORD_FILE=str(mounted))
        assert settings.kafka_security.client_config()["sasl_plain_password"] == "s3cret-pw"
    mounted.chmod(0o666)
    with pytest.raises(SettingsError, match=r"other users may change the file \(mode 0666\)"):
        _settings(tmp_path, **SASL, RUNBUS_KAFKA_PASSWORD_FILE=str(mounted))


def test_a_client_certificate_whose_key_does_not_fit_is_named(tmp_path: Path) -> None:
    ca = _self_signed_ca(tmp_path, "one")
    other = _self_signed_ca(tmp_path, "two")
    with pytest.raises(SettingsError, match=r"RUNBUS_KAFKA_KEY_FILE=.*cannot be loaded"):
        _settings(tmp_path, RUNBUS_KAFKA_SECURITY_PROTOCOL="SSL", RUNBUS_KAFKA_CERT_FILE=str(ca),
                  RUNBUS_KAFKA_KEY_FILE=str(other.with_suffix(".key")))
    settings = _settings(tmp_path, RUNBUS_KAFKA_SECURITY_PROTOCOL="SSL", RUNBUS_KAFKA_CERT_FILE=str(ca),
                         RUNBUS_KAFKA_KEY_FILE=str(ca.with_suffix(".key")))
    assert settings.kafka_security.client_config()["ssl_keyfile"] == str(ca.with_suffix(".key"))


def test_a_password_crosses_to_another_process_as_where_it_comes_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _owner_only(tmp_path / "password", "s3cret-pw")
    settings = _settings(tmp_path, **SASL, RUNBUS_KAFKA_PASSWORD_FILE=str(tmp_path / "password"))
    pickled = pickle.dumps(settings)
    assert b"s3cret-pw" not in pickled
    assert pickle.loads(pickled) == settings

    monkeypatch.setenv("RUNBUS_KAFKA_PASSWORD", "from-env")
    from_env = pickle.dumps(_settings(tmp_path, **SASL, RUNBUS_KAFKA_PASSWORD="from-env"))
    assert b"from-env" not in from_env
    monkeypatch.delenv("RUNBUS_KAFKA_PASSWORD")
    unpickled = pickle.loads(from_env)  # a process without the variable learns it when it connects
    with pytest.raises(KafkaSecurityError, match=r"environment variable RUNBUS_KAFKA_PASSWORD, which is not set"):
        unpickled.kafka_security.client_config()
    with pytest.raises(TypeError, match="not sent to another process"):
        pickle.dumps(Secret("a-value"))


def _self_signed_ca(folder: Path, name: str = "other") -> Path:
    """A CA certificate (and key, beside it) that signed nothing the broker has."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-noenc", "-days", "1", "-subj", f"/CN=not the broker's CA {name}", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    return cert


# -- the secured broker ----------------------------------------------------------------------------

@pytest.mark.kafka
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_the_writer_writes_and_the_reader_reads_over_sasl_ssl(
        broker: SecureBroker, mechanism: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # kafka-python's DEBUG lines hold PLAIN's request, password and all
    topic = _topic()
    records = [(f"run-{i % 3}", f"value {i}".encode()) for i in range(50)]
    with KafkaBus(broker.bootstrap, topic, partitions=3, security=broker.security("writer", mechanism=mechanism)) \
            as writer:
        writer.append(records)
    with KafkaBus(broker.bootstrap, topic, security=broker.security("reader", mechanism=mechanism)) as reader:
        read = _read_until(reader, lambda got: len(got) >= len(records), "the records written")
        assert sorted((r.key, r.value) for r in read) == sorted(records)
        reader.commit("runbus-test-group", {0: 1})
        assert reader.committed("runbus-test-group") == {0: 1}
    passwords = {broker.password(user) for user in ("writer", "reader")}
    assert not [r for r in caplog.records if any(p in r.getMessage() for p in passwords)]


@pytest.mark.kafka
def test_the_writer_may_not_read_and_the_reader_may_not_write(broker: SecureBroker) -> None:
    topic = _topic()
    with KafkaBus(broker.bootstrap, topic, partitions=1, security=broker.security("writer")) as writer, \
            KafkaBus(broker.bootstrap, topic, security=broker.security("reader")) as reader:
        writer.append([("run", b"v")])
        for _ in range(2):  # asked again, the answer is the same (not an empty read)
            refused, took = _refusal(lambda: writer.read({}, timeout=0))
            assert "user 'writer'" in str(refused) and "may not read" in str(refused) and "\n" not in str(refused)
            assert took < BOUND_S
        refused, took = _refusal(lambda: reader.append([("run", b"v")]))
        assert "user 'reader'" in str(refused) and "may not write" in str(refused) and "allow DESCRIBE, READ" in str(
            refused)
        assert took < BOUND_S


@pytest.mark.kafka
def test_a_wrong_password_is_a_refused_login_at_once(broker: SecureBroker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    refused, took = _refusal(lambda: KafkaBus(broker.bootstrap, _topic(),
                                              security=broker.security("writer", password="not-the-password")))
    message = str(refused)
    assert "refused the login of user 'writer'" in message and "invalid credentials" in message
    assert "\n" not in message and took < BOUND_S
    assert "not-the-password" not in message
    assert not [r for r in caplog.records if "not-the-password" in r.getMessage()]


@pytest.mark.kafka
def test_a_broker_certificate_the_ca_file_does_not_trust_is_named(broker: SecureBroker, tmp_path: Path) -> None:
    other_ca = _self_signed_ca(tmp_path)
    refused, took = _refusal(lambda: KafkaBus(broker.bootstrap, _topic(),
                                              security=broker.security("writer", ca_file=other_ca)))
    assert f"TLS certificate fails verification against the CA file {other_ca}" in str(refused)
    assert "\n" not in str(refused) and took < BOUND_S


@pytest.mark.kafka
def test_a_missing_write_acl_is_named_with_what_the_acls_allow(
        broker: SecureBroker, admin: KafkaAdminClient) -> None:
    topic = _locked_topic(admin, broker)
    with KafkaBus(broker.bootstrap, topic, security=broker.security("writer")) as bus:
        refused, took = _refusal(lambda: bus.append([("run", b"v")]))
    assert f"user 'writer' (SCRAM-SHA-512 over SASL_SSL, password from file {broker.secrets / 'writer.password'}) " \
           f"may not write 1 records to topic {topic!r} (it needs WRITE)" in str(refused)
    assert f"on topic {topic!r} its ACLs allow DESCRIBE" in str(refused)
    assert "\n" not in str(refused) and took < BOUND_S


@pytest.mark.kafka
def test_what_the_acls_refused_is_spilled_and_delivered_once_access_works(
        broker: SecureBroker, admin: KafkaAdminClient, tmp_path: Path) -> None:
    topic = _locked_topic(admin, broker)
    spill = tmp_path / "spill"
    refused_bus = KafkaBus(broker.bootstrap, topic, security=broker.security("writer"))
    writer = BackgroundWriter(refused_bus, flush_interval_s=0.01, spill_dir=spill)
    for step in range(200):
        writer.emit("run-a" if step % 2 else "run-b", step // 2, "metric", _metric(step))
    with pytest.raises(EventsNotWritten, match=r"may not write .*it needs WRITE.*kept in .*\.spill"):
        writer.flush(BOUND_S * 3)
    writer.close()
    refused_bus.close()
    assert list(spill.glob("*.spill"))

    _grant(admin, "writer", topic, ACLOperation.WRITE)
    wait_until(lambda: _may(broker, "writer", topic, "WRITE"), "the writer may write the topic")
    with KafkaBus(broker.bootstrap, topic, security=broker.security("writer")) as bus:
        later = BackgroundWriter(bus, flush_interval_s=0.01, spill_dir=spill)  # the next job's writer
        later.flush(BOUND_S * 3)
        later.close()
    assert later.delivered_spill.records > 0 and not list(spill.glob("*.spill"))

    _grant(admin, "reader", topic, ACLOperation.READ)
    wait_until(lambda: _may(broker, "reader", topic, "READ"), "the reader may read the topic")
    codec = EventCodec()
    with KafkaBus(broker.bootstrap, topic, security=broker.security("reader")) as reader:
        def events_of(records: list[BusRecord]) -> list[Any]:
            return [event for record in records for event in codec.decode_all(record.value)]

        events = events_of(_read_until(reader, lambda got: len(events_of(got)) >= 200, "the 200 events"))
    assert sorted((e.run_uid, e.seq) for e in events) == sorted(
        ("run-a" if step % 2 else "run-b", step // 2) for step in range(200))



@pytest.mark.kafka
def test_a_sasl_login_to_a_listener_without_sasl_is_named(kafka_bootstrap: str) -> None:
    security = KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-512", "writer", Secret("a-password"))
    refused, took = _refusal(lambda: KafkaBus(kafka_bootstrap, _topic(), security=security))
    assert "takes no SASL login on this listener" in str(refused) and "\n" not in str(refused)
    assert took < BOUND_S


# -- every process through the settings ---------------------------------------------------------------

JOB = '''
from engine import NewRun, new_function


def handler(context, p1=1):
    context.log_result("accuracy", p1 * 2)
    for step in range(20):
        context.log_metric("loss", 1.0 / (step + 1), step=step)


new_function().run(NewRun(handler=handler, name="secure-run", params={"p1": 5}))
new_function().run(NewRun(handler=handler, name="secure-sweep"), hyperparams={"p1": [1, 2, 3]},
                   selector="max.accuracy")
new_function(command="dask://").run(NewRun(handler=handler, name="secure-dask-sweep"),
                                    hyperparams={"p1": [4, 6]}, selector="max.accuracy")
'''


@pytest.mark.kafka
def test_runs_and_sweeps_of_the_runner_projected_by_the_reader_over_sasl_ssl(
        broker: SecureBroker, tmp_path: Path) -> None:
    """A job process (its Dask workers too) and a reading process, each configured only by the
    RUNBUS_* settings kafka.sh writes for its user."""
    topic = _topic()
    (tmp_path / "job.py").write_text(JOB)
    job_env = {**os.environ, **broker.env("runner"), "RUNBUS_KAFKA_TOPIC": topic,
               "RUNBUS_HOME": str(tmp_path / "job-home"), "RUNBUS_PROJECTION": "inprocess",
               "RUNBUS_DASK_WORKERS": "1"}
    done = subprocess.run([sys.executable, str(tmp_path / "job.py")], env=job_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    settings = load_settings({**broker.env("reader"), "RUNBUS_KAFKA_TOPIC": topic,
                              "RUNBUS_HOME": str(tmp_path / "reader-home"), "RUNBUS_PROJECTION": "inprocess"})
    services = bootstrap(settings)
    try:
        db = services.run_db()
        runs = db.list_runs()
        assert sorted(runs.name[runs.iteration == 0]) == ["secure-dask-sweep", "secure-run", "secure-sweep"]
        assert len(runs) == 3 + 3 + 2 and set(runs.state) == {"completed"}  # with the sweeps' iterations
        best = db.sql("SELECT r.name, x.value_num FROM runs r JOIN results x USING (uid) "
                      "WHERE x.key = 'accuracy' AND r.iteration = 0")
        assert dict(zip(best.name, best.value_num, strict=True)) == {
            "secure-dask-sweep": 12, "secure-run": 10, "secure-sweep": 6}
        assert db.sql("SELECT count(*) AS n FROM metrics").n[0] == 20 * (1 + 3 + 2)
    finally:
        services.close()
