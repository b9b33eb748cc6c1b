"""The spool: received instances on disk, the source of truth for everything the daemon acknowledged.

Layout: ``<spool>/<series uid>/<sop instance uid>.dcm``. UIDs come from the network, so they are checked
(digits and dots only, at most 64 characters) before they become a path. A file appears only complete: the
bytes go to ``<spool>/.incoming/`` first, are flushed to disk, and are then linked into place, which also
makes "the same SOP instance twice is stored once" atomic. A restart rescans these folders.

The daemon's spool keeps a few empty files made ahead in ``.incoming`` (:class:`_EmptyFiles`): creating a file
costs the file system 0.15-1.2 ms of kernel time on the test machine, on every instance's path to its response;
taking one made while the listener waited for the sender does not. They hold nothing acknowledged: a restart
deletes them with any other leftover.
"""

from __future__ import annotations

import enum
import itertools
import os
import re
import shutil
import threading
import time
from collections import deque
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
        self._empty_files = _EmptyFiles(self.incoming, 0)

    def make_files_ahead(self, count: int) -> None:
        """Keep ``count`` empty files ready for incoming instances, made by a background thread (until
        :meth:`close`); without this call each file is created when its instance arrives."""
        self._empty_files.close()
        self._empty_files = _EmptyFiles(self.incoming, count)

    def series_dir(self, series_uid: str) -> Path:
        return self.root / check_uid(series_uid, "SeriesInstanceUID")

    def store(self, series_uid: str, sop_instance_uid: str, *parts: bytes | memoryview) -> StoreOutcome:
        """Write one instance (the concatenation of ``parts``) durably; returns DUPLICATE (and writes nothing)
        if it is already spooled. When this returns NEW, the file and its folder entry are on disk (fsynced)."""
        folder = self.series_dir(series_uid)
        target = folder / (check_uid(sop_instance_uid, "SOPInstanceUID") + INSTANCE_SUFFIX)
        if target.exists():
            return StoreOutcome.DUPLICATE
        fd, tmp_name = self._empty_files.open()
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
        """Remove partial files left by a crash mid-write (they were never acknowledged), and empty ones made
        ahead by an earlier run."""
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop making files ahead and delete those not used."""
        self._empty_files.close()

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


class _EmptyFiles:
    """Empty files in ``folder`` for instances to be written into, ``target`` of them kept ready by a thread that
    refills the stock when it falls to half; with none ready (or ``target`` 0), :meth:`open` creates one."""

    def __init__(self, folder: Path, target: int):
        self.folder = folder
        self.target = target
        self._names = itertools.count()
        self._prefix = f"rx-{os.getpid()}-{id(self):x}-"
        self._ready: deque[Path] = deque()
        self._low = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        if target > 0:
            self._low.set()
            self._thread = threading.Thread(target=self._refill, name="spool-files-ahead", daemon=True)
            self._thread.start()

    def open(self) -> tuple[int, Path]:
        """A file to write one instance into: (descriptor open for writing, path)."""
        if self._thread is not None and len(self._ready) <= self.target // 2:
            self._low.set()
        while True:
            try:
                path = self._ready.popleft()
            except IndexError:
                return self._create()
            try:
                return os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW), path
            except FileNotFoundError:  # removed meanwhile (clean_incoming at start-up): take the next one
                continue

    def close(self) -> None:
        self._closed = True
        self._low.set()
        if self._thread is not None:
            self._thread.join()
        while self._ready:
            self._ready.popleft().unlink(missing_ok=True)

    def _create(self) -> tuple[int, Path]:
        while True:
            path = self.folder / f"{self._prefix}{next(self._names)}.part"
            try:
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600), path
            except FileExistsError:
                continue

    def _refill(self) -> None:
        while True:
            self._low.wait()
            self._low.clear()
            while not self._closed and len(self._ready) < self.target:
                try:
                    fd, path = self._create()
                except OSError:  # a full disk or a vanished folder: instances create their own files meanwhile
                    break
                os.close(fd)
                self._ready.append(path)
            if self._closed:
                return


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
