"""cosign's simple-signing signatures: the payload, its signature and what it must name.

`cosign sign` (without --new-bundle-format) pushes, under the tag
`sha256-<hex>.sig` of the signed manifest (or as an OCI 1.1 referrer with
--registry-referrers-mode=oci-1-1), a manifest whose every layer is one
signature: the layer blob is the payload, a JSON document

    {"critical": {"identity": {"docker-reference": "host/repo"},
                  "image": {"docker-manifest-digest": "sha256:..."},
                  "type": "cosign container image signature"},
     "optional": {...}}

and the layer's annotations carry the signature over those exact bytes
(`dev.cosignproject.cosign/signature`, base64) and, for certificate
signing, the leaf (`dev.sigstore.cosign/certificate`) and chain
(`dev.sigstore.cosign/chain`) as PEM. The payload blob's own digest is
checked when it is fetched (csi_oci.verify.discover), so the bytes verified
here are the bytes the registry committed to.

Only `critical.image.docker-manifest-digest` binds: `docker-reference`
names where it was pushed, which a mirror or a copy changes, so it is not
compared (cosign does not either unless asked).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping

from csi_oci.spec.digest import digest_or_none
from csi_oci.verify.policy import Requirement
from csi_oci.verify.trust import (
    RANK_BAD_SIGNATURE,
    RANK_MALFORMED,
    RANK_OTHER_DIGEST,
    RANK_UNTRUSTED,
    SignatureRejected,
    Verified,
    checked_key,
    load_certificates,
    signature_verifies,
)

SIMPLE_SIGNING_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
ANNOTATION_SIGNATURE = "dev.cosignproject.cosign/signature"
ANNOTATION_CERTIFICATE = "dev.sigstore.cosign/certificate"
ANNOTATION_CHAIN = "dev.sigstore.cosign/chain"
PAYLOAD_TYPE = "cosign container image signature"
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_SIGNATURE_BYTES = 2048  # base64 of an RSA-8192 signature fits


def signed_digest(payload: bytes) -> str:
    """The manifest digest a simple-signing payload names; SignatureRejected if malformed."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise SignatureRejected(f"cosign payload of {len(payload)} bytes is too large")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # [[[[… stops json
        raise SignatureRejected(f"cosign payload is not JSON ({str(exc)[:80]})") from None
    critical = doc.get("critical") if isinstance(doc, dict) else None
    image = critical.get("image") if isinstance(critical, dict) else None
    if not isinstance(critical, dict) or not isinstance(image, dict):
        raise SignatureRejected("cosign payload has no critical.image")
    if critical.get("type") != PAYLOAD_TYPE:
        raise SignatureRejected(f"cosign payload type is {str(critical.get('type'))[:64]!r}")
    named = image.get("docker-manifest-digest")
    digest = digest_or_none(named) if isinstance(named, str) else None
    if digest is None:
        raise SignatureRejected("cosign payload names no valid docker-manifest-digest")
    return str(digest)


def _signature(annotations: Mapping[str, str]) -> bytes:
    text = annotations.get(ANNOTATION_SIGNATURE)
    if not text:
        raise SignatureRejected("cosign layer has no signature annotation")
    if len(text) > MAX_SIGNATURE_BYTES:
        raise SignatureRejected("cosign signature annotation is too long")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureRejected("cosign signature annotation is not base64") from None


def verify_simple_signing(
    payload: bytes,
    annotations: Mapping[str, str],
    requirement: Requirement,
    subjects: Mapping[str, str],
    *,
    source: str,
) -> Verified:
    """One cosign signature layer against a requirement; `subjects` maps each digest
    that may be signed to what it is ("manifest", "index")."""
    digest = signed_digest(payload)
    if digest not in subjects:
        raise SignatureRejected(
            f"a cosign signature names {digest}, not {' or '.join(subjects)} (the tag was "
            "moved after signing, or the signature was copied)",
            RANK_OTHER_DIGEST,
        )
    signature = _signature(annotations)
    cert_pem = annotations.get(ANNOTATION_CERTIFICATE, "")
    if requirement.keys is not None:
        name = requirement.keys.find(signature, payload)
        if name is not None:
            return Verified("cosign", name, digest, source)
    if requirement.certs is not None and cert_pem:
        try:
            certs = load_certificates(cert_pem.encode(), "cosign certificate")
            # Signed without --certificate-chain: no annotation, the rule's roots
            # must hold the intermediates.
            chain_pem = annotations.get(ANNOTATION_CHAIN, "")
            chain = load_certificates(chain_pem.encode(), "chain") if chain_pem else []
        except ValueError as exc:
            raise SignatureRejected(str(exc), RANK_MALFORMED) from None
        if len(certs) != 1:
            raise SignatureRejected("cosign certificate annotation holds more than one")
        try:
            key = checked_key(certs[0].public_key(), "cosign certificate")
        except ValueError as exc:
            raise SignatureRejected(str(exc), RANK_UNTRUSTED) from None
        # The chain first: a certificate the rule does not trust is the news,
        # whether or not its signature verifies.
        identity = requirement.certs.check(certs[0], chain)
        if not signature_verifies(key, signature, payload):
            raise SignatureRejected(
                f"a cosign signature by {identity.describe()} does not verify: the payload or "
                "the signature was altered",
                RANK_BAD_SIGNATURE,
            )
        return Verified("cosign", identity.short(), digest, source)
    if requirement.keys is not None:
        raise SignatureRejected(
            f"signed, but by an unknown key (the cosign signature verifies with none of "
            f"{requirement.keys.describe()}; or its payload was altered)",
            RANK_UNTRUSTED,
        )
    raise SignatureRejected(
        "a cosign signature made with a key, where the rule wants a certificate", RANK_UNTRUSTED
    )
