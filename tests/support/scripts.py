"""Real Python scripts for tests of script-level runs: written to a folder, run with the repo importable."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_script(folder: Path, body: str, name: str = "job.py") -> Path:
    """`body` (dedented) as the script `folder/name`."""
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def script_env(**extra: str) -> dict[str, str]:
    """This process's environment with the repo on PYTHONPATH, plus `extra`."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}
