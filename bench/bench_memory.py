"""Peak resident memory: of scoring one volume, and of a running daemon while several scanners send at once.

    .venv/bin/python bench/bench_memory.py
    .venv/bin/python bench/bench_memory.py --scanners 8 [--receive-to-disk] [SERIES_FOLDER]

Without ``--scanners``: this process loads the bundled model (ONNX Runtime session), then the peak is reset and one
256x256x176 1 mm volume is preprocessed and scored.

With ``--scanners N``: a fresh daemon (``python -m qc_daemon serve``, default configuration apart from a temporary
state folder) receives N copies of one real series (default: the Philips 3D T1 of ../shared/data/dicom, 170 files),
each with its own study, series and instance UIDs, from N DCMTK ``storescu`` processes started together (N
scanners, N associations at once); the benchmark then waits until every series is scored. The daemon's resident
memory is sampled every 20 ms from /proc: the peak while the scanners send, and ``VmHWM`` (the true peak, nothing
missed between samples) once all N rows are stored. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_latency import DEFAULT_FOLDERS, _DaemonLog, _free_port

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TCP_NODELAY": "1"}


def _kib(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def scoring_peak() -> dict:
    import numpy as np

    from qc_daemon.scorer import Scorer
    from qc_daemon.settings import ScoringSettings
    from qc_daemon.volume import Volume

    scorer = Scorer(ScoringSettings(device="cpu"))
    volume = Volume(np.random.default_rng(0).random((256, 256, 176)).astype(np.float32) * 1000, (1.0, 1.0, 1.0),
                    np.eye(4))
    Path("/proc/self/clear_refs").write_text("5")  # peak from here on
    before = _kib("self", "VmRSS")
    started = time.perf_counter()
    result = scorer.score_volume(volume)
    return {"bench": "memory", "case": "scoring", "rss_before_mib": round(before / 1024),
            "rss_peak_mib": round(_kib("self", "VmHWM") / 1024), "seconds": round(time.perf_counter() - started, 2),
            "patches": len(result.patch_scores)}


def copy_series(folder: Path, out: Path, copies: int) -> list[tuple[Path, str]]:
    """``copies`` copies of a series with new study, series and instance UIDs: (folder, series UID) each."""
    import pydicom
    from pydicom.uid import generate_uid

    sources = sorted(p for p in folder.rglob("*") if p.is_file())
    made = []
    for n in range(copies):
        target = out / f"scanner-{n}"
        target.mkdir(parents=True)
        study, series = generate_uid(), generate_uid()
        for i, source in enumerate(sources):
            ds = pydicom.dcmread(source)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(target / f"{i:04d}.dcm", enforce_file_format=True)
        made.append((target, series))
    return made


class _Sampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kib, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak_kib = max(self.peak_kib, _kib(self.pid, "VmRSS"))


def scanners_peak(folder: Path, scanners: int, receive_to_disk: bool, storescu: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        copies = copy_series(folder, work / "send", scanners)
        files = len(list(copies[0][0].iterdir()))
        port = _free_port()
        config = work / "config.toml"
        config.write_text(f'[dicom]\nhost = "127.0.0.1"\nport = {port}\n'
                          f'receive_to_disk = {str(receive_to_disk).lower()}\n'
                          f'[storage]\nstate_dir = "{work / "state"}"\nmin_free_mb = 1\n[logging]\nformat = "json"\n')
        log_path = work / "daemon.log"
        process = subprocess.Popen([sys.executable, "-m", "qc_daemon", "--config", str(config), "serve"],
                                   stdout=log_path.open("w"), stderr=subprocess.STDOUT, cwd=REPO, env=ENV)
        try:
            log = _DaemonLog(log_path)
            log.wait_for("daemon_ready", timeout_s=120)
            log.wait_for("model_warmed_up", timeout_s=120)
            ready_kib = _kib(process.pid, "VmRSS")
            Path(f"/proc/{process.pid}/clear_refs").write_text("5")
            sampler = _Sampler(process.pid)
            sampler.start()
            started = time.perf_counter()
            senders = [subprocess.Popen([storescu, "-aet", f"MR{n}", "-aec", "QC_DAEMON", "127.0.0.1", str(port),
                                         "+sd", str(path)], env=ENV, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL) for n, (path, _) in enumerate(copies)]
            if any(sender.wait(timeout=600) for sender in senders):
                raise RuntimeError("a storescu failed")
            sent_s = time.perf_counter() - started
            receiving_peak_kib = sampler.peak_kib
            for _, series_uid in copies:
                log.wait_for("series_scored", series_uid, timeout_s=900)
            scored_s = time.perf_counter() - started
            sampler.stop.set()
            peak_kib = _kib(process.pid, "VmHWM")
        finally:
            process.terminate()
            process.wait(timeout=120)
    return {"bench": "memory", "case": "scanners", "scanners": scanners, "series": folder.name,
            "files_per_scanner": files,
            "receive_to_disk": receive_to_disk, "rss_ready_mib": round(ready_kib / 1024),
            "rss_peak_receiving_mib": round(receiving_peak_kib / 1024), "rss_peak_mib": round(peak_kib / 1024),
            "all_sent_s": round(sent_s, 1), "all_scored_s": round(scored_s, 1), "cpus": os.cpu_count(),
            "load_avg": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDERS[0])
    parser.add_argument("--scanners", type=int, default=0, help="0: the scoring step alone, in this process")
    parser.add_argument("--receive-to-disk", action="store_true", help="the daemon with dicom.receive_to_disk")
    parser.add_argument("--storescu", default="/usr/bin/storescu", help="DCMTK's (the venv's pynetdicom one differs)")
    args = parser.parse_args()
    if args.scanners:
        result = scanners_peak(args.folder, args.scanners, args.receive_to_disk, args.storescu)
    else:
        result = scoring_peak()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
