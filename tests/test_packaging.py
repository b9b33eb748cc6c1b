"""The wheel puts only ``qc_daemon`` into site-packages: ``trainer`` and ``export`` are generic names that would
collide with other projects', so they run from the repository root and are not packaged."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_the_qc_daemon_package(tmp_path):
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.onnx")  # the model is package data, not a package
    for folder in ("qc_daemon", "trainer", "export"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-c", "import setuptools.build_meta as b; print(b.build_wheel('dist'))"],
        cwd=source, capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = source / "dist" / built.stdout.strip().splitlines()[-1]

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        declared = archive.read(top_level).decode().split()

    assert declared == ["qc_daemon"]
    distribution, version = wheel.name.split("-")[:2]
    assert {name.split("/")[0] for name in names} == {"qc_daemon", f"{distribution}-{version}.dist-info"}
    assert "qc_daemon/cli.py" in names and "qc_daemon/models/hysnet-default.onnx.parity.json" in names
    assert "qc_daemon/web/templates/now.html" in names and "qc_daemon/web/static/live.js" in names
