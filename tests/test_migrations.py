"""Schema migrations (Alembic): a database made by release 0.1.0 is upgraded with every row kept, a fresh one
reaches the same schema, and that schema is the one the models describe."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, DateTime, MetaData, create_engine, inspect

from qc_daemon.store import (
    AlertState,
    Base,
    SchemaError,
    SeriesStatus,
    Store,
    alembic_config,
    alerts_for,
    head_revision,
    history,
    migrate,
    migration_connection,
    revisions,
)

RELEASE_0_1_0_DB = Path(__file__).parent / "data" / "qc-0.1.0.sqlite3"  # made by commit 99b67cf's store
TIMING_COLUMNS = ("last_instance_at", "processing_started_at")


def _release_db(tmp_path: Path) -> Path:
    path = tmp_path / "qc.sqlite3"
    shutil.copyfile(RELEASE_0_1_0_DB, path)
    return path


def _rows(path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


def _schema_sql(path: Path) -> list[tuple]:
    return _rows(path, "SELECT type, name, sql FROM sqlite_master WHERE tbl_name != 'alembic_version' ORDER BY name")


def _differences(path: Path, metadata: MetaData) -> list:
    engine = create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    return differences


def test_a_release_0_1_0_database_is_upgraded_with_every_row_kept(tmp_path):
    path = _release_db(tmp_path)
    before = {table: _rows(path, f"SELECT * FROM {table} ORDER BY id") for table in ("series_results", "alerts")}
    assert _rows(path, "SELECT version FROM schema_version") == [(1,)]

    store = Store(f"sqlite:///{path}")
    assert store.revision == head_revision() == "0006"
    assert _rows(path, "SELECT version_num FROM alembic_version") == [(head_revision(),)]
    tables = inspect(store.engine).get_table_names()
    assert "schema_version" not in tables  # alembic_version records the schema from 0002 on
    old_columns = [c[1] for c in _rows(RELEASE_0_1_0_DB, "PRAGMA table_info(series_results)")]
    after = _rows(path, f"SELECT {', '.join(old_columns)} FROM series_results ORDER BY id")
    assert after == before["series_results"] and len(after) == 4
    assert _rows(path, "SELECT * FROM alerts ORDER BY id") == before["alerts"]
    assert _rows(path, f"SELECT {', '.join(TIMING_COLUMNS)} FROM series_results") == [(None, None)] * 4
    findings = "iqms, iqm_errors, quality_map_path, montage_path"
    assert _rows(path, f"SELECT {findings} FROM series_results") == [(None, None, None, None)] * 4
    assert _rows(path, "SELECT node_name FROM series_results") == [(None,)] * 4  # recorded before nodes were

    with store.session() as session:  # the models read the old rows
        scored = history(session, status=SeriesStatus.SCORED)
        assert [r.score for r in scored] == [0.31, 0.82]
        low = next(r for r in scored if r.below_threshold)
        assert low.patch_scores == [0.3, 0.32] and low.to_dict()["last_instance_at"] is None
        assert [a.state for a in alerts_for(session, low.id)] == [AlertState.PENDING, AlertState.DELIVERED]
        assert [r.status for r in revisions(session, low.series_instance_uid)] == [
            SeriesStatus.SCORED, SeriesStatus.SKIPPED,
        ]
    store.close()
    backup = path.with_name("qc.sqlite3.bak-0001")  # copied before the upgrade touched it
    assert _schema_sql(backup) == _schema_sql(RELEASE_0_1_0_DB)
    assert _rows(backup, "SELECT count(*) FROM series_results") == [(4,)]


def test_reopening_an_upgraded_database_changes_nothing(tmp_path):
    path = _release_db(tmp_path)
    Store(f"sqlite:///{path}").close()
    schema = _schema_sql(path)
    store = Store(f"sqlite:///{path}")
    assert migrate(store.engine) == head_revision()
    store.close()
    assert _schema_sql(path) == schema


def test_revision_0001_is_the_schema_release_0_1_0_made(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'fresh.sqlite3'}")
    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
    engine.dispose()
    assert _schema_sql(tmp_path / "fresh.sqlite3") == _schema_sql(RELEASE_0_1_0_DB)
    assert _rows(tmp_path / "fresh.sqlite3", "SELECT version FROM schema_version") == [(1,)]


@pytest.mark.parametrize("origin", ["fresh", "release-0.1.0"])
def test_the_database_at_head_is_what_the_models_describe(tmp_path, origin):
    path = tmp_path / "qc.sqlite3" if origin == "fresh" else _release_db(tmp_path)
    Store(f"sqlite:///{path}").close()
    assert _differences(path, Base.metadata) == []


def test_a_model_column_without_a_revision_is_noticed(tmp_path):
    """The check above can fail: a column only in the models shows up as a difference."""
    path = tmp_path / "qc.sqlite3"
    Store(f"sqlite:///{path}").close()
    metadata = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(metadata)
    metadata.tables["series_results"].append_column(Column("reviewed_at", DateTime, nullable=True))
    (difference,) = _differences(path, metadata)
    assert difference[0] == "add_column" and difference[3].name == "reviewed_at"


def test_downgrade_to_0001_and_back_keeps_the_rows(tmp_path):
    path = _release_db(tmp_path)
    store = Store(f"sqlite:///{path}")
    store.close()
    kept = "SELECT id, series_instance_uid, revision, status, score FROM series_results ORDER BY id"
    before = _rows(path, kept)
    config = alembic_config()
    with migration_connection(store.engine) as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0001")
    store.engine.dispose()
    columns = {c[1] for c in _rows(path, "PRAGMA table_info(series_results)")}
    assert columns.isdisjoint(TIMING_COLUMNS)
    assert _rows(path, "SELECT version FROM schema_version") == [(1,)]  # release 0.1.0 would open it as its own
    store = Store(f"sqlite:///{path}")
    assert store.revision == head_revision()
    store.close()
    assert _rows(path, kept) == before
    assert _rows(path, "SELECT count(*) FROM alerts") == [(2,)]


def test_an_unknown_schema_version_is_refused(tmp_path):
    path = _release_db(tmp_path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = 7")
    with pytest.raises(SchemaError, match="schema_version = 7"):
        Store(f"sqlite:///{path}")


def test_a_database_from_a_newer_release_is_refused_by_name(tmp_path):
    path = tmp_path / "qc.sqlite3"
    Store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0099'")
    with pytest.raises(SchemaError, match="at revision 0099, newer than this release knows"):
        Store(f"sqlite:///{path}")
