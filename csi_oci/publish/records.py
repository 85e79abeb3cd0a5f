"""Published-volume records: what is mounted where, kept on disk before the mount."""

from __future__ import annotations

from dataclasses import dataclass

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
