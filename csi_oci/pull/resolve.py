"""Resolution: a reference pinned to one platform manifest, and what to say when it is not there."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from csi_oci.errors import (
    CsiOciError,
    FailedPrecondition,
    IntegrityError,
    NotFound,
)
from csi_oci.oci.config import ConfigSource
from csi_oci.oci.manifest import (
    INDEX_TYPES,
    Descriptor,
    ImageManifest,
    parse_index,
    parse_manifest,
    select_platform,
)
from csi_oci.oci.registry import CredentialLookup, RegistryClient
from csi_oci.spec.attributes import Platform, PullPolicy
from csi_oci.spec.reference import Reference
from csi_oci.storage.records import tree_key
from csi_oci.storage.store import Store
from csi_oci.telemetry import instruments

log = logging.getLogger(__name__)


@dataclass
class ResolvedImage:
    """A reference pinned to one platform-specific manifest (and include set)."""

    reference: Reference
    digest: str  # platform manifest digest
    manifest: ImageManifest | None  # None when served from the local record
    client: RegistryClient | None
    include: tuple[str, ...] = ()
    # The index the reference resolved through (None: no index, or answered from
    # the node's records): signatures may name it instead of the manifest.
    index_digest: str | None = None

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


class Resolver:
    """Pins references to platform manifests: from the node's tag records when the
    pull policy allows, else from the registry (and its mirrors, for digests)."""

    def __init__(self, store: Store, registries: ConfigSource) -> None:
        self.store = store
        self.registries = registries

    def resolve(
        self,
        ref: Reference,
        platform: Platform,
        policy: PullPolicy,
        credentials: CredentialLookup | None,
        include: tuple[str, ...] = (),
    ) -> ResolvedImage:
        """Pin `ref` to a platform manifest digest, honouring the pull policy.

        Never and IfNotPresent answer from the node's record of earlier
        resolutions without touching the network when the tree is there.
        """
        key_ref, plat = str(ref), str(platform)
        if policy is not PullPolicy.ALWAYS:
            known = self.store.tags.lookup(key_ref, plat)
            if known is not None and self.store.image(tree_key(known, include)) is not None:
                return ResolvedImage(ref, known, None, None, include)
            if policy is PullPolicy.NEVER:
                what = f" with include={','.join(include)}" if include else ""
                raise FailedPrecondition(
                    f"image {ref} ({plat}){what} is not present on this node "
                    "and pullPolicy is Never; use pullPolicy IfNotPresent, or pull it onto "
                    "the node first (csi-oci pull)"
                )
        client = RegistryClient(ref, credentials, config=self.registries.current())
        try:
            top = client.get_manifest(ref.manifest_key)
        except NotFound as exc:
            error = _not_found(ref, client, exc)
            instruments.count_pull_error(error)
            raise error from None
        except CsiOciError as exc:
            instruments.count_pull_error(exc)
            raise
        fetched = top
        try:
            if top.media_type in INDEX_TYPES:
                entries = parse_index(top.data)
                try:
                    chosen = select_platform(entries, platform)
                except NotFound:
                    raise NotFound(_no_platform_message(ref, platform, entries)) from None
                fetched = client.get_manifest(chosen.digest)
                if fetched.media_type in INDEX_TYPES:
                    raise IntegrityError(f"index entry {chosen.digest} of {ref} is itself an index")
            manifest = parse_manifest(fetched.data, fetched.media_type)
            if policy is PullPolicy.ALWAYS and top.from_mirror and fetched.from_mirror:
                # The pod's own access, at the registry: for what the pod asked for (a
                # tag a trusted mirror resolved may name bytes only the mirror has).
                client.check_access(ref.manifest_key)
        except CsiOciError as exc:
            instruments.count_pull_error(exc)
            raise
        log.info("resolved %s (%s) to %s (top-level %s)", ref, plat, fetched.digest, top.digest)
        index_digest = top.digest if top.media_type in INDEX_TYPES else None
        return ResolvedImage(ref, fetched.digest, manifest, client, include, index_digest)
