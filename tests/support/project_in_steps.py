"""Run the projector in small batches, printing a line after each committed batch.

Usage: python -m tests.support.project_in_steps DB_PATH BATCH_SIZE   (the bus comes from RUNBUS_*)
"""

from __future__ import annotations

import sys

import duckdb

from engine.api import session

if __name__ == "__main__":
    db_path, batch_size = sys.argv[1], int(sys.argv[2])
    projector = session().services.projector(duckdb.connect(db_path), batch_size)
    while projector.run_once(timeout=1.0):
        print("batch", flush=True)
    print("done", flush=True)
