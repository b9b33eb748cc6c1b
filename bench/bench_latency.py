"""Latency of a running daemon: from the last C-STORE response to the scored row and to the webhook.

    .venv/bin/python bench/bench_latency.py [DICOM_FOLDER ...] [--repeats 3] [--storescu /usr/bin/storescu]

Default folders: the scorable series of ../shared/data/dicom. For each repeat a fresh daemon is started
(``python -m qc_daemon serve``, default config apart from a temporary state folder, a free port, JSON logs, a
webhook on this process and ``alerts.threshold = 1.0`` so that every scored series alerts), and each folder is
sent by DCMTK's ``storescu`` in one association. Times come from three clocks of the same machine:

* the last "Received Store Response" line of storescu (log4cplus ``%d``: UTC, milliseconds);
* the daemon's JSON log: ``series_completed`` (end of waiting) and ``series_scored`` (the row is committed),
  whose phase fields split the processing into reading, volume building, preprocessing, inference and storing;
* the arrival of the alert's POST at this process's webhook.

``--no-expected-count`` measures the association-release path alone. Prints one JSON line per series and
repeat, then one summary line (medians and the load average).
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.server
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"
DEFAULT_FOLDERS = [
    DICOM / "philips_elitionx_t1_mprage_3d",
    DICOM / "siemens_xa30_t1_tfl_jpeglossless_phantom",
    DICOM / "siemens_xa30_t1_tfl_enhanced_phantom",
    DICOM / "siemens_prisma_t1_2d_sag",
]
PHASES = ("read_s", "volume_s", "preprocess_s", "inference_s", "store_s")
STORESCU_LOG_CONFIG = """\
log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %d{%Y-%m-%dT%H:%M:%S.%q} %p: %m%n
"""
TIMEOUT_S = 120.0
# storescu proposes a compressed transfer syntax only when told which one (as in tests/test_real_series.py).
STORESCU_PROPOSAL = {"1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.4.80": "-xt",
                     "1.2.840.10008.1.2.4.90": "-xv"}


class _Webhook(http.server.BaseHTTPRequestHandler):
    received: dict[str, float] = {}

    def do_POST(self):  # noqa: N802 - http.server's name
        arrived = time.time()
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        _Webhook.received.setdefault(body["series_instance_uid"], arrived)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _utc(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).replace(tzinfo=dt.UTC).timestamp()


class _DaemonLog:
    """The daemon's JSON log lines, read as they are written."""

    def __init__(self, path: Path):
        self.path = path

    def events(self) -> list[dict]:
        lines = self.path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait_for(self, event: str, series_uid: str | None = None, timeout_s: float = TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.events():
                if line.get("event") == event and series_uid in (None, line.get("series_instance_uid")):
                    return line
            time.sleep(0.05)
        raise TimeoutError(f"no {event} for {series_uid} within {timeout_s} s")


def _start_daemon(
    state: Path, webhook_port: int, use_expected_count: bool
) -> tuple[subprocess.Popen, _DaemonLog, int]:
    port = _free_port()
    config = state / "config.toml"
    config.write_text(
        f'[dicom]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[storage]\nstate_dir = "{state / "state"}"\nmin_free_mb = 1\n'
        f'[alerts]\nthreshold = 1.0\nwebhook_url = "http://127.0.0.1:{webhook_port}/"\n'
        f'[logging]\nformat = "json"\n'
        f'[assembly]\nuse_expected_count = {str(use_expected_count).lower()}\n'
    )
    log_path = state / "daemon.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "qc_daemon", "--config", str(config), "serve"],
        stdout=log_path.open("w"), stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
    )
    log = _DaemonLog(log_path)
    log.wait_for("daemon_ready", timeout_s=60)
    return process, log, port


def _send(storescu: str, folder: Path, port: int, work: Path) -> float:
    """Send the folder in one association; returns the time of the last C-STORE response (epoch seconds)."""
    log_config = work / "storescu.cfg"
    log_config.write_text(STORESCU_LOG_CONFIG)
    proposal = [STORESCU_PROPOSAL[syntax]] if (syntax := _first(folder).file_meta.TransferSyntaxUID) in \
        STORESCU_PROPOSAL else []
    result = subprocess.run(
        [storescu, "--log-config", str(log_config), *proposal, "-aet", "BENCH_SCU", "-aec", "QC_DAEMON",
         "127.0.0.1", str(port), "+sd", str(folder)],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=True,
    )
    responses = [line for line in (result.stdout + result.stderr).splitlines() if "Received Store Response" in line]
    if not responses:
        raise RuntimeError(f"storescu logged no store response:\n{result.stdout}{result.stderr}")
    return _utc(responses[-1].split(" ", 1)[0])


def _first(folder: Path):
    import pydicom

    first = next(p for p in sorted(folder.rglob("*")) if p.is_file())
    return pydicom.dcmread(first, stop_before_pixels=True)


def measure(folder: Path, storescu: str, webhook_port: int, use_expected_count: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        work = Path(tmp)
        process, log, port = _start_daemon(work, webhook_port, use_expected_count)
        try:
            uid = str(_first(folder).SeriesInstanceUID)
            last_response = _send(storescu, folder, port, work)
            scored = log.wait_for("series_scored", uid)
            completed = log.wait_for("series_completed", uid)
            deadline = time.monotonic() + 10
            while uid not in _Webhook.received and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            process.terminate()
            process.wait(timeout=60)
    row_at = _utc(scored["timestamp"])
    result = {
        "series": folder.name,
        "trigger": completed["trigger"],
        "waiting_s": round(_utc(completed["timestamp"]) - last_response, 3),
        **{name: scored.get(name) for name in PHASES},
        "to_row_s": round(row_at - last_response, 3),
        "row_to_webhook_s": round(_Webhook.received[uid] - row_at, 3) if uid in _Webhook.received else None,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folders", nargs="*", type=Path, default=DEFAULT_FOLDERS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-expected-count", action="store_true",
                        help="assembly.use_expected_count = false: only the association's release completes early")
    parser.add_argument("--storescu", default="/usr/bin/storescu", help="DCMTK's (the venv's pynetdicom one differs)")
    args = parser.parse_args()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    results = []
    for _ in range(args.repeats):
        for folder in args.folders:
            _Webhook.received.clear()
            result = measure(folder, args.storescu, server.server_address[1], not args.no_expected_count)
            print(json.dumps(result), flush=True)
            results.append(result)
    summary = {"bench": "latency", "cpus": os.cpu_count(), "load_avg": round(os.getloadavg()[0], 2),
               "repeats": args.repeats, "median": {}}
    for folder in args.folders:
        mine = [r for r in results if r["series"] == folder.name]
        summary["median"][folder.name] = {
            key: round(statistics.median(r[key] for r in mine), 3)
            for key in ("waiting_s", *PHASES, "to_row_s", "row_to_webhook_s")
            if all(r[key] is not None for r in mine)
        }
    print(json.dumps(summary))
    server.shutdown()


if __name__ == "__main__":
    main()
