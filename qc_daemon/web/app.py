"""Routes of the web view: ``/`` (now, live), ``/events`` (server-sent events), ``/series/{uid}``, ``/trends``,
``/health`` and ``/metrics``. GET only; every page is complete as served, the script only keeps ``/`` live."""

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
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from qc_daemon.logs import get_logger
from qc_daemon.metrics import DaemonMetrics
from qc_daemon.settings import HttpSettings
from qc_daemon.status import DaemonStatus
from qc_daemon.store import (
    SeriesStatus,
    Store,
    alerts_for,
    history,
    pending_results,
    ping,
    revisions,
    station_names,
    utcnow,
)
from qc_daemon.web.charts import Sample, score_chart
from qc_daemon.web.feed import LOOKBACK, LiveFeed, row_view
from qc_daemon.web.security import AccessGuard, SecurityHeaders

log = get_logger(__name__)
HERE = Path(__file__).parent
LATEST_ROWS = 50
TREND_ROWS = 5000
HEARTBEAT_S = 15.0


@dataclass(frozen=True)
class WebView:
    """What the web view may read: the store, the daemon's status snapshot and metrics, and its stop event."""

    store: Store
    status: Callable[[], DaemonStatus]
    metrics: DaemonMetrics
    stopping: threading.Event
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
            shown = [{**row_view(row), "patches": _patch_summary(row.patch_scores),
                      "iqms": getattr(row, "iqms", None),
                      "alerts": [_alert_view(a) for a in alerts_for(session, row.id)]} for row in rows]
        return templates.TemplateResponse(request, "series.html", {
            "uid": uid, "revisions": shown, "threshold": view.status().threshold})

    def trends_page(request: Request) -> Response:
        params = request.query_params
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
        charts = []
        for title, key in (("by station", lambda r: r.station_name or "(no station)"),
                           ("by series description", lambda r: r.series_description or "(no description)")):
            samples = [Sample(key(r), r.scored_at or r.completed_at, r.score, r.series_description or "",
                              f"/series/{r.series_instance_uid}", r.below_threshold) for r in rows]
            charts.append(score_chart(f"Score {title}", samples, threshold, since, end))
        return templates.TemplateResponse(request, "trends.html", {
            "charts": charts, "since": since_text, "station": station or "", "below": params.get("below") or "",
            "stations": stations, "count": len(rows), "threshold": threshold, "limit": TREND_ROWS})

    def health(request: Request) -> Response:
        status = view.status()
        checks = {"listener": status.listener_up, "model": status.model_loaded, "disk": status.disk_ok}
        try:
            ping(view.store)
            database = True
        except SQLAlchemyError as exc:
            log.warning("health_database_unavailable", error=str(exc)[:200])
            database = False
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
            log.warning("live_feed_store_unavailable", error=str(exc)[:200])
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
    return {"channel": alert.channel.value, "state": alert.state.value, "attempts": alert.attempts,
            "last_error": alert.last_error, "created_at": alert.created_at, "delivered_at": alert.delivered_at}


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
