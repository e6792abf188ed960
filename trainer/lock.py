"""One `trainer run` per run directory: an exclusive `flock` on RUN_DIR/trainer.lock.

Two trainers on one run dir would both resume from the same checkpoint, lease under the same
consumer name (releasing each other's leases) and publish clashing versions. The lock file holds
the owner's pid, host and start time for the error message; the lock itself is the kernel's
(fcntl.flock), so a killed owner (even kill -9) releases it with its file descriptor: no stale
lock to clean up by hand. (flock on NFS is advisory across hosts only with NFSv4 locking.)
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

LOCK_NAME = "trainer.lock"


class RunDirLocked(RuntimeError):
    """Another process holds the run directory."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise RunDirLocked(f"{self.path.parent} is in use by another trainer: {holder} "
                               f"(lock file {self.path}); stop it, or use another --out") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
                "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 65536, 0) or b"{}")
        except ValueError:
            info = {}
        if not info:
            return "a process that is still starting"
        started = datetime.fromtimestamp(info.get("started_at", 0), timezone.utc).isoformat(timespec="seconds")
        return f"pid {info.get('pid')} on host {info.get('host')}, started {started}"

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
