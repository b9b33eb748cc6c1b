"""The spike check (qc_daemon/spike_check.py): what it reads on clean scans and on known spikes, and its time.

    .venv/bin/python bench/bench_spike_check.py [--heads 8] [--positions 2]

Needs ../shared/data. The check runs on the volume as acquired (the daemon's own DICOM reading for the series).
1. Clean: every training scan under ../shared/data/t1w and the human and phantom DICOM series: the largest
   spectral prominence (a spike needs MIN_PROMINENCE).
2. Spikes: `trainer.artifacts`' spike (one k-space sample at 5-30 % of k-space on each axis, random signs) at its
   five severities, ``--positions`` random positions each, on the 2 unseen human series and ``--heads`` training
   scans: how many are found, the lowest prominence, and the stripe amplitude read (median and range).
3. Time of one check on the Philips 3D T1 (170 x 256 x 256).
Prints JSON lines; the last is the summary quoted in BENCHMARKS.md and MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from shared_scans import HUMAN, PHANTOMS, dicom_volume, require_shared_data, scan_name, training_scans

from qc_daemon.spike_check import measure_spike
from trainer.artifacts import SEVERITY_TABLE, apply_params
from trainer.data import load_ras


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", type=int, default=8, help="training scans to spike, spread over the sites")
    parser.add_argument("--positions", type=int, default=2, help="random spike positions per severity and head")
    args = parser.parse_args()
    require_shared_data()

    clean = {}
    training = training_scans()
    for path in training:
        clean[scan_name(path)] = measure_spike(load_ras(path)[0]).prominence
    human = {name: dicom_volume(name) for name in HUMAN}
    for name in (*HUMAN, *PHANTOMS):
        clean[name] = measure_spike((human.get(name) or dicom_volume(name)).data).prominence
    print(json.dumps({"clean": clean}))

    heads = {name: (v.data, v.spacing_mm) for name, v in human.items()}
    for path in training[:: max(1, len(training) // max(1, args.heads))][: args.heads]:
        heads[scan_name(path)] = load_ras(path)
    rng = np.random.default_rng(0)
    found: dict[float, list[tuple[float | None, float | None]]] = {a: [] for a in SEVERITY_TABLE["spike"][1:]}
    for name, (data, spacing) in heads.items():
        for amplitude in found:
            for _ in range(args.positions):
                position = (rng.uniform(0.05, 0.3, 3) * rng.choice([-1.0, 1.0], 3)).tolist()
                spiked = apply_params(data, spacing, "spike", {"position": position, "amplitude": amplitude})
                measure = measure_spike(spiked)
                found[amplitude].append((measure.prominence, measure.amplitude))
        print(json.dumps({"head": name, "found": {a: r[-args.positions:] for a, r in found.items()}}), flush=True)

    volume = human[HUMAN[0]].data
    times = []
    for _ in range(5):
        started = time.perf_counter()
        measure_spike(volume)
        times.append(time.perf_counter() - started)

    def reads(rows):
        amplitudes = [a for _, a in rows if a is not None]
        return {"found": f"{len(amplitudes)}/{len(rows)}", "lowest_prominence": min(p for p, _ in rows),
                "amplitude_median_min_max": [round(statistics.median(amplitudes), 4), min(amplitudes),
                                             max(amplitudes)] if amplitudes else None}

    print(json.dumps({
        "bench": "spike_check", "clean_scans": len(clean), "clean_largest_prominence": max(clean.values()),
        "clean_with_a_spike": sorted(n for n, p in clean.items() if p is None or p >= 12.0),
        "spikes": {a: reads(rows) for a, rows in found.items()},
        "seconds_median": round(statistics.median(times), 3), "shape": list(volume.shape),
    }))


if __name__ == "__main__":
    main()
