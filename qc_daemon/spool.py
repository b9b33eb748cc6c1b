"""The spool: received instances on disk, the source of truth for everything the daemon acknowledged.

Layout: ``<spool>/<series uid>/<sop instance uid>.dcm``. UIDs come from the network, so they are checked
(digits and dots only, at most 64 characters) before they become a path. A file appears only complete: the
bytes go to ``<spool>/.incoming/`` first, are flushed to disk, and are then linked into place, which also
makes "the same SOP instance twice is stored once" atomic. A restart rescans these folders.
"""

from __future__ import annotations

import enum
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")  # always used with fullmatch
INSTANCE_SUFFIX = ".dcm"


class InvalidUID(ValueError):
    """A UID from the network is missing or malformed (and so must never become a path)."""


class StoreOutcome(enum.Enum):
    NEW = "new"
    DUPLICATE = "duplicate"


def check_uid(value: object, what: str) -> str:
    """Return ``value`` as a UID string if it is a well-formed DICOM UID, else raise :class:`InvalidUID`."""
    # Only DICOM's padding (a trailing NUL or space) is removed; anything else, a newline included, is refused.
    text = str(value).rstrip("\x00 ").lstrip(" ") if value is not None else ""
    if not text:
        raise InvalidUID(f"{what} is missing")
    if len(text) > 64 or not _UID.fullmatch(text):
        raise InvalidUID(f"{what} is not a valid UID: {text[:80]!r}")
    return text


class Spool:
    def __init__(self, root: Path):
        self.root = root
        self.incoming = root / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)

    def series_dir(self, series_uid: str) -> Path:
        return self.root / check_uid(series_uid, "SeriesInstanceUID")

    def store(self, series_uid: str, sop_instance_uid: str, *parts: bytes | memoryview) -> StoreOutcome:
        """Write one instance (the concatenation of ``parts``) durably; returns DUPLICATE (and writes nothing)
        if it is already spooled. When this returns NEW, the file and its folder entry are on disk (fsynced)."""
        folder = self.series_dir(series_uid)
        target = folder / (check_uid(sop_instance_uid, "SOPInstanceUID") + INSTANCE_SUFFIX)
        if target.exists():
            return StoreOutcome.DUPLICATE
        fd, tmp_name = tempfile.mkstemp(dir=self.incoming, prefix="rx-", suffix=".part")
        try:
            try:
                for part in parts:
                    _write_all(fd, part)
                os.fsync(fd)
            finally:
                os.close(fd)
            new_folder = not folder.exists()
            folder.mkdir(exist_ok=True)
            if new_folder:
                _fsync_dir(self.root)
            try:
                os.link(tmp_name, target)  # fails if another association stored the same instance first
            except FileExistsError:
                return StoreOutcome.DUPLICATE
            _fsync_dir(folder)
            return StoreOutcome.NEW
        finally:
            os.unlink(tmp_name)

    def instance_paths(self, series_uid: str) -> list[Path]:
        folder = self.series_dir(series_uid)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix == INSTANCE_SUFFIX and p.is_file())

    def series_uids(self) -> Iterator[str]:
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and not entry.is_symlink() and _UID.fullmatch(entry.name):
                yield entry.name

    def last_modified(self, series_uid: str) -> float:
        paths = self.instance_paths(series_uid)
        return max((p.stat().st_mtime for p in paths), default=0.0)

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 2**20

    def clean_incoming(self) -> None:
        """Remove partial files left by a crash mid-write (they were never acknowledged)."""
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)

    def remove_older_than(
        self, max_age_s: float, keep: Callable[[str], bool] = lambda uid: False, now: float | None = None
    ) -> list[str]:
        """Delete series folders whose newest instance is older than ``max_age_s`` and that ``keep`` does not
        hold back (e.g. a series not yet recorded); returns their UIDs."""
        now = time.time() if now is None else now
        removed = []
        for uid in self.series_uids():
            if now - self.last_modified(uid) > max_age_s and not keep(uid):
                shutil.rmtree(self.series_dir(uid), ignore_errors=True)
                removed.append(uid)
        return removed


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte is written (one call writes at most ~2 GiB, and may write less)."""
    with memoryview(data) as view:
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
