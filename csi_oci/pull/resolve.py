"""Resolution: a reference pinned to one platform manifest, and what to say when it is not there."""

from __future__ import annotations

from dataclasses import dataclass

from csi_oci.errors import (
    CsiOciError,
    NotFound,
)
from csi_oci.oci.manifest import Descriptor, ImageManifest
from csi_oci.oci.registry import RegistryClient
from csi_oci.spec.attributes import Platform
from csi_oci.spec.reference import Reference
from csi_oci.storage.records import tree_key


@dataclass
class ResolvedImage:
    """A reference pinned to one platform-specific manifest (and include set)."""

    reference: Reference
    digest: str  # platform manifest digest
    manifest: ImageManifest | None  # None when served from the local record
    client: RegistryClient | None
    include: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return tree_key(self.digest, self.include)


MAX_TAGS_SHOWN = 8


def _not_found(ref: Reference, client: RegistryClient, exc: NotFound) -> NotFound:
    """What is missing (tag, digest or the whole repository), with what there is instead."""
    where = f"{ref.registry}/{ref.repository}"
    try:
        tags = client.list_tags()
    except NotFound:
        return NotFound(
            f"image {ref} not found: repository {ref.repository} does not exist at "
            f"{ref.registry} (or is private and hidden from these credentials); check the "
            "image name"
        )
    except CsiOciError:
        tags = None
    if ref.digest and ref.manifest_key == ref.digest:
        return NotFound(
            f"image {ref} not found: manifest {ref.digest} is not in {where} (deleted, or "
            "pushed to another repository); check the digest"
        )
    tag = ref.manifest_key
    if tags:
        shown = ", ".join(sorted(tags)[:MAX_TAGS_SHOWN])
        more = f" ({len(tags)}{'+' if len(tags) >= 100 else ''} in all)" if len(tags) > 1 else ""
        if len(tags) > MAX_TAGS_SHOWN:
            shown += ", ..."
        return NotFound(
            f"image {ref} not found: tag {tag} does not exist in {where}; pushed tags: "
            f"{shown}{more}; fix the tag in the volume's image attribute"
        )
    if tags == []:
        return NotFound(
            f"image {ref} not found: repository {where} has no tags; push the image first"
        )
    return NotFound(f"image {ref} not found: tag {tag} does not exist in {where} ({exc})")


def _no_platform_message(ref: Reference, want: Platform, entries: list[Descriptor]) -> str:
    offered = sorted(
        {
            str(d.platform)
            for d in entries
            if d.platform is not None and d.platform.os not in ("unknown", "")
        }
    )
    return (
        f"image {ref} has no variant for platform {want} (this node's unless the volume sets "
        f"platform); available platforms: {', '.join(offered) or 'none'}; set the volume's "
        "platform attribute to one of them or push the image for this platform"
    )
