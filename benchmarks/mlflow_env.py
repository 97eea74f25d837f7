"""MLflow for the side-by-side figures: its own venv (benchmarks/.venv-mlflow, made on first use with
`python3 -m venv` + `pip install mlflow==<pin>`), and the MLflow workload run there as a subprocess.

Nothing here raises: when MLflow cannot be installed or run, `run()` returns the reason instead.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS

MLFLOW_PIN = "mlflow==3.17.2"  # the newest release whose mlflow-skinny is published for Python 3.11 here
VENV = Path(__file__).resolve().parent / ".venv-mlflow"
SCRIPT = Path(__file__).resolve().parent / "mlflow_workload.py"
STAMP = VENV / ".installed"


@dataclass
class MlflowResult:
    figures: dict[str, float] = field(default_factory=dict)
    version: str | None = None
    unavailable: str | None = None
    phases: dict[str, float] = field(default_factory=dict)  # seconds of untimed work, by what it was


def _python() -> Path:
    return VENV / "bin" / "python"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def ensure_venv(log: Any) -> str | None:
    """Create the venv and install MLflow if that was not done yet; the reason when it fails."""
    if STAMP.is_file() and STAMP.read_text().strip() == MLFLOW_PIN and _python().is_file():
        return None
    base = shutil.which("python3") or sys.executable
    print(f"mlflow: installing {MLFLOW_PIN} into {VENV} (once, about a minute)", flush=True)
    steps = [[base, "-m", "venv", "--clear", str(VENV)],
             [str(_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check", MLFLOW_PIN]]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(step[:3])}: {exc}"
        log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            return f"{' '.join(step[-2:])} failed: {_last_line(done.stderr)}"
    STAMP.write_text(MLFLOW_PIN + "\n")
    return None


def run(config: dict[str, Any], timeout_s: float = 1500) -> MlflowResult:
    """Run benchmarks/mlflow_workload.py in the MLflow venv; its stderr goes to results/mlflow.log."""
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "mlflow.log").open("w") as log:
        reason = ensure_venv(log)
        if reason:
            return MlflowResult(unavailable=reason)
        try:
            began = time.perf_counter()
            done = subprocess.run([str(_python()), str(SCRIPT), json.dumps(config)], stdout=subprocess.PIPE,
                                  stderr=log, text=True, timeout=timeout_s, cwd=RESULTS)
            ran_s = time.perf_counter() - began
        except (OSError, subprocess.TimeoutExpired) as exc:
            return MlflowResult(unavailable=f"the MLflow workload did not finish: {exc}")
    if done.returncode != 0:
        return MlflowResult(unavailable=f"the MLflow workload exited with {done.returncode} "
                                        f"(see {RESULTS / 'mlflow.log'})")
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return MlflowResult(unavailable=f"the MLflow workload printed no JSON: {_last_line(done.stdout)}")
    phases = {"start-up and exit (interpreter, imports, clean-up)": ran_s - answer["main_s"], **answer["phases"]}
    return MlflowResult(figures=answer["figures"], version=answer["version"], phases=phases)
