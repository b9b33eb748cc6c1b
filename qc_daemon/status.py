"""What the daemon is doing right now, as a read-only snapshot for the web view and the metrics.

The daemon publishes :class:`DaemonStatus` through a callable; readers (``qc_daemon.web``, ``qc_daemon.metrics``)
never reach into the listener, assembler or scorer. :class:`Activity` tracks the series between "complete" and
"recorded": queued for a worker, then being scored.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class DaemonStatus:
    listener_up: bool  # the DICOM port is open
    model_loaded: bool
    model_sha256: str
    receiving: tuple[str, ...]  # series UIDs whose instances are arriving (not yet complete)
    queued: tuple[str, ...]  # complete, waiting for a worker
    scoring: tuple[str, ...]  # taken by a worker
    free_disk_mb: float  # free space where the spool lives
    min_free_mb: float  # below this, instances are refused
    threshold: float  # a scored series below this raises an alert

    @property
    def disk_ok(self) -> bool:
        return self.free_disk_mb >= self.min_free_mb


class Activity:
    """Thread-safe sets of series queued for and taken by the scoring workers."""

    def __init__(self):
        self._lock = threading.Lock()
        self._queued: dict[str, None] = {}  # insertion-ordered sets
        self._scoring: dict[str, None] = {}

    def queued(self, series_uid: str) -> None:
        with self._lock:
            self._queued[series_uid] = None

    def started(self, series_uid: str) -> None:
        with self._lock:
            self._queued.pop(series_uid, None)
            self._scoring[series_uid] = None

    def finished(self, series_uid: str) -> None:
        with self._lock:
            self._scoring.pop(series_uid, None)

    def snapshot(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(queued, scoring) UIDs, oldest first."""
        with self._lock:
            return tuple(self._queued), tuple(self._scoring)
