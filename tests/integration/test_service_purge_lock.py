"""A service waiting for its home (a follower asking a reader's service to stop, or the next
reader's service while one ends) holds the home's purge lock only for each try at the home's lock:
a purge takes it meanwhile, and then gets the home before any service does."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from filelock import FileLock

from engine.api import session
from engine.bootstrap import make_bus
from engine.projection_service import build_service
from projections.client import ServiceClient
from tests.support.polling import wait_until

_PURGE = """
import sys
from filelock import FileLock, Timeout
lock = FileLock(sys.argv[1], mode=0o600, thread_local=False)
try:
    lock.acquire(timeout=5)
except Timeout:
    print("timed out", flush=True)
    sys.exit(1)
print("held", flush=True)
sys.stdin.readline()
lock.release()
"""


def test_a_follower_waiting_for_the_home_leaves_the_purge_lock_to_a_purge(home: Path) -> None:
    settings = session().services.settings
    bus = make_bus(settings.bus_url, settings)
    follower = build_service(settings, bus, follow=True)
    address = follower.address
    kept = FileLock(str(address.lock), thread_local=False)
    kept.acquire(timeout=10)  # the home's lock, as a reader's service holds it until it has stopped
    asked = threading.Semaphore(0)
    thread = threading.Thread(target=follower.run, kwargs={"lock_timeout_s": 60, "while_waiting": asked.release},
                              daemon=True)
    thread.start()
    try:
        for _ in range(2):  # it asked twice: it is in its wait for the home
            assert asked.acquire(timeout=30), "the follower never asked the service keeping the home to stop"
        # a purge, in a process of its own (a purge and the waiting service are two processes: a
        # lock taken back at once by the service left the purge no chance there), before it stops the service
        purge = subprocess.Popen([sys.executable, "-c", _PURGE, str(address.purge)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert purge.stdout is not None and purge.stdin is not None
            assert purge.stdout.readline().strip() == "held", "the purge did not get its lock within 5 s"
            kept.release()  # the service stops for the purge
            with kept.acquire(timeout=5):  # the purge gets the home, the follower waiting for its lock
                pass
            purge.stdin.write("done\n")
            purge.stdin.flush()
            assert purge.wait(timeout=30) == 0
        finally:
            if purge.poll() is None:
                purge.kill()
                purge.wait()
        client = ServiceClient(address, session().services.bus, start=None, timeout_s=30)
        wait_until(lambda: _answers(client), "the follower serves the home once the purge is done")
        client.close()
    finally:
        if kept.is_locked:
            kept.release()
        follower.shutdown()
        thread.join(timeout=30)
        bus.close()
    assert not thread.is_alive()


def _answers(client: ServiceClient) -> bool:
    return client.running() is not None
