"""Time the results for PACS of one scored revision: build the SR and the montage SC, store both on loopback.

    .venv/bin/python bench/bench_results.py [--slices 176] [--repeats 5]

The SR's evidence lists every instance of a classic MR series of ``--slices`` headers (no pixel data: the
build reads headers only); the montage is a 1200 x 900 RGB PNG, the size qc_daemon/montage.py draws. Each
object is then C-STOREd to a pynetdicom storage SCP on loopback by :func:`qc_daemon.pacs_sender.send_instance`
(one association each, as the sender does). Prints one JSON line: median seconds per step, and the load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from qc_daemon.logs import configure_logging
from qc_daemon.pacs_report import ModelIdentity, ResultFacts, ResultKind, build_results
from qc_daemon.pacs_sender import send_instance
from qc_daemon.settings import Destination, LoggingSettings


def headers(slices: int) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    out = []
    for k in range(slices):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Head", "BENCH", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "A1", "1"
        ds.Modality, ds.Manufacturer, ds.SeriesDescription, ds.InstanceNumber = "MR", "Bench", "T1 3D", k + 1
        out.append(ds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=176)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    configure_logging(LoggingSettings(level="warning"), stream=sys.stderr)
    series = headers(args.slices)
    scp = AE("BENCH_SCP")
    for context in AllStoragePresentationContexts:
        scp.add_supported_context(context.abstract_syntax)
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])
    target = Destination("BENCH_SCP", "127.0.0.1", server.server_address[1])
    runs = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            png = Path(folder) / "montage.png"
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (900, 1200, 4), dtype=np.uint8)).save(png)
            for i in range(args.repeats + 1):  # the first run loads highdicom's tables: not counted
                facts = ResultFacts(str(series[0].SeriesInstanceUID), i + 1, dt.datetime(2026, 1, 1), "T1 3D", 0.42,
                                    0.5, {"snr_total": 12.0, "cjv": 0.5}, ModelIdentity("bench", "0" * 64, "bench"),
                                    "QC_DAEMON")
                run = {}
                for kind in ResultKind:
                    started = time.perf_counter()
                    (built,) = build_results([kind], series, facts, png, Path(folder) / f"r{i}").values()
                    run[f"build_{kind.value}_s"] = time.perf_counter() - started
                    started = time.perf_counter()
                    send_instance(built.path, target, "QC_DAEMON", timeout_s=30)
                    run[f"send_{kind.value}_s"] = time.perf_counter() - started
                    run[f"{kind.value}_bytes"] = built.path.stat().st_size
                if i:
                    runs.append(run)
    finally:
        server.shutdown()
    print(json.dumps({
        "slices": args.slices,
        "repeats": args.repeats,
        **{f"median_{k}": round(statistics.median(run[k] for run in runs), 3) for k in runs[0]},
        "cpus": os.cpu_count(),
        "load_1min": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
