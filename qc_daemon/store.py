"""The store: the only module that talks SQL (SQLAlchemy 2.0; SQLite in WAL mode by default, PostgreSQL through
psycopg 3 for several daemons sharing one history).

One row per series *revision* in ``series_results``: a late instance after scoring opens a new revision, so
history is kept. Alerts live in an outbox table (``alerts``), one row per (revision, channel), written in the
same transaction as the result they belong to, so a restart or an unreachable endpoint loses nothing.
Times are naive UTC datetimes. Schema changes are Alembic revisions in ``qc_daemon/migrations/versions/``
(batch mode on SQLite), applied when a :class:`Store` opens; revision 0001 is the frozen schema of release
0.1.0, whose databases (a ``schema_version`` table, no ``alembic_version``) are stamped at 0001 and upgraded.
A change to the models below needs a new revision: ``tests/test_migrations.py`` fails until it exists.

Several daemons (nodes) may share one PostgreSQL database: each row names the node that recorded it, a revision
is recorded by one node only (the same instances reaching a second node are a duplicate, see
:func:`open_revision`), and an alert is claimed by one dispatcher at a time (:func:`claim_alert`).
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import sqlite3
import threading
import time
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
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, InterfaceError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from qc_daemon.logs import get_logger

log = get_logger(__name__)


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
    # ``score`` is the lower of the model's (``model_score``) and the N/2 ghost check's (qc_daemon/ghost_check.py):
    # the measured ghost-to-signal ratio and the voxel axis it lies along. Null before revision 0005, and for the
    # ghost when scoring.ghost_check is off or there is no room beside the head to measure one.
    model_score: Mapped[float | None] = mapped_column(Float)
    ghost_ratio: Mapped[float | None] = mapped_column(Float)
    ghost_axis: Mapped[int | None] = mapped_column(Integer)
    # The spike check (qc_daemon/spike_check.py): a k-space spike's stripe amplitude, fraction of the head's p99;
    # null when none was found (or before revision 0006, or with scoring.spike_check off).
    spike_amplitude: Mapped[float | None] = mapped_column(Float)
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
    # The daemon that recorded the revision (``storage.node_name``); null for rows from before revision 0004.
    node_name: Mapped[str | None] = mapped_column(String(128))

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
            "model_score": self.model_score,
            "ghost_ratio": self.ghost_ratio,
            "ghost_axis": self.ghost_axis,
            "spike_amplitude": self.spike_amplitude,
            "model_sha256": self.model_sha256,
            "scoring_time_s": self.scoring_time_s,
            "nifti_path": self.nifti_path,
            "iqms": self.iqms,
            "iqm_errors": self.iqm_errors,
            "quality_map_path": self.quality_map_path,
            "montage_path": self.montage_path,
            "node_name": self.node_name,
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


BUSY_TIMEOUT_S = 30.0  # how long a statement waits for another connection's lock before the database error
CONNECT_TIMEOUT_S = 10  # PostgreSQL: how long opening a connection may take (libpq counts whole seconds)
POOL_SIZE = 5  # connections kept open; a daemon passes its thread count (Store(pool_size=...))
POOL_OVERFLOW = 10  # more, opened for a burst (web requests) and closed again


class StoreUnavailable(RuntimeError):
    """The database cannot be reached or refuses us (server down, wrong credentials, no driver installed);
    the message names the URL without its password."""


class Store:
    """Engine and session factory for one database URL, migrated to the current schema on open.

    SQLite: a file in WAL mode, writers wait up to ``busy_timeout_s`` for the lock. PostgreSQL (``postgresql://``
    or ``postgresql+psycopg://``, psycopg 3 from the ``postgres`` extra): a pool of ``pool_size`` connections (the
    daemon's threads that use the store) plus :data:`POOL_OVERFLOW`, each checked before use (a restarted server
    costs no failed query), a connect timeout and a ``statement_timeout`` of ``busy_timeout_s``.
    Raises :class:`StoreUnavailable` when the database cannot be opened.
    """

    def __init__(self, url: str, busy_timeout_s: float = BUSY_TIMEOUT_S, pool_size: int = POOL_SIZE):
        self.url = url
        parsed = database_url(url)
        self.shown_url = parsed.render_as_string(hide_password=True)  # for logs and errors
        try:
            self.engine: Engine = create_engine(parsed, **_engine_args(parsed, busy_timeout_s, pool_size))
        except (ModuleNotFoundError, NoSuchModuleError) as exc:
            raise StoreUnavailable(
                f"no driver for {self.shown_url}: {exc} (PostgreSQL: pip install 'qc-daemon[postgres]')"
            ) from exc
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas(busy_timeout_s))
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.availability = Availability(self.shown_url)
        try:
            self.revision = migrate(self.engine)
        except (OperationalError, InterfaceError) as exc:  # not reached, refused, timed out; not a schema error
            self.engine.dispose()
            raise StoreUnavailable(f"cannot open the database {self.shown_url}: {error_line(exc)}") from exc

    def session(self) -> Session:
        return self.sessions()

    def close(self) -> None:
        self.engine.dispose()


def database_url(url: str) -> URL:
    """The URL SQLAlchemy is given: ``postgresql://`` means psycopg 3 here (SQLAlchemy's default is psycopg2)."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreUnavailable(f"the database URL cannot be read (not shown: it may hold a password): {exc}") from exc
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def url_without_password(url: str) -> str:
    """The URL as logs and messages show it: ``postgresql+psycopg://qc:***@db/qc``."""
    try:
        return database_url(url).render_as_string(hide_password=True)
    except StoreUnavailable:
        return "(not a database URL)"


def error_line(exc: BaseException) -> str:
    """A database error as one line, the driver's own message without SQLAlchemy's statement and link."""
    message = str(getattr(exc, "orig", None) or exc)
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())[:300]


def _engine_args(url: URL, busy_timeout_s: float, pool_size: int) -> dict:
    if url.get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": busy_timeout_s, "check_same_thread": False}}
    args: dict = {"pool_size": pool_size, "max_overflow": POOL_OVERFLOW, "pool_timeout": busy_timeout_s,
                  "pool_pre_ping": True}
    if url.get_backend_name() == "postgresql":
        args["connect_args"] = {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "options": f"-c statement_timeout={int(busy_timeout_s * 1000)}",
            "application_name": "qc-daemon",
            # A server that vanished without closing the connection (host down, failover) is noticed in ~1 min.
            "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
        }
    return args


class Availability:
    """Whether the database answered the last time a part of the daemon asked, shared by all of them.

    An outage is logged once when it begins (warning ``database_unavailable``, with the URL without its password
    and the error) and once when it ends (``database_available``, with how long it lasted), however many loops
    keep trying meanwhile: no traceback per poll.
    """

    def __init__(self, shown_url: str):
        self.shown_url = shown_url
        self._lock = threading.Lock()
        self._down_since: float | None = None

    def failed(self, exc: BaseException, component: str) -> None:
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
        log.warning("database_unavailable", url=self.shown_url, component=component, error=error_line(exc))

    def answered(self) -> None:
        if self._down_since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._down_since is None:
                return
            down_s, self._down_since = time.monotonic() - self._down_since, None
        log.info("database_available", url=self.shown_url, unavailable_s=round(down_s, 1))


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
        if not _known_revision(current):
            raise SchemaError(f"the database is at revision {current}, newer than this release knows "
                              f"({head_revision()}): upgrade qc-daemon")
        _backup_sqlite(engine, suffix=f".bak-{current}")
    with migration_connection(engine) as conn:
        config.attributes["connection"] = conn
        if made_by_0_1_0 and database_revision(conn) is None:
            command.stamp(config, RELEASE_0_1_0_REVISION)
        command.upgrade(config, "head")
    with engine.connect() as conn:
        return database_revision(conn)


MIGRATION_LOCK = 0x71C0DAE0  # PostgreSQL advisory lock key: one daemon migrates a shared database at a time


@contextmanager
def migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction for Alembic; on SQLite with foreign keys off meanwhile and checked after,
    on PostgreSQL holding the migration lock (:data:`MIGRATION_LOCK`) until it commits.

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
                if engine.dialect.name == "postgresql":
                    # Daemons starting together on one database: the others wait here, then find it at head
                    # (PostgreSQL's DDL is transactional, so they never see half a migration).
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
                yield conn
                if sqlite and (broken := conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()):
                    raise SchemaError(f"the migration left {len(broken)} broken foreign key(s): {broken[:3]}")
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


def _known_revision(revision: str) -> bool:
    """Whether this release's migrations contain ``revision`` (a newer release's database does not)."""
    return any(script.revision == revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions())


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


PENDING_LEASE_S = 600.0  # another node's pending revision older than this is taken over (that node died)


class RevisionInProgress(RuntimeError):
    """Another node is scoring these very instances (a PACS routing the series to both): look again later."""

    def __init__(self, series_uid: str, revision: int, node_name: str | None):
        super().__init__(f"series {series_uid} revision {revision} is being recorded by node {node_name!r}")
        self.revision = revision
        self.node_name = node_name


def open_revision(
    session: Session, facts: SeriesFacts, node_name: str | None = None, now: dt.datetime | None = None
) -> SeriesResult | None:
    """The revision for ``node_name`` to (re)score these instances under; None when they are already recorded.

    Reuses a PENDING revision of this node (left by a crash mid-scoring) and otherwise opens the next one, so each
    series is recorded exactly once per revision. Nodes sharing the database: when the newest revision was opened
    by another node for the same number of instances, they are the same series routed to both: a duplicate, None
    once that revision is final, :class:`RevisionInProgress` while it is pending -- unless it has been pending
    for :data:`PENDING_LEASE_S` (its node died mid-scoring), then this node takes it over.
    Rows from before nodes were recorded (``node_name`` null) count as this node's.
    """
    latest = latest_revision(session, facts.series_instance_uid)
    now = now or utcnow()
    ours = latest is not None and latest.node_name in (None, node_name)
    stale = latest is not None and _pending_since(latest) < now - dt.timedelta(seconds=PENDING_LEASE_S)
    if latest is not None and not ours and latest.instances == facts.instances:
        if latest.status in FINAL_STATUSES:
            return None
        if not stale:
            raise RevisionInProgress(latest.series_instance_uid, latest.revision, latest.node_name)
    if latest is not None and latest.status is SeriesStatus.PENDING and (ours or stale):
        row = latest
        for name, value in vars(facts).items():
            setattr(row, name, value)
        row.completed_at = now
        row.node_name = node_name
    else:
        row = SeriesResult(
            **vars(facts),
            revision=1 if latest is None else latest.revision + 1,
            completed_at=now,
            status=SeriesStatus.PENDING,
            node_name=node_name,
        )
        session.add(row)
    session.flush()
    return row


def begin_revision(
    session: Session,
    facts: SeriesFacts,
    node_name: str | None,
    last_instance_at: dt.datetime | None,
    started_at: dt.datetime,
) -> SeriesResult | None:
    """:func:`open_revision`, committed with its timing, and None when the instances are already recorded.

    Two nodes opening the same revision at once: the unique (series, revision) constraint fails the second
    insert; that node rolls back and looks again, finding the first node's row (a duplicate or a revision in
    progress) instead of failing.
    """
    def open_and_commit() -> SeriesResult | None:
        row = open_revision(session, facts, node_name)
        if row is not None:
            row.last_instance_at = last_instance_at
            row.processing_started_at = started_at
            session.commit()
        return row

    try:
        return open_and_commit()
    except IntegrityError:
        session.rollback()
        log.info("revision_opened_elsewhere", series_instance_uid=facts.series_instance_uid)
        return open_and_commit()


def _pending_since(row: SeriesResult) -> dt.datetime:
    return row.processing_started_at or row.completed_at


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


def due_alerts(
    session: Session, channel: AlertChannel, now: dt.datetime, limit: int = 50, node_name: str | None = None
) -> Sequence[Alert]:
    """Pending outbox rows of ``channel`` whose next attempt is due; with ``node_name``, only those of results
    that node recorded (a result sent to PACS is a file on the recording node's disk)."""
    query = select(Alert).where(Alert.channel == channel, Alert.state == AlertState.PENDING, Alert.next_attempt_at <= now)
    if node_name is not None:
        query = query.join(SeriesResult, Alert.result_id == SeriesResult.id).where(SeriesResult.node_name == node_name)
    return session.scalars(query.order_by(Alert.id).limit(limit)).all()


def claim_alert(session: Session, alert_id: int, now: dt.datetime, lease_s: float) -> bool:
    """Take a due alert for one delivery attempt: its next attempt moves ``lease_s`` ahead in one conditional
    UPDATE, so two dispatchers (threads or daemons sharing the database) never deliver it at once.

    SQLite runs one writer at a time. PostgreSQL (READ COMMITTED) makes a second UPDATE of the row wait for the
    first to commit and then evaluates its WHERE again on the new row version, whose next attempt is now in the
    future: it updates nothing (``tests/test_postgres.py`` races two dispatchers). The same as ``SELECT ... FOR
    UPDATE SKIP LOCKED``, without holding a transaction open while the alert is being delivered. ``now`` is
    the claiming host's clock: hosts sharing a database keep time with NTP (the lease is 30 s beyond a delivery
    timeout)."""
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
