"""pynetdicom 3.0, tuned for the listener's hot path: event-driven receive loops and a direct command encoder.

Each association pynetdicom accepts runs two polling loops: its DUL thread sleeps 1 ms whenever the socket has
nothing to read, and its association thread sleeps 1 ms between looks at the queue of decoded DIMSE messages.
A sender that waits for each C-STORE response before the next request (DCMTK ``storescu``, every scanner) meets
both sleeps on every instance, and each idle association wakes 2,000 times a second. Every C-STORE response's
command set is also encoded twice by pydicom's general dataset writer.

:func:`event_driven_request_handler` is a request handler for pynetdicom's association server whose
associations wait on events instead: the DUL thread in ``select`` on its socket and on a wake-up pipe that every
hand-over from another thread writes to, the association thread on an :class:`threading.Event` set when a
DIMSE message or an A-RELEASE/A-ABORT is queued for it. Both still look at their timers and kill flags at least
every :data:`IDLE_WAIT_S`. :func:`install_command_encoder` replaces the encoder pynetdicom uses for command sets
(always Implicit VR Little Endian) with a direct one for the few value representations commands use; anything
else goes to pydicom as before, and the bytes are the same (tests/test_pynetdicom_tuning.py).

The two loops below are pynetdicom 3.0.4's ``DULServiceProvider.run_reactor`` and ``Association._run_reactor``
(MIT licence, Copyright (c) 2018 pynetdicom contributors) with the sleeps replaced by waits and one reordering:
a release is reported (EVT_RELEASED) before the A-RELEASE-RP is sent, so that it always precedes the close. They
depend on pynetdicom's internals, so they are used only with the pynetdicom series they were taken from
(:data:`TUNED_SERIES`, pinned in pyproject.toml); any other version runs pynetdicom unchanged, with a warning.
Measured in BENCHMARKS.md ("Ingest throughput").
"""

from __future__ import annotations

import os
import queue
import select
import ssl
import struct
import threading
from collections.abc import Callable
from types import MethodType
from typing import Any

import pynetdicom
from pynetdicom import dimse_messages
from pynetdicom.association import LOGGER as ASSOCIATION_LOGGER
from pynetdicom.association import Association
from pynetdicom.dul import LOGGER as DUL_LOGGER
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import RequestHandler

from qc_daemon.logs import get_logger

log = get_logger(__name__)

TUNED_SERIES = "3.0."  # the pynetdicom releases whose loops are copied here
IDLE_WAIT_S = 0.05  # the longest either loop waits without an event (ARTIM and network timers, kill flags)


def is_supported(version: str = pynetdicom.__version__) -> bool:
    return version.startswith(TUNED_SERIES)


# --- the command-set encoder -------------------------------------------------------------------------------

_STRING_PADDING = {"UI": b"\x00", "AE": b" ", "LO": b" ", "SH": b" ", "CS": b" "}
_pydicom_encode = dimse_messages.encode


def encode_command_set(ds: Any, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> bytes | None:
    """pynetdicom's ``dsutils.encode`` for a DIMSE command set: group 0000 elements of VR UL, US or one string
    (UI, AE, LO, SH, CS) in Implicit VR Little Endian, written directly; any other dataset goes to pydicom."""
    if not is_implicit_vr or not is_little_endian or deflated:
        return _pydicom_encode(ds, is_implicit_vr, is_little_endian, deflated)
    parts = []
    for element in ds:
        tag, vr, value = element.tag, element.VR, element.value
        if tag >> 16 != 0:
            return _pydicom_encode(ds, is_implicit_vr, is_little_endian, deflated)
        if vr == "US" and isinstance(value, int) and 0 <= value <= 0xFFFF:  # an int or an IntEnum (a status)
            encoded = struct.pack("<H", value)
        elif vr == "UL" and isinstance(value, int) and 0 <= value <= 0xFFFFFFFF:
            encoded = struct.pack("<I", value)
        elif vr in _STRING_PADDING and isinstance(value, str) and value and value.isascii():
            encoded = value.encode("ascii")
            if len(encoded) % 2:
                encoded += _STRING_PADDING[vr]
        else:
            return _pydicom_encode(ds, is_implicit_vr, is_little_endian, deflated)
        parts.append(struct.pack("<HHI", 0, tag & 0xFFFF, len(encoded)))
        parts.append(encoded)
    return b"".join(parts)


def install_command_encoder() -> None:
    """Make pynetdicom encode command sets with :func:`encode_command_set` (process-wide; idempotent)."""
    if is_supported():
        dimse_messages.encode = encode_command_set


# --- event-driven associations -------------------------------------------------------------------------------


class _NotifyingQueue(queue.Queue):
    """A queue that calls ``notify`` after every put (from any thread but ``quiet_thread``, when given)."""

    def __init__(self, notify: Callable[[], None], quiet_thread: Callable[[], int | None] = lambda: None):
        super().__init__()
        self._notify = notify
        self._quiet_thread = quiet_thread

    def put(self, item, block=True, timeout=None):
        super().put(item, block, timeout)
        if threading.get_ident() != self._quiet_thread():
            self._notify()


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL provider, its reactor waiting on the socket and a wake-up pipe instead of sleeping 1 ms."""

    _kill_flag = False
    _wake_r = _wake_w = -1  # the wake-up pipe exists while the loop runs (made and closed under _pipe_lock)

    def __init__(self, assoc: Association, association_activity: threading.Event):
        self._pipe_lock = threading.Lock()
        super().__init__(assoc)
        self._association_activity = association_activity
        # Other threads hand work to this one through these two queues; puts by this thread need no wake-up.
        self.event_queue = _NotifyingQueue(self.wake, lambda: self.ident)
        self.to_provider_queue = _NotifyingQueue(self.wake, lambda: self.ident)
        # What this thread queues for the association (A-RELEASE, A-ABORT, ...) wakes the association's loop.
        self.to_user_queue = _NotifyingQueue(association_activity.set)

    def wake(self) -> None:
        with self._pipe_lock:  # never a write to a descriptor number the loop has closed and the process reused
            if self._wake_w < 0:
                return  # the loop has not started (it looks at every queue first) or has ended
            try:
                os.write(self._wake_w, b"\x00")
            except BlockingIOError:  # the pipe is full: a wake-up is pending anyway
                pass

    @property
    def _kill_thread(self) -> bool:
        return self._kill_flag

    @_kill_thread.setter
    def _kill_thread(self, value: bool) -> None:
        """pynetdicom stops the loop by setting this flag (``kill_dul``, ``stop_dul``): the loop must wake to see it."""
        self._kill_flag = value
        if value:
            self.wake()

    def _wait_for_event(self, timeout: float) -> None:
        """Wait until the socket has data, another thread handed something over, or ``timeout`` passed."""
        watched = [self._wake_r]  # read only by this thread, which closes it
        association_socket = self.socket
        sock = association_socket.socket if association_socket is not None else None
        if sock is not None and association_socket._is_connected:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes already buffered: select would not see them
            if sock.fileno() >= 0:
                watched.append(sock.fileno())
        try:
            ready, _, _ = select.select(watched, [], [], timeout)
        except (OSError, ValueError):  # the socket was closed by another thread: the loop finds out next
            return
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``DULServiceProvider.run_reactor``; ``time.sleep(self._run_loop_delay)`` became
        :meth:`_wait_for_event`, and the association's loop is woken when this one ends."""
        with self._pipe_lock:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
        try:
            self._run_reactor()
        finally:
            with self._pipe_lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1
            self._association_activity.set()

    def _run_reactor(self) -> None:
        self._idle_timer.start()
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                self._wait_for_event(IDLE_WAIT_S)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - as pynetdicom: abort the association, end the thread
                DUL_LOGGER.error("Exception in DUL.run(), aborting association")
                DUL_LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self.state_machine.do_action(event)
            sleep = False


def _run_acceptor_reactor(self: Association) -> None:
    """pynetdicom 3.0.4's ``Association._run_reactor``; ``time.sleep(0.001)`` became a wait on the association's
    activity event, skipped while the previous pass found a message (more may be queued), and a release is reported
    before it is answered."""
    activity: threading.Event = self._qc_activity
    self._is_paused = False
    idle = False
    while not self._kill:
        if idle:
            activity.wait(IDLE_WAIT_S)
        activity.clear()  # anything queued from here on sets it again; anything before is seen below
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

        context_id, msg = self.dimse.get_msg(block=False)
        idle = not msg
        if msg:
            self._serve_request(msg, context_id)

        if self.is_established and self.acse.is_release_requested():
            # EVT_RELEASED before the A-RELEASE-RP, where pynetdicom has it after: the peer closes the connection
            # once it has the RP, and the DUL thread, no longer asleep, would report the close (EVT_CONN_CLOSE)
            # before this thread reported the release.
            ASSOCIATION_LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            pynetdicom.evt.trigger(self, pynetdicom.evt.EVT_RELEASED, {})
            self.acse.send_release(is_response=True)
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            ASSOCIATION_LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            pynetdicom.evt.trigger(self, pynetdicom.evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            ASSOCIATION_LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


def make_event_driven(assoc: Association) -> None:
    """Give a new acceptor association (socket set, not started) the event-driven loops."""
    activity = threading.Event()
    dul, replaced = EventDrivenDUL(assoc, activity), assoc.dul
    dul.socket = replaced.socket
    dul.artim_timer.timeout = replaced.artim_timer.timeout  # the ACSE and network timeouts, set on the
    dul._idle_timer.timeout = replaced._idle_timer.timeout  # replaced provider when the association was made
    while not replaced.event_queue.empty():  # the connection's Evt5, queued when the socket was set
        dul.event_queue.put(replaced.event_queue.get())
    assoc.dul = dul
    assoc.dimse.msg_queue = _NotifyingQueue(activity.set)
    assoc._qc_activity = activity
    assoc._run_reactor = MethodType(_run_acceptor_reactor, assoc)


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler, its associations made event-driven."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        make_event_driven(assoc)
        return assoc


def event_driven_request_handler() -> type[RequestHandler]:
    """The request handler the listener's server uses: event-driven with the tuned pynetdicom series, else
    pynetdicom's own (logged once)."""
    if is_supported():
        return EventDrivenRequestHandler
    log.warning("pynetdicom_not_tuned", version=pynetdicom.__version__, tuned_series=TUNED_SERIES,
                reason="its receive loops poll every 1 ms: ingest is slower")
    return RequestHandler
