"""The run directory a trainer writes: checked before anything runs, and held by one trainer at a
time.

`check_writable(model_dir)` names, in one line, a model_dir that is a file, lies under a file, or
cannot be written. `RunLock(model_dir)` takes an exclusive `fcntl` lock on `model_dir/.lock`
(recording host, pid and start time in it) for as long as the run lasts; a second trainer on the
same directory is refused at once with the owner named. The operating system drops the lock when
its process dies, however it dies (`kill -9` included), so a stale lock never blocks a restart.
Remote paths (`gs://...`) are not locked (nor, with a warning, file systems without `flock`);
in a multi-host run process 0 takes the lock. Within one process the lock is reentrant (`python -m lexjax.train` takes it
before its slow imports, so a second trainer is refused within a second; `train` takes it again).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Optional

from lexjax.errors import UserError
from lexjax.paths import is_remote, run_path

LOCK_FILE = ".lock"
_held: dict[str, list] = {}  # lock path -> [open lock file, number of holders in this process]


class RunDirectoryError(UserError, OSError):
    """A model_dir that cannot be used: not a directory, not writable, or in use."""


def is_local(path: str) -> bool:
    """Whether `path` is on a local (or mounted) file system: not a URI such as `gs://...`."""
    return not is_remote(path)


def check_writable(model_dir: str) -> None:
    """Creates `model_dir` if needed; a `RunDirectoryError` naming the path and the fix if it is
    a file, lies under a file, or cannot be written."""
    if not is_local(model_dir):
        return
    path = os.path.abspath(model_dir)
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        where = "is a file" if parent == path else f"lies under the file {parent}"
        raise RunDirectoryError(f"--model_dir {model_dir} {where}; give a directory path")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise RunDirectoryError(f"cannot write to --model_dir {model_dir}: "
                                f"{e.strerror or e}; choose a writable directory") from None


class RunLock:
    """An exclusive lock on a run directory, held from `acquire()` until `release()` (or the
    process's end). Use as a context manager."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.path = str(run_path(model_dir) / LOCK_FILE)  # never opened for a URI
        self._holding = False

    def acquire(self) -> "RunLock":
        if not is_local(self.model_dir) or self._holding:
            return self
        if self.path in _held:  # this process holds it already
            _held[self.path][1] += 1
            self._holding = True
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):  # no flock here (some NFS, FUSE)
                handle.close()
                print(f"warning: cannot lock {self.path} ({e.strerror}); make sure no other "
                      "trainer uses this run directory", file=sys.stderr)
                return self
            owner = self.owner()
            handle.close()
            raise RunDirectoryError(
                f"{self.model_dir} is in use by another trainer ({owner}); wait for it to finish "
                "or stop it, or train into another --model_dir") from None
        handle.seek(0)
        handle.truncate()
        json.dump({"host": socket.gethostname(), "pid": os.getpid(),
                   "started": datetime.datetime.now().isoformat(timespec="seconds")}, handle)
        handle.flush()
        _held[self.path] = [handle, 1]
        self._holding = True
        return self

    def owner(self) -> str:
        """Who holds the lock, as its file records it ("unknown owner" when unreadable)."""
        try:
            with open(self.path) as f:
                record: Optional[dict] = json.load(f)
            return (f"pid {record['pid']} on {record['host']}, started {record['started']}")
        except (OSError, ValueError, KeyError, TypeError):
            return "unknown owner"

    def release(self) -> None:
        if not self._holding:
            return
        self._holding = False
        entry = _held[self.path]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self.path]
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            entry[0].close()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
