"""The command line itself: where --config may go, which file is read, exit codes, clean output and pipes."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import phantom

from qc_daemon import cli
from qc_daemon.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\nstate_dir = "{tmp_path / "state"}"\n{extra}')
    return path


def _run_module(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "qc_daemon", *args], cwd=ROOT, env=env, capture_output=True, text=True, **kwargs
    )


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_is_accepted_before_and_after_the_command(tmp_path, capsys, where):
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nport = 'eleven'\n")
    argv = ["--config", str(bad), "check-config"] if where == "before" else ["check-config", "--config", str(bad)]
    assert main(argv) == cli.EXIT_CONFIG
    assert "dicom.port = 'eleven'" in capsys.readouterr().err


def test_config_after_the_command_wins(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nport = 'eleven'\n")
    assert main(["--config", str(bad), "check-config", "--config", str(_config(tmp_path))]) == cli.EXIT_OK
    capsys.readouterr()


def test_environment_names_the_default_config(tmp_path, capsys, monkeypatch):
    config = _config(tmp_path, '[dicom]\nae_title = "FROM_ENV"\n')
    monkeypatch.setenv(cli.CONFIG_ENV, str(config))
    assert main(["check-config"]) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["dicom"].startswith("FROM_ENV@")
    monkeypatch.setenv(cli.CONFIG_ENV, str(tmp_path / "missing.toml"))
    assert main(["check-config"]) == cli.EXIT_CONFIG
    assert "missing.toml does not exist" in capsys.readouterr().err


def test_check_config_prints_only_its_json_with_the_training_data(tmp_path, capsys):
    assert main(["check-config", "--config", str(_config(tmp_path))]) == cli.EXIT_OK
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # nothing but the result on stdout
    assert summary["model"]["training_data"] and summary["model"]["label"]
    assert captured.err == ""  # no log line before the result


def test_score_prints_only_its_result_with_a_counted_noun(tmp_path, capsys):
    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(phantom((100, 100, 80)).astype(np.float32), np.diag([1.5, 1.5, 1.5, 1.0])), path)
    config = str(_config(tmp_path))
    assert main(["score", str(path), "--json", "--config", config]) == cli.EXIT_OK
    patches = json.loads(capsys.readouterr().out)["patches"]
    assert main(["score", str(path), "--config", config]) == cli.EXIT_OK
    captured = capsys.readouterr()
    counted = "1 patch," if patches == 1 else f"{patches} patches,"
    assert captured.out.startswith(f"{path}: score ") and counted in captured.out
    assert captured.out.count("\n") == 1 and captured.err == ""


def test_a_busy_port_is_one_line_and_exit_code_3(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = _config(tmp_path, f'[dicom]\nhost = "127.0.0.1"\nport = {port}\n[logging]\nformat = "json"\n')
        result = _run_module(["serve", "--config", str(config)], timeout=180)
    assert result.returncode == cli.EXIT_CANNOT_LISTEN, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("qc-daemon:")]
    assert line == f"qc-daemon: cannot listen on 127.0.0.1:{port}: Address already in use (set [dicom] host/port)"
    events = [json.loads(line)["event"] for line in result.stdout.splitlines()]
    assert "listener_failed" in events and "daemon_stopped" in events


def test_history_into_head_ends_quietly(tmp_path):
    from qc_daemon.store import SeriesFacts, Store, open_revision

    config = _config(tmp_path)
    (tmp_path / "state").mkdir()
    store = Store(f"sqlite:///{tmp_path / 'state' / 'qc.sqlite3'}")
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with store.session() as session:
        for i in range(3000):  # far more than a pipe buffer holds
            facts = SeriesFacts(
                series_instance_uid=f"1.2.826.0.1.{i}", study_instance_uid=None, station_name="MR1",
                calling_ae="MR1", modality="MR", series_description="T1w", protocol_name="t1", sop_class_uid=None,
                instances=100, received_at=now,
            )
            open_revision(session, facts)
        session.commit()
    store.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = f"{sys.executable} -m qc_daemon history --config {config} 2>err.txt | head -2; echo ${{PIPESTATUS[0]}}"
    result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    header, first, status = result.stdout.splitlines()
    assert header.startswith("completed (UTC)") and "1.2.826.0.1." in first
    assert (tmp_path / "err.txt").read_text() == ""
    assert int(status) == cli.EXIT_BROKEN_PIPE
