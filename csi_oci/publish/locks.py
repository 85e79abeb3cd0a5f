"""Serializing work on one target path: between threads, and with the lazy-server.

The cross-process part is an flock on one of LOCK_STRIPES files, picked by
the target's hash: bounded on disk however many pods come and go.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from csi_oci.errors import FailedPrecondition, PullInProgress

LOCK_STRIPES = 64


@contextlib.contextmanager
def _flock(path: Path, deadline: float | None) -> Iterator[None]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise FailedPrecondition(
            f"state directory {path.parent.parent.parent} is not writable ({exc.strerror}); "
            "check the driver's hostPath volume and disk"
        ) from None
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise PullInProgress(
                        "another operation on this target is still in progress; retry"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # releases the lock


class TargetLocks:
    def __init__(self, directory: Path, wait: float) -> None:
        self.dir = directory  # <state>/volumes/locks
        self.wait = wait  # seconds to wait for a lock (inf: forever)
        # target -> (its lock, threads holding or waiting for it); an entry
        # goes when its last user does, or every pod ever seen would stay.
        self._locks: dict[str, tuple[threading.Lock, int]] = {}
        self._locks_guard = threading.Lock()

    @contextlib.contextmanager
    def hold(self, target: str) -> Iterator[None]:
        """Serialize work on one target: between threads, and with the lazy-server.

        The cross-process part is an flock on one of LOCK_STRIPES files, picked
        by the target's hash: bounded on disk however many pods come and go.
        """
        lock = self._use_lock(target)
        try:
            timeout = None if math.isinf(self.wait) else self.wait
            deadline = None if timeout is None else time.monotonic() + timeout
            if not lock.acquire(timeout=-1 if timeout is None else timeout):
                raise PullInProgress(f"another operation on {target} is still in progress; retry")
            try:
                with _flock(self._stripe(target), deadline):
                    yield
            finally:
                lock.release()
        finally:
            self._unuse_lock(target)

    def _use_lock(self, target: str) -> threading.Lock:
        with self._locks_guard:
            lock, users = self._locks.get(target) or (threading.Lock(), 0)
            self._locks[target] = (lock, users + 1)
            return lock

    def _unuse_lock(self, target: str) -> None:
        """Forget the target's lock once no thread holds or waits for it."""
        with self._locks_guard:
            lock, users = self._locks[target]
            if users > 1:
                self._locks[target] = (lock, users - 1)
            else:
                del self._locks[target]

    def _stripe(self, target: str) -> Path:
        stripe = hashlib.sha256(target.encode()).digest()[0] % LOCK_STRIPES
        return self.dir / f"{stripe:02x}"
