"""`csi-oci lazy-server`: runs the FUSE servers of lazy volumes, apart from gRPC.

In the DaemonSet this is its own container, so restarting or upgrading the
gRPC server never touches a lazy volume, and a crash here is repaired here:
the loop below reconciles the desired state on disk (csi_oci.publish.lazy_mounts)
with what is mounted, about once a second and at once when the gRPC server
sends a wake-up datagram:

  * an image that should be served but is not (new, or its server died,
    or this container restarted and took every server with it) gets a
    server, and every published volume of that image is bound again at its
    target path: the old binds point at a dead FUSE connection (ENOTCONN);
  * a start that fails leaves its reason where the waiting publish reads
    it, and is retried with a growing pause;
  * a mount no image asks for any more (a release that raced a start) is
    unmounted.

It never takes the store's lock: it only reads volume records and the
lazy desired state, and changes mounts under the same per-target locks as
the gRPC server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from csi_oci.errors import CsiOciError
from csi_oci.publish import mounts
from csi_oci.publish.binds import rebind_lazy
from csi_oci.publish.lazy_mounts import LazyMounts
from csi_oci.publish.locks import TargetLocks
from csi_oci.publish.records import VolumeRecords
from csi_oci.storage.store import Store

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
RETRY_CAP = 30.0
LOCK_WAIT_SECONDS = 60.0  # for a target the gRPC server is working on


@dataclass
class _Failure:
    count: int
    next_try: float


class LazyServer:
    def __init__(self, records: VolumeRecords, locks: TargetLocks, lazy: LazyMounts) -> None:
        self.records = records
        self.locks = locks
        self.lazy = lazy
        self._failures: dict[str, _Failure] = {}

    def reconcile(self) -> int:
        """One pass: start what should run, rebind its volumes; returns servers started."""
        self.lazy.reap()
        started = 0
        for digest in self.lazy.requested():
            if self.lazy.alive(digest) or not self._due(digest):
                continue
            try:
                mnt = self.lazy.start(digest)
            except CsiOciError as exc:
                self._failed(digest, exc)
                continue
            self._failures.pop(digest, None)
            started += 1
            rebound = rebind_lazy(self.records, self.locks, digest, mnt)
            if rebound:
                log.info("%s: %d volume(s) bound again", digest, rebound)
        self._unmount_orphans()
        return started

    def _due(self, digest: str) -> bool:
        failure = self._failures.get(digest)
        if failure is None:
            return True
        if not (self.lazy.root / digest.partition(":")[2] / "error").exists():
            return True  # a new publish cleared the error: it waits for an answer now
        return time.monotonic() >= failure.next_try

    def _failed(self, digest: str, exc: CsiOciError) -> None:
        previous = self._failures.get(digest)
        count = previous.count + 1 if previous else 1
        pause = min(RETRY_CAP, 2.0**count)
        self._failures[digest] = _Failure(count, time.monotonic() + pause)
        log.error("could not serve %s lazily (again in %.0f s): %s", digest, pause, exc)
        self.lazy.record_error(digest, exc)

    def _unmount_orphans(self) -> None:
        if not self.lazy.root.is_dir():
            return
        wanted = set(self.lazy.requested())
        for image_dir in self.lazy.root.iterdir():
            mnt = image_dir / "mnt"
            if f"sha256:{image_dir.name}" in wanted or not mounts.is_mounted(mnt):
                continue
            log.info("unmounting %s: no volume asks for it any more", mnt)
            with contextlib.suppress(CsiOciError, OSError):
                mounts.unmount(mnt)

    def run(self, stop: threading.Event) -> None:
        """Reconcile until `stop` is set; a datagram on the wake socket cuts the wait."""
        path = self.lazy.wake_socket
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as wake:
            wake.bind(str(path))
            wake.setblocking(False)
            log.info("lazy-server watching %s", self.lazy.root)
            self.lazy.prepare_standby()
            while not stop.is_set():
                try:
                    self.reconcile()
                except Exception:  # the loop must survive anything
                    log.exception("lazy-server pass failed")
                select.select([wake], [], [], POLL_SECONDS)
                with contextlib.suppress(BlockingIOError):  # take every pending wake-up
                    while True:
                        wake.recv(64)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def serve_lazy(state_dir: Path, registry_config: Path | None, runtime_dir: Path | None) -> int:
    """Run the lazy-server until SIGTERM/SIGINT (the container's stop)."""
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # taken by sigwait below only
    store = Store(state_dir)
    lazy = LazyMounts(store, registry_config, runtime_dir=runtime_dir)
    records = VolumeRecords(store.root / "volumes")
    locks = TargetLocks(records.dir / "locks", LOCK_WAIT_SECONDS)
    stop = threading.Event()
    loop = threading.Thread(target=LazyServer(records, locks, lazy).run, args=(stop,), name="lazy")
    loop.start()
    signum = signal.sigwait(signals)
    log.info("received %s: stopping (FUSE servers keep serving)", signal.Signals(signum).name)
    stop.set()
    loop.join(POLL_SECONDS + 5)
    return 0
