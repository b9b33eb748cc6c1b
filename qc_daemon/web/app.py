"""Routes of the web view: ``/`` (now, live), ``/events`` (server-sent events), ``/series/{uid}`` with each
revision's montage and quality map files, ``/trends``, ``/health`` and ``/metrics``. GET only; every page is
complete as served, the script only keeps ``/`` live."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from qc_daemon.iqms import IQM_NAMES
from qc_daemon.metrics import DaemonMetrics
from qc_daemon.settings import HttpSettings
from qc_daemon.status import DaemonStatus
from qc_daemon.store import (
    ALERT_CHANNELS,
    RESULT_CHANNELS,
    SeriesStatus,
    Store,
    alerts_for,
    history,
    pending_results,
    ping,
    revision_of,
    revisions,
    station_names,
    utcnow,
)
from qc_daemon.web.charts import Sample, score_chart, trend_chart, value_range
from qc_daemon.web.feed import LOOKBACK, LiveFeed, row_view
from qc_daemon.web.security import AccessGuard, SecurityHeaders

HERE = Path(__file__).parent
LATEST_ROWS = 50
TREND_ROWS = 5000
HEARTBEAT_S = 15.0
SCORE = "score"
FINDING_FILES = {  # URL name -> (the row's column, media type, content disposition)
    "montage.png": ("montage_path", "image/png", "inline"),
    "quality_map.nii.gz": ("quality_map_path", "application/gzip", "attachment"),
}


@dataclass(frozen=True)
class WebView:
    """What the web view may read: the store, the daemon's status snapshot and metrics, its stop event, and the
    results folder (montages and quality maps), the only place it serves files from besides its statics."""

    store: Store
    status: Callable[[], DaemonStatus]
    metrics: DaemonMetrics
    stopping: threading.Event
    results_dir: Path
    poll_s: float = 0.25  # the live list sees a stored row within this (plus a query)


def create_app(view: WebView, settings: HttpSettings) -> Starlette:
    templates = Jinja2Templates(directory=HERE / "templates", context_processors=[_nonce])

    def now_page(request: Request) -> Response:
        status = view.status()
        with view.store.session() as session:
            latest = [row_view(r) for r in history(session, limit=LATEST_ROWS)]
            scoring = [row_view(r) for r in pending_results(session)]
        alerts = [row for row in latest if row["alert"]][:5]
        return templates.TemplateResponse(request, "now.html", {
            "status": status, "latest": latest, "scoring": scoring, "alerts": alerts,
            "cursor": (utcnow() - LOOKBACK).isoformat(timespec="milliseconds") + "Z",
        })

    async def events(request: Request) -> Response:
        since = _parse_time(request.headers.get("last-event-id") or request.query_params.get("since") or "")
        feed = LiveFeed(view.store, since or utcnow() - LOOKBACK)
        return StreamingResponse(_event_stream(view, feed), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    def series_page(request: Request) -> Response:
        uid = request.path_params["uid"]
        with view.store.session() as session:
            rows = revisions(session, uid)
            if not rows:
                raise HTTPException(404, "no such series")
            shown = [{**row_view(row), **_finding_urls(view.results_dir, row),
                      "patches": _patch_summary(row.patch_scores),
                      "iqm_rows": _iqm_rows(row.iqms, row.iqm_errors),
                      "alerts": [_alert_view(a) for a in alerts_for(session, row.id, ALERT_CHANNELS)],
                      "pacs": [_alert_view(a) for a in alerts_for(session, row.id, RESULT_CHANNELS)]} for row in rows]
        return templates.TemplateResponse(request, "series.html", {
            "uid": uid, "revisions": shown, "threshold": view.status().threshold})

    def finding_file(request: Request) -> Response:
        uid, revision, name = (request.path_params[k] for k in ("uid", "revision", "name"))
        if name not in FINDING_FILES:
            raise HTTPException(404, f"no file {name!r}: expected one of {', '.join(FINDING_FILES)}")
        column, media_type, disposition = FINDING_FILES[name]
        with view.store.session() as session:
            row = revision_of(session, uid, revision)
            recorded = getattr(row, column) if row is not None else None
        path = _inside(view.results_dir, recorded)
        if path is None:
            raise HTTPException(404, f"no {name} for this revision (not made, or removed by retention)")
        return FileResponse(path, media_type=media_type, filename=f"{uid}_r{revision}_{name}",
                            content_disposition_type=disposition)

    def trends_page(request: Request) -> Response:
        params = request.query_params
        metric = params.get("metric") or SCORE
        if metric != SCORE and metric not in IQM_NAMES:
            raise HTTPException(400, f"metric={metric!r}: expected {SCORE} or an IQM: {', '.join(IQM_NAMES)}")
        since_text = params.get("since") or "30d"
        since = _parse_since(since_text)
        station = params.get("station") or None
        below = _parse_float(params.get("below"))
        threshold = view.status().threshold
        with view.store.session() as session:
            rows = history(session, since=since, station=station, below=below, status=SeriesStatus.SCORED,
                           limit=TREND_ROWS)
            stations = station_names(session, since)
        end = utcnow()
        measured = [(r, _metric_value(r, metric)) for r in rows]
        measured = [(r, value) for r, value in measured if value is not None]
        charts = []
        for title, key in (("by station", lambda r: r.station_name or "(no station)"),
                           ("by series description", lambda r: r.series_description or "(no description)")):
            samples = [Sample(key(r), r.scored_at or r.completed_at, value, r.series_description or "",
                              f"/series/{r.series_instance_uid}", r.below_threshold) for r, value in measured]
            if metric == SCORE:
                charts.append(score_chart(f"Score {title}", samples, threshold, since, end))
            else:
                charts.append(trend_chart(f"{metric} {title}", samples, since, end, value_range(samples)))
        return templates.TemplateResponse(request, "trends.html", {
            "charts": charts, "since": since_text, "station": station or "", "below": params.get("below") or "",
            "stations": stations, "count": len(rows), "plotted": len(measured), "threshold": threshold,
            "limit": TREND_ROWS, "metric": metric, "metrics": (SCORE, *IQM_NAMES)})

    def health(request: Request) -> Response:
        status = view.status()
        checks = {"listener": status.listener_up, "model": status.model_loaded, "disk": status.disk_ok}
        try:
            ping(view.store)
            database = True
        except SQLAlchemyError as exc:
            view.store.availability.failed(exc, "health")  # logged once per outage, not per probe
            database = False
        else:
            view.store.availability.answered()
        failing = [name for name, ok in checks.items() if not ok]
        body = {
            # 503 only when instances cannot be accepted; without the database the spool still holds the work
            "status": "failing" if failing else ("ok" if database else "degraded"),
            "checks": {name: "ok" if ok else "failing" for name, ok in {**checks, "database": database}.items()},
            "failing": failing + ([] if database else ["database"]),
            "free_disk_mb": round(status.free_disk_mb, 1),
            "min_free_mb": status.min_free_mb,
            "model_sha256": status.model_sha256,
        }
        return JSONResponse(body, status_code=503 if failing else 200, headers={"Cache-Control": "no-store"})

    def metrics(request: Request) -> Response:
        return Response(view.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(routes=[
        Route("/", now_page, methods=["GET"]),
        Route("/events", events, methods=["GET"]),
        Route("/series/{uid}", series_page, methods=["GET"]),
        Route("/series/{uid}/{revision:int}/{name:str}", finding_file, methods=["GET"]),
        Route("/trends", trends_page, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ])
    return SecurityHeaders(AccessGuard(app, settings))


async def _event_stream(view: WebView, feed: LiveFeed) -> AsyncIterator[str]:
    """``result`` events (one per new row state, ``id:`` its time), ``status`` events when the activity changes,
    heartbeat comments; ends when the daemon stops. A gone client shows only as a failed send."""
    yield "retry: 2000\n\n"
    last_status, last_sent = None, time.monotonic()
    while not view.stopping.is_set():
        try:
            rows = await anyio.to_thread.run_sync(feed.poll)
        except SQLAlchemyError as exc:
            view.store.availability.failed(exc, "live_feed")  # logged once per outage, not per poll
            rows = []
        for row in rows:
            yield f"id: {row['changed_at']}\nevent: result\ndata: {json.dumps(row)}\n\n"
            last_sent = time.monotonic()
        status = _status_view(view.status())
        if status != last_status:
            yield f"event: status\ndata: {json.dumps(status)}\n\n"
            last_status, last_sent = status, time.monotonic()
        if time.monotonic() - last_sent > HEARTBEAT_S:
            yield ": heartbeat\n\n"
            last_sent = time.monotonic()
        await anyio.sleep(view.poll_s)


def _status_view(status: DaemonStatus) -> dict:
    shown = asdict(status)
    shown["free_disk_mb"] = round(status.free_disk_mb)
    return shown


def _alert_view(alert) -> dict:
    """One outbox row: an alert delivery, or a result sent to PACS (with the SOP Instance UID it carries)."""
    return {"channel": alert.channel.value, "state": alert.state.value, "attempts": alert.attempts,
            "last_error": alert.last_error, "created_at": alert.created_at, "delivered_at": alert.delivered_at,
            "sop_instance_uid": (alert.payload or {}).get("sop_instance_uid")}


def _finding_urls(results_dir: Path, row) -> dict:
    """No link to a montage or quality map this daemon cannot serve: removed by retention, or written by another
    node sharing the database (the files stay on the node that recorded the revision)."""
    return {key: None for key, column in (("montage_url", "montage_path"), ("quality_map_url", "quality_map_path"))
            if _inside(results_dir, getattr(row, column)) is None}


def _inside(folder: Path, recorded: str | None) -> Path | None:
    """The recorded file if it exists and, links resolved, lies inside ``folder``; None otherwise. A row's path
    is data: the web view never serves a file outside the daemon's results folder."""
    if not recorded:
        return None
    path = Path(recorded).resolve()
    if not path.is_relative_to(folder.resolve()) or not path.is_file():
        return None
    return path


def _metric_value(row, metric: str) -> float | None:
    if metric == SCORE:
        return row.score
    value = (row.iqms or {}).get(metric)
    return float(value) if isinstance(value, int | float) else None


def _iqm_rows(iqms: dict | None, errors: dict | None) -> list[tuple[str, float | None, str]]:
    """(name, value, why it is missing) per IQM; an error for ``all`` (findings failed) explains every row."""
    iqms, errors = iqms or {}, errors or {}
    if not iqms and not errors:
        return []
    names = [*IQM_NAMES, *(n for n in iqms if n not in IQM_NAMES)]
    return [(name, iqms.get(name), errors.get(name) or errors.get("all") or "") for name in names]


def _patch_summary(scores: list | None) -> dict | None:
    if not scores:
        return None
    ordered = sorted(scores)
    return {"count": len(scores), "min": ordered[0], "median": ordered[len(ordered) // 2], "max": ordered[-1],
            "bars": [(i, max(0.0, min(1.0, s))) for i, s in enumerate(scores)]}


def _nonce(request: Request) -> dict:
    return {"csp_nonce": request.state.csp_nonce}


def _parse_time(text: str) -> dt.datetime | None:
    try:
        value = dt.datetime.fromisoformat(text.removesuffix("Z"))
    except ValueError:
        return None
    return value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value


def _parse_since(text: str) -> dt.datetime:
    """``30m``, ``24h``, ``7d`` ago, or an ISO date/time (as ``history --since``)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([mhd])", text.strip())
    if match:
        unit = {"m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return utcnow() - dt.timedelta(**{unit: float(match.group(1))})
    value = _parse_time(text.strip())
    if value is None:
        raise HTTPException(400, f"since={text!r}: expected e.g. 24h, 7d or an ISO date/time")
    return value


def _parse_float(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise HTTPException(400, f"below={text!r}: expected a number") from None
