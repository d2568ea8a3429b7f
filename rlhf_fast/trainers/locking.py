"""One writer per output directory: ``{output_dir}/rlhf_fast.lock``.

The lock is an exclusive ``flock`` on that file, held while the run lives; the file records the owner (pid,
host, start time, command) for the message a second run gets. The kernel drops the lock when the owner dies,
however it dies, so a lock left by a killed run is simply taken over (with a warning naming the dead owner).
Within one process, a new trainer on the same directory takes the lock over from an older one (a notebook cell
run again); the older trainer then refuses to write there. A finished run releases the lock.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
import weakref
from typing import Optional

from .errors import OutputDirBusy

try:
    import fcntl
except ImportError:  # not POSIX: no lock (warned once per acquire)
    fcntl = None

LOCK_FILE = "rlhf_fast.lock"
_HELD: dict[str, "weakref.ref[OutputDirLock]"] = {}  # real path of a lock file -> the lock of this process


class OutputDirLock:
    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.key = None
        self._fd: Optional[int] = None
        self._finalizer = None
        self.taken_over = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise ``OutputDirBusy`` naming the live owner."""
        os.makedirs(self.output_dir, exist_ok=True)
        self.key = os.path.realpath(self.path)
        previous = _HELD.get(self.key)
        previous = previous() if previous else None
        if previous is not None and previous is not self and previous.held:  # same process: a newer trainer wins
            previous.release()
            previous.taken_over = True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            warnings.warn(f"{self.path}: file locks are not available here; a second run on this output_dir is "
                          "not prevented", stacklevel=3)
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _describe(_read(fd))
                os.close(fd)
                raise OutputDirBusy(f"output_dir {self.output_dir} is in use by another run ({owner}); wait for it "
                                    "to finish or stop it, or choose another output_dir") from None
            except OSError as error:  # a file system without locks
                warnings.warn(f"{self.path}: cannot lock ({error}); a second run on this output_dir is not "
                              "prevented", stacklevel=3)
        stale = _read(fd)
        if stale.get("pid") is not None and (stale.get("pid"), stale.get("host")) != (os.getpid(), socket.gethostname()):
            warnings.warn(f"output_dir {self.output_dir}: taking over the lock of a run that ended without releasing "
                          f"it ({_describe(stale)})", stacklevel=3)
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        self.taken_over = False
        self._finalizer = weakref.finalize(self, os.close, fd)  # a trainer dropped without finishing
        _HELD[self.key] = weakref.ref(self)

    def ensure(self) -> None:
        """Before writing: hold the lock (again, after a release), or raise if another trainer took it over."""
        if self.taken_over:
            raise OutputDirBusy(f"output_dir {self.output_dir} was taken over by a newer trainer in this process; "
                                "this trainer no longer writes there")
        if not self.held:
            self.acquire()

    def release(self) -> None:
        """Clear the owner record and drop the lock (the file stays: removing it would race with a new owner)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        self._finalizer.detach()
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing drops the flock
        if self.key and _HELD.get(self.key) is not None and _HELD[self.key]() is self:
            del _HELD[self.key]


def _read(fd: int) -> dict:
    try:
        text = os.pread(fd, 65536, 0).decode("utf-8", "replace").strip()
        record = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(owner: dict) -> str:
    if not owner:
        return "owner unknown"
    return (f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"
            + (f": {owner['command']}" if owner.get("command") else ""))
