"""`serving_in_thread` says so when the service it ran does not stop: it would keep the file."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any, cast

import pytest

from projections import service as service_module
from projections.service import ProjectionService, ServiceAddress, serving_in_thread


class _DeafService:
    """Serves until released, whatever `shutdown` says (a fold stuck in a call that never returns)."""

    def __init__(self, home: Path) -> None:
        self.address = ServiceAddress.of(home)
        self.ready = threading.Event()
        self.released = threading.Event()
        self.shutdowns = 0

    def run(self, lock_timeout_s: float = 0.0) -> None:
        self.ready.set()
        self.released.wait()

    def shutdown(self) -> None:
        self.shutdowns += 1


@pytest.fixture
def deaf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(service_module, "SERVING_JOIN_S", 0.05)
    service = _DeafService(tmp_path)
    yield service
    service.released.set()


def test_a_service_that_does_not_stop_is_an_error_after_the_block(deaf: _DeafService) -> None:
    stopped_late = re.escape(f"projection service of {deaf.address.home} did not stop within 0.05s")
    with pytest.raises(RuntimeError, match=stopped_late), serving_in_thread(cast(ProjectionService, deaf)):
        pass
    assert deaf.shutdowns == 1


def test_an_error_of_the_block_is_not_replaced_by_it(deaf: _DeafService) -> None:
    with pytest.raises(KeyError, match="the block's own"), serving_in_thread(cast(ProjectionService, deaf)):
        raise KeyError("the block's own")
    assert deaf.shutdowns == 1
