"""The run dir lock: an exclusive claim, a heartbeat, and the take-over of a run that is gone."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

from data_curation.storage import Storage
from orchestration import runlock
from orchestration.runlock import RunLock, live_holder, lock_name, newest_lock


def _lock_of(pid: int, heartbeat: float, token: str = "old") -> str:
    return json.dumps({"token": token, "pid": pid, "host": socket.gethostname(), "machine": runlock._machine(),
                       "started": time.time(), "heartbeat": heartbeat})


def _gone_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_one_holder_at_a_time_and_release_frees_it_without_reusing_its_generation(tmp_path):
    lines = []
    first, second = RunLock(Storage(), str(tmp_path)), RunLock(Storage(), str(tmp_path), lines.append)
    assert first.acquire() is None
    held = second.acquire()
    assert held["token"] == first.token and held["pid"] == os.getpid()
    assert live_holder(Storage(), str(tmp_path))["token"] == first.token
    first.release()
    assert live_holder(Storage(), str(tmp_path)) is None
    assert second.acquire() is None and second.uri.endswith(lock_name(2))  # a released lock is kept: no reuse
    assert lines == []  # a released lock is free, not taken over
    assert [p.name for p in tmp_path.iterdir()] == [lock_name(2)]
    second.release()


def test_a_lock_whose_process_is_gone_is_taken_over_at_once(tmp_path):
    pid = _gone_pid()
    (tmp_path / lock_name(1)).write_text(_lock_of(pid, time.time()))
    assert live_holder(Storage(), str(tmp_path)) is None
    lines = []
    lock = RunLock(Storage(), str(tmp_path), lines.append)
    assert lock.acquire() is None
    [line] = lines
    assert re.fullmatch(rf"taking over the run dir from a run that is gone \(pid {pid} on "
                        rf"{re.escape(socket.gethostname())}, since [-0-9: ]+, heartbeat \d+ s ago: process {pid} "
                        rf"is gone\)", line), line
    assert [p.name for p in tmp_path.iterdir()] == [lock_name(2)]  # the stale one removed
    assert newest_lock(Storage(), str(tmp_path))[1]["token"] == lock.token
    lock.release()


def test_of_two_runs_taking_over_the_same_stale_lock_one_wins(tmp_path, monkeypatch):
    (tmp_path / lock_name(1)).write_text(_lock_of(_gone_pid(), time.time()))
    stale = newest_lock(Storage(), str(tmp_path))
    first, second = RunLock(Storage(), str(tmp_path)), RunLock(Storage(), str(tmp_path))
    assert first.acquire() is None
    # The second read the directory before the first claimed: it saw the same stale lock.
    monkeypatch.setattr(runlock, "newest_lock", lambda storage, run_dir: stale)
    held = second.acquire()
    assert held["token"] == first.token and held["uri"] == first.uri  # its claim of the same generation lost
    assert second.uri is None
    first.release()


def test_a_claim_whose_put_was_retried_after_it_landed_is_held(tmp_path, monkeypatch):
    """A PUT that timed out after it landed is retried by botocore and then fails its condition."""
    storage = Storage()

    def create_then_report_a_conflict(uri, data):
        Storage.create_bytes(storage, uri, data)
        return False

    monkeypatch.setattr(storage, "create_bytes", create_then_report_a_conflict)
    lock = RunLock(storage, str(tmp_path))
    assert lock.acquire() is None and lock.uri.endswith(lock_name(1))
    lock.release()


def test_the_heartbeat_refreshes_the_lock_and_notices_a_take_over(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    lines = []
    lock = RunLock(Storage(), str(tmp_path), lines.append)
    assert lock.acquire() is None
    path = tmp_path / lock_name(1)
    first_beat = json.loads(path.read_text())["heartbeat"]
    deadline = time.monotonic() + 10
    while json.loads(path.read_text())["heartbeat"] == first_beat:
        assert time.monotonic() < deadline, "the heartbeat never refreshed the lock"
        time.sleep(0.02)
    Storage().write_text(str(tmp_path / lock_name(2)), _lock_of(1, time.time(), token="newer"))  # judged gone
    while lock.lost_to is None:
        assert time.monotonic() < deadline, "the heartbeat never noticed the take-over"
        time.sleep(0.02)
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock_name(1), lock_name(2)]  # the newer run's is left alone
    assert lines[-1].startswith("warning: another run took over this run dir (pid 1 on ")


def test_a_lock_file_that_cannot_be_read_is_never_judged_stale(tmp_path):
    (tmp_path / lock_name(3)).write_text('{"token": "cut sh')
    held = RunLock(Storage(), str(tmp_path)).acquire()
    assert held == {"uri": str(tmp_path / lock_name(3))}
    assert runlock.describe(held) == f"a lock file vfm cannot read, {tmp_path / lock_name(3)}"


def test_a_run_whose_lock_was_deleted_by_hand_knows_it_is_no_longer_held(tmp_path, monkeypatch):
    """The refusal tells a user to delete the lock of a run that is gone; if it was not gone, it
    must stop instead of writing its lock back over the new run's."""
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    lock = RunLock(Storage(), str(tmp_path))
    assert lock.acquire() is None
    (tmp_path / lock_name(1)).unlink()
    deadline = time.monotonic() + 10
    while lock.lost_to is None:
        assert time.monotonic() < deadline, "the heartbeat never noticed"
        time.sleep(0.02)
    lock.release()
    assert not list(tmp_path.iterdir())  # not written back
