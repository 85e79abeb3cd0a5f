"""Published-volume records: what is mounted where, kept on disk before the mount.

Each published target has a record under `<state>/volumes/`, written
*before* the mount ("mounting") and completed after it ("published"), so a
driver killed at any point finds, on restart, every mount it may have made.
Reference counts of image trees are the number of records naming them:
derived from disk, they survive restarts by construction.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from csi_oci.storage.atomic import read_json, write_json_atomic

log = logging.getLogger(__name__)

STATE_MOUNTING = "mounting"
STATE_PUBLISHED = "published"


@dataclass(frozen=True)
class VolumeRecord:
    volume_id: str
    target_path: str
    spec: dict[str, str]
    image_digest: str
    state: str
    published_at: float
    tree: str = ""  # store key of the tree (digest, plus include set)


class VolumeRecords:
    """The records under one directory: read, written, counted."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _path(self, target: str) -> Path:
        return self.dir / (hashlib.sha256(target.encode()).hexdigest() + ".json")

    def load(self, target: str) -> VolumeRecord | None:
        raw = read_json(self._path(target))
        if raw is None:
            return None
        try:
            rec = VolumeRecord(**raw)
        except TypeError:
            log.warning("ignoring malformed volume record for %s", target)
            return None
        return rec if rec.target_path == target else None

    def save(self, rec: VolumeRecord) -> None:
        # Not fsynced: the record has to survive a driver restart (the page
        # cache does), not a power loss, which takes the mount with it; a
        # torn record then reads as unreadable and kubelet publishes again.
        write_json_atomic(self._path(rec.target_path), asdict(rec), durable=False)

    def forget(self, target: str) -> None:
        self._path(target).unlink(missing_ok=True)

    def all(self) -> list[VolumeRecord]:
        out = []
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
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
        for rec in self.all():
            key = rec.tree or rec.image_digest
            counts[key] = counts.get(key, 0) + 1
        return counts
