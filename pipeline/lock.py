"""One build at a time per output: OUT/build.lock, a lease its owner renews.

Two builds writing one output (two people, or a cluster job retried while the first still runs)
would sweep each other's temporary files and race on the dedupe's removal plan. The second is
refused with one line naming the first (host, pid, start time). A build killed without releasing
its lock stops renewing it, and once the lease has run out the next build takes it over.

Claiming is atomic on a local disk (exclusive create; a stale lock is renamed away first, which
only one claimant can do). Object stores have no create-if-absent that every fsspec backend
offers, so there a claimant writes its token, waits SETTLE_S (spent starting Ray) and reads it
back: of two builds started together, only the last writer finds its own token. S3 and GCS read
their own writes consistently, which is what this relies on. Leases compare the owner's clock with
the claimant's: a few seconds of skew between hosts are well inside a lease.
"""

from __future__ import annotations

import _thread
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid

from fsspec.implementations.local import LocalFileSystem

from pipeline.config import ConfigError
from pipeline.storage import Output

LOCK_NAME = "build.lock"
SETTLE_S = 2.0
# how the renewer stops the main thread: a signal of its own, since SIGINT is ignored in a build
# started with nohup or & (the shell ignores it there, and interrupt_main then does nothing)
LOST_SIGNAL = signal.SIGUSR2


def _raise_lost(signum: int, frame: object) -> None:
    raise KeyboardInterrupt("this build's output lock was taken over")


class OutputLock:
    """Held from claim() to release(); renewed by a daemon thread every quarter of the lease."""

    def __init__(self, output: Output, lease_s: float):
        self.output, self.lease_s = output, lease_s
        self.path = output.path(LOCK_NAME)
        self.local = isinstance(output.fs, LocalFileSystem)
        self.token = uuid.uuid4().hex
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                      "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "lease_s": lease_s, "command": " ".join(sys.argv)[:300]}
        self.claimed_at = 0.0
        self.lost: str | None = None  # why the lock was lost while held, if it was
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._previous_handler: signal.Handlers | None = None  # LOST_SIGNAL's, while ours is set

    @classmethod
    def claim(cls, output: Output, lease_s: float) -> OutputLock:
        """Take the output's lock, or raise ConfigError naming the build that holds it."""
        lock = cls(output, lease_s)
        held = lock._read()
        if held is not None:
            age = time.time() - held["renewed_at"]
            dead = held["host"] == lock.owner["host"] and not _process_alive(held["pid"])  # kill -9 here: rerun at once
            if age < held["lease_s"] and not dead:  # the holder's lease: it renews at its own pace
                raise ConfigError(lock._held_by(held, age))
            lock._remove_stale(held)
        lock._write(exclusive=lock.local)
        lock.claimed_at = time.time()
        return lock

    def confirm(self) -> None:
        """On object storage, after SETTLE_S, check no build that claimed at the same moment wrote
        after us; then start renewing. A no-op wait on a local disk, where the claim was atomic."""
        if not self.local:
            time.sleep(max(0.0, self.claimed_at + SETTLE_S - time.time()))
            held = self._read()
            if held is None or held["token"] != self.token:
                raise ConfigError(self._held_by(held, 0.0) if held else
                                  f"{self.output.url}: another build removed this one's lock as it started")
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            self._previous_handler = signal.signal(LOST_SIGNAL, _raise_lost)
        self._renewer = threading.Thread(target=self._renew, name="output-lock", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._previous_handler is not None:
            signal.signal(LOST_SIGNAL, self._previous_handler)
            self._previous_handler = None
        try:
            held = self._read()
            if held is not None and held["token"] == self.token:
                self.output.fs.rm(self.path)
        except OSError:
            pass  # left behind, it runs out after its lease

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                held = self._read()
                if held is None or held["token"] != self.token:
                    self.lost = (f"{self.output.url}: this build's lock was taken over ("
                                 f"{self._held_by(held, 0.0) if held else 'removed'}); it stops here")
                    # the build sees KeyboardInterrupt, build() turns it into this line
                    _thread.interrupt_main(LOST_SIGNAL if self._previous_handler is not None else signal.SIGINT)
                    return
                self._write(exclusive=False)  # a takeover landing between read and write is undone here;
                # then the taker's next tick sees this lock and stops: one of the two always stops
            except OSError:
                continue  # the store is down for a moment: the next tick tries again, within the lease

    def _held_by(self, held: dict, age: float) -> str:
        wait = max(0, round(held["lease_s"] - age))
        return (f"{self.output.url} is being built by another build (host {held['host']}, pid {held['pid']}, "
                f"started {held['started_at']}): one build at a time per output. If that build was killed, "
                f"its lock ({LOCK_NAME}) runs out {wait} s from now and a rerun takes it over")

    def _read(self) -> dict | None:
        try:
            with self.output.fs.open(self.path, "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:  # half a lock: a local claim caught between create and write
            return {"host": "?", "pid": "?", "started_at": "?", "token": "unreadable", "renewed_at": time.time(),
                    "lease_s": self.lease_s}

    def _write(self, exclusive: bool) -> None:
        data = json.dumps({**self.owner, "renewed_at": time.time()}).encode()
        if not exclusive:
            self.output.write_atomic(self.path, lambda f: f.write(data))
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            held = self._read()
            raise ConfigError(self._held_by(held, 0.0)) from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def _remove_stale(self, stale: dict) -> None:
        """Move a lock whose lease ran out out of the way. Locally by a rename, then a look at what was
        moved: a claimant that lost the race to a fresher claim puts that one back and gives way."""
        if not self.local:
            self.output.fs.rm(self.path)
            return
        moved = f"{self.path}.stale-{self.token[:8]}"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return  # another claimant moved it first; the exclusive create decides between us
        with open(moved, "rb") as f:
            taken = json.load(f)
        if taken["token"] != stale["token"]:
            os.link(moved, self.path)  # never over a third claim: link fails where a file exists
            os.remove(moved)
            raise ConfigError(self._held_by(taken, 0.0))
        os.remove(moved)


def _process_alive(pid: object) -> bool:
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):  # another user's process, or no pid to ask about
        return True
    return True
