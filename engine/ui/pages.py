"""HTML rendering: the Jinja2 environment (autoescaped), value formatting and link styles."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from functools import cache
from typing import Any
from urllib.parse import quote, urlencode

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape


def fmt_value(value: Any) -> str:
    """A param/result/cell value as text: numbers to 6 significant digits, JSON for the rest."""
    if value is None or value is pd.NaT:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, (datetime, pd.Timestamp)):
        return fmt_time(value)
    if hasattr(value, "item"):  # numpy scalar
        return fmt_value(value.item())
    return json.dumps(value, default=str, separators=(", ", ": "))


def fmt_time(value: Any) -> str:
    if value is None or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return ""
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC")
    return stamp.strftime("%Y-%m-%d %H:%M:%S")


def fmt_duration(seconds: Any) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return ""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.2f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"


def run_duration(row: dict[str, Any]) -> str:
    """The recorded duration, or for a running run the time since it started."""
    if row.get("state") == "running" and row.get("started_at") is not None and row["started_at"] is not pd.NaT:
        started = pd.Timestamp(row["started_at"])
        now = datetime.now(timezone.utc) if started.tzinfo else datetime.now()
        return fmt_duration((now - started).total_seconds())
    return fmt_duration(row.get("duration_s"))


def fmt_size(size: Any) -> str:
    if size is None or (isinstance(size, float) and math.isnan(size)):
        return ""
    size = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


class ServerLinks:
    """Links between the pages of the running UI."""

    report = False

    def run(self, uid: str) -> str:
        return f"/runs/{quote(uid)}"

    def sweep(self, uid: str) -> str:
        return f"/sweeps/{quote(uid)}"

    def artifact(self, uid: str, key: str, download: bool = False, part: str | None = None) -> str:
        """An artifact's body, or (`part`) the companion image its meta names."""
        query = urlencode([*([("part", part)] if part else []), *([("download", "1")] if download else [])])
        return f"/artifacts/{quote(uid)}/{quote(key)}" + (f"?{query}" if query else "")

    def compare(self, uids: list[str]) -> str:
        return "/compare?" + urlencode([("uid", u) for u in uids])

    def runs(self, **query: str) -> str:
        return "/runs" + ("?" + urlencode(query) if query else "")


class ReportLinks(ServerLinks):
    """Links inside one self-contained report file: anchors to its own sections."""

    report = True

    def __init__(self, included: set[str]) -> None:
        self.included = included

    def run(self, uid: str) -> str:
        return f"#run-{uid}" if uid in self.included else ""

    def sweep(self, uid: str) -> str:
        return f"#sweep-{uid}" if uid in self.included else ""


@cache
def environment() -> Environment:
    env = Environment(loader=PackageLoader("engine.ui", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(value=fmt_value, time=fmt_time, duration=fmt_duration, size=fmt_size,
                       short=lambda uid: str(uid or "")[:8], run_duration=run_duration)
    return env


def render(template: str, **context: Any) -> str:
    """Render a template; every value is HTML-escaped unless it is a chart's SVG (Markup)."""
    return environment().get_template(template).render(**context)
