from __future__ import annotations

import re
from pathlib import Path

import pytest

from qc_daemon.cli import main
from qc_daemon.settings import Device, Settings, SettingsError, load_settings, settings_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_repository_config_documents_every_key_with_its_default():
    text = (ROOT / "config.toml").read_text()
    assert load_settings(ROOT / "config.toml") == Settings()
    for section, field in Settings.model_fields.items():
        assert f"[{section}]" in text
        for name in field.annotation.model_fields:
            assert re.search(rf"^#? ?{name} = ", text, re.M), f"{section}.{name} undocumented"


def test_partial_config_keeps_other_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[dicom]\nae_title = "MRQC"\nport = 104\n[alerts]\nthreshold = 0.3\n')
    settings = load_settings(path)
    assert (settings.dicom.ae_title, settings.dicom.port, settings.alerts.threshold) == ("MRQC", 104, 0.3)
    assert settings.assembly == Settings().assembly
    assert settings.storage.database.endswith("qc.sqlite3")


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"dicom": {"port": 70000}}, "dicom.port = 70000"),
        ({"dicom": {"port": "11112"}}, "dicom.port = '11112'"),
        ({"dicom": {"ae_title": "A_TITLE_THAT_IS_TOO_LONG"}}, "dicom.ae_title"),
        ({"dicom": {"port": True}}, "dicom.port = True"),
        ({"dicom": {"colour": "red"}}, "dicom.colour = 'red': unknown key (known: ae_title, host"),
        ({"dicom": {"allowed_peers": ["10.0.0.300"]}}, "dicom.allowed_peers[0] = '10.0.0.300'"),
        ({"dicom": 5}, "dicom = 5: expected a table"),
        ({"bogus": {}}, "bogus = {}: unknown section (known: dicom, storage"),
        ({"alerts": {"threshold": 1.5}}, "alerts.threshold = 1.5"),
        ({"alerts": {"webhook_url": "ftp://x"}}, "alerts.webhook_url = 'ftp://x'"),
        ({"scoring": {"device": "tpu"}}, "scoring.device = 'tpu': expected one of 'auto', 'cpu', 'cuda'"),
        ({"storage": {"state_dir": 3}}, "storage.state_dir = 3"),
        ({"alerts": {"retry_initial_s": 10, "retry_max_s": 5}}, "alerts.retry_initial_s = 10"),
        ({"scoring": {"model_path": "/nonexistent/model.onnx"}}, "scoring.model_path"),
        ({"assembly": {"quiet_period_s": -1}}, "assembly.quiet_period_s = -1"),
        ({"logging": {"level": "loud"}}, "logging.level = 'loud'"),
        ({"alerts": {"exec_command": "/bin/true"}}, "alerts.exec_command = '/bin/true'"),
        ({"storage": {"database_url": "postgress://qc:pw@db/qc"}}, "storage.database_url = 'postgress://qc:***@db/qc'"),
        ({"storage": {"database_url": "qc:pw at db"}}, "storage.database_url = '(not shown: it may hold a password)'"),
        ({"storage": {"node_name": "n" * 129}}, "storage.node_name"),
    ],
)
def test_bad_values_name_key_and_value(raw, named):
    with pytest.raises(SettingsError) as info:
        settings_from_dict(raw)
    assert named in str(info.value)


def test_enum_list_and_path_values_are_typed(tmp_path):
    raw = {
        "scoring": {"device": "cpu"},
        "alerts": {"exec_command": ["/bin/true", "x"], "retry_initial_s": 1},
        "storage": {"state_dir": "~/qc"},
    }
    settings = settings_from_dict(raw)
    assert settings.scoring.device is Device.CPU
    assert settings.alerts.exec_command == ("/bin/true", "x")
    assert settings.alerts.retry_initial_s == 1.0 and isinstance(settings.alerts.retry_initial_s, float)
    assert settings.storage.state_dir == Path.home() / "qc"


def test_every_problem_is_reported_and_settings_are_frozen():
    with pytest.raises(SettingsError) as info:
        settings_from_dict({"dicom": {"port": -1, "max_associations": 0}, "watch": {"settle_s": "1"}})
    lines = str(info.value).splitlines()
    assert [line.split(" = ")[0] for line in lines] == ["dicom.port", "dicom.max_associations", "watch.settle_s"]
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.dicom.port = 104  # type: ignore[misc]


def test_cli_reports_bad_config_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text("[assembly]\nquiet_period_s = 'soon'\n")
    assert main(["--config", str(path), "check-config"]) == 2
    assert "assembly.quiet_period_s = 'soon'" in capsys.readouterr().err


def test_check_config_loads_the_bundled_model(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(f'[storage]\nstate_dir = "{tmp_path}"\n')
    assert main(["--config", str(path), "check-config"]) == 0
    out = capsys.readouterr().out
    assert '"architecture": "hysnet-' in out


def test_node_name_defaults_to_host_and_dicom_port():
    import socket

    assert settings_from_dict({"dicom": {"port": 104}}).node_name == f"{socket.gethostname()}:104"
    assert settings_from_dict({"storage": {"node_name": "mr-room-1"}}).node_name == "mr-room-1"


def test_check_config_shows_the_database_url_without_its_password(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(f'[storage]\nstate_dir = "{tmp_path}"\nnode_name = "mr-room-1"\n'
                    'database_url = "postgresql://qc:s3cret@db.example.org/qc"\n')
    assert main(["--config", str(path), "check-config"]) == 0
    out = capsys.readouterr().out
    assert '"database": "postgresql+psycopg://qc:***@db.example.org/qc"' in out and "s3cret" not in out
    assert '"node_name": "mr-room-1"' in out
