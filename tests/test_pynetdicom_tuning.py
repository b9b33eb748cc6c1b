"""The listener's tuned pynetdicom: command sets encoded byte for byte as pydicom does, associations that wait on
events (not 1 ms sleeps) yet still honour their timers, a release reported before the connection's close, and
pynetdicom's own loops when its version is not the one the loops were taken from."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import send_datasets, wait_until
from dicom_factory import classic_series, phantom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, dimse, dimse_messages
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode as pydicom_encode
from pynetdicom.sop_class import MRImageStorage, Verification
from pynetdicom.transport import RequestHandler

from qc_daemon import pynetdicom_tuning
from qc_daemon.intake import StoreStatus
from qc_daemon.listener import failure_status, start_listener
from qc_daemon.settings import DicomSettings
from qc_daemon.spool import StoreOutcome

MR = "1.2.840.10008.5.1.4.1.1.4"


def _store_rsp(status, **fields):
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = MR
    primitive.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    primitive.Status = status
    for name, value in fields.items():
        setattr(primitive, name, value)
    return primitive


def _primitives():
    store_rq = C_STORE()
    store_rq.MessageID, store_rq.Priority = 3, 2
    store_rq.AffectedSOPClassUID, store_rq.AffectedSOPInstanceUID = MR, "1.2.3.4"
    store_rq.MoveOriginatorApplicationEntityTitle, store_rq.MoveOriginatorMessageID = "PACS", 9
    echo_rsp = C_ECHO()
    echo_rsp.MessageIDBeingRespondedTo, echo_rsp.AffectedSOPClassUID, echo_rsp.Status = 1, Verification, 0
    find_rq = C_FIND()
    find_rq.MessageID, find_rq.AffectedSOPClassUID, find_rq.Priority = 5, "1.2.840.10008.5.1.4.1.2.2.1", 0
    move_rq = C_MOVE()
    move_rq.MessageID, move_rq.AffectedSOPClassUID, move_rq.Priority = 6, "1.2.840.10008.5.1.4.1.2.2.2", 0
    move_rq.MoveDestination = "QC_DAEMON"
    get_rsp = C_GET()
    get_rsp.MessageIDBeingRespondedTo, get_rsp.Status = 2, 0xFF00
    get_rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.3"
    get_rsp.NumberOfRemainingSuboperations, get_rsp.NumberOfCompletedSuboperations = 4, 65535
    get_rsp.NumberOfFailedSuboperations, get_rsp.NumberOfWarningSuboperations = 0, 1
    return {
        "C-STORE-RSP success": _store_rsp(0),
        "C-STORE-RSP success, status as the listener returns it": _store_rsp(StoreStatus.SUCCESS),
        "C-STORE-RSP failure, odd comment": _store_rsp(0xC000, ErrorComment="malformed dataset"),
        "C-STORE-RSP failure, even comment": _store_rsp(0xA700, ErrorComment="no disk!"),
        "C-STORE-RSP with Offending Element (AT: pydicom's path)": _store_rsp(0xA900, OffendingElement=[0x00100010]),
        "C-STORE-RQ from a C-MOVE": store_rq,
        "C-ECHO-RSP": echo_rsp,
        "C-FIND-RQ": find_rq,
        "C-MOVE-RQ": move_rq,
        "C-GET-RSP": get_rsp,
    }


@pytest.mark.parametrize("name", list(_primitives()))
def test_command_sets_are_encoded_exactly_as_pydicom_encodes_them(name, monkeypatch):
    primitive = _primitives()[name]
    messages, fallbacks = {}, []
    monkeypatch.setattr(pynetdicom_tuning, "_pydicom_encode",
                        lambda *args: (fallbacks.append(1), pydicom_encode(*args))[1])
    for encoder in (pydicom_encode, pynetdicom_tuning.encode_command_set):
        monkeypatch.setattr(dimse_messages, "encode", encoder)
        is_response = getattr(primitive, "MessageIDBeingRespondedTo", None) is not None
        table = dimse._RSP_TO_MESSAGE if is_response else dimse._RQ_TO_MESSAGE  # noqa: SLF001
        message = table[type(primitive)]()
        message.primitive_to_message(primitive)
        messages[encoder] = b"".join(
            b"".join(bytes(value) for _, value in pdata.presentation_data_value_list)
            for pdata in message.encode_msg(1, 16384)
        )
    assert messages[pynetdicom_tuning.encode_command_set] == messages[pydicom_encode]
    assert bool(fallbacks) == ("AT:" in name)  # written directly, except what only pydicom writes
    assert len(messages[pydicom_encode]) > 40  # a real command set went through both


def test_the_failure_status_the_listener_returns_is_encoded_as_pydicom_does():
    response = failure_status(StoreStatus.CANNOT_UNDERSTAND, "malformed dataset: élément")  # made printable
    response.MessageIDBeingRespondedTo, response.CommandField = 1, 0x8001
    assert pynetdicom_tuning.encode_command_set(response, True, True) == pydicom_encode(response, True, True)


class _Intake:
    """Accepts everything, spools nothing: the loops under test, not the spool. Each instance is announced the
    way the listener asks (after its response)."""

    def __init__(self):
        self.stored, self.announced = [], []

    def has_room(self) -> bool:
        return True

    def accept_stream(self, stream, transfer_syntax, **kwargs) -> StoreOutcome:
        uid = kwargs["sop_instance_uid"]
        self.stored.append(uid)
        kwargs["announce_later"](lambda: self.announced.append(uid))
        return StoreOutcome.NEW


@pytest.fixture
def listener():
    started = []

    def start(**settings):
        intake, ends = _Intake(), []
        ae, server = start_listener(
            DicomSettings(host="127.0.0.1", port=0, **settings),
            intake,
            on_released=lambda assoc_id: ends.append(("released", assoc_id, len(intake.announced))),
            on_ended=lambda assoc_id: ends.append(("ended", assoc_id, len(intake.announced))),
        )
        started.append(server)
        return server.server_address[1], intake, ends, server

    yield start
    for server in started:
        server.shutdown()


def _requestor(port):
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title="QC_DAEMON")


def test_an_idle_association_waits_instead_of_polling(listener, monkeypatch):
    waits, acceptors = [], []
    original_wait = pynetdicom_tuning.EventDrivenDUL._wait_for_event
    monkeypatch.setattr(pynetdicom_tuning.EventDrivenDUL, "_wait_for_event",
                        lambda self, timeout: (waits.append(timeout), original_wait(self, timeout))[1])
    original_make = pynetdicom_tuning.make_event_driven
    monkeypatch.setattr(pynetdicom_tuning, "make_event_driven",
                        lambda assoc: (acceptors.append(assoc), original_make(assoc))[1])
    port, *_ = listener()
    assoc = _requestor(port)
    try:
        assert assoc.is_established
        time.sleep(0.5)
        before = len(waits)
        time.sleep(1.0)
        idle_wakeups = len(waits) - before
    finally:
        assoc.release()
    assert len(acceptors) == 1
    # pynetdicom's own loop wakes ~1,000 times a second; this one at its timers' pace (1 / IDLE_WAIT_S = 20)
    assert idle_wakeups <= 2 / pynetdicom_tuning.IDLE_WAIT_S


def test_instances_are_stored_and_each_release_is_reported_before_the_close(listener):
    port, intake, ends, _ = listener()
    series = classic_series(phantom((16, 16, 12)))
    for _ in range(3):
        assert send_datasets(series, port) == [0] * len(series)
    assert wait_until(lambda: len(ends) == 6)
    assert len(intake.stored) == 3 * len(series)
    assert intake.announced == intake.stored  # each once, in the order they arrived
    for number, (released, ended) in enumerate(zip(ends[::2], ends[1::2]), start=1):
        assert released[0] == "released" and ended[0] == "ended" and released[1] == ended[1]
        assert released[2] == number * len(series)  # every instance of the association announced before its release


def test_an_idle_association_is_still_closed_at_the_network_timeout(listener):
    port, _, ends, _ = listener(network_timeout_s=0.5)
    assoc = _requestor(port)
    assert assoc.is_established
    assert wait_until(lambda: not assoc.is_established, timeout_s=10)
    assert wait_until(lambda: ends, timeout_s=5)


def test_another_pynetdicom_version_runs_pynetdicoms_own_loops(listener, monkeypatch, log_stream):
    monkeypatch.setattr(pynetdicom_tuning, "is_supported", lambda: False)
    port, intake, ends, server = listener()
    assert server.RequestHandlerClass is RequestHandler
    series = classic_series(phantom((16, 16, 4)))
    assert send_datasets(series, port) == [0] * len(series)
    assert len(intake.stored) == len(series)
    assert "pynetdicom_not_tuned" in log_stream.getvalue()


def test_the_tuned_series_is_the_installed_one():
    """The copied loops follow pynetdicom's internals: pyproject pins the series they were taken from."""
    assert pynetdicom_tuning.is_supported()
    assert not pynetdicom_tuning.is_supported("3.1.0") and not pynetdicom_tuning.is_supported("2.0.2")


def test_the_listener_answers_echo_and_store_concurrently(listener):
    port, intake, _, _ = listener()
    series = classic_series(phantom((16, 16, 30)))
    results = {}

    def send(part):
        results[part] = send_datasets(series[part::3], port)

    threads = [threading.Thread(target=send, args=(part,)) for part in range(3)]
    for thread in threads:
        thread.start()
    echo_ae = AE(ae_title="ECHO_SCU")
    echo_ae.add_requested_context(Verification)
    echo = echo_ae.associate("127.0.0.1", port, ae_title="QC_DAEMON")
    assert echo.is_established and int(echo.send_c_echo().Status) == 0
    echo.release()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(sum(results.values(), [])) == [0] * len(series)
    assert sorted(intake.stored) == sorted(str(ds.SOPInstanceUID) for ds in series)
