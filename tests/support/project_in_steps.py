"""Run the projector in small batches, printing a line after each committed batch.

Usage: python -m tests.support.project_in_steps LOG_PATH DB_PATH BATCH_SIZE
"""

from __future__ import annotations

import sys

import duckdb

from producers.bus.embedded import EmbeddedBus
from projections import Projector

if __name__ == "__main__":
    log_path, db_path, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    con = duckdb.connect(db_path)
    projector = Projector(EmbeddedBus(log_path), con, batch_size=batch_size)
    while projector.run_once():
        print("batch", flush=True)
    print("done", flush=True)
