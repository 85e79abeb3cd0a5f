"""Published volumes: publish/unpublish on plain data, persisted across restarts.

Each published target has a record under `<state>/volumes/`, written
*before* the mount ("mounting") and completed after it ("published"), so a
driver killed at any point finds, on restart, every mount it may have made.
Reference counts of image trees are the number of records naming them:
derived from disk, they survive restarts by construction."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from csi_oci.errors import (
    AlreadyExists,
    CsiOciError,
    FailedPrecondition,
    IntegrityError,
    InvalidLayer,
    NotFound,
    PullInProgress,
)
from csi_oci.lazy.reader import lazy_format
from csi_oci.oci.registry import CredentialLookup
from csi_oci.publish import mounts
from csi_oci.publish.lazy_mounts import LazyMounts, fuse_available
from csi_oci.publish.records import STATE_MOUNTING, STATE_PUBLISHED, VolumeRecord
from csi_oci.pull.puller import Puller
from csi_oci.pull.resolve import ResolvedImage
from csi_oci.spec.attributes import Mode, PullPolicy, VolumeSpec, parse_volume_attributes
from csi_oci.storage.atomic import read_json, write_json_atomic
from csi_oci.storage.store import Store
from csi_oci.unpack.paths import open_in_root

log = logging.getLogger(__name__)


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


class VolumeManager:
    def __init__(
        self,
        store: Store,
        puller: Puller | None,
        *,
        publish_wait: float = 90.0,
        lazy: LazyMounts | None = None,
    ) -> None:
        self.store = store
        self.puller = puller
        self.lazy = lazy
        self.publish_wait = publish_wait
        self.records = store.root / "volumes"
        # target -> (its lock, threads holding or waiting for it); an entry
        # goes when its last user does, or every pod ever seen would stay.
        self._locks: dict[str, tuple[threading.Lock, int]] = {}
        self._locks_guard = threading.Lock()
        if puller is not None:  # the lazy-server reads records only
            puller.in_use = self.in_use

    @property
    def _puller(self) -> Puller:
        if self.puller is None:
            raise FailedPrecondition("this process only reads volume records; it cannot publish")
        return self.puller

    # -- records -------------------------------------------------------------

    def _record_path(self, target: str) -> Path:
        return self.records / (hashlib.sha256(target.encode()).hexdigest() + ".json")

    def load(self, target: str) -> VolumeRecord | None:
        raw = read_json(self._record_path(target))
        if raw is None:
            return None
        try:
            rec = VolumeRecord(**raw)
        except TypeError:
            log.warning("ignoring malformed volume record for %s", target)
            return None
        return rec if rec.target_path == target else None

    def _save(self, rec: VolumeRecord) -> None:
        # Not fsynced: the record has to survive a driver restart (the page
        # cache does), not a power loss, which takes the mount with it; a
        # torn record then reads as unreadable and kubelet publishes again.
        write_json_atomic(self._record_path(rec.target_path), asdict(rec), durable=False)

    def _forget(self, target: str) -> None:
        self._record_path(target).unlink(missing_ok=True)

    def all_records(self) -> list[VolumeRecord]:
        out = []
        for path in sorted(self.records.glob("*.json")) if self.records.is_dir() else []:
            raw = read_json(path)
            with contextlib.suppress(TypeError):
                if raw is not None:
                    out.append(VolumeRecord(**raw))
        return out

    def in_use(self) -> set[str]:
        """Trees that published (or publishing) volumes use: never evicted."""
        return set(self.refcounts())

    def refcounts(self) -> dict[str, int]:
        """Tree key (image digest, plus include set) -> number of volumes using it."""
        counts: dict[str, int] = {}
        for rec in self.all_records():
            key = rec.tree or rec.image_digest
            counts[key] = counts.get(key, 0) + 1
        return counts

    def recover(self) -> None:
        """After a restart: drop records of mounts that never completed.

        Lazy images whose volumes are all gone (a crash between starting the
        image's server and binding its first volume) stop being served.
        """
        self.records.mkdir(parents=True, exist_ok=True)
        for rec in self.all_records():
            if rec.state == STATE_MOUNTING and not mounts.is_mounted(rec.target_path):
                log.info("dropping record of unfinished publish at %s", rec.target_path)
                self._forget(rec.target_path)
        if self.lazy is not None:
            used = self.refcounts()
            for digest in self.lazy.requested():
                if f"lazy:{digest}" not in used:
                    log.info("no volume uses lazy image %s any more: releasing it", digest)
                    self.lazy.release(digest)

    # -- locking ---------------------------------------------------------------

    @contextlib.contextmanager
    def _target_lock(self, target: str) -> Iterator[None]:
        """Serialize work on one target: between threads, and with the lazy-server.

        The cross-process part is an flock on one of LOCK_STRIPES files, picked
        by the target's hash: bounded on disk however many pods come and go.
        """
        lock = self._use_lock(target)
        try:
            timeout = None if math.isinf(self.publish_wait) else self.publish_wait
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
        return self.records / "locks" / f"{stripe:02x}"

    # -- publish / unpublish -------------------------------------------------------

    def publish(
        self,
        volume_id: str,
        target: str,
        spec: VolumeSpec,
        credentials: CredentialLookup | None,
        *,
        wait: float | None = None,
    ) -> VolumeRecord:
        target = os.path.normpath(target)
        with self._target_lock(target):
            existing = self._republish_check(volume_id, target, spec)
            if existing is not None:
                return existing
            if not self.store.usable():
                raise FailedPrecondition(
                    f"state directory {self.store.root} is not writable; check the driver's "
                    "hostPath volume and disk"
                )
            if spec.mode is Mode.LAZY:
                return self._publish_lazy(volume_id, target, spec, credentials)
            resolved = self._puller.resolve(
                spec.reference, spec.platform, spec.pull_policy, credentials, spec.include
            )
            if spec.mode is Mode.AUTO and self._lazy_capable(resolved, spec):
                return self._publish_lazy(volume_id, target, spec, credentials, resolved)
            budget = self.publish_wait if wait is None else wait
            with self.store.pinned(resolved.key):
                tree = self._puller.ensure(
                    resolved, spec.platform, None if math.isinf(budget) else budget
                )
                self.store.touch(resolved.key)
                return self._mount(volume_id, target, spec, resolved.digest, tree, resolved.key)

    def _lazy_capable(self, resolved: ResolvedImage, spec: VolumeSpec) -> bool:
        """auto picks lazy when every layer can be served lazily, and FUSE is here.

        An image already unpacked on this node (served from the local record,
        no manifest at hand) stays unpacked.
        """
        if self.lazy is None or resolved.manifest is None:
            return False
        if self.store.image(resolved.key) is not None or not fuse_available():
            return False
        layers = resolved.manifest.layers
        return bool(layers) and all(lazy_format(d.media_type, d.annotations) for d in layers)

    def _publish_lazy(
        self,
        volume_id: str,
        target: str,
        spec: VolumeSpec,
        credentials: CredentialLookup | None,
        resolved: ResolvedImage | None = None,
    ) -> VolumeRecord:
        """mode lazy: bind the image's FUSE mount (one server per image) at the target."""
        if self.lazy is None:
            raise FailedPrecondition("mode lazy is not available on this node")
        if resolved is None or resolved.manifest is None:
            # The manifest is needed to know the layers: resolve with the
            # network unless the policy forbids it.
            policy = (
                PullPolicy.ALWAYS if spec.pull_policy is not PullPolicy.NEVER else spec.pull_policy
            )
            resolved = self._puller.resolve(
                spec.reference, spec.platform, policy, credentials, spec.include
            )
        upstream = (
            credentials(spec.reference.registry, spec.reference.repository) if credentials else None
        )
        try:
            mnt = self.lazy.ensure(resolved, upstream, spec.prefetch)
        except (InvalidLayer, IntegrityError):
            # The image itself cannot be served (a hostile or corrupt TOC): no
            # retry will change that, so nothing should keep asking for it.
            if f"lazy:{resolved.key}" not in self.refcounts():
                self.lazy.release(resolved.key)
            raise
        return self._mount(volume_id, target, spec, resolved.digest, mnt, f"lazy:{resolved.key}")

    def check_lazy(self) -> int:
        """Restart dead lazy servers and bind their volumes again; returns how many.

        A FUSE mount dies with its server; every access then fails at once
        with ENOTCONN (no hang). Run periodically by the server's watchdog.
        """
        if self.lazy is None:
            return 0
        by_digest: dict[str, list[VolumeRecord]] = {}
        for rec in self.all_records():
            if rec.tree.startswith("lazy:") and rec.state == STATE_PUBLISHED:
                by_digest.setdefault(rec.tree.removeprefix("lazy:"), []).append(rec)
        revived = 0
        for digest in by_digest:
            if self.lazy.alive(digest):
                continue
            try:
                mnt = self.lazy.revive(digest)
            except CsiOciError as exc:
                log.error("could not restart the lazy filesystem of %s: %s", digest, exc)
                continue
            self.rebind_lazy(digest, mnt)
            revived += 1
        return revived

    def rebind_lazy(self, digest: str, mnt: Path) -> int:
        """Bind the image's published volumes again after its server restarted.

        A bind of a dead FUSE mount fails every access with ENOTCONN; a
        healthy one (rebound already, or never broken) is left alone.
        Returns how many targets were bound again.
        """
        rebound = 0
        for rec in self.all_records():
            if rec.tree != f"lazy:{digest}" or rec.state != STATE_PUBLISHED:
                continue
            with self._target_lock(rec.target_path):
                current = self.load(rec.target_path)
                if current is None or current.tree != rec.tree:
                    continue  # unpublished, or published again, meanwhile
                if mounts.is_answering(rec.target_path):
                    continue  # rebound already, or never broken
                # On top of the stale bind, not in its place: a container with
                # mountPropagation HostToContainer holds a slave copy of this
                # mount, which receives a mount stacked on it but is cut off by
                # an unmount. NodeUnpublish unmounts the whole stack.
                spec = parse_volume_attributes(rec.spec)
                root_fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    src_fd = _open_sub_path(root_fd, spec, digest)
                    try:
                        mounts.bind_mount_readonly(src_fd, rec.target_path)
                    finally:
                        os.close(src_fd)
                finally:
                    os.close(root_fd)
                log.info("bound %s again at %s", rec.volume_id, rec.target_path)
                rebound += 1
        return rebound

    def _republish_check(
        self, volume_id: str, target: str, spec: VolumeSpec
    ) -> VolumeRecord | None:
        """An identical republish is a no-op; an incompatible one is ALREADY_EXISTS."""
        if not mounts.is_mounted(target):
            return None
        rec = self.load(target)
        if rec is None:
            raise AlreadyExists(f"target {target} is already a mount point, not made by csi-oci")
        if rec.volume_id == volume_id and rec.spec == spec.canonical():
            if rec.state != STATE_PUBLISHED:
                rec = VolumeRecord(**{**asdict(rec), "state": STATE_PUBLISHED})
                self._save(rec)
            return rec
        raise AlreadyExists(
            f"target {target} already has volume {rec.volume_id} ({rec.spec.get('image')}) "
            "published with different parameters"
        )

    def _mount(
        self, volume_id: str, target: str, spec: VolumeSpec, digest: str, tree: Path, key: str
    ) -> VolumeRecord:
        rec = VolumeRecord(
            volume_id, target, spec.canonical(), digest, STATE_MOUNTING, time.time(), key
        )
        self._save(rec)
        created = False
        try:
            created = _make_target_dir(target)
            root_fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                src_fd = _open_sub_path(root_fd, spec, digest)
                try:
                    mounts.bind_mount_readonly(src_fd, target)
                finally:
                    os.close(src_fd)
            finally:
                os.close(root_fd)
        except BaseException:
            self._forget(target)
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(target)
            raise
        rec = VolumeRecord(**{**asdict(rec), "state": STATE_PUBLISHED})
        self._save(rec)
        log.info("published %s (%s @ %s) at %s", volume_id, spec.reference, digest, target)
        return rec

    def unpublish(self, volume_id: str, target: str) -> None:
        """Idempotent: OK when not mounted or absent. Removes the target directory."""
        target = os.path.normpath(target)
        with self._target_lock(target):
            rec = self.load(target)
            if rec is not None and rec.volume_id != volume_id:
                log.warning(
                    "unpublish of %s at %s, but %s was published there",
                    volume_id,
                    target,
                    rec.volume_id,
                )
            mounts.unmount(target)
            _remove_target(target)
            self._forget(target)
            log.info("unpublished %s from %s", volume_id, target)
            if rec is not None and rec.tree.startswith("lazy:") and self.lazy is not None:
                if rec.tree not in self.refcounts():
                    self.lazy.release(rec.tree.removeprefix("lazy:"))


def _make_target_dir(target: str) -> bool:
    """Create the target directory (CSI: the SP creates it). True if we made it."""
    try:
        os.mkdir(target, 0o750)
        return True
    except FileExistsError:
        if not os.path.isdir(target) or os.path.islink(target):
            raise FailedPrecondition(f"target {target} exists and is not a directory") from None
        return False
    except FileNotFoundError:
        raise FailedPrecondition(
            f"parent directory of target {target} does not exist (the CO must create it)"
        ) from None


def _open_sub_path(root_fd: int, spec: VolumeSpec, digest: str) -> int:
    where = spec.sub_path or "."
    try:
        fd = open_in_root(root_fd, where)
    except InvalidLayer:
        raise NotFound(
            f"subPath {spec.sub_path!r} is not a directory in image {spec.reference}"
        ) from None
    if fd is None:
        raise NotFound(
            f"subPath {spec.sub_path!r} does not exist in image {spec.reference} ({digest}); "
            f"its top level holds: {_top_level(root_fd)}; fix the volume's subPath attribute"
        )
    return fd


def _top_level(root_fd: int, shown: int = 10) -> str:
    """`models/, config.json, ...`: what a subPath could have been."""
    try:
        names = sorted(os.listdir(root_fd))
    except OSError:
        return "(unreadable)"
    marked = []
    for name in names[:shown]:
        with contextlib.suppress(OSError):
            if _is_dir_at(root_fd, name):
                name += "/"
        marked.append(name)
    if len(names) > shown:
        marked.append(f"... ({len(names)} entries)")
    return ", ".join(marked) or "nothing (the image is empty)"


def _is_dir_at(dir_fd: int, name: str) -> bool:
    return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)


def _remove_target(target: str) -> None:
    try:
        os.rmdir(target)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        os.unlink(target)
    except OSError as exc:
        if exc.errno == errno.ENOTEMPTY:
            raise FailedPrecondition(
                f"target {target} is not empty after unmount; refusing to delete its contents"
            ) from None
        raise
