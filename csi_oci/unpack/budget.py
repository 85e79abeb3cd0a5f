"""Budgets: what an image may unpack to, and the node cache's room for a pull.

Charged while bytes stream, never from claims: bytes and entries against an
image's bound (its declared sizes or --max-image-bytes, --max-image-entries),
and what lands on disk against the cache (DiskBudget), which evicts unused
images only as bytes arrive.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from csi_oci.errors import InvalidLayer, OutOfSpace, human_bytes

# What one inode and its directory entry cost on disk, about one filesystem block:
# an empty directory takes a 4 KiB block on ext4 and xfs. Budgets charge every
# entry this much on top of its bytes, so a layer of a million empty directories
# (a few MB gzipped) is charged 4 GiB, not nothing.
ENTRY_DISK_BYTES = 4096


DEFAULT_MAX_IMAGE_ENTRIES = 1_000_000  # --max-image-entries


@dataclass
class Limits:
    """Budgets enforced while streaming; exceeding one refuses the layer."""

    max_bytes: int = 1 << 50
    max_entries: int = DEFAULT_MAX_IMAGE_ENTRIES


class Budget:
    """Bytes and entries an image may unpack to, shared by parallel layers.

    `charge(entries, nbytes)` counts one step of unpacking against this
    budget and every parent; `lands=False` is for bytes that were inflated
    but never written (padding): they count against an image's bomb budget
    but take no room on disk.
    """

    def __init__(self, limits: Limits, parent: Budget | None = None) -> None:
        self.limits = limits
        self.parent = parent  # a layer's own budget also counts against the image's
        self.bytes = 0
        self.entries = 0
        self._lock = threading.Lock()

    def charge(self, entries: int, nbytes: int, what: str, *, lands: bool = True) -> None:
        if entries < 0 or nbytes < 0:
            raise InvalidLayer(f"{what}: negative size")
        if self.parent is not None:
            self.parent.charge(entries, nbytes, what, lands=lands)
        with self._lock:
            self.entries += entries
            self.bytes += nbytes
            entries_now, bytes_now = self.entries, self.bytes
        if entries_now > self.limits.max_entries:
            raise InvalidLayer(
                f"{what}: more than {self.limits.max_entries} entries in the image "
                "(--max-image-entries)"
            )
        if bytes_now > self.limits.max_bytes:
            raise InvalidLayer(
                f"{what}: image unpacks to more than {self.limits.max_bytes} bytes "
                "(its declared size, or --max-image-bytes)"
            )


class DiskBudget(Budget):
    """The node cache's room for one pull, charged what lands on disk.

    Each entry costs ENTRY_DISK_BYTES on top of its bytes. When a charge
    goes past the room, `make_room(bytes_short)` may evict unused images
    (it returns the bytes it freed): eviction follows bytes that arrived,
    never sizes a manifest claims, so a lying descriptor flushes nothing
    and a pull that fails early leaves the cache as it was.
    """

    def __init__(self, room: int, make_room: Callable[[int], int] | None = None) -> None:
        super().__init__(Limits(max_bytes=room, max_entries=1 << 62))
        self.room = room
        self._make_room = make_room
        self._grow_lock = threading.Lock()

    def charge(self, entries: int, nbytes: int, what: str, *, lands: bool = True) -> None:
        if entries < 0 or nbytes < 0:
            raise InvalidLayer(f"{what}: negative size")
        if not lands:
            return
        cost = nbytes + entries * ENTRY_DISK_BYTES
        with self._lock:
            self.entries += entries
            self.bytes += cost
            short = self.bytes - self.room
        if short <= 0:
            return
        if self._make_room is not None:
            with self._grow_lock:  # one eviction at a time; recheck after waiting
                with self._lock:
                    short = self.bytes - self.room
                if short > 0:
                    freed = self._make_room(short)
                    with self._lock:
                        self.room += freed
                        short = self.bytes - self.room
        if short > 0:
            raise OutOfSpace(
                f"{what}: the node's image cache has room for {human_bytes(self.room)} more "
                "(after evicting unused images), and this image needs more",
                kind=OutOfSpace.CACHE_FULL,
            )
