"""Series assembly: when is a series complete?

A series is complete, and handed to the work queue, as soon as one of these holds:

* ``expected_count``: the count the scanner announced (ImagesInAcquisition or a vendor field, see
  :mod:`qc_daemon.completeness`) is in the spool, and, when every spooled instance's header facts are known,
  they form one complete 3D grid;
* ``association_released``: the association that delivered it was released (not aborted), no other open
  association is delivering the same series, and every spooled instance of it forms one complete, regularly
  spaced 3D grid (or is one multi-frame instance) of at least ``min_slices`` slices;
* ``quiet_period``: ``quiet_period_s`` passed without a new instance, the fallback for everything else.

The first two are checked the moment they can change (an arrival, a release), so a series is handed over
without waiting; the checks use the header facts the intake already read, never the pixel data. When the queue
is full a series stays here (its instances are safe in the spool) and is offered again on the next tick. A late
instance after a hand-over makes the series tracked again, and the worker opens a new revision: an early
decision is never a silent one. A series whose processing failed on the store comes back here through
:meth:`Assembler.retry_later` and is handed over again once its delay has passed.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from qc_daemon.completeness import SliceFacts, forms_complete_grid
from qc_daemon.intake import Arrival
from qc_daemon.logs import get_logger

log = get_logger(__name__)

QUIET_PERIOD = "quiet_period"
RETRY = "retry"  # processing raised (the store failed): offered again after a delay
EXPECTED_COUNT = "expected_count"
ASSOCIATION_RELEASED = "association_released"
REMEMBERED_SERIES = 256  # handed-over series whose facts are kept, so a late instance can complete at release


@dataclass
class _Receiving:
    last_arrival: float
    arrived: int = 0
    images: int = 0  # arrivals that are images (or whose header facts are unknown)
    expected: int | None = None
    facts: dict[str, SliceFacts | None] = field(default_factory=dict)  # by SOP instance UID
    open_associations: set[int] = field(default_factory=set)
    ready: str | None = None  # the trigger that found the series complete, until it is handed over
    not_before: float | None = None  # a retry: not handed over before this clock time


class Assembler:
    def __init__(
        self,
        quiet_period_s: float,
        use_expected_count: bool,
        submit: Callable[[str], bool],
        count_spooled: Callable[[str], int],
        *,
        min_slices: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.quiet_period_s = quiet_period_s
        self.use_expected_count = use_expected_count
        self.min_slices = min_slices
        self._submit = submit  # returns False when the work queue is full
        self._count_spooled = count_spooled
        self._clock = clock
        self._lock = threading.Lock()
        self._handover = threading.Lock()  # one hand-over at a time: the listener's threads and the ticker race
        self._receiving: dict[str, _Receiving] = {}
        self._deliveries: dict[int, set[str]] = {}  # open association -> series UIDs it delivered
        self._handed_over: OrderedDict[str, _Receiving] = OrderedDict()  # recent hand-overs, oldest first

    def instance_arrived(self, arrival: Arrival) -> None:
        """Called from the listener's threads for every newly spooled instance: cheap, no I/O unless the
        announced count has just been reached."""
        uid = arrival.series_uid
        with self._lock:
            state = self._receiving.get(uid)
            if state is None:
                state = self._receiving[uid] = self._reopen(uid)
                log.info("series_receiving", series_instance_uid=uid)
            state.last_arrival = self._clock()
            state.arrived += 1
            state.ready = None  # a decision taken before this instance no longer holds
            state.facts[arrival.sop_instance_uid] = arrival.facts
            state.images += arrival.facts is None or arrival.facts.is_image
            if arrival.expected_instances is not None:
                state.expected = arrival.expected_instances
            if arrival.association_id is not None:
                self._deliveries.setdefault(arrival.association_id, set()).add(uid)
                state.open_associations.add(arrival.association_id)
            # Checked once, when the announced number of images is reached (a time series announcing the images
            # of one volume is not re-checked at every later arrival); the ticker covers any other case.
            count_reached = self.use_expected_count and state.images == state.expected
        if count_reached:
            self._complete_early(uid, EXPECTED_COUNT)

    def association_released(self, association_id: int) -> None:
        """The association was released: every series it delivered is checked for completeness now."""
        for uid in self._forget_association(association_id):
            self._complete_early(uid, ASSOCIATION_RELEASED)

    def association_ended(self, association_id: int) -> None:
        """The association was aborted or its connection closed: its series wait for the quiet period."""
        self._forget_association(association_id)

    def resume(self, series_uid: str, age_s: float) -> None:
        """Track a series found in the spool at start-up as if its last instance arrived ``age_s`` ago."""
        with self._lock:
            self._receiving.setdefault(series_uid, _Receiving(last_arrival=self._clock() - max(0.0, age_s)))

    def retry_later(self, series_uid: str, delay_s: float) -> None:
        """Track again a series whose processing raised; it is complete again once ``delay_s`` has passed."""
        now = self._clock()
        with self._lock:
            state = self._receiving.get(series_uid)
            if state is None:
                state = self._receiving[series_uid] = self._reopen(series_uid)
            state.ready = RETRY
            state.not_before = now + delay_s

    def receiving(self) -> list[str]:
        with self._lock:
            return list(self._receiving)

    def tick(self) -> list[str]:
        """Hand over every complete series; returns the UIDs handed over."""
        now = self._clock()
        with self._lock:
            snapshot = {uid: (state.arrived, state.ready, now - state.last_arrival >= self.quiet_period_s,
                              state.expected is not None)
                        for uid, state in self._receiving.items()
                        if state.not_before is None or now >= state.not_before}
        handed = []
        for uid, (arrived, ready, quiet, announced) in snapshot.items():
            trigger = ready or (QUIET_PERIOD if quiet else None)
            if trigger is None and self.use_expected_count and announced:
                trigger = EXPECTED_COUNT if self._is_complete(uid, EXPECTED_COUNT) else None
            if trigger is None:
                continue
            outcome = self._hand_over(uid, arrived, trigger)
            if outcome is None:
                break  # queue full: back-pressure, the series stays here and is offered again next tick
            if outcome:
                handed.append(uid)
        return handed

    def _reopen(self, uid: str) -> _Receiving:
        """A new arrival's state, with the facts of the instances already handed over (a late instance)."""
        earlier = self._handed_over.pop(uid, None)
        state = _Receiving(last_arrival=self._clock())
        if earlier is not None:
            state.facts, state.expected = earlier.facts, earlier.expected
            state.images, state.arrived = earlier.images, earlier.arrived
        return state

    def _forget_association(self, association_id: int) -> set[str]:
        with self._lock:
            uids = self._deliveries.pop(association_id, set())
            for uid in uids:
                state = self._receiving.get(uid)
                if state is not None:
                    state.open_associations.discard(association_id)
        return uids

    def _complete_early(self, uid: str, trigger: str) -> None:
        if not self._is_complete(uid, trigger):
            log.debug("series_not_complete", series_instance_uid=uid, trigger=trigger)
            return
        with self._lock:
            state = self._receiving.get(uid)
            if state is None or state.not_before is not None and self._clock() < state.not_before:
                return  # gone, or waiting to retry: the tick hands it over when its delay has passed
            state.ready = trigger
            arrived = state.arrived
        self._hand_over(uid, arrived, trigger)

    def _is_complete(self, uid: str, trigger: str) -> bool:
        """Does the spool hold the whole series, by the evidence ``trigger`` names?"""
        spooled = self._count_spooled(uid)  # the spool, not our count, decides (duplicates, restarts)
        with self._lock:
            state = self._receiving.get(uid)
            if state is None:
                return False
            facts = list(state.facts.values())
            expected = state.expected if self.use_expected_count else None
            open_elsewhere = bool(state.open_associations)
        known = len(facts) == spooled and None not in facts
        if trigger == EXPECTED_COUNT:
            if expected is None or spooled < expected:
                return False
            # With every instance's facts known they must agree; for a series resumed after a restart (facts of
            # the instances spooled before it unknown) the announced count alone decides, as it always did.
            return not known or forms_complete_grid(facts, self.min_slices, expected)
        return known and not open_elsewhere and forms_complete_grid(facts, self.min_slices, expected)

    def _hand_over(self, uid: str, arrived: int, trigger: str) -> bool | None:
        """Submit the series; True when handed over, False when it changed or went meanwhile (nothing to do),
        None when the queue is full (it stays tracked)."""
        with self._handover:
            with self._lock:
                state = self._receiving.get(uid)
                if state is None or state.arrived != arrived:
                    return False
            if not self._submit(uid):
                return None
            with self._lock:
                state = self._receiving.get(uid)
                # An instance that arrived meanwhile keeps the series tracked: it completes again later.
                if state is not None and state.arrived == arrived:
                    del self._receiving[uid]
                    state.open_associations.clear()
                    self._handed_over[uid] = state
                    while len(self._handed_over) > REMEMBERED_SERIES:
                        self._handed_over.popitem(last=False)
        log.info("series_completed", series_instance_uid=uid, trigger=trigger, instances=arrived)
        return True
