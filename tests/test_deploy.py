"""deploy/: the systemd unit, the Orthanc routing files and the conformance statement agree with the code;
``qc-daemon serve`` as a real process speaks systemd's notify protocol and stops cleanly on SIGTERM."""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

from qc_daemon import cli
from qc_daemon.listener import TRANSFER_SYNTAXES
from qc_daemon.series import MR_IMAGE_CLASSES
from qc_daemon.settings import DicomSettings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "qc-daemon.service"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values...]}}: keys may repeat, comments and blanks are skipped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {raw!r} outside a section"
        assert "=" in line, f"{path}: not a key=value line: {raw!r}"
        key, value = (part.strip() for part in line.split("=", 1))
        current.setdefault(key, []).append(value)
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    unit = parse_unit(UNIT)
    assert {"Unit", "Service", "Install"} <= set(unit)
    return unit["Service"]


def _one(service, key: str) -> str:
    values = service.get(key)
    assert values, f"{key}= missing from {UNIT.name}"
    return values[-1]


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min|m)?", value)
    assert match, f"unsupported time span {value!r}"
    return float(match.group(1)) * (60 if match.group(2) in ("min", "m") else 1)


def test_unit_has_the_required_hardening(service):
    required = {
        "Type": "notify",
        "User": "qc-daemon",
        "Group": "qc-daemon",
        "DynamicUser": "no",
        "StateDirectory": "qc-daemon",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "LockPersonality": "yes",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
    }
    for key, value in required.items():
        assert _one(service, key) == value, f"{key}= should be {value}"
    assert set(_one(service, "RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    # ONNX Runtime and the CUDA driver may JIT: W^X protection would break them.
    assert "MemoryDenyWriteExecute" not in service
    # Port 11112 needs no capability; CAP_NET_BIND_SERVICE stays a comment for sites on port 104.
    assert _one(service, "AmbientCapabilities") == ""
    assert _one(service, "CapabilityBoundingSet") == ""
    assert DicomSettings().port >= 1024


def test_unit_timeouts_fit_the_daemon(service):
    from qc_daemon.service import Daemon

    tick_s = inspect.signature(Daemon).parameters["tick_s"].default
    watchdog = _seconds(_one(service, "WatchdogSec"))
    assert watchdog >= 20 * tick_s, "the daemon pings every tick; leave room for a slow disk or a busy CPU"
    assert _seconds(_one(service, "TimeoutStopSec")) >= 120, "SIGTERM lets the series being scored finish"
    assert _seconds(_one(service, "TimeoutStartSec")) >= 90, "model check (and CUDA init) at start-up"


def test_unit_does_not_restart_on_a_configuration_error(service, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nport = 'eleven'\n")
    code = cli.main(["--config", str(bad), "serve"])
    assert code == 2 and "dicom.port" in capsys.readouterr().err
    assert str(code) in _one(service, "RestartPreventExitStatus").split()


def test_unit_does_not_restart_when_the_port_cannot_be_opened(service):
    # the exit itself is tested in test_cli.py (a real busy port)
    assert str(cli.EXIT_CANNOT_LISTEN) in _one(service, "RestartPreventExitStatus").split()


def test_exec_start_is_a_valid_serve_command(service):
    argv = shlex.split(_one(service, "ExecStart"))
    assert argv[0] == "/opt/qc-daemon/.venv/bin/qc-daemon"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[Path(argv[0]).name] == "qc_daemon.cli:main"
    args = cli._parser().parse_args(argv[1:])
    assert args.command == "serve" and args.run is cli.cmd_serve
    assert args.config == cli.DEFAULT_CONFIG_PATH == Path("/etc/qc-daemon/config.toml")


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    entry = Path(sys.executable).parent / "qc-daemon"
    if not entry.exists():
        pytest.skip("no qc-daemon entry point next to this interpreter")
    # verify checks that ExecStart= exists: point it at this checkout's entry point.
    unit = tmp_path / "qc-daemon.service"
    unit.write_text(UNIT.read_text().replace("/opt/qc-daemon/.venv/bin/qc-daemon", str(entry)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "qc-daemon.service" not in result.stderr, result.stderr  # no warnings about our unit either


# ---- Orthanc --------------------------------------------------------------------------------------------


def _orthanc_snippet() -> dict:
    text = (DEPLOY / "orthanc" / "qc-daemon.json").read_text()
    return json.loads("\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//")))


def test_lua_routes_to_the_modality_the_snippet_defines():
    snippet = _orthanc_snippet()
    lua_path = DEPLOY / "orthanc" / "qc-daemon-routing.lua"
    lua = "\n".join(line for line in lua_path.read_text().splitlines() if not line.lstrip().startswith("--"))
    assert "function OnStableSeries(" in lua
    targets = re.findall(r"/modalities/([A-Za-z0-9_-]+)/store", lua)
    assert targets, "the script sends nothing"
    modalities = snippet["DicomModalities"]
    assert set(targets) <= set(modalities)
    for name in targets:
        entry = modalities[name]
        assert entry["AET"] == DicomSettings().ae_title
        assert entry["Port"] == DicomSettings().port
    assert [Path(p).name for p in snippet["LuaScripts"]] == [lua_path.name]


# ---- conformance statement ------------------------------------------------------------------------------


def test_conformance_statement_matches_the_listener():
    from pydicom.uid import UID
    from pynetdicom import (
        PYNETDICOM_IMPLEMENTATION_UID,
        PYNETDICOM_IMPLEMENTATION_VERSION,
        AllStoragePresentationContexts,
    )

    text = (DEPLOY / "CONFORMANCE.md").read_text()
    for syntax in TRANSFER_SYNTAXES:
        assert f"`{syntax}`" in text, f"transfer syntax {UID(syntax).name} ({syntax}) not in CONFORMANCE.md"
    listed = set(re.findall(r"`(1\.2\.840\.10008\.1\.2[0-9.]*)`", text))
    assert listed == set(TRANSFER_SYNTAXES), "CONFORMANCE.md lists a transfer syntax the listener does not accept"
    for sop_class in MR_IMAGE_CLASSES:
        assert f"`{sop_class}`" in text
    appendix = text.split("## Appendix A", 1)[1]
    accepted = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    assert set(re.findall(r"`(1\.2\.840\.10008\.5\.1\.4\.[0-9.]+)`", appendix)) == accepted
    scored = {uid for uid, outcome in re.findall(r"`([0-9.]+)` \| (scored) \|", appendix)}
    assert scored == set(MR_IMAGE_CLASSES)
    # A pynetdicom upgrade changes what the node announces: the statement must follow.
    assert PYNETDICOM_IMPLEMENTATION_UID in text
    assert PYNETDICOM_IMPLEMENTATION_VERSION in text


# ---- the real process under a systemd-like supervisor ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _receive_until(sock: socket.socket, wanted: str, timeout_s: float, seen: list[str], proc) -> bool:
    """Collect notify datagrams into ``seen`` until ``wanted`` arrives, the time is up or the process is gone."""
    deadline = time.monotonic() + timeout_s
    sock.settimeout(0.2)
    while wanted not in seen and time.monotonic() < deadline:
        try:
            seen.append(sock.recv(4096).decode())
        except TimeoutError:
            if proc.poll() is not None:  # exited, and everything it sent has been read
                break
    return wanted in seen


def test_serve_process_notifies_systemd_answers_echo_and_stops_on_sigterm(tmp_path, capsys):
    port = _free_port()
    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    config.write_text(
        f'[dicom]\nhost = "127.0.0.1"\nport = {port}\n\n'
        "[storage]\nmin_free_mb = 1\n\n"  # no state_dir: $STATE_DIRECTORY (set by systemd) is used
        "[scoring]\nthreads = 1\n\n"
        '[logging]\nformat = "json"\n'
    )
    sock_dir = tempfile.mkdtemp(prefix="qcn-")  # AF_UNIX paths are limited to 108 bytes: keep it short
    notify_path = os.path.join(sock_dir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path, STATE_DIRECTORY=str(state), OMP_NUM_THREADS="1")
    stdout_path, stderr_path = tmp_path / "stdout.log", tmp_path / "stderr.log"
    messages: list[str] = []
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qc_daemon", "--config", str(config), "serve"],
            stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=tmp_path,
        )
    try:
        ready = _receive_until(sock, "READY=1", 120, messages, proc)
        assert ready, f"no READY=1 (got {messages}); stderr:\n{stderr_path.read_text()[-3000:]}"
        assert (state / "qc.sqlite3").exists(), "state_dir should default to $STATE_DIRECTORY"
        assert cli.main(["--config", str(config), "echo"]) == 0
        assert "success" in capsys.readouterr().out
        assert _receive_until(sock, "WATCHDOG=1", 10, messages, proc), messages

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        stop_s = time.monotonic() - started
        _receive_until(sock, "STOPPING=1", 2, messages, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        sock.close()
        shutil.rmtree(sock_dir, ignore_errors=True)

    assert code == 0, stderr_path.read_text()[-3000:]
    assert stop_s < 10
    assert "STOPPING=1" in messages
    assert messages.index("READY=1") < messages.index("STOPPING=1")
    lines = [line for line in stdout_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # journald + jq need one JSON object per line, nothing else
    events = [record["event"] for record in records]
    assert "daemon_ready" in events
    assert events[-1] == "daemon_stopped"
    ready = records[events.index("daemon_ready")]
    assert ready["port"] == port and ready["state_dir"] == str(state)
    assert all({"timestamp", "level", "logger"} <= set(record) for record in records)
