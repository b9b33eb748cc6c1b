"""A real series from a real DICOM client to a scored row, an alert and the CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import send_datasets
from dicom_factory import BIRTH_DATE, PATIENT_ID, PATIENT_NAME, classic_series, enhanced_series, phantom

from qc_daemon.cli import main
from qc_daemon.ghost_check import AXIS_DIRECTIONS, GhostMeasure
from qc_daemon.store import AlertState, SeriesStatus, alerts_for, revisions


def _rows(daemon, uid):
    with daemon.store.session() as session:
        return list(revisions(session, uid))


def test_series_is_scored_and_recorded(daemon_factory, log_stream):
    daemon = daemon_factory()
    series = classic_series(phantom((64, 64, 40)), spacing_mm=(2.0, 2.0, 2.0))
    uid = str(series[0].SeriesInstanceUID)

    statuses = send_datasets(series, daemon.port)

    assert statuses == [0x0000] * len(series)
    assert daemon.wait_idle(60)
    (row,) = _rows(daemon, uid)
    assert row.status is SeriesStatus.SCORED, row.reason
    assert row.model_score == pytest.approx(min(1.0, max(0.0, float(np.mean(row.patch_scores)))))  # patches' mean
    assert row.ghost_ratio is not None and row.ghost_axis in (0, 1, 2)  # the phantom sits in air
    assert row.score == pytest.approx(min(row.model_score, GhostMeasure(row.ghost_ratio, row.ghost_axis).score))
    assert row.instances == 40
    assert row.calling_ae == "TEST_SCU"
    assert row.station_name == "MR_TEST_1"
    assert row.model_sha256 == daemon.scorer.model_sha256
    assert len(row.patch_scores) == len(row.patch_origins) >= 1
    logs = log_stream.getvalue()
    assert "series_scored" in logs
    for secret in (PATIENT_NAME, "Doe", PATIENT_ID, BIRTH_DATE):
        assert secret not in logs


def test_enhanced_multiframe_is_scored(daemon_factory):
    daemon = daemon_factory()
    series = enhanced_series(phantom((64, 64, 40)), spacing_mm=(2.0, 2.0, 2.0))
    assert send_datasets(series, daemon.port) == [0x0000]
    assert daemon.wait_idle(60)
    (row,) = _rows(daemon, str(series[0].SeriesInstanceUID))
    assert row.status is SeriesStatus.SCORED, row.reason
    assert row.instances == 1


def test_duplicate_instance_is_stored_once(daemon_factory):
    daemon = daemon_factory()
    series = classic_series(phantom((48, 48, 20)))
    uid = str(series[0].SeriesInstanceUID)
    assert send_datasets(series + series[:5], daemon.port) == [0x0000] * 25
    assert len(daemon.spool.instance_paths(uid)) == 20
    assert daemon.wait_idle(60)
    (row,) = _rows(daemon, uid)
    assert row.instances == 20


def test_late_instance_opens_a_new_revision(daemon_factory):
    daemon = daemon_factory()
    series = classic_series(phantom((48, 48, 24)))
    uid = str(series[0].SeriesInstanceUID)
    send_datasets(series[:-1], daemon.port)
    assert daemon.wait_idle(60)
    send_datasets(series[-1:], daemon.port)
    assert daemon.wait_idle(60)
    rows = _rows(daemon, uid)
    assert [(r.revision, r.instances) for r in rows] == [(1, 23), (2, 24)]
    assert all(r.status is SeriesStatus.SCORED for r in rows)


def test_low_score_raises_one_alert_per_revision(daemon_factory, webhook, log_stream):
    url, received = webhook
    # threshold 1.0: every scored series is "low", whatever the model says
    daemon = daemon_factory(alerts={"threshold": 1.0, "webhook_url": url, "retry_initial_s": 0.1})
    series = classic_series(phantom((48, 48, 20)))
    uid = str(series[0].SeriesInstanceUID)
    send_datasets(series, daemon.port)
    assert daemon.wait_idle(60)
    (row,) = _rows(daemon, uid)
    assert row.below_threshold
    daemon.alerts.deliver_due()  # racing the dispatcher thread: the claim lets only one of them send it
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with daemon.store.session() as session:
            (alert,) = alerts_for(session, row.id)
        if alert.state is AlertState.DELIVERED:
            break
        time.sleep(0.05)
    assert alert.state is AlertState.DELIVERED and alert.attempts == 1
    time.sleep(0.2)
    assert [a["series_instance_uid"] for a in received] == [uid]
    assert received[0]["score"] == pytest.approx(row.score)
    assert received[0]["model_score"] == pytest.approx(row.model_score)
    assert received[0]["ghost_ratio"] == row.ghost_ratio and received[0]["ghost_direction"] in AXIS_DIRECTIONS
    assert received[0]["spike_amplitude"] is None is row.spike_amplitude  # no stripes in the phantom
    assert "alert_raised" in log_stream.getvalue()


def test_cli_history_json(daemon_factory, tmp_path, capsys):
    daemon = daemon_factory()
    good = classic_series(phantom((48, 48, 20)))
    short = classic_series(phantom((48, 48, 3)))
    send_datasets(good + short, daemon.port)
    assert daemon.wait_idle(60)
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\nstate_dir = "{daemon.settings.storage.state_dir}"\n')

    assert main(["--config", str(config), "history", "--json"]) == 0
    items = {item["series_instance_uid"]: item for item in json.loads(capsys.readouterr().out)}
    scored = items[str(good[0].SeriesInstanceUID)]
    skipped = items[str(short[0].SeriesInstanceUID)]
    assert scored["status"] == "scored" and isinstance(scored["score"], float) and scored["reason"] is None
    assert scored["instances"] == 20
    assert skipped["status"] == "skipped" and skipped["score"] is None
    assert "only 3 slices" in skipped["reason"]

    assert main(["--config", str(config), "history", "--below", "-1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_cli_history_filters(daemon_factory, tmp_path, capsys):
    daemon = daemon_factory()
    send_datasets(classic_series(phantom((48, 48, 20))), daemon.port)
    assert daemon.wait_idle(60)
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\nstate_dir = "{daemon.settings.storage.state_dir}"\n')

    def uids(*args):
        assert main(["--config", str(config), "history", "--json", *args]) == 0
        return [item["series_instance_uid"] for item in json.loads(capsys.readouterr().out)]

    assert len(uids()) == 1
    assert uids("--station", "MR_TEST_1") == uids()
    assert uids("--station", "ELSEWHERE") == []
    assert uids("--since", "1h") == uids()
    assert uids("--since", "2999-01-01") == []
    assert uids("--status", "failed") == []
    assert main(["--config", str(config), "history"]) == 0
    table = capsys.readouterr().out
    assert "scored" in table and "MR_TEST_1" in table


def test_refused_instance_says_why_in_the_error_comment(daemon_factory):
    from pynetdicom import AE

    daemon = daemon_factory()
    (ds,) = classic_series(phantom((16, 16, 1)))
    ds.SeriesInstanceUID = "../../etc"
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="QC_DAEMON")
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC000
    assert status.ErrorComment.startswith("SeriesInstanceUID is not a valid UID")
    assert list(daemon.spool.series_uids()) == []


def test_the_model_is_warmed_up_when_the_daemon_starts(daemon_factory, log_stream):
    """One dummy batch at the model's input shape runs at start (on its own thread, beside the listener), so the
    first series does not pay for ONNX Runtime's first run; on a GPU every batch size a volume can produce."""
    daemon = daemon_factory()
    deadline = time.monotonic() + 120
    while '"model_warmed_up"' not in log_stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    (line,) = [json.loads(text) for text in log_stream.getvalue().splitlines() if '"model_warmed_up"' in text]
    scorer = daemon.scorer
    assert line["seconds"] > 0 and line["providers"] == scorer.session.get_providers()
    assert line["batch_sizes"] == (list(range(1, scorer.batch_size + 1)) if scorer.on_gpu else [scorer.batch_size])
