from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from pynetdicom import AE, StoragePresentationContexts
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

sys.path.insert(0, str(Path(__file__).parent))

from qc_daemon.logs import configure_logging  # noqa: E402
from qc_daemon.settings import LogFormat, LoggingSettings, Settings, settings_from_dict  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "2")
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_settings(tmp_path: Path, **sections) -> Settings:
    """Settings for a test: state under tmp_path, any free port, a short quiet period."""
    raw = {
        "dicom": {"port": 0, "host": "127.0.0.1"},
        "storage": {"state_dir": str(tmp_path / "state"), "min_free_mb": 1},
        "assembly": {"quiet_period_s": 0.5, "min_slices": 16},
        "logging": {"format": "json"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return settings_from_dict(raw)


@pytest.fixture(autouse=True, scope="session")
def _no_site_config(tmp_path_factory):
    """A command run without --config reads an empty file (built-in defaults), never /etc/qc-daemon/config.toml."""
    empty = tmp_path_factory.mktemp("no-site-config") / "config.toml"
    empty.write_text("")
    before = os.environ.get("QC_DAEMON_CONFIG")
    os.environ["QC_DAEMON_CONFIG"] = str(empty)
    yield
    if before is None:
        os.environ.pop("QC_DAEMON_CONFIG", None)
    else:
        os.environ["QC_DAEMON_CONFIG"] = before


@pytest.fixture(autouse=True)
def _fresh_logging():
    """Each test starts with logs to a stream of its own; none writes into an earlier test's closed capture."""
    configure_logging(LoggingSettings(format=LogFormat.JSON, level="info"), stream=io.StringIO())
    yield
    logging.getLogger().handlers.clear()


@pytest.fixture
def log_stream():
    """Everything the daemon logs during the test, as JSON lines."""
    stream = io.StringIO()
    configure_logging(LoggingSettings(format=LogFormat.JSON, level="debug"), stream=stream)
    yield stream
    logging.getLogger().handlers.clear()


@pytest.fixture
def daemon_factory(tmp_path):
    from qc_daemon.service import Daemon

    started = []

    def start(**sections):
        daemon = Daemon(make_settings(tmp_path, **sections), tick_s=0.05)
        daemon.start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def send_datasets(datasets, port: int, called_aet: str = "QC_DAEMON", calling_aet: str = "TEST_SCU") -> list[int]:
    """Send with pynetdicom as a storage SCU; returns the status of each C-STORE."""
    ae = AE(ae_title=calling_aet)
    for context in StoragePresentationContexts:
        ae.add_requested_context(context.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    assert assoc.is_established, "association was not established"
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        assoc.release()
    return statuses


def spool_datasets(spool, datasets) -> str:
    """Write datasets straight into a spool (as if received, without the network); returns the series UID."""
    from pydicom.filebase import DicomBytesIO

    for ds in datasets:
        buffer = DicomBytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        spool.store(str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), buffer.getvalue())
    return str(datasets[0].SeriesInstanceUID)


def wait_until(condition, timeout_s: float = 10.0, poll_s: float = 0.02) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passed; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(poll_s)
    return condition()


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} not present")
    return path


class Pipeline:
    """Spool + store + scorer + processor without the network: for classification and failure tests."""

    def __init__(self, settings: Settings):
        from qc_daemon.pipeline import SeriesProcessor
        from qc_daemon.scorer import Scorer
        from qc_daemon.spool import Spool
        from qc_daemon.store import Store

        settings.storage.state_dir.mkdir(parents=True, exist_ok=True)
        self.spool = Spool(settings.storage.spool_path)
        self.store = Store(settings.storage.database)
        self.processor = SeriesProcessor(
            self.spool, self.store, Scorer(settings.scoring), min_slices=settings.assembly.min_slices,
            threshold=settings.alerts.threshold, alert_channels=(), archive_dir=None,
        )

    def spool_datasets(self, datasets) -> str:
        return spool_datasets(self.spool, datasets)

    def process(self, datasets):
        return self.processor.process(self.spool_datasets(datasets))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    pipe = Pipeline(make_settings(tmp_path_factory.mktemp("pipeline")))
    yield pipe
    pipe.store.close()


class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    """A webhook receiver on loopback: (url, list of the JSON bodies POSTed to it)."""
    _Hook.received = []
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alerts", _Hook.received
    server.shutdown()
