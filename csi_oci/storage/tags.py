"""Tag records: what a reference last resolved to on this node (IfNotPresent, Never).

    refs/<sha256 of "reference|platform">.json   {"reference", "platform", "digest", "at"}

Read defensively (a torn or foreign file is no record) and written only when
the digest changed.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from csi_oci.errors import CsiOciError
from csi_oci.spec.digest import validate_digest
from csi_oci.storage.atomic import read_json, write_json_atomic


class TagRecords:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _path(self, reference: str, platform: str) -> Path:
        key = hashlib.sha256(f"{reference}|{platform}".encode()).hexdigest()
        return self.dir / f"{key}.json"

    def remember(self, reference: str, platform: str, digest: str) -> None:
        """Record what `reference` resolved to (rewritten only when it changed).

        Not fsynced: a record lost to a power loss means one more look at
        the registry, and a cached publish should not wait on the journal.
        """
        if self.lookup(reference, platform) == digest:
            return
        write_json_atomic(
            self._path(reference, platform),
            {"reference": reference, "platform": platform, "digest": digest, "at": time.time()},
            durable=False,
        )

    def lookup(self, reference: str, platform: str) -> str | None:
        """The digest this reference resolved to last time on this node, if known."""
        raw = read_json(self._path(reference, platform))
        if not isinstance(raw, dict) or raw.get("reference") != reference:
            return None
        try:
            return validate_digest(str(raw.get("digest", "")))
        except CsiOciError:
            return None
