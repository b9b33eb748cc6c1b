"""The store: the only module that talks SQL (SQLAlchemy 2.0; SQLite in WAL mode by default).

One row per series *revision* in ``series_results``: a late instance after scoring opens a new revision, so
history is kept. Alerts live in an outbox table (``alerts``), one row per (revision, channel), written in the
same transaction as the result they belong to, so a restart or an unreachable endpoint loses nothing.
Times are naive UTC datetimes. Schema changes are Alembic revisions in ``qc_daemon/migrations/versions/``
(batch mode on SQLite), applied when a :class:`Store` opens; revision 0001 is the frozen schema of release
0.1.0, whose databases (a ``schema_version`` table, no ``alembic_version``) are stamped at 0001 and upgraded.
A change to the models below needs a new revision: ``tests/test_migrations.py`` fails until it exists.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    case,
    create_engine,
    event,
    extract,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker


class SeriesStatus(enum.StrEnum):
    PENDING = "pending"  # complete, waiting for (or in) scoring; redone after a crash
    SCORED = "scored"
    SKIPPED = "skipped"  # not a 3D anatomical MR volume: reason says why
    FAILED = "failed"  # should have been scorable but something broke: reason says what


FINAL_STATUSES = (SeriesStatus.SCORED, SeriesStatus.SKIPPED, SeriesStatus.FAILED)


class AlertChannel(enum.StrEnum):
    """An outbox channel: the alert deliveries, and the results sent to PACS (qc_daemon.pacs_sender)."""

    WEBHOOK = "webhook"
    EXEC = "exec"
    PACS_REPORT = "pacs_report"  # the Enhanced SR of a scored revision
    PACS_MONTAGE = "pacs_montage"  # the Secondary Capture of its montage


ALERT_CHANNELS = (AlertChannel.WEBHOOK, AlertChannel.EXEC)
RESULT_CHANNELS = (AlertChannel.PACS_REPORT, AlertChannel.PACS_MONTAGE)


class AlertState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # will never be delivered (the peer refused it for good): last_error says why


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class SeriesResult(Base):
    __tablename__ = "series_results"
    __table_args__ = (UniqueConstraint("series_instance_uid", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    station_name: Mapped[str | None] = mapped_column(String(64), index=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(256))
    protocol_name: Mapped[str | None] = mapped_column(String(256))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    instances: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime)
    completed_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    # When the newest spooled instance arrived, when a worker took the series, when the outcome was stored:
    # waiting for the quiet period, waiting in the queue and processing can be told apart.
    last_instance_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    processing_started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    scored_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    status: Mapped[SeriesStatus] = mapped_column(Enum(SeriesStatus, native_enum=False, length=16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    score: Mapped[float | None] = mapped_column(Float)
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    scoring_time_s: Mapped[float | None] = mapped_column(Float)
    patch_scores: Mapped[list | None] = mapped_column(JSON)
    patch_origins: Mapped[list | None] = mapped_column(JSON)
    volume_shape: Mapped[list | None] = mapped_column(JSON)
    nifti_path: Mapped[str | None] = mapped_column(Text)
    below_threshold: Mapped[bool] = mapped_column(Boolean, default=False)
    # Added after the score is committed (qc_daemon/findings.py): classical IQMs (name -> number or null),
    # why each null one is null, and the absolute paths of the quality map (NIfTI) and the montage (PNG).
    iqms: Mapped[dict | None] = mapped_column(JSON)
    iqm_errors: Mapped[dict | None] = mapped_column(JSON)
    quality_map_path: Mapped[str | None] = mapped_column(Text)
    montage_path: Mapped[str | None] = mapped_column(Text)

    alerts: Mapped[list[Alert]] = relationship(back_populates="result", cascade="all, delete-orphan")

    def to_dict(self, with_patches: bool = False) -> dict:
        out = {
            "series_instance_uid": self.series_instance_uid,
            "revision": self.revision,
            "study_instance_uid": self.study_instance_uid,
            "station_name": self.station_name,
            "calling_ae": self.calling_ae,
            "modality": self.modality,
            "series_description": self.series_description,
            "protocol_name": self.protocol_name,
            "sop_class_uid": self.sop_class_uid,
            "instances": self.instances,
            "received_at": _iso(self.received_at),
            "completed_at": _iso(self.completed_at),
            "last_instance_at": _iso(self.last_instance_at),
            "processing_started_at": _iso(self.processing_started_at),
            "scored_at": _iso(self.scored_at),
            "status": self.status.value,
            "reason": self.reason,
            "score": self.score,
            "alert": self.below_threshold,
            "model_sha256": self.model_sha256,
            "scoring_time_s": self.scoring_time_s,
            "nifti_path": self.nifti_path,
            "iqms": self.iqms,
            "iqm_errors": self.iqm_errors,
            "quality_map_path": self.quality_map_path,
            "montage_path": self.montage_path,
        }
        if with_patches:
            out["volume_shape"] = self.volume_shape
            out["patch_origins"] = self.patch_origins
            out["patch_scores"] = self.patch_scores
        return out


class Alert(Base):
    __tablename__ = "alerts"
    __table_args__ = (UniqueConstraint("result_id", "channel"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("series_results.id"), index=True)
    channel: Mapped[AlertChannel] = mapped_column(Enum(AlertChannel, native_enum=False, length=16))
    state: Mapped[AlertState] = mapped_column(Enum(AlertState, native_enum=False, length=16), index=True)
    payload: Mapped[dict] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    result: Mapped[SeriesResult] = relationship(back_populates="alerts")


BUSY_TIMEOUT_S = 30.0  # how long a write waits for another connection's lock before the database error


class Store:
    """Engine and session factory for one database URL, migrated to the current schema on open."""

    def __init__(self, url: str, busy_timeout_s: float = BUSY_TIMEOUT_S):
        self.url = url
        self.engine: Engine = create_engine(url, connect_args=_connect_args(url, busy_timeout_s))
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas(busy_timeout_s))
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.revision = migrate(self.engine)

    def session(self) -> Session:
        return self.sessions()

    def close(self) -> None:
        self.engine.dispose()


def _connect_args(url: str, busy_timeout_s: float) -> dict:
    return {"timeout": busy_timeout_s, "check_same_thread": False} if url.startswith("sqlite") else {}


def _sqlite_pragmas(busy_timeout_s: float):
    def set_pragmas(dbapi_conn, _record) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.close()

    return set_pragmas


# ---- schema migrations ----------------------------------------------------------------------------------

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
RELEASE_0_1_0_REVISION = "0001"  # the schema release 0.1.0 made with its own ``schema_version`` table


class SchemaError(RuntimeError):
    """The database's schema is one this release cannot bring to its own."""


def alembic_config() -> Config:
    """Alembic's configuration, built in code: the migration scripts ship inside the package, no alembic.ini."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def database_revision(conn: Connection) -> str | None:
    """The Alembic revision recorded in the database; None for an empty database or one made by 0.1.0."""
    return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine) -> str:
    """Bring the database to the newest schema and return the revision it is at, as read back from it.

    An SQLite file that needs an upgrade is first copied beside itself (``<file>.bak-<revision>``, kept if
    present): SQLite's DDL is not transactional, so a failed upgrade can leave a half-changed file.
    """
    config = alembic_config()
    with engine.connect() as conn:
        current = database_revision(conn)
        made_by_0_1_0 = current is None and _made_by_release_0_1_0(conn)
    if made_by_0_1_0:
        current = RELEASE_0_1_0_REVISION
    if current is not None and current != head_revision():
        _backup_sqlite(engine, suffix=f".bak-{current}")
    with migration_connection(engine) as conn:
        config.attributes["connection"] = conn
        if made_by_0_1_0:
            command.stamp(config, RELEASE_0_1_0_REVISION)
        command.upgrade(config, "head")
    with engine.connect() as conn:
        return database_revision(conn)


@contextmanager
def migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction for Alembic; on SQLite with foreign keys off meanwhile and checked after.

    Batch mode rebuilds a table by copy, drop and rename, which an enforced foreign key onto it forbids; the
    pragma is ignored inside a transaction, so it is set before one begins (Alembic's batch documentation).
    """
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        try:
            with conn.begin():
                yield conn
                if sqlite and (broken := conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()):
                    raise SchemaError(f"the migration left {len(broken)} broken foreign key(s): {broken[:3]}")
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


def _made_by_release_0_1_0(conn: Connection) -> bool:
    """True for a database migrated by release 0.1.0's own list: ``schema_version`` at 1, no Alembic table."""
    if "schema_version" not in inspect(conn).get_table_names():
        return False
    version = conn.execute(text("SELECT max(version) FROM schema_version")).scalar()
    if version != 1:
        raise SchemaError(f"schema_version = {version!r}: only 1 (release 0.1.0) is known")
    return True


def _backup_sqlite(engine: Engine, suffix: str) -> None:
    if engine.dialect.name != "sqlite" or not engine.url.database or engine.url.database == ":memory:":
        return
    source = Path(engine.url.database)
    target = source.with_name(source.name + suffix)
    if target.exists():
        return  # an earlier attempt's copy is the one from before any change
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


# ---- series results ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesFacts:
    """What the spool tells about a series revision, independent of its outcome."""

    series_instance_uid: str
    study_instance_uid: str | None
    station_name: str | None
    calling_ae: str | None
    modality: str | None
    series_description: str | None
    protocol_name: str | None
    sop_class_uid: str | None
    instances: int
    received_at: dt.datetime


def latest_revision(session: Session, series_uid: str) -> SeriesResult | None:
    return session.scalars(
        select(SeriesResult)
        .where(SeriesResult.series_instance_uid == series_uid)
        .order_by(SeriesResult.revision.desc())
        .limit(1)
    ).first()


def awaits_result(session: Session, series_uid: str, spooled_instances: int) -> bool:
    """True while the spool holds instances of the series that no final result counts yet.

    That is: some are spooled and the newest revision is missing, still pending, or final for another count.
    """
    if not spooled_instances:
        return False
    latest = latest_revision(session, series_uid)
    return latest is None or latest.status not in FINAL_STATUSES or latest.instances != spooled_instances


def open_revision(session: Session, facts: SeriesFacts) -> SeriesResult:
    """The revision to (re)score these instances under.

    Reuses a PENDING revision (left by a crash mid-scoring) and otherwise opens the next one, so each series
    is recorded exactly once per revision.
    """
    latest = latest_revision(session, facts.series_instance_uid)
    now = utcnow()
    if latest is not None and latest.status is SeriesStatus.PENDING:
        row = latest
        for name, value in vars(facts).items():
            setattr(row, name, value)
        row.completed_at = now
    else:
        row = SeriesResult(
            **vars(facts),
            revision=1 if latest is None else latest.revision + 1,
            completed_at=now,
            status=SeriesStatus.PENDING,
        )
        session.add(row)
    session.flush()
    return row


def history(
    session: Session,
    below: float | None = None,
    since: dt.datetime | None = None,
    station: str | None = None,
    status: SeriesStatus | None = None,
    limit: int | None = None,
) -> Sequence[SeriesResult]:
    """Results newest first; ``below`` keeps scored series with score < below."""
    query = select(SeriesResult).order_by(SeriesResult.completed_at.desc(), SeriesResult.id.desc())
    if below is not None:
        query = query.where(SeriesResult.score.is_not(None), SeriesResult.score < below)
    if since is not None:
        query = query.where(SeriesResult.completed_at >= since)
    if station is not None:
        query = query.where(SeriesResult.station_name == station)
    if status is not None:
        query = query.where(SeriesResult.status == status)
    if limit is not None:
        query = query.limit(limit)
    return session.scalars(query).all()


def revisions(session: Session, series_uid: str) -> Sequence[SeriesResult]:
    return session.scalars(
        select(SeriesResult)
        .where(SeriesResult.series_instance_uid == series_uid)
        .order_by(SeriesResult.revision)
    ).all()


def revision_of(session: Session, series_uid: str, revision: int) -> SeriesResult | None:
    return session.scalars(
        select(SeriesResult)
        .where(SeriesResult.series_instance_uid == series_uid, SeriesResult.revision == revision)
    ).first()


def pending_results(session: Session) -> Sequence[SeriesResult]:
    return session.scalars(select(SeriesResult).where(SeriesResult.status == SeriesStatus.PENDING)).all()


# ---- alert outbox -----------------------------------------------------------------------------------------


def enqueue_alert(session: Session, result: SeriesResult, channel: AlertChannel, payload: dict) -> Alert:
    now = utcnow()
    alert = Alert(
        result=result,
        channel=channel,
        state=AlertState.PENDING,
        payload=payload,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    session.add(alert)
    return alert


def due_alerts(session: Session, channel: AlertChannel, now: dt.datetime, limit: int = 50) -> Sequence[Alert]:
    return session.scalars(
        select(Alert)
        .where(Alert.channel == channel, Alert.state == AlertState.PENDING, Alert.next_attempt_at <= now)
        .order_by(Alert.id)
        .limit(limit)
    ).all()


def claim_alert(session: Session, alert_id: int, now: dt.datetime, lease_s: float) -> bool:
    """Take a due alert for one delivery attempt: its next attempt moves ``lease_s`` ahead in one conditional
    UPDATE, so two dispatchers (threads or daemons sharing the database) never deliver it at once."""
    claimed = session.execute(
        update(Alert)
        .where(Alert.id == alert_id, Alert.state == AlertState.PENDING, Alert.next_attempt_at <= now)
        .values(next_attempt_at=now + dt.timedelta(seconds=lease_s))
    ).rowcount
    session.commit()
    return claimed == 1


def alerts_for(
    session: Session, result_id: int, channels: Sequence[AlertChannel] | None = None
) -> Sequence[Alert]:
    """The outbox rows of one revision (only those of ``channels`` when given), oldest first."""
    query = select(Alert).where(Alert.result_id == result_id)
    if channels is not None:
        query = query.where(Alert.channel.in_(channels))
    return session.scalars(query.order_by(Alert.id)).all()


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="milliseconds") + "Z"


def dump_json(rows: Sequence[SeriesResult]) -> str:
    return json.dumps([row.to_dict() for row in rows], indent=2)


def ping(store: Store) -> None:
    with store.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


# ---- read-only views for the web page and the metrics (qc_daemon.web, qc_daemon.metrics) -------------------


def changed_at(row: SeriesResult) -> dt.datetime:
    """When the row last changed state: opened (pending) at ``completed_at``, finished at ``scored_at``."""
    return row.scored_at or row.completed_at


def results_changed_since(session: Session, since: dt.datetime, limit: int = 500) -> Sequence[SeriesResult]:
    """Revisions opened or finished at or after ``since``, oldest change first (the live list's feed)."""
    changed = func.coalesce(SeriesResult.scored_at, SeriesResult.completed_at)
    return session.scalars(
        select(SeriesResult).where(changed >= since).order_by(changed, SeriesResult.id).limit(limit)
    ).all()


@dataclass(frozen=True)
class ResultTotals:
    """Counts over every result in the store (results are never deleted, so they only grow)."""

    series_by_status: dict[str, int]  # final revisions by status
    alerts_raised: int  # scored revisions below the threshold
    alerts_pending: int  # alert deliveries (webhook, exec) not yet delivered
    results_pending: int  # results to PACS (SR, SC) not yet delivered
    results_failed: int  # results to PACS that never will be


def result_totals(session: Session) -> ResultTotals:
    by_status = dict(
        session.execute(
            select(SeriesResult.status, func.count())
            .where(SeriesResult.status.in_(FINAL_STATUSES))
            .group_by(SeriesResult.status)
        ).all()
    )
    raised = session.scalar(select(func.count()).where(SeriesResult.below_threshold.is_(True))) or 0
    counts = session.execute(
        select(Alert.channel, Alert.state, func.count())
        .where(Alert.state.in_((AlertState.PENDING, AlertState.FAILED)))
        .group_by(Alert.channel, Alert.state)
    ).all()

    def outbox(channels: tuple[AlertChannel, ...], state: AlertState) -> int:
        return sum(int(n) for channel, row_state, n in counts if channel in channels and row_state is state)

    return ResultTotals(
        series_by_status={status.value: int(by_status.get(status, 0)) for status in FINAL_STATUSES},
        alerts_raised=int(raised),
        alerts_pending=outbox(ALERT_CHANNELS, AlertState.PENDING),
        results_pending=outbox(RESULT_CHANNELS, AlertState.PENDING),
        results_failed=outbox(RESULT_CHANNELS, AlertState.FAILED),
    )


class Latency(enum.StrEnum):
    SCORING = "scoring"  # scoring_time_s: volume preprocessing and inference
    END_TO_END = "end_to_end"  # newest instance in the spool -> outcome stored


@dataclass(frozen=True)
class LatencyCounts:
    """A cumulative histogram: ``buckets[i]`` results took at most ``bounds[i]`` seconds."""

    bounds: tuple[float, ...]
    buckets: tuple[int, ...]
    count: int
    sum_s: float


def latency_counts(session: Session, latency: Latency, bounds: Sequence[float]) -> LatencyCounts:
    """One aggregate query over every final result that has the latency; no rows leave the database."""
    if latency is Latency.SCORING:
        seconds = SeriesResult.scoring_time_s
    elif session.get_bind().dialect.name == "sqlite":
        seconds = (func.julianday(SeriesResult.scored_at) - func.julianday(SeriesResult.last_instance_at)) * 86400.0
    else:
        seconds = extract("epoch", SeriesResult.scored_at - SeriesResult.last_instance_at)
    columns = [func.count(seconds), func.coalesce(func.sum(seconds), 0.0)]
    columns += [func.coalesce(func.sum(case((seconds <= bound, 1), else_=0)), 0) for bound in bounds]
    count, total, *buckets = session.execute(
        select(*columns).where(SeriesResult.status.in_(FINAL_STATUSES), seconds.is_not(None))
    ).one()
    return LatencyCounts(tuple(bounds), tuple(int(b) for b in buckets), int(count), float(total))


def station_names(session: Session, since: dt.datetime | None = None) -> list[str]:
    """The stations that sent series (since ``since``), for the trends page's filter."""
    query = select(SeriesResult.station_name).where(SeriesResult.station_name.is_not(None)).distinct()
    if since is not None:
        query = query.where(SeriesResult.completed_at >= since)
    return sorted(session.scalars(query).all())
