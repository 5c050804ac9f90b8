"""One build at a time per output (pipeline.lock), on real files and real processes. Object
storage has the same tests against a local S3 server in test_s3.py."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from outputs import race_for
from pipeline.config import ConfigError
from pipeline.lock import LOCK_NAME, OutputLock
from pipeline.storage import Output


def output_at(path: Path) -> Output:
    output = Output(str(path))
    output.make_dirs()
    return output


def left_lock(path: Path, host: str, pid: int, seconds_ago: float, lease_s: float = 60.0) -> None:
    """A lock file as another build left it (written here: the build that 'left' it is not run)."""
    (path / LOCK_NAME).write_text(json.dumps({"host": host, "pid": pid, "token": "theirs", "lease_s": lease_s,
                                              "started_at": "2026-12-05T10:00:00Z", "command": "build",
                                              "renewed_at": time.time() - seconds_ago}))


def test_a_held_output_is_refused_naming_its_holder(tmp_path: Path) -> None:
    output = output_at(tmp_path)
    first = OutputLock.claim(output, 60)
    first.confirm()
    try:
        with pytest.raises(ConfigError) as err:
            OutputLock.claim(output, 60)
        message = str(err.value)
        assert f"host {socket.gethostname()}, pid {first.owner['pid']}, started {first.owner['started_at']}" in message
        assert "runs out 60 s from now" in message
    finally:
        first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    OutputLock.claim(output, 60).release()  # free again


def test_a_lock_whose_process_died_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left_lock(tmp_path, socket.gethostname(), int(dead.stdout), seconds_ago=1)
    lock = OutputLock.claim(output_at(tmp_path), 60)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token
    lock.release()


@pytest.mark.parametrize("seconds_ago, taken", [(3, False), (31, True)])
def test_another_hosts_lock_holds_for_its_own_lease(tmp_path: Path, seconds_ago: float, taken: bool) -> None:
    left_lock(tmp_path, "node-7", 12345, seconds_ago=seconds_ago, lease_s=30)
    if not taken:
        with pytest.raises(ConfigError, match=r"host node-7, pid 12345.*runs out 27 s from now"):
            OutputLock.claim(output_at(tmp_path), 600)  # the holder's lease counts, not the claimant's
        return
    lock = OutputLock.claim(output_at(tmp_path), 600)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token
    lock.release()


def test_the_holder_renews_its_lease(tmp_path: Path) -> None:
    lock = OutputLock.claim(output_at(tmp_path), 4)
    lock.confirm()
    try:
        first = json.loads((tmp_path / LOCK_NAME).read_text())["renewed_at"]
        time.sleep(2.5)  # renewed every lease / 4 = 1 s
        assert json.loads((tmp_path / LOCK_NAME).read_text())["renewed_at"] >= first + 0.9
    finally:
        lock.release()


def test_a_holder_whose_lock_was_taken_over_is_stopped(tmp_path: Path) -> None:
    """Also when SIGINT is ignored, as in a build started with nohup or & (what `make test &` showed)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    lock = OutputLock.claim(output_at(tmp_path), 4)
    lock.confirm()
    renewed = json.loads((tmp_path / LOCK_NAME).read_text())["renewed_at"]
    while json.loads((tmp_path / LOCK_NAME).read_text())["renewed_at"] == renewed:
        time.sleep(0.01)  # just after a renewal: a renewal between our write and its read would undo the takeover
    left_lock(tmp_path, "node-7", 12345, seconds_ago=0)  # as a build that judged ours run out would write it
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            while time.monotonic() < started + 10:
                time.sleep(0.05)  # busy, as a build's main thread is between its waits on Ray
    finally:
        lock.release()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 4, "stopped within about a quarter lease (1 s), load aside"
    assert "taken over" in lock.lost and "host node-7" in lock.lost
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "theirs", "the new holder's lock is kept"


def test_of_processes_claiming_at_once_one_holds(tmp_path: Path) -> None:
    output_at(tmp_path)
    assert race_for(str(tmp_path), claimants=3) == ["holds", "refused", "refused"]
