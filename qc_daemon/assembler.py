"""Series assembly: when is a series complete?

A series is complete after ``quiet_period_s`` without a new instance, or as soon as the scanner's announced
instance count (ImagesInAcquisition) has arrived. Complete series are handed to the work queue; when the queue
is full they simply stay here (their instances are safe in the spool) and are offered again on the next tick.
A late instance after scoring makes the series complete again, and the worker opens a new revision. A series
whose processing failed on the store comes back here through :meth:`Assembler.retry_later` and is handed over
again once its delay has passed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from qc_daemon.intake import Arrival
from qc_daemon.logs import get_logger

log = get_logger(__name__)


@dataclass
class _Receiving:
    last_arrival: float
    arrived: int = 0
    expected: int | None = None
    not_before: float | None = None  # a retry: not handed over before this clock time


class Assembler:
    def __init__(
        self,
        quiet_period_s: float,
        use_expected_count: bool,
        submit: Callable[[str], bool],
        count_spooled: Callable[[str], int],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.quiet_period_s = quiet_period_s
        self.use_expected_count = use_expected_count
        self._submit = submit  # returns False when the work queue is full
        self._count_spooled = count_spooled
        self._clock = clock
        self._lock = threading.Lock()
        self._receiving: dict[str, _Receiving] = {}

    def instance_arrived(self, arrival: Arrival) -> None:
        """Called from the listener's threads for every newly spooled instance: cheap, no I/O."""
        with self._lock:
            state = self._receiving.get(arrival.series_uid)
            if state is None:
                state = self._receiving[arrival.series_uid] = _Receiving(last_arrival=self._clock())
                log.info("series_receiving", series_instance_uid=arrival.series_uid)
            state.last_arrival = self._clock()
            state.arrived += 1
            if arrival.expected_instances is not None:
                state.expected = arrival.expected_instances

    def resume(self, series_uid: str, age_s: float) -> None:
        """Track a series found in the spool at start-up as if its last instance arrived ``age_s`` ago."""
        with self._lock:
            self._receiving.setdefault(series_uid, _Receiving(last_arrival=self._clock() - max(0.0, age_s)))

    def retry_later(self, series_uid: str, delay_s: float) -> None:
        """Track again a series whose processing raised; it is complete again once ``delay_s`` has passed."""
        now = self._clock()
        with self._lock:
            state = self._receiving.setdefault(series_uid, _Receiving(last_arrival=now - self.quiet_period_s))
            state.not_before = now + delay_s

    def receiving(self) -> list[str]:
        with self._lock:
            return list(self._receiving)

    def tick(self) -> list[str]:
        """Hand over every complete series; returns the UIDs handed over."""
        now = self._clock()
        with self._lock:
            snapshot = {uid: (state.arrived, state.expected, self._is_quiet(state, now))
                        for uid, state in self._receiving.items()
                        if state.not_before is None or now >= state.not_before}
        complete = []
        for uid, (arrived, expected, quiet) in snapshot.items():
            if quiet:
                complete.append((uid, arrived, "quiet_period"))
            elif self.use_expected_count and expected is not None and self._count_spooled(uid) >= expected:
                # The announced count is checked against the spool itself (duplicates and restarts included).
                complete.append((uid, arrived, "expected_count"))
        handed = []
        for uid, arrived, trigger in complete:
            if not self._submit(uid):
                break  # queue full: back-pressure, the series stays here and is offered again next tick
            with self._lock:
                state = self._receiving.get(uid)
                # An instance that arrived meanwhile keeps the series tracked: it completes again later.
                if state is not None and state.arrived == arrived:
                    del self._receiving[uid]
            log.info("series_completed", series_instance_uid=uid, trigger=trigger)
            handed.append(uid)
        return handed

    def _is_quiet(self, state: _Receiving, now: float) -> bool:
        return now - state.last_arrival >= self.quiet_period_s
