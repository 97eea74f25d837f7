"""From data views to template contexts: charts drawn, artifact previews and links made. Shared by
the web pages (images served by URL) and the report (images inlined as data: URIs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from markupsafe import Markup

from engine.ui.charts import line_chart, parallel_coordinates_svg
from engine.ui.data import CompareView, RunView, SweepView
from engine.ui.pages import ServerLinks
from engine.ui.previews import INLINE_IMAGE_BYTES, body_path, data_uri, media_type, preview

INLINE_DOWNLOAD_BYTES = 256_000   # smaller artifacts are embedded in a report as downloadable data: URIs


def run_context(view: RunView, store_root: str | Path, links: ServerLinks, inline: bool = False) -> dict[str, Any]:
    """Context of `_run_body.html`: the view, one chart per metric key, previews, download links."""
    charts = [(key, Markup(line_chart(key, {view.run["name"]: series})), view.metric_points[key])
              for key, series in view.metrics.items()]
    previews, download = {}, {}
    for artifact in view.artifacts:
        if inline:
            previews[artifact["key"]] = preview(artifact, store_root, _inline_image)
            path = body_path(artifact, store_root)
            small = path is not None and path.stat().st_size <= INLINE_DOWNLOAD_BYTES
            download[artifact["key"]] = data_uri(path, media_type(artifact)) if small and path else ""
        else:
            previews[artifact["key"]] = preview(
                artifact, store_root, lambda row, _path: links.artifact(row["uid"], row["key"], part=row.get("part")))
            download[artifact["key"]] = links.artifact(artifact["uid"], artifact["key"], download=True)
    return {"view": view, "charts": charts, "previews": previews, "download": download, "links": links}


def _inline_image(row: dict[str, Any], path: Path) -> str:
    if path.stat().st_size > INLINE_IMAGE_BYTES:
        return ""
    return data_uri(path, media_type(row))


def sweep_context(sweep: SweepView, links: ServerLinks) -> dict[str, Any]:
    """Context of `_sweep_body.html`: the iteration table and the parallel-coordinates chart."""
    parallel = Markup(parallel_coordinates_svg(sweep.table, sweep.best, f"sweep {sweep.parent['name']}")) \
        if len(sweep.table) else None
    return {"sweep": sweep, "parallel": parallel, "links": links}


def compare_charts(view: CompareView) -> list[tuple[str, Markup, int]]:
    """One chart per metric key with every compared run's curve on it."""
    return [(key, Markup(line_chart(key, series)), len(series)) for key, series in sorted(view.charts.items())]
