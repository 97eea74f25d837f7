from __future__ import annotations

from pathlib import Path

import pytest

from engine.bootstrap import make_bus
from engine.settings import SettingsError, load_settings


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
