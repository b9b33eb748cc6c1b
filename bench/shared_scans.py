"""The shared scans the check benchmarks read (bench_ghost_check.py, bench_spike_check.py): ../shared/data."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qc_daemon.cli import _pick_series  # noqa: E402
from qc_daemon.series import classify, read_series  # noqa: E402
from qc_daemon.volume import Volume, build_volume  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
HUMAN = ("philips_elitionx_t1_mprage_3d", "siemens_prisma_t1_2d_sag")  # the two unseen sites
PHANTOMS = ("siemens_xa30_t1_tfl_enhanced_phantom", "siemens_xa30_t1_tfl_jpeglossless_phantom")


def require_shared_data() -> None:
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is not here: this benchmark needs the shared data")


def training_scans() -> list[Path]:
    """Every clean training scan (NIfTI) under ../shared/data/t1w, in name order."""
    return sorted((SHARED / "t1w").glob("*/*.nii*"))


def scan_name(path: Path) -> str:
    return f"{path.parent.name}/{path.name.split('_')[0]}"


def dicom_volume(name: str) -> Volume:
    """A shared DICOM series built by the daemon's own code (phantoms too: no phantom keywords)."""
    folder = SHARED / "dicom" / name
    return build_volume(classify(read_series(name, _pick_series(folder, None)), min_slices=5, phantom_keywords=[]))
