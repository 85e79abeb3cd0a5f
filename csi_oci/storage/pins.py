"""Pins that outlive a call: trees kept from eviction by name of who wants them.

A publish pins the tree it is about to mount for the length of the call
(CacheSpace.pinned, in memory). A pre-warmed image (csi_oci.prewarm) must
stay while its ImageCache selects the node, across driver restarts and
against `csi-oci gc` run from another process, so those pins are a file:
`<state>/pins.json`, `{owner: [tree keys]}`, written atomically. An owner is
a name such as `imagecache/llama-3`; releasing the owner unpins its keys
(they become evictable like any unused image, least recently used first).
"""

from __future__ import annotations

import threading
from pathlib import Path

from csi_oci.storage.atomic import read_json, write_json_atomic

MAX_OWNERS = 10_000


class StorePins:
    """Owner -> tree keys, on disk; `keys()` is what eviction must leave alone."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def _load(self) -> dict[str, list[str]]:
        raw = read_json(self.path)
        if not isinstance(raw, dict):
            return {}
        return {
            str(owner): [str(k) for k in keys]
            for owner, keys in raw.items()
            if isinstance(keys, list)
        }

    def keys(self) -> set[str]:
        """Every pinned tree key, whoever pinned it (read from disk: other processes see it)."""
        return {key for keys in self._load().values() for key in keys}

    def owned(self) -> dict[str, list[str]]:
        return self._load()

    def hold(self, owner: str, keys: list[str]) -> None:
        """`owner` holds exactly `keys` now (an empty list releases it)."""
        with self._lock:
            pins = self._load()
            if keys:
                pins[owner] = sorted(set(keys))
            else:
                pins.pop(owner, None)
            if len(pins) > MAX_OWNERS:
                raise ValueError(f"more than {MAX_OWNERS} pin owners")
            write_json_atomic(self.path, pins, durable=False)

    def release_all_but(self, owners: set[str], prefix: str) -> list[str]:
        """Drop the owners under `prefix` not in `owners` (ImageCaches deleted while the
        driver was down); returns who was dropped."""
        with self._lock:
            pins = self._load()
            gone = [o for o in pins if o.startswith(prefix) and o not in owners]
            for owner in gone:
                del pins[owner]
            if gone:
                write_json_atomic(self.path, pins, durable=False)
            return gone
