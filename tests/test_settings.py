from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import get_type_hints

import pytest

from qc_daemon.cli import main
from qc_daemon.settings import Device, Settings, SettingsError, load_settings, settings_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_repository_config_documents_every_key_with_its_default():
    text = (ROOT / "config.toml").read_text()
    assert load_settings(ROOT / "config.toml") == Settings()
    for section, section_type in get_type_hints(Settings).items():
        assert f"[{section}]" in text
        for field in dataclasses.fields(section_type):
            assert re.search(rf"^#? ?{field.name} = ", text, re.M), f"{section}.{field.name} undocumented"


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
        ({"dicom": {"colour": "red"}}, "unknown key dicom.colour"),
        ({"dicom": {"allowed_peers": ["10.0.0.300"]}}, "dicom.allowed_peers: '10.0.0.300'"),
        ({"bogus": {}}, "unknown section [bogus]"),
        ({"alerts": {"threshold": 1.5}}, "alerts.threshold = 1.5"),
        ({"alerts": {"webhook_url": "ftp://x"}}, "alerts.webhook_url = 'ftp://x'"),
        ({"scoring": {"device": "tpu"}}, "scoring.device = 'tpu'"),
        ({"scoring": {"model_path": "/nonexistent/model.onnx"}}, "scoring.model_path"),
        ({"assembly": {"quiet_period_s": -1}}, "assembly.quiet_period_s = -1"),
        ({"logging": {"level": "loud"}}, "logging.level = 'loud'"),
    ],
)
def test_bad_values_name_key_and_value(raw, named):
    with pytest.raises(SettingsError) as info:
        settings_from_dict(raw)
    assert named in str(info.value)


def test_enum_and_list_values_are_typed():
    settings = settings_from_dict({"scoring": {"device": "cpu"}, "alerts": {"exec_command": ["/bin/true", "x"]}})
    assert settings.scoring.device is Device.CPU
    assert settings.alerts.exec_command == ("/bin/true", "x")


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
