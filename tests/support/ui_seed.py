"""Runs for the UI tests: the seed example, its sweep, and runs that log metric curves."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from engine import NewRun, new_function
from engine.loader import load_handler

ROOT = Path(__file__).resolve().parents[2]


def curves(context: Any, lr: float = 0.1, steps: int = 6) -> None:
    """Logs loss and accuracy curves over `steps` steps, and a label that looks like HTML."""
    context.set_label("note", "<b>not bold</b>")
    for step in range(steps):
        context.log_metric("loss", 1.0 / (1 + lr * step), step=step)
        context.log_metric("accuracy", min(1.0, 0.5 + lr * step / 2), step=step)
    context.log_result("final_loss", 1.0 / (1 + lr * (steps - 1)))


def slow(context: Any, seconds: float = 6.0) -> None:
    """Stays running for `seconds`, logging a tick metric, then completes."""
    for step in range(int(seconds * 4)):
        context.log_metric("tick", step, step=step)
        time.sleep(0.25)
    context.log_result("ticks", int(seconds * 4))


def broken(context: Any) -> None:
    raise ValueError("no data in <input>")


def seed() -> dict[str, str]:
    """The seed run (name demo, p1=5), its sweep (p1 in 5, 2, 3; min.loss), two curve runs and a
    run that fails."""
    handler = load_handler(f"{ROOT}/examples/quickstart.py:handler")
    demo = new_function().run(NewRun(handler=handler, name="demo", params={"p1": 5}).set_label("type", "demo"))
    sweep = new_function().run(NewRun(handler=handler).with_hyper_params({"p1": [5, 2, 3]}, "min.loss"))
    slow_lr = new_function().run(NewRun(handler=curves, name="curves", params={"lr": 0.1}))
    fast_lr = new_function().run(NewRun(handler=curves, name="curves", params={"lr": 0.5}))
    failed = new_function().run(NewRun(handler=broken, name="broken"))
    return {"demo": demo.uid, "sweep": sweep.uid, "curves_slow": slow_lr.uid, "curves_fast": fast_lr.uid,
            "broken": failed.uid}
