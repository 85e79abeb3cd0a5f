"""Sigstore bundles (`application/vnd.dev.sigstore.bundle*`): parse, and verify for an image.

A bundle carries the signed content (a DSSE envelope with an in-toto
statement, or a message signature over a digest) and the verification
material (a public-key hint, a certificate, or a chain). cosign 2.5 writes
bundles as OCI referrers for `cosign attest --new-bundle-format`;
model-signing writes one as `model.sig` (csi_oci.verify.models reads those).

Two ways to trust one, as the rule says:

- keys or certificate roots from the policy: the envelope's signature is
  checked here with csi_oci.verify.trust, and the statement must name the
  digest being mounted. Transparency-log entries in the bundle add nothing
  without the log's key, so they are not read.
- a Sigstore trusted root (`trusted_root` in the rule: Fulcio CAs, Rekor and
  CT log keys, TSAs): sigstore-python verifies the bundle against it
  offline, tlog inclusion proof and signed entry timestamp included, and the
  certificate's identity is matched against the rule's patterns here
  (sigstore-python's own policies match exact strings, not patterns).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from csi_oci.verify.policy import Requirement
from csi_oci.verify.trust import (
    MAX_CERTS,
    RANK_BAD_SIGNATURE,
    RANK_IDENTITY,
    RANK_MALFORMED,
    RANK_OTHER_DIGEST,
    RANK_UNTRUSTED,
    CertificateIdentity,
    CertTrust,
    KeyTrust,
    SignatureRejected,
    Verified,
    checked_key,
    load_der_certificate,
    signature_verifies,
)

MAX_BUNDLE_BYTES = 4 * 1024 * 1024
MAX_STATEMENT_SUBJECTS = 1024
MAX_SIGNATURES = 8  # DSSE allows several; the signers here write one
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
MODEL_SIGNING_PREDICATE = "https://model_signing/signature/"


@dataclass(frozen=True)
class Envelope:
    """A DSSE envelope: `signatures` are each over PAE(payload_type, payload)."""

    payload_type: str
    payload: bytes
    signatures: tuple[bytes, ...]

    def pae(self) -> bytes:
        """DSSE's pre-authentication encoding: what the signature covers."""
        kind = self.payload_type.encode()
        return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(self.payload), self.payload)


@dataclass(frozen=True)
class Bundle:
    media_type: str
    certificates: tuple[x509.Certificate, ...]  # leaf first; empty for a key
    envelope: Envelope | None
    message_digest: bytes | None  # messageSignature: sha256 of the signed bytes
    message_signature: bytes | None
    raw: dict[str, Any]
    key_hint: str = ""  # verificationMaterial.publicKey.hint of a key-signed bundle


def _b64(value: object, where: str) -> bytes:
    if not isinstance(value, str) or len(value) > MAX_BUNDLE_BYTES:
        raise SignatureRejected(f"bundle {where} is not a base64 string", RANK_MALFORMED)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        try:  # DSSE allows URL-safe base64
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            raise SignatureRejected(f"bundle {where} is not base64", RANK_MALFORMED) from None


def _utf8(text: str) -> bool:
    """Whether `text` is UTF-8 (JSON's \\ud800 escapes give lone surrogates, which are not)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _obj(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SignatureRejected(f"bundle {where} is not an object", RANK_MALFORMED)
    return value


def parse_bundle(data: bytes) -> Bundle:
    """The parts of a bundle this module checks; SignatureRejected if malformed."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise SignatureRejected(f"bundle of {len(data)} bytes is too large", RANK_MALFORMED)
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise SignatureRejected(f"bundle is not JSON ({str(exc)[:80]})", RANK_MALFORMED) from None
    doc = _obj(doc, "")
    media_type = doc.get("mediaType")
    if not isinstance(media_type, str) or not media_type.startswith(
        "application/vnd.dev.sigstore.bundle"
    ):
        raise SignatureRejected("bundle has no Sigstore bundle mediaType", RANK_MALFORMED)
    material = _obj(doc.get("verificationMaterial"), "verificationMaterial")
    certs: list[x509.Certificate] = []
    raw_certs: list[object] = []
    if "certificate" in material:
        raw_certs = [_obj(material["certificate"], "certificate").get("rawBytes")]
    elif "x509CertificateChain" in material:
        chain = _obj(material["x509CertificateChain"], "x509CertificateChain").get("certificates")
        if not isinstance(chain, list) or not chain or len(chain) > MAX_CERTS:
            raise SignatureRejected("bundle certificate chain is empty or too long", RANK_MALFORMED)
        raw_certs = [_obj(c, "certificate").get("rawBytes") for c in chain]
    for i, raw in enumerate(raw_certs):
        try:
            certs.append(load_der_certificate(_b64(raw, f"certificate {i}"), f"certificate {i}"))
        except ValueError as exc:
            raise SignatureRejected(f"bundle {exc}", RANK_MALFORMED) from None
    envelope = None
    message_digest = message_signature = None
    if "dsseEnvelope" in doc:
        env = _obj(doc["dsseEnvelope"], "dsseEnvelope")
        sigs = env.get("signatures")
        if not isinstance(sigs, list) or not sigs or len(sigs) > MAX_SIGNATURES:
            raise SignatureRejected("bundle DSSE envelope has no signatures", RANK_MALFORMED)
        payload_type = env.get("payloadType")
        if not isinstance(payload_type, str) or not _utf8(payload_type):
            raise SignatureRejected("bundle DSSE envelope has no payloadType", RANK_MALFORMED)
        envelope = Envelope(
            payload_type,
            _b64(env.get("payload"), "DSSE payload"),
            tuple(_b64(_obj(s, "signature").get("sig"), "DSSE signature") for s in sigs),
        )
    elif "messageSignature" in doc:
        msg = _obj(doc["messageSignature"], "messageSignature")
        md = _obj(msg.get("messageDigest"), "messageDigest")
        if md.get("algorithm") != "SHA2_256":
            raise SignatureRejected("bundle message digest is not SHA2_256", RANK_MALFORMED)
        message_digest = _b64(md.get("digest"), "message digest")
        message_signature = _b64(msg.get("signature"), "message signature")
        if len(message_digest) != 32:
            raise SignatureRejected("bundle message digest is not 32 bytes", RANK_MALFORMED)
    else:
        raise SignatureRejected(
            "bundle has neither a DSSE envelope nor a message signature", RANK_MALFORMED
        )
    hint = _obj(material.get("publicKey", {}), "publicKey").get("hint") or ""
    return Bundle(
        media_type,
        tuple(certs),
        envelope,
        message_digest,
        message_signature,
        doc,
        hint if isinstance(hint, str) else "",
    )


def statement_of(envelope: Envelope) -> dict[str, Any]:
    """The in-toto statement a DSSE envelope carries."""
    if envelope.payload_type != IN_TOTO_PAYLOAD_TYPE:
        raise SignatureRejected(
            f"bundle payload type is {envelope.payload_type[:64]!r}, not in-toto",
            RANK_MALFORMED,
        )
    try:
        statement = json.loads(envelope.payload)
    except (ValueError, UnicodeDecodeError, RecursionError):  # [[[[… stops json
        raise SignatureRejected("bundle in-toto statement is not JSON", RANK_MALFORMED) from None
    return _obj(statement, "statement")


def is_model_signing(data: bytes) -> bool:
    """Whether a bundle is an OpenSSF model-signing signature (it signs files, not a digest)."""
    try:
        parsed = parse_bundle(data)
        if parsed.envelope is None:
            return False
        predicate = statement_of(parsed.envelope).get("predicateType")
    except SignatureRejected:
        return False
    return isinstance(predicate, str) and predicate.startswith(MODEL_SIGNING_PREDICATE)


def _named_digests(parsed: Bundle) -> list[str]:
    """The digests a bundle's content names ("sha256:<hex>")."""
    if parsed.envelope is None:
        assert parsed.message_digest is not None
        return ["sha256:" + parsed.message_digest.hex()]
    subjects = statement_of(parsed.envelope).get("subject")
    if not isinstance(subjects, list) or len(subjects) > MAX_STATEMENT_SUBJECTS:
        raise SignatureRejected("bundle statement has no subject list", RANK_MALFORMED)
    out = []
    for entry in subjects:
        digests = entry.get("digest") if isinstance(entry, dict) else None
        value = digests.get("sha256") if isinstance(digests, dict) else None
        if isinstance(value, str) and len(value) == 64:
            out.append("sha256:" + value.lower())
    return out


def _signature_verifies_with(key: Any, parsed: Bundle) -> bool:
    if parsed.envelope is not None:
        pae = parsed.envelope.pae()
        return any(signature_verifies(key, sig, pae) for sig in parsed.envelope.signatures)
    assert parsed.message_digest is not None and parsed.message_signature is not None
    return signature_verifies(key, parsed.message_signature, parsed.message_digest, prehashed=True)


def verify_image_bundle(
    data: bytes, requirement: Requirement, subjects: Mapping[str, str], *, source: str
) -> Verified:
    """A bundle found as a referrer of an image, against a cosign requirement."""
    parsed = parse_bundle(data)
    named = _named_digests(parsed)
    digest = next((d for d in named if d in subjects), None)
    if digest is None:
        raise SignatureRejected(
            f"a Sigstore bundle names {', '.join(named) or 'no digest'}, not "
            f"{' or '.join(subjects)}",
            RANK_OTHER_DIGEST,
        )
    if requirement.trusted_root is not None and parsed.certificates:
        identity = _verify_with_trusted_root(parsed, requirement)
        return Verified("cosign", identity.short(), digest, source)
    return Verified(
        "cosign", authenticate(parsed, requirement, "the Sigstore bundle"), digest, source
    )


def authenticate(parsed: Bundle, requirement: Requirement, what: str) -> str:
    """The signer's name (the key's, or the certificate identity's) when the bundle
    is signed by what `requirement` trusts, checked with its keys or roots (no
    trusted root); SignatureRejected saying why not. `what` names the bundle in
    messages ("the Sigstore bundle", "model signature")."""
    if not parsed.certificates:
        if requirement.keys is None:
            roots = ", ".join(requirement.certs.names) if requirement.certs else "(none)"
            raise SignatureRejected(
                f"{what} is signed with a bare key, but the rule trusts only certificates "
                f"under {roots}",
                RANK_UNTRUSTED,
            )
        for name, key in requirement.keys.keys:
            if _signature_verifies_with(key, parsed):
                return name
        hinted = _key_by_hint(requirement.keys, parsed.key_hint)
        if hinted is not None:
            # The bundle names one of our keys, yet no signature verifies: the
            # content or the signature was changed after signing.
            raise SignatureRejected(
                f"{what} by key {hinted} does not verify (the bundle was altered)",
                RANK_BAD_SIGNATURE,
            )
        raise SignatureRejected(
            f"{what} is signed, but by an unknown key"
            + (f" (public key hash {parsed.key_hint[:16]})" if parsed.key_hint else "")
            + f"; the rule trusts {requirement.keys.describe()}",
            RANK_UNTRUSTED,
        )
    leaf, *intermediates = parsed.certificates
    if requirement.certs is None:
        raise SignatureRejected(
            f"{what} is signed with a certificate ({CertificateIdentity.of(leaf).describe()}), "
            f"but the rule trusts only keys "
            f"({requirement.keys.describe() if requirement.keys else 'none'})",
            RANK_UNTRUSTED,
        )
    # Checked now, not at the leaf's notBefore: without a timestamp or a log
    # entry nothing proves when the signature was made, so an expired leaf
    # proves nothing either. Chain and identity come first, so a bad signature
    # under a trusted identity ranks as such.
    identity = requirement.certs.check(leaf, intermediates)
    try:
        key = checked_key(leaf.public_key(), "the signing certificate")
    except ValueError as exc:
        raise SignatureRejected(f"{what}: {exc}", RANK_UNTRUSTED) from None
    if not _signature_verifies_with(key, parsed):
        raise SignatureRejected(
            f"{what} by {identity.short()} does not verify (the bundle was altered)",
            RANK_BAD_SIGNATURE,
        )
    return identity.short()


def _key_by_hint(keys: KeyTrust, hint: str) -> str | None:
    """The trusted key a bundle's hint names (model-signing: sha256 of its SPKI PEM)."""
    if not hint:
        return None
    for name, key in keys.keys:
        pem = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if hashlib.sha256(pem).hexdigest() == hint.lower():
            return name
    return None


class _RulePolicy:
    """sigstore-python's VerificationPolicy, answered with the rule's identity patterns.

    sigstore-python's own policies (Identity, AnyOf) compare exact strings;
    a rule's identities are regular expressions, so the check is ours and
    the mismatch is remembered to be reported with its rank.
    """

    def __init__(self, certs: CertTrust) -> None:
        self.certs = certs
        self.found: CertificateIdentity | None = None

    def verify(self, cert: x509.Certificate) -> None:
        from sigstore.errors import VerificationError as SigstoreError

        self.found = CertificateIdentity.of(cert)
        if not any(i.matches(self.found) for i in self.certs.identities):
            raise SigstoreError("identity mismatch")


def _verify_with_trusted_root(parsed: Bundle, requirement: Requirement) -> CertificateIdentity:
    """sigstore-python against the rule's trusted root: chain to its Fulcio CA at the
    logged time, SCT, tlog inclusion proof and SET, and the signature. Offline."""
    from sigstore.errors import Error as SigstoreError
    from sigstore.models import Bundle as SigstoreBundle
    from sigstore.models import TrustedRoot
    from sigstore.verify import Verifier

    assert requirement.certs is not None and requirement.trusted_root is not None
    try:
        root = TrustedRoot.from_file(str(requirement.trusted_root))
        verifier = Verifier(trusted_root=root)
        sig_bundle = SigstoreBundle.from_json(json.dumps(parsed.raw))
    except Exception as exc:  # sigstore-python raises many types for bad input
        raise SignatureRejected(
            f"Sigstore bundle or trusted root unusable: {_one_line(exc)}", RANK_MALFORMED
        ) from None
    policy = _RulePolicy(requirement.certs)
    try:
        if parsed.envelope is not None:
            verifier.verify_dsse(sig_bundle, policy)
        else:
            assert parsed.message_digest is not None
            from sigstore.hashes import Hashed
            from sigstore_models.common.v1 import HashAlgorithm

            verifier.verify_artifact(
                Hashed(algorithm=HashAlgorithm.SHA2_256, digest=parsed.message_digest),
                sig_bundle,
                policy,
            )
    except SigstoreError as exc:
        if policy.found is not None and str(exc) == "identity mismatch":
            raise SignatureRejected(
                f"certificate identity {policy.found.describe()}, wanted "
                f"{requirement.certs.describe_identities()}",
                RANK_IDENTITY,
            ) from None
        raise SignatureRejected(
            f"Sigstore bundle does not verify against trusted root "
            f"{requirement.trusted_root.name}: {_one_line(exc)}",
            RANK_BAD_SIGNATURE,
        ) from None
    assert policy.found is not None
    return policy.found


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
