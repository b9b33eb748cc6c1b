"""Several daemons, one PostgreSQL: a real server started here (Debian's ``postgresql`` package; skipped only where
its binaries are absent), the same migrations as SQLite, one history without duplicates, each alert delivered
once, a clear error at start, and a database restart under a running daemon that loses nothing."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections import Counter

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import make_settings, send_datasets
from dicom_factory import classic_series, phantom
from postgres_server import PASSWORD, PostgresServer, find_bindir, free_port
from sqlalchemy import create_engine, text

from qc_daemon.alerts import AlertDispatcher
from qc_daemon.cli import EXIT_NO_DATABASE, main
from qc_daemon.service import Daemon
from qc_daemon.settings import AlertSettings
from qc_daemon.store import (
    AlertChannel,
    AlertState,
    Base,
    RevisionInProgress,
    SeriesFacts,
    SeriesStatus,
    Store,
    alembic_config,
    alerts_for,
    begin_revision,
    claim_alert,
    enqueue_alert,
    head_revision,
    history,
    latest_revision,
    migration_connection,
    open_revision,
    revisions,
    utcnow,
)

@pytest.fixture(scope="session")
def postgres():
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (Debian: postgresql) not installed")
    server = PostgresServer(bindir)
    server.start()
    yield server
    server.remove()


@pytest.fixture
def database_url(postgres) -> str:
    """A fresh, empty database on the test server."""
    return postgres.create_database(f"qc_{uuid.uuid4().hex[:12]}")


def _events(log_stream, name: str | None = None) -> list[dict]:
    events = [json.loads(line) for line in log_stream.getvalue().splitlines() if line.startswith("{")]
    return [e for e in events if name is None or e.get("event") == name]


def _wait_for(condition, timeout_s: float, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    return condition()


def _facts(uid: str, instances: int = 20) -> SeriesFacts:
    return SeriesFacts(series_instance_uid=uid, study_instance_uid=None, station_name="MR1", calling_ae="MR1",
                       modality="MR", series_description="t1", protocol_name="t1", sop_class_uid=None,
                       instances=instances, received_at=utcnow())


# ---- schema ---------------------------------------------------------------------------------------------------


def test_an_empty_database_is_migrated_to_what_the_models_describe(database_url):
    store = Store(database_url)
    assert store.engine.dialect.name == "postgresql" and store.engine.driver == "psycopg"
    assert store.revision == head_revision()
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        config = alembic_config()
        config.attributes["connection"] = conn
        command.check(config)  # raises when the models and the migrations disagree
    store.close()
    reopened = Store(database_url)  # nothing left to do
    assert reopened.revision == head_revision()
    reopened.close()


@pytest.mark.parametrize("origin", ["0003", "release-0.1.0"])
def test_an_older_schema_is_upgraded_with_its_rows_and_downgrades_again(database_url, origin):
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    config = alembic_config()
    with migration_connection(engine) as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001" if origin == "release-0.1.0" else origin)
        if origin == "release-0.1.0":
            conn.execute(text("DROP TABLE alembic_version"))  # 0.1.0 kept only its schema_version table
        conn.execute(text(
            "INSERT INTO series_results (id, series_instance_uid, revision, instances, received_at, completed_at,"
            " scored_at, status, score, patch_scores, below_threshold) VALUES (1, '1.2.3', 1, 20,"
            " '2026-01-02 03:04:05', '2026-01-02 03:04:06', '2026-01-02 03:04:07', 'SCORED', 0.31, '[0.3, 0.32]',"
            " true)"))
        conn.execute(text(
            "INSERT INTO alerts (id, result_id, channel, state, payload, attempts, next_attempt_at, created_at)"
            " VALUES (1, 1, 'WEBHOOK', 'PENDING', '{\"score\": 0.31}', 0, '2026-01-02 03:04:07',"
            " '2026-01-02 03:04:07')"))
    engine.dispose()

    store = Store(database_url)
    assert store.revision == head_revision()
    with store.session() as session:
        (row,) = history(session)
        assert (row.status, row.score, row.patch_scores, row.node_name) == (SeriesStatus.SCORED, 0.31, [0.3, 0.32],
                                                                           None)
        assert row.completed_at == dt.datetime(2026, 1, 2, 3, 4, 6)  # naive UTC, as stored
        (alert,) = alerts_for(session, row.id)
        assert (alert.channel, alert.state, alert.payload) == (AlertChannel.WEBHOOK, AlertState.PENDING,
                                                               {"score": 0.31})
    with migration_connection(store.engine) as conn:  # and back down to 0.1.0's schema, on PostgreSQL too
        config.attributes["connection"] = conn
        command.downgrade(config, "0001")
        assert conn.execute(text("SELECT version FROM schema_version")).scalar() == 1
    store.close()
    store = Store(database_url)
    with store.session() as session:
        assert [r.score for r in history(session)] == [0.31]
    store.close()


def test_daemons_starting_together_migrate_the_database_once(database_url):
    stores, errors = [], []

    def open_store():
        try:
            stores.append(Store(database_url))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and [s.revision for s in stores] == [head_revision()] * 4
    for store in stores:
        store.close()


# ---- a clear error at start -------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem", ["wrong password", "nothing listening"])
def test_an_unusable_database_stops_serve_with_one_line_without_the_password(tmp_path, capsys, postgres, problem):
    port = postgres.port if problem == "wrong password" else free_port()
    url = postgres.url(password="not-the-password", port=port)
    expected = "password authentication failed" if problem == "wrong password" else "Connection refused"
    config = tmp_path / "config.toml"
    config.write_text(f'[dicom]\nport = 0\n[storage]\nstate_dir = "{tmp_path / "state"}"\ndatabase_url = "{url}"\n'
                      '[logging]\nformat = "json"\n')
    capsys.readouterr()
    assert main(["serve", "--config", str(config)]) == EXIT_NO_DATABASE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert f"postgresql+psycopg://qc:***@127.0.0.1:{port}/postgres" in err
    assert "not-the-password" not in err and PASSWORD not in err
    assert main(["history", "--config", str(config)]) == EXIT_NO_DATABASE
    assert "not-the-password" not in capsys.readouterr().err


# ---- several nodes on one database ------------------------------------------------------------------------------


def test_the_same_instances_at_a_second_node_are_a_duplicate_not_a_revision(database_url, log_stream):
    node_a, node_b = Store(database_url), Store(database_url)
    uid = "1.2.826.0.1.77"
    with node_a.session() as a, node_b.session() as b:
        row = begin_revision(a, _facts(uid), "mr1:11112", None, utcnow())
        assert row.revision == 1
        with pytest.raises(RevisionInProgress, match="mr1:11112"):  # node A is still scoring it
            begin_revision(b, _facts(uid), "gpu1:11112", None, utcnow())
        b.rollback()
        row.status = SeriesStatus.SCORED
        a.commit()
        assert begin_revision(b, _facts(uid), "gpu1:11112", None, utcnow()) is None  # recorded: a duplicate
        more = begin_revision(b, _facts(uid, instances=21), "gpu1:11112", None, utcnow())  # a late instance
        assert (more.revision, more.node_name) == (2, "gpu1:11112")
        later = utcnow() + dt.timedelta(hours=1)  # node B died while scoring revision 2: A takes it over
        assert open_revision(a, _facts(uid, instances=21), "mr1:11112", now=later).revision == 2
        a.commit()
        assert [(r.revision, r.node_name) for r in revisions(a, uid)] == [(1, "mr1:11112"), (2, "mr1:11112")]
    node_a.close()
    node_b.close()


def test_two_nodes_inserting_the_same_revision_at_once_do_not_fail(database_url, log_stream):
    """Node B's insert waits on node A's uncommitted row for the same (series, revision), then violates the
    unique constraint when A commits: B looks again and finds A's revision in progress instead of failing."""
    node_a, node_b = Store(database_url), Store(database_url)
    uid = "1.2.826.0.1.78"
    outcome = []

    def node_b_opens():
        with node_b.session() as b:
            try:
                outcome.append(begin_revision(b, _facts(uid), "gpu1:11112", None, utcnow()))
            except RevisionInProgress as exc:
                outcome.append(exc)

    with node_a.session() as a:
        open_revision(a, _facts(uid), "mr1:11112")  # inserted, not committed
        racer = threading.Thread(target=node_b_opens)
        racer.start()

        def b_waits_on_a_lock() -> bool:
            with node_a.engine.connect() as conn:
                return bool(conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = "
                    "current_database()")).scalar())

        assert _wait_for(b_waits_on_a_lock, 30)
        a.commit()
        racer.join(30)
    (result,) = outcome
    assert isinstance(result, RevisionInProgress) and result.node_name == "mr1:11112"
    assert _events(log_stream, "revision_opened_elsewhere")
    with node_a.session() as a:
        assert [(r.revision, r.node_name) for r in revisions(a, uid)] == [(1, "mr1:11112")]
    node_a.close()
    node_b.close()


def test_two_dispatchers_racing_deliver_each_alert_once(database_url, webhook):
    url, received = webhook
    setup = Store(database_url)
    with setup.session() as session:
        for i in range(30):
            row = begin_revision(session, _facts(f"1.2.826.0.2.{i}"), "mr1:11112", None, utcnow())
            row.status, row.score = SeriesStatus.SCORED, 0.1
            enqueue_alert(session, row, AlertChannel.WEBHOOK, {"series_instance_uid": row.series_instance_uid})
        session.commit()
        alert_id = alerts_for(session, row.id)[0].id
    # The claim itself, from 8 connections at once: exactly one takes it.
    stores = [Store(database_url) for _ in range(2)]
    start = threading.Barrier(8)
    claims = []

    def claim(store):
        with store.session() as session:
            start.wait()
            claims.append(claim_alert(session, alert_id, utcnow(), lease_s=60))

    threads = [threading.Thread(target=claim, args=(stores[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claims) == [False] * 7 + [True]

    # Two daemons' dispatchers polling the same outbox together, again and again.
    settings = AlertSettings(threshold=0.5, webhook_url=url, retry_initial_s=0.1, retry_max_s=0.2)
    dispatchers = [AlertDispatcher(store, settings) for store in stores]
    rounds = threading.Barrier(2)

    def dispatch(dispatcher):
        for _ in range(5):
            rounds.wait()
            dispatcher.deliver_due()

    threads = [threading.Thread(target=dispatch, args=(d,)) for d in dispatchers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    delivered = Counter(alert["series_instance_uid"] for alert in received)
    assert len(delivered) == 29 and set(delivered.values()) == {1}  # the claimed one waits for its lease
    assert f"1.2.826.0.2.{29}" not in delivered
    for store in [setup, *stores]:
        store.close()


def _node(tmp_path, name: str, database_url: str, webhook_url: str, **sections):
    settings = make_settings(
        tmp_path / name,
        storage={"database_url": database_url, "node_name": name},
        alerts={"threshold": 1.0, "webhook_url": webhook_url, "retry_initial_s": 0.2, "retry_max_s": 1.0},
        assembly={"quiet_period_s": 10.0},  # a fallback only: each series completes when its association ends
        **sections,
    )
    daemon = Daemon(settings, tick_s=0.05)
    daemon.start()
    return daemon


def test_two_daemons_share_one_history_and_alert_once(tmp_path, database_url, webhook, capsys, log_stream):
    url, received = webhook
    first = _node(tmp_path, "mr-room-1:11112", database_url, url)
    second = _node(tmp_path, "mr-room-2:11112", database_url, url, http={"enabled": True, "port": 0})
    try:
        only_first, only_second, routed_to_both = (classic_series(phantom((40, 40, 20), seed=i)) for i in range(3))
        both = [threading.Thread(target=send_datasets, args=(routed_to_both, d.port)) for d in (first, second)]
        for thread in both:  # at the same moment: the two nodes race for the same revision
            thread.start()
        assert send_datasets(only_first, first.port) == [0] * 20
        assert send_datasets(only_second, second.port) == [0] * 20
        for thread in both:
            thread.join()
        assert first.wait_idle(120) and second.wait_idle(120)

        uid = {name: str(s[0].SeriesInstanceUID) for name, s in
               (("first", only_first), ("second", only_second), ("both", routed_to_both))}
        with first.store.session() as session:
            rows = {r.series_instance_uid: r for r in history(session)}
        assert len(rows) == 3 and sorted(rows) == sorted(uid.values())  # once each, no duplicate revision
        assert all((r.revision, r.status, r.instances) == (1, SeriesStatus.SCORED, 20) for r in rows.values())
        assert rows[uid["first"]].node_name == "mr-room-1:11112"
        assert rows[uid["second"]].node_name == "mr-room-2:11112"
        assert rows[uid["both"]].node_name in ("mr-room-1:11112", "mr-room-2:11112")
        assert len(first.spool.instance_paths(uid["both"])) == len(second.spool.instance_paths(uid["both"])) == 20
        seen_twice = [e["event"] for e in _events(log_stream) if e.get("series_instance_uid") == uid["both"]]
        assert {"series_recording_elsewhere", "series_duplicate", "series_unchanged"} & set(seen_twice)

        def all_delivered() -> bool:
            with first.store.session() as session:
                return all(a.state is AlertState.DELIVERED for r in history(session) for a in alerts_for(session, r.id))

        assert _wait_for(all_delivered, 60)
        assert sorted(a["series_instance_uid"] for a in received) == sorted(uid.values())  # each alert once

        # history and show from a third host: only the URL is needed
        config = tmp_path / "reader.toml"
        config.write_text(f'[storage]\nstate_dir = "{tmp_path / "reader"}"\ndatabase_url = "{database_url}"\n')
        capsys.readouterr()
        assert main(["history", "--json", "--config", str(config)]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert {r["series_instance_uid"]: r["node_name"] for r in listed} == {
            u: rows[u].node_name for u in uid.values()}
        assert main(["history", "--config", str(config)]) == 0
        table = capsys.readouterr().out
        assert "node" in table.splitlines()[0] and "mr-room-1:11112" in table and "mr-room-2:11112" in table
        assert main(["show", uid["first"], "--config", str(config)]) == 0
        assert "mr-room-1:11112" in capsys.readouterr().out

        # the web view on either node shows every node's results
        with urlopen(second.web.url + "/") as response:
            page = response.read().decode()
        assert uid["first"][-16:] in page and "mr-room-1:11112" in page and "mr-room-2:11112" in page
        with urlopen(second.web.url + f"/series/{uid['first']}") as response:
            page = response.read().decode()
        assert "mr-room-1:11112" in page and "Recorded by" in page
        assert rows[uid["first"]].montage_path and "montage.png" not in page  # the file is on the first node
    finally:
        second.stop()
        first.stop()


def urlopen(url: str):
    import urllib.request

    return urllib.request.urlopen(url, timeout=20)


# ---- a database outage under a running daemon -------------------------------------------------------------------


def test_a_database_restart_loses_nothing_and_is_logged_once(tmp_path, postgres, database_url, webhook, log_stream):
    url, received = webhook
    daemon = _node(tmp_path, "mr-room-1:11112", database_url, url, http={"enabled": True, "port": 0})
    try:
        before = classic_series(phantom((40, 40, 20), seed=1))
        assert send_datasets(before, daemon.port) == [0] * 20
        assert daemon.wait_idle(60)

        postgres.stop()
        during = [classic_series(phantom((40, 40, 20), seed=s)) for s in (2, 3)]
        for series in during:  # the spool takes them; the store is not needed to receive
            assert send_datasets(series, daemon.port) == [0] * 20
        assert _wait_for(lambda: len(_events(log_stream, "series_retry_scheduled")) >= 4, 60)
        for _ in range(3):  # the web view and the metrics poll too: degraded, not failing
            with urlopen(daemon.web.url + "/health") as response:
                assert json.loads(response.read())["status"] == "degraded"
            with urlopen(daemon.web.url + "/metrics") as response:
                assert "qc_store_up 0.0" in response.read().decode()
        time.sleep(2)  # the alert dispatcher polls every second meanwhile

        postgres.start()
        back = time.monotonic()
        uids = [str(s[0].SeriesInstanceUID) for s in (before, *during)]

        def recorded() -> list | None:
            with daemon.store.session() as session:
                rows = [latest_revision(session, uid) for uid in uids]
            return rows if all(r is not None and r.status is SeriesStatus.SCORED for r in rows) else None

        rows = _wait_for(recorded, 30)
        recorded_after_s = time.monotonic() - back
        assert rows, "the series received during the outage were not recorded within 30 s of the database's return"
        assert [(r.revision, r.instances) for r in rows] == [(1, 20)] * 3
        assert daemon.wait_idle(60)
        assert _wait_for(lambda: len(received) == 3, 30)
        assert sorted(a["series_instance_uid"] for a in received) == sorted(uids)
    finally:
        daemon.stop()
        if not postgres.running():  # the session's other tests need it
            postgres.start()
    unavailable = _events(log_stream, "database_unavailable")
    assert len(unavailable) == 1 and len(_events(log_stream, "database_available")) == 1
    assert "qc:***@127.0.0.1" in unavailable[0]["url"] and PASSWORD not in log_stream.getvalue()
    assert not [e for e in _events(log_stream) if "exception" in e]  # no traceback at all
    print(f"recorded {recorded_after_s:.1f} s after the database came back")
