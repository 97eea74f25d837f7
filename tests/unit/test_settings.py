from __future__ import annotations

from pathlib import Path

import pytest

from engine.bootstrap import make_bus
from engine.settings import Settings, SettingsError, load_settings


def test_defaults_put_everything_under_dot_runbus_in_the_current_folder() -> None:
    settings = load_settings({})
    assert settings.home == Path(".runbus").resolve()
    assert settings.bus_url == "embedded"
    assert settings.db_path.parent == settings.home and settings.log_path.parent == settings.home


@pytest.mark.parametrize(("env", "message"), [
    ({"RUNBUS_DB_TIMEOUT": "0"}, "RUNBUS_DB_TIMEOUT='0' must be more than 0"),
    ({"RUNBUS_FLUSH_INTERVAL": "soon"}, "RUNBUS_FLUSH_INTERVAL='soon' is not a float"),
    ({"RUNBUS_KAFKA_PARTITIONS": "2.5"}, "RUNBUS_KAFKA_PARTITIONS='2.5' is not a int"),
    ({"RUNBUS_DB_LINGER": "-1"}, "RUNBUS_DB_LINGER='-1' must be at least 0"),
    ({"RUNBUS_HEARTBEAT_INTERVAL": "nan"}, "RUNBUS_HEARTBEAT_INTERVAL='nan' must be a finite number"),
    ({"RUNBUS_HEARTBEAT_INTERVAL": "inf"}, "RUNBUS_HEARTBEAT_INTERVAL='inf' must be a finite number"),
])
def test_a_bad_setting_names_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        load_settings(env)


def test_an_unknown_bus_url_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="RUNBUS_BUS='redis://x' is not a bus URL"):
        make_bus("redis://x", load_settings({"RUNBUS_HOME": str(tmp_path)}))


PASSWORD = "Hunter2-not-shown"


@pytest.mark.parametrize("url", [f"kafka://alice:{PASSWORD}@127.0.0.1:9", f"kafkaa://alice:{PASSWORD}@broker",
                                 f"kafka://alice:{PASSWORD}/x@127.0.0.1:9,127.0.0.1:10"])
def test_a_kafka_url_with_a_password_is_refused_without_showing_it(url: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"RUNBUS_BUS='kafkaa?://alice:\*\*\*@.*RUNBUS_KAFKA_PASSWORD") as refused:
        load_settings({"RUNBUS_HOME": str(tmp_path), "RUNBUS_BUS": url})
    assert PASSWORD not in str(refused.value) and PASSWORD not in repr(refused.value)


def test_a_kafka_bus_given_a_login_in_its_address_refuses_it_without_showing_the_password(tmp_path: Path) -> None:
    from producers.bus.base import BusError

    settings = load_settings({"RUNBUS_HOME": str(tmp_path)})
    # the broker at port 9 cannot be reached: the message must not quote the address as given either
    with pytest.raises(BusError, match=r"kafka://alice:\*\*\*@127.0.0.1:9 carries a login") as refused:
        make_bus(f"kafka://alice:{PASSWORD}@127.0.0.1:9", settings)
    assert PASSWORD not in str(refused.value) and PASSWORD not in repr(refused.value)


def test_no_repr_of_settings_shows_a_password(tmp_path: Path) -> None:
    from producers.bus.kafka_security import KafkaSecurity, Secret

    security = KafkaSecurity(protocol="SASL_PLAINTEXT", mechanism="PLAIN", user="alice",
                             password=Secret(PASSWORD + "-sasl"))
    settings = Settings(home=tmp_path, bus_url=f"kafka://alice:{PASSWORD}@127.0.0.1:9", kafka_security=security)
    shown = repr(settings)
    assert PASSWORD not in shown and "alice:***@127.0.0.1:9" in shown and "Secret(from a value)" in shown
    assert shown.startswith("Settings(home=") and "db_timeout_s=60.0" in shown


def test_a_bus_path_holding_an_at_sign_is_not_taken_for_a_login(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/at@sign/log.sqlite"
    assert load_settings({"RUNBUS_HOME": str(tmp_path), "RUNBUS_BUS": url}).bus_url == url


def test_an_unknown_bus_url_given_as_an_address_shows_no_password(tmp_path: Path) -> None:
    """`runbus push --to URL` builds a bus from a URL that no setting checked."""
    with pytest.raises(SettingsError, match="is not a bus URL") as refused:
        make_bus(f"redis://alice:{PASSWORD}@cache:6379", load_settings({"RUNBUS_HOME": str(tmp_path)}))
    assert PASSWORD not in str(refused.value) and "alice:***@" in str(refused.value)


@pytest.mark.parametrize("password", ["pa ss", "p\tw", "a'b\"c", "x@y z"])
def test_a_password_of_any_characters_is_never_shown(password: str, tmp_path: Path) -> None:
    refusals = []
    for url in (f"kafka://alice:{password}@127.0.0.1:9", f"redis://alice:{password}@cache:6379/0"):
        with pytest.raises(SettingsError) as refused:
            load_settings({"RUNBUS_HOME": str(tmp_path), "RUNBUS_BUS": url})
        refusals.append(refused.value)
    with pytest.raises(SettingsError) as refused:  # runbus push --to: no setting checked it
        make_bus(f"redis://alice:{password}@cache:6379/0", load_settings({"RUNBUS_HOME": str(tmp_path)}))
    for error in [*refusals, refused.value]:
        assert password not in str(error) and "alice:***@" in str(error)
