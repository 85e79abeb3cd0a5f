"""Where signatures live, and fetching them: every byte by digest, every list bounded.

For a manifest digest `sha256:<hex>` a signature may be:

- under cosign's tag `sha256-<hex>.sig` (each layer one simple-signing payload);
- an OCI 1.1 referrer: listed by the referrers API and/or in the index
  under the fallback tag `sha256-<hex>` (both are read: signers write the
  tag even where the API exists). Referrers
  are cosign signatures (--registry-referrers-mode=oci-1-1), Sigstore bundles
  (cosign --new-bundle-format, model-signing attached with oras) and Notary
  Project signatures (JWS or COSE).

A referrer is classified by its layers' media types, not by its
artifactType alone: cosign writes bundles under more than one artifactType
(cosign#4422), and an attacker chooses artifactType freely anyway.

Tag and referrers list come from the registry and its mirrors: a mirror may
hide or add entries, so the lists are merged and each entry is fetched by
digest (verified by RegistryClient); a forged entry then fails its
signature check, a hidden one is still found at the registry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from csi_oci.errors import CsiOciError, NotFound
from csi_oci.oci.manifest import INDEX_TYPES, Descriptor, parse_index, parse_manifest
from csi_oci.oci.registry import RegistryClient

log = logging.getLogger(__name__)

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
BUNDLE_PREFIX = "application/vnd.dev.sigstore.bundle"
NOTATION_JWS = "application/jose+json"
NOTATION_COSE = "application/cose"

MAX_REFERRERS = 64  # examined per digest; more is a flood, not a signing history
MAX_SIGNATURE_LAYERS = 16  # per signature manifest
MAX_SIGNATURE_BLOB = 4 * 1024 * 1024  # a payload, bundle or envelope with its chain


@dataclass(frozen=True)
class Candidate:
    """One signature found for a digest, not yet verified."""

    kind: str  # "simple-signing", "bundle", "notation"
    media_type: str
    data: bytes  # the blob, checked against its digest
    annotations: dict[str, str]  # the layer's (cosign carries the signature here)
    source: str  # for messages and records: "tag sha256-<hex>.sig", "referrer sha256:..."


@dataclass
class Found:
    """What a search for one digest's signatures turned up."""

    digest: str
    candidates: list[Candidate] = field(default_factory=list)
    looked: list[str] = field(default_factory=list)  # where it looked, for "no signature"
    errors: list[str] = field(default_factory=list)  # what failed on the way


def _kind(media_type: str) -> str | None:
    if media_type == SIMPLE_SIGNING:
        return "simple-signing"
    if media_type.startswith(BUNDLE_PREFIX):
        return "bundle"
    if media_type in (NOTATION_JWS, NOTATION_COSE):
        return "notation"
    return None


def _tag_for(digest: str, suffix: str = "") -> str:
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}-{hexpart}{suffix}"


class SignatureFinder:
    """Finds the signatures of digests in one repository (through its mirrors)."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client

    def find(self, digest: str) -> Found:
        found = Found(digest)
        self._cosign_tag(found)
        self._referrers(found)
        return found

    def _cosign_tag(self, found: Found) -> None:
        tag = _tag_for(found.digest, ".sig")
        found.looked.append(f"tag {tag}")
        try:
            fetched = self.client.get_manifest(tag)
        except NotFound:
            return
        except CsiOciError as exc:
            found.errors.append(f"tag {tag}: {exc}")
            return
        self._layers_of(found, fetched.data, fetched.media_type, f"tag {tag}")

    def _referrers(self, found: Found) -> None:
        entries: dict[str, Descriptor] = {}
        listed = self.client.get_referrers(found.digest)
        if listed is not None:
            found.looked.append("the OCI referrers API")
            for entry in listed[0]:
                entries.setdefault(entry.digest, entry)
            found.errors += listed[1]
        # The fallback tag too, even where the API exists: some signers write
        # only the tag (notation 1.3 does by default, --force-referrers-tag).
        for entry in self._fallback_index(found):
            entries.setdefault(entry.digest, entry)
        chosen = list(entries.values())
        if len(chosen) > MAX_REFERRERS:
            found.errors.append(
                f"{len(chosen)} referrers of {found.digest}; only the first {MAX_REFERRERS} "
                "were examined"
            )
        for entry in chosen[:MAX_REFERRERS]:
            source = f"referrer {entry.digest}"
            try:
                fetched = self.client.get_manifest(entry.digest)
            except CsiOciError as exc:
                found.errors.append(f"{source}: {exc}")
                continue
            self._layers_of(found, fetched.data, fetched.media_type, source)

    def _fallback_index(self, found: Found) -> list[Descriptor]:
        tag = _tag_for(found.digest)
        found.looked.append(f"tag {tag}")
        try:
            fetched = self.client.get_manifest(tag)
        except NotFound:
            return []
        except CsiOciError as exc:
            found.errors.append(f"tag {tag}: {exc}")
            return []
        if fetched.media_type not in INDEX_TYPES:
            found.errors.append(f"tag {tag} is not an index")
            return []
        try:
            return parse_index(fetched.data)
        except CsiOciError as exc:
            found.errors.append(f"tag {tag}: {exc}")
            return []

    def _layers_of(self, found: Found, data: bytes, media_type: str, source: str) -> None:
        if media_type in INDEX_TYPES:
            found.errors.append(f"{source} is an index, not a signature")
            return
        try:
            manifest = parse_manifest(data, media_type)
        except CsiOciError as exc:
            found.errors.append(f"{source}: {exc}")
            return
        layers = [layer for layer in manifest.layers if _kind(layer.media_type)]
        for layer in layers[:MAX_SIGNATURE_LAYERS]:
            kind = _kind(layer.media_type)
            assert kind is not None
            try:
                blob = self.client.get_blob_bytes(
                    layer, f"signature blob {layer.digest}", MAX_SIGNATURE_BLOB
                )
            except CsiOciError as exc:
                found.errors.append(f"{source}: {exc}")
                continue
            found.candidates.append(
                Candidate(kind, layer.media_type, blob, dict(layer.annotations), source)
            )
