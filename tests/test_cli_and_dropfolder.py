"""The drop folder, the exec alert hook and the offline CLI commands, each against the real parts."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import classic_series, phantom, write_series

from qc_daemon.cli import main
from qc_daemon.settings import load_settings
from qc_daemon.store import AlertState, SeriesStatus, alerts_for, history, revisions


def _wait_for(predicate, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_drop_folder_ingests_through_the_same_path(daemon_factory, tmp_path):
    drop = tmp_path / "drop"
    # a drop folder has no association to end: the quiet period completes the series (3 s: a loaded CI machine
    # may ingest the 20 files slower than the default test setting of 0.5 s)
    daemon = daemon_factory(watch={"folder": str(drop), "settle_s": 0.1}, assembly={"quiet_period_s": 3.0})
    series = classic_series(phantom((40, 40, 20)))
    uid = str(series[0].SeriesInstanceUID)
    write_series(series, drop / "exam")
    (drop / "notes.txt").write_text("not DICOM")

    def scored():
        with daemon.store.session() as session:
            rows = revisions(session, uid)
            return bool(rows) and rows[-1].status is SeriesStatus.SCORED

    assert _wait_for(scored)
    with daemon.store.session() as session:
        (row,) = revisions(session, uid)
    assert row.instances == 20
    assert not list((drop / "exam").iterdir())  # spooled files leave the drop folder
    reason = (drop / "rejected" / "notes.txt.reason.txt").read_text()
    assert "not a readable DICOM file" in reason


def test_exec_hook_receives_the_alert_json(daemon_factory, tmp_path):
    out = tmp_path / "alert.json"
    hook = [sys.executable, "-c", f"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())"]
    daemon = daemon_factory(alerts={"threshold": 1.0, "exec_command": hook})
    series = classic_series(phantom((40, 40, 20)))
    from conftest import send_datasets

    send_datasets(series, daemon.port)
    assert daemon.wait_idle(60)
    assert _wait_for(out.exists, 20)
    payload = json.loads(out.read_text())
    assert payload["series_instance_uid"] == str(series[0].SeriesInstanceUID)
    assert payload["event"] == "qc_alert" and payload["threshold"] == 1.0
    assert "PatientName" not in out.read_text() and "Doe" not in out.read_text()

    def delivered():
        with daemon.store.session() as session:
            (row,) = history(session)
            return alerts_for(session, row.id)[0].state is AlertState.DELIVERED

    assert _wait_for(delivered, 20)


def _config(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\nstate_dir = "{tmp_path / "state"}"\n')
    return path


def test_score_nifti_offline(tmp_path, capsys):
    volume = phantom((100, 100, 80)).astype(np.float32)
    image = nib.Nifti1Image(volume, np.diag([1.5, 1.5, 1.5, 1.0]))
    path = tmp_path / "t1.nii.gz"
    nib.save(image, path)
    assert main(["--config", str(_config(tmp_path)), "score", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    from qc_daemon.scorer import Scorer
    from qc_daemon.volume import load_nifti

    expected = Scorer(load_settings(_config(tmp_path)).scoring).score_volume(load_nifti(path))
    assert out["score"] == pytest.approx(expected.score) and out["patches"] == len(expected.patch_scores) >= 1
    assert out["model_score"] == pytest.approx(expected.model_score)
    assert out["ghost_ratio"] == expected.ghost.ratio and out["ghost_direction"] == expected.ghost.direction


def test_score_dicom_folder_offline_matches_the_daemon(daemon_factory, tmp_path, capsys):
    series = classic_series(phantom((40, 40, 20)))
    write_series(series, tmp_path / "dicom")
    assert main(["--config", str(_config(tmp_path)), "score", str(tmp_path / "dicom"), "--json"]) == 0
    offline = json.loads(capsys.readouterr().out)["score"]

    from conftest import send_datasets

    daemon = daemon_factory()
    send_datasets(series, daemon.port)
    assert daemon.wait_idle(60)
    with daemon.store.session() as session:
        (row,) = history(session)
    assert row.score == offline


def test_score_refuses_a_folder_with_several_series(tmp_path, capsys):
    write_series(classic_series(phantom((40, 40, 16))), tmp_path / "d" / "a")
    write_series(classic_series(phantom((40, 40, 16))), tmp_path / "d" / "b")
    assert main(["--config", str(_config(tmp_path)), "score", str(tmp_path / "d")]) == 1
    assert "holds 2 series" in capsys.readouterr().err


def test_show_prints_revisions_with_patch_scores(daemon_factory, tmp_path, capsys):
    from conftest import send_datasets

    daemon = daemon_factory()
    series = classic_series(phantom((40, 40, 20)))
    send_datasets(series, daemon.port)
    assert daemon.wait_idle(60)
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\nstate_dir = "{daemon.settings.storage.state_dir}"\n')
    assert main(["--config", str(config), "show", str(series[0].SeriesInstanceUID), "--json"]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert item["revision"] == 1 and len(item["patch_scores"]) == len(item["patch_origins"])
    assert main(["--config", str(config), "show", "1.2.3.4"]) == 1


def test_history_and_show_json_carry_when_each_step_happened(daemon_factory, tmp_path, capsys):
    from conftest import send_datasets

    daemon = daemon_factory()
    series = classic_series(phantom((40, 40, 20)))
    send_datasets(series, daemon.port)
    assert daemon.wait_idle(60)
    newest_file_s = max(p.stat().st_mtime for p in daemon.spool.instance_paths(str(series[0].SeriesInstanceUID)))
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\nstate_dir = "{daemon.settings.storage.state_dir}"\n')
    assert main(["--config", str(config), "history", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert main(["--config", str(config), "show", str(series[0].SeriesInstanceUID), "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    steps = ("last_instance_at", "processing_started_at", "scored_at")
    assert [shown[key] for key in steps] == [listed[key] for key in steps]
    times = [dt.datetime.fromisoformat(listed[key]) for key in steps]
    assert all(t.utcoffset() == dt.timedelta(0) for t in times)  # ISO 8601, UTC
    assert times == sorted(times)  # arrived, then picked up, then stored
    assert abs(times[0].timestamp() - newest_file_s) < 0.01  # the newest spooled instance's arrival


def test_history_without_a_database_says_so(tmp_path, capsys):
    assert main(["--config", str(_config(tmp_path)), "history"]) == 1
    assert "no database yet" in capsys.readouterr().err


def test_echo_against_a_running_daemon(daemon_factory, capsys):
    daemon = daemon_factory()
    assert main(["echo", "--port", str(daemon.port)]) == 0
    assert "success" in capsys.readouterr().out
    assert main(["echo", "--port", str(daemon.port), "--aet", "SOMEONE_ELSE"]) == 1
