"""What NodeGetVolumeStats answers: a published volume's size and its condition.

kubelet asks every published volume for its usage (it becomes the
`kubelet_volume_stats_*` metrics of PVC-backed volumes) and, with the
CSIVolumeHealth feature, for its condition (an abnormal one becomes a
warning event on the pod). A volume is an immutable tree, so:

- its size is known without a walk per call: an unpacked tree's record
  (image.json, counted once at pull) or a lazy FUSE server's stats file
  (counted once from the TOC). A `subPath` volume is walked once, on the
  first call, and remembered: the tree under it never changes.
- capacity equals use and nothing is available: nobody can write to it.
- the condition is abnormal when the pod could not read it: the mount is
  gone or its FUSE server is dead, the unpacked tree left the node cache, or
  a lazy volume's reads are failing (the registry refuses or is down).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from csi_oci.errors import NotFound
from csi_oci.publish import mounts
from csi_oci.publish.lazy_mounts import LazyMounts
from csi_oci.publish.records import STATE_PUBLISHED, VolumeRecord, VolumeRecords
from csi_oci.spec.attributes import KEY_IMAGE, KEY_SUB_PATH
from csi_oci.storage.store import Store
from csi_oci.telemetry.lazystats import read_server_stats

log = logging.getLogger(__name__)

# Walks of subPath volumes remembered: a tree is immutable, so an entry is
# never stale; the bound keeps a node with many distinct subPaths small.
MAX_REMEMBERED_WALKS = 1024


@dataclass(frozen=True)
class VolumeUsage:
    """Bytes and inodes of the tree a pod sees, and whether it can read it."""

    bytes: int
    inodes: int
    abnormal: bool = False
    message: str = "readable"


class VolumeUsageReader:
    """Answers NodeGetVolumeStats from the records the publish path keeps."""

    def __init__(self, store: Store, records: VolumeRecords, lazy: LazyMounts | None) -> None:
        self.store = store
        self.records = records
        self.lazy = lazy
        self._walks: OrderedDict[tuple[str, str], tuple[int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def usage(self, volume_id: str, volume_path: str) -> VolumeUsage:
        target = os.path.normpath(volume_path)
        rec = self.records.load(target)
        if rec is None or rec.volume_id != volume_id or rec.state != STATE_PUBLISHED:
            raise NotFound(f"volume {volume_id} is not published at {volume_path}")
        image = rec.spec.get(KEY_IMAGE, "?")
        broken = _mount_problem(target, image, rec.tree.startswith("lazy:"))
        if rec.tree.startswith("lazy:"):
            return self._lazy(rec, target, image, broken)
        return self._unpacked(rec, target, image, broken)

    def _unpacked(
        self, rec: VolumeRecord, target: str, image: str, broken: str | None
    ) -> VolumeUsage:
        record = self.store.image(rec.tree)
        if record is None and broken is None:
            broken = (
                f"the unpacked tree of {image} ({rec.image_digest}) is no longer in the node "
                "cache; delete the pod to publish it again"
            )
        if broken is not None:
            return VolumeUsage(0, 0, True, broken)
        assert record is not None
        if rec.spec.get(KEY_SUB_PATH) or not record.entries:
            nbytes, inodes = self._walked(rec, target)
        else:
            nbytes, inodes = record.unpacked_bytes, record.entries
        return VolumeUsage(nbytes, inodes)

    def _lazy(self, rec: VolumeRecord, target: str, image: str, broken: str | None) -> VolumeUsage:
        if broken is not None:
            return VolumeUsage(0, 0, True, broken)
        key = rec.tree.removeprefix("lazy:")
        stats = read_server_stats(self.lazy.server_dir(key)) if self.lazy is not None else None
        if rec.spec.get(KEY_SUB_PATH) or stats is None or "tree_inodes" not in stats.numbers:
            nbytes, inodes = self._walked(rec, target)
        else:
            nbytes, inodes = int(stats.numbers["tree_bytes"]), int(stats.numbers["tree_inodes"])
        failing_since = stats.numbers.get("failing_since", 0.0) if stats else 0.0
        if failing_since:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(failing_since))
            return VolumeUsage(
                nbytes,
                inodes,
                True,
                f"reads of {image} fail since {when}: {stats.last_error if stats else ''}",
            )
        return VolumeUsage(nbytes, inodes)

    def _walked(self, rec: VolumeRecord, target: str) -> tuple[int, int]:
        key = (rec.tree, rec.spec.get(KEY_SUB_PATH, ""))
        with self._lock:
            if key in self._walks:
                self._walks.move_to_end(key)
                return self._walks[key]
        found = _walk(target)
        with self._lock:
            self._walks[key] = found
            while len(self._walks) > MAX_REMEMBERED_WALKS:
                self._walks.popitem(last=False)
        return found


def _mount_problem(target: str, image: str, lazy: bool) -> str | None:
    """Why the pod cannot read the volume at all, or None."""
    if not mounts.is_mounted(target):
        return f"{image} is no longer mounted at {target}; delete the pod to publish it again"
    try:
        os.statvfs(target)
    except OSError as exc:
        if lazy and exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            return (
                f"the lazy filesystem serving {image} is not running (its FUSE server "
                "exited); csi-oci restarts it and binds the volume again"
            )
        return f"{image} at {target} cannot be read: {os.strerror(exc.errno or 0)}"
    return None


def _walk(root: str) -> tuple[int, int]:
    """Bytes of regular files and inodes (the root included) under `root`; no links followed."""
    nbytes, inodes = 0, 1
    seen: set[int] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        inodes += len(dirnames)
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if st.st_ino in seen:
                continue  # a hard link is one inode
            seen.add(st.st_ino)
            inodes += 1
            if stat.S_ISREG(st.st_mode):
                nbytes += st.st_size
    return nbytes, inodes


__all__ = ["VolumeUsage", "VolumeUsageReader"]
