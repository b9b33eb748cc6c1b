"""Ingest throughput: the same DCMTK ``storescu`` sending one folder to DCMTK ``storescp`` and to the daemon.

    .venv/bin/python bench/bench_ingest.py [DICOM_FOLDER] [--pairs 5] [--no-fsync]

Each pair sends the folder once to a fresh ``storescp -od DIR`` and once to a fresh daemon (``python -m
qc_daemon serve``, default ``[dicom]`` settings, a temporary state folder), in alternating order so that a
change of load on a shared machine falls on both sides; the reported ratio is the median over pairs of
``storescp seconds / daemon seconds`` (the daemon's throughput relative to storescp's). Both ends run with
``TCP_NODELAY=1``: DCMTK 3.6.7 leaves Nagle's algorithm on otherwise, and storescp then spends ~40 ms per
instance waiting for delayed ACKs.

``storescp`` writes each file without fsync; the daemon answers success only after the instance and its
folder entry are fsynced. ``--no-fsync`` adds, to every pair, a third run against a daemon whose ``os.fsync``
is replaced by a no-op in the benchmark's launcher (never in the product), to measure what durability costs.

The daemons here only receive: the quiet period is an hour and no series can complete early (``min_slices``
is out of reach), so nothing is scored while the benchmark runs and the daemon's peak resident memory
(``VmHWM``, read from /proc once storescu has finished) is that of ingest on top of the loaded model.
Prints one JSON line per pair, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_latency import DEFAULT_FOLDERS, _DaemonLog, _free_port

STORESCP = "/usr/bin/storescp"
ENV = {**os.environ, "TCP_NODELAY": "1"}
REPO = Path(__file__).resolve().parents[1]
NO_FSYNC_LAUNCHER = "import os, sys; os.fsync = lambda fd: None; from qc_daemon.cli import main; sys.exit(main())"


def _send(storescu: str, folder: Path, port: int) -> float:
    started = time.perf_counter()
    subprocess.run([storescu, "-aec", "QC_DAEMON", "127.0.0.1", str(port), "+sd", str(folder)],
                   env=ENV, check=True, capture_output=True, timeout=300)
    return time.perf_counter() - started


def time_storescp(storescu: str, folder: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        port = _free_port()
        server = subprocess.Popen([STORESCP, "-od", tmp, str(port)], env=ENV)
        try:
            time.sleep(0.5)
            return {"s": _send(storescu, folder, port)}
        finally:
            server.terminate()
            server.wait()


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def time_daemon(storescu: str, folder: Path, fsync: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        state, port = Path(tmp), _free_port()
        config = state / "config.toml"
        config.write_text(
            f'[dicom]\nhost = "127.0.0.1"\nport = {port}\n'
            f'[storage]\nstate_dir = "{state / "state"}"\nmin_free_mb = 1\n'
            f'[logging]\nformat = "json"\n'
            f'[assembly]\nquiet_period_s = 3600\nuse_expected_count = false\nmin_slices = 100000\n'
        )
        launcher = ["-c", NO_FSYNC_LAUNCHER] if not fsync else ["-m", "qc_daemon"]
        log_path = state / "daemon.log"
        process = subprocess.Popen([sys.executable, *launcher, "--config", str(config), "serve"],
                                   stdout=log_path.open("w"), stderr=subprocess.STDOUT, cwd=REPO, env=ENV)
        try:
            log = _DaemonLog(log_path)
            log.wait_for("daemon_ready", timeout_s=120)
            log.wait_for("model_warmed_up", timeout_s=120)  # its one dummy batch must not share the send's CPUs
            ready_kib = _kib(process.pid, "VmRSS")
            Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # peak from here on
            seconds = _send(storescu, folder, port)
            peak_kib = _kib(process.pid, "VmHWM")
            spooled = sum(1 for p in (state / "state" / "spool").rglob("*.dcm"))
        finally:
            process.terminate()
            process.wait(timeout=60)
        return {"s": seconds, "rss_ready_mib": round(ready_kib / 1024), "rss_peak_mib": round(peak_kib / 1024),
                "spooled": spooled}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDERS[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--storescu", default="/usr/bin/storescu", help="DCMTK's (the venv's pynetdicom one differs)")
    parser.add_argument("--no-fsync", action="store_true", help="also time a daemon whose os.fsync is a no-op")
    args = parser.parse_args()
    files = sum(1 for p in args.folder.rglob("*") if p.is_file())
    load_before = os.getloadavg()[0]
    pairs = []
    for i in range(args.pairs):
        runs = {"storescp": lambda: time_storescp(args.storescu, args.folder),
                "daemon": lambda: time_daemon(args.storescu, args.folder)}
        if args.no_fsync:
            runs["daemon_no_fsync"] = lambda: time_daemon(args.storescu, args.folder, fsync=False)
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        pair = {name: runs[name]() for name in order}
        if pair["daemon"]["spooled"] != files:
            raise RuntimeError(f"the daemon spooled {pair['daemon']['spooled']} of {files} files")
        pair["ratio"] = round(pair["storescp"]["s"] / pair["daemon"]["s"], 3)
        if args.no_fsync:
            pair["ratio_no_fsync"] = round(pair["storescp"]["s"] / pair["daemon_no_fsync"]["s"], 3)
        print(json.dumps({"pair": i, **pair}, default=lambda x: round(x, 3)), flush=True)
        pairs.append(pair)

    def median(name: str, key: str = "s") -> float:
        return round(statistics.median(p[name][key] for p in pairs), 3)

    summary = {
        "bench": "ingest", "series": args.folder.name, "files": files, "pairs": len(pairs), "cpus": os.cpu_count(),
        "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2),
        "storescp_s": median("storescp"), "daemon_s": median("daemon"),
        "daemon_vs_storescp": round(statistics.median(p["ratio"] for p in pairs), 2),
        "daemon_rss_ready_mib": median("daemon", "rss_ready_mib"),
        "daemon_rss_peak_mib": max(p["daemon"]["rss_peak_mib"] for p in pairs),
    }
    if args.no_fsync:
        summary["daemon_no_fsync_s"] = median("daemon_no_fsync")
        summary["daemon_no_fsync_vs_storescp"] = round(statistics.median(p["ratio_no_fsync"] for p in pairs), 2)
        summary["fsync_cost_ms_per_instance"] = round(
            (summary["daemon_s"] - summary["daemon_no_fsync_s"]) / files * 1000, 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
