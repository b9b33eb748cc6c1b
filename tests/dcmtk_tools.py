"""Finding DCMTK's command-line tools, not the same-named pynetdicom apps an activated virtualenv puts first on PATH.

pynetdicom installs ``storescu``, ``echoscu``, ``storescp``... into ``.venv/bin``; they take other options
(no ``+sd``, ``-R``, ``-xs``), so a test that runs ``storescu`` from PATH may run the wrong program.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

# A distribution's DCMTK first, then a local build, then whatever else PATH holds.
PREFERRED_DIRS = (Path("/usr/bin"), Path("/usr/local/bin"))


@functools.cache
def dcmtk_tool(name: str) -> str | None:
    """Path of DCMTK's ``name`` (checked by ``name --version`` naming dcmtk), or None when none is installed."""
    path_dirs = [Path(d) for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    for folder in dict.fromkeys([*PREFERRED_DIRS, *path_dirs]):
        candidate = folder / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        try:
            done = subprocess.run([str(candidate), "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (done.stdout + done.stderr).lower():
            return str(candidate)
    return None
