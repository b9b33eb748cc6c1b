"""The spool on its own: instances written whole into empty files made ahead, each SOP instance stored once."""

from __future__ import annotations

import os
import threading

import pytest
from conftest import wait_until

from qc_daemon.spool import InvalidUID, Spool, StoreOutcome

SERIES = "1.2.826.0.1.3680043.8.498.1"


def _empty_files(spool: Spool) -> list:
    return [p for p in spool.incoming.iterdir() if p.stat().st_size == 0]


def test_instances_go_into_files_made_ahead_which_are_refilled_and_removed_at_close(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.make_files_ahead(8)
    try:
        assert wait_until(lambda: len(_empty_files(spool)) == 8)
        inodes_ahead = {p.stat().st_ino for p in spool.incoming.iterdir()}
        payloads = {f"{SERIES}.{i}": os.urandom(1000 + i) for i in range(5)}  # the 5th takes the stock to half
        for uid, payload in payloads.items():
            assert spool.store(SERIES, uid, payload[:10], memoryview(payload)[10:]) is StoreOutcome.NEW
        stored = {p.stem: p for p in spool.instance_paths(SERIES)}
        assert {uid: stored[uid].read_bytes() for uid in payloads} == payloads
        assert {p.stat().st_ino for p in stored.values()} <= inodes_ahead  # written into files made ahead
        assert wait_until(lambda: len(_empty_files(spool)) == 8)  # refilled once half was used
        assert all(p.stat().st_size == 0 for p in spool.incoming.iterdir())  # nothing written is left there
    finally:
        spool.close()
    assert list(spool.incoming.iterdir()) == []


def test_files_made_ahead_removed_underneath_are_replaced(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.make_files_ahead(4)
    try:
        assert wait_until(lambda: len(_empty_files(spool)) == 4)
        spool.clean_incoming()  # what a restart does: the ready list now names files that are gone
        assert spool.store(SERIES, f"{SERIES}.1", b"instance") is StoreOutcome.NEW
        assert spool.instance_paths(SERIES)[0].read_bytes() == b"instance"
    finally:
        spool.close()


@pytest.mark.parametrize("ahead", [0, 16])
def test_the_same_instance_from_two_associations_at_once_is_stored_once(tmp_path, ahead):
    spool = Spool(tmp_path / "spool")
    spool.make_files_ahead(ahead)
    outcomes, start = [], threading.Barrier(8)

    def store(payload):
        start.wait()
        outcomes.append(spool.store(SERIES, f"{SERIES}.7", payload))

    try:
        threads = [threading.Thread(target=store, args=(b"same instance",)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        spool.close()
    assert sorted(o.value for o in outcomes) == ["duplicate"] * 7 + ["new"]
    assert [p.read_bytes() for p in spool.instance_paths(SERIES)] == [b"same instance"]
    assert list(spool.incoming.iterdir()) == []


def test_a_uid_that_is_not_a_uid_never_becomes_a_path(tmp_path):
    spool = Spool(tmp_path / "spool")
    for series, sop in ((SERIES, "../../etc/passwd"), ("1.2/../..", "1.2.3"), (SERIES, "1.2.3\n")):
        with pytest.raises(InvalidUID):
            spool.store(series, sop, b"x")
    assert [p.name for p in spool.root.iterdir()] == [".incoming"]
    assert list(spool.incoming.iterdir()) == []
