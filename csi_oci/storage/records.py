"""What the store records about each tree, and the keys it files them under."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from csi_oci.spec.reference import validate_digest


def tree_key(digest: str, include: tuple[str, ...] = ()) -> str:
    """Store key of a tree: the manifest digest, plus the include set if any.

    Different include sets of one image are distinct trees (raw files among
    them are hard links to one shared blob).
    """
    validate_digest(digest)
    if not include:
        return digest
    h = hashlib.sha256("\n".join(include).encode()).hexdigest()[:16]
    return f"{digest}.include-{h}"


def blob_pin(digest: str) -> str:
    """The pin (Store.pinned) that keeps a blob in the blob store from eviction."""
    return f"blob:{digest}"


@dataclass(frozen=True)
class ImageRecord:
    """Metadata of one unpacked tree: `image.json` beside it, shown by `csi-oci ls`."""

    digest: str  # manifest digest (platform-specific)
    reference: str  # reference it was first pulled as
    config_digest: str
    layers: list[str]
    compressed_bytes: int  # bytes of the layers this tree needed
    unpacked_bytes: int
    pulled_at: float
    packaging: str = "image"
    files: int = 0
    include: list[str] = field(default_factory=list)
    key: str = ""
    own_bytes: int = 0  # on disk for this tree alone (shared raw blobs not counted)
    entries: int = 0  # directories, files and links, the root included (0: an older record)
    # Signature rules this tree was verified under: {rule, kind, signer, digest, source}.
    signatures: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """The one-line summary users see in the log and in `csi-oci ls`."""
        inc = f" include={','.join(self.include)}" if self.include else ""
        return (
            f"{self.reference} {self.digest} {self.packaging}: {self.files} files, "
            f"{self.unpacked_bytes} bytes{inc}{self.signed_by()}"
        )

    def signed_by(self) -> str:
        """ ", signed (rule models: cosign release.pub)" for `csi-oci ls`, or ""."""
        if not self.signatures:
            return ""
        parts = [
            f"rule {s.get('rule')}: {s.get('kind')} {s.get('signer')}" for s in self.signatures
        ]
        return f", signed ({'; '.join(parts)})"


@dataclass(frozen=True)
class Usage:
    """What the store holds on disk, by the bytes of the files in it."""

    trees: int  # bytes of files owned by trees (hard-linked raw files excluded)
    blobs: int  # bytes in the blob store (raw files, counted once however linked)

    @property
    def total(self) -> int:
        return self.trees + self.blobs
