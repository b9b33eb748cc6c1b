"""Peak resident memory of scoring one 256x256x176 1 mm volume with the bundled model (this process: ONNX Runtime
session loaded, then the peak is reset and one volume preprocessed and scored).

    .venv/bin/python bench/bench_memory.py
"""

import numpy as np, time
from pathlib import Path
from qc_daemon.scorer import Scorer
from qc_daemon.settings import ScoringSettings
from qc_daemon.volume import Volume
def kib(field):
    for l in Path("/proc/self/status").read_text().splitlines():
        if l.startswith(field+":"): return int(l.split()[1])
sc=Scorer(ScoringSettings(device="cpu"))
v=Volume(np.random.default_rng(0).random((256,256,176)).astype(np.float32)*1000, (1.0,1.0,1.0), np.eye(4))
Path("/proc/self/clear_refs").write_text("5")
before=kib("VmRSS"); t=time.time(); r=sc.score_volume(v); dt=time.time()-t
print(f"RSS before {before/1024:.0f} MiB, peak while scoring {kib('VmHWM')/1024:.0f} MiB, {dt:.2f} s, {len(r.patch_scores)} patches")
