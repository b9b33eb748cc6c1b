"""Ingest throughput: the same DCMTK ``storescu`` sending one folder to DCMTK ``storescp`` and to the daemon.

    .venv/bin/python bench/bench_ingest.py [DICOM_FOLDER] [--repeats 3]

Both ends run with ``TCP_NODELAY=1`` in the environment: DCMTK 3.6.7 leaves Nagle's algorithm on otherwise, and
storescp then spends ~40 ms per instance waiting for delayed ACKs (10 s instead of 0.8 s for the Philips series).
``storescp`` writes each file without fsync; the daemon answers success only after the instance and its folder
entry are fsynced. Each daemon run starts a fresh daemon (a resent instance is a duplicate and is not written).
Prints one JSON line: median seconds per run and the daemon's throughput relative to storescp.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench_latency import DEFAULT_FOLDERS, _free_port, _start_daemon, _Webhook

STORESCP = "/usr/bin/storescp"
ENV = {**os.environ, "TCP_NODELAY": "1"}


def _send(storescu: str, folder: Path, port: int) -> float:
    started = time.perf_counter()
    subprocess.run([storescu, "-aec", "QC_DAEMON", "127.0.0.1", str(port), "+sd", str(folder)],
                   env=ENV, check=True, capture_output=True, timeout=300)
    return time.perf_counter() - started


def time_storescp(storescu: str, folder: Path) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        port = _free_port()
        server = subprocess.Popen([STORESCP, "-od", tmp, str(port)], env=ENV)
        try:
            time.sleep(0.5)
            return _send(storescu, folder, port)
        finally:
            server.terminate()
            server.wait()


def time_daemon(storescu: str, folder: Path, webhook_port: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        process, _, port = _start_daemon(Path(tmp), webhook_port, use_expected_count=True)
        try:
            return _send(storescu, folder, port)
        finally:
            process.terminate()
            process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDERS[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--storescu", default="/usr/bin/storescu")
    args = parser.parse_args()
    webhook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    storescp = [time_storescp(args.storescu, args.folder) for _ in range(args.repeats)]
    daemon = [time_daemon(args.storescu, args.folder, webhook.server_address[1]) for _ in range(args.repeats)]
    files = sum(1 for p in args.folder.rglob("*") if p.is_file())
    print(json.dumps({
        "bench": "ingest", "series": args.folder.name, "files": files, "repeats": args.repeats,
        "load_avg": round(os.getloadavg()[0], 2),
        "storescp_s": round(statistics.median(storescp), 3), "daemon_s": round(statistics.median(daemon), 3),
        "daemon_vs_storescp": round(statistics.median(storescp) / statistics.median(daemon), 2),
    }))
    webhook.shutdown()


if __name__ == "__main__":
    main()
