"""Notary Project (notation) signatures: a JWS or COSE envelope, its chain, the digest it names.

`notation sign` pushes, as an OCI 1.1 referrer of the signed manifest (or
under the referrers tag `sha256-<hex>`), a manifest of artifact type
`application/vnd.cncf.notary.signature` whose one layer is the envelope:
`application/jose+json` (JWS JSON, flattened) or `application/cose`
(COSE_Sign1_Tagged). Both carry the same things (Notary Project signature
specification, specs/signature-envelope-{jws,cose}.md):

- a payload, `{"targetArtifact": <OCI descriptor of the signed manifest>}`
  of type `application/vnd.cncf.notary.payload.v1+json`;
- signed (protected) headers: `alg`, `cty`, `crit`,
  `io.cncf.notary.signingScheme` (critical), `io.cncf.notary.signingTime`
  (self-asserted, so never used for trust) and the optional, critical
  `io.cncf.notary.expiry`;
- unsigned headers: the certificate chain (`x5c` / `x5chain`, DER, leaf
  first), and optionally a signing agent and an RFC 3161 timestamp.

What is checked, in this order, so that the first failure is the most
fundamental one and the payload is only read once the signature is known
good (as the specification demands):

1. the envelope parses, strictly: bounded sizes, exact types, no duplicate
   keys, no unknown top-level fields or unsigned headers, no CBOR tags but
   COSE_Sign1 (18) and epoch times (1);
2. the headers: signing scheme `notary.x509`, the payload content type,
   every `crit` entry present and understood (an unknown critical header,
   such as a verification plugin's, fails the signature, as the
   specification requires), expiry after signing time;
3. `alg` is the one the leaf's key dictates (specification's table: RSA
   2048/3072/4096 -> PS256/384/512, EC P-256/384/521 -> ES256/384/512), so
   an algorithm cannot be substituted;
4. the leaf chains to one of the rule's roots, now, names an accepted
   identity (trust.CertTrust.check) and meets the Notary Project's
   code-signing leaf profile;
5. the signature verifies: RSASSA-PSS or ECDSA (raw r||s) with the alg's hash;
6. the payload's `targetArtifact` names one of the acceptable digests, as
   the media type that digest is;
7. the expiry, if any, has not passed.

Not done, offline by design: the RFC 3161 timestamp countersignature is not
verified (no TSA roots in a rule), so the chain must be valid now; no OCSP
or CRL; no verification plugins; `notary.x509.signingAuthority` (its
authentic signing time needs a signing-authority trust store, which a rule
does not have) is refused rather than half-checked.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from csi_oci.oci.manifest import INDEX_TYPES, MANIFEST_TYPES, MAX_MANIFEST_BYTES
from csi_oci.spec.digest import digest_or_none
from csi_oci.verify.trust import (
    MAX_CERTS,
    RANK_BAD_SIGNATURE,
    RANK_MALFORMED,
    RANK_OTHER_DIGEST,
    RANK_UNTRUSTED,
    CertTrust,
    PublicKey,
    SignatureRejected,
    Verified,
    checked_key,
    raw_ecdsa_to_der,
)

JWS_MEDIA_TYPE = "application/jose+json"
COSE_MEDIA_TYPE = "application/cose"
PAYLOAD_MEDIA_TYPE = "application/vnd.cncf.notary.payload.v1+json"
SCHEME_X509 = "notary.x509"
SCHEME_SIGNING_AUTHORITY = "notary.x509.signingAuthority"

# The Notary Project's own header names (strings in JWS and COSE alike).
H_SCHEME = "io.cncf.notary.signingScheme"
H_SIGNING_TIME = "io.cncf.notary.signingTime"
H_AUTHENTIC_TIME = "io.cncf.notary.authenticSigningTime"
H_EXPIRY = "io.cncf.notary.expiry"
H_PLUGIN = "io.cncf.notary.verificationPlugin"
H_PLUGIN_MIN_VERSION = "io.cncf.notary.verificationPluginMinVersion"
U_TIMESTAMP = "io.cncf.notary.timestampSignature"
U_AGENT = "io.cncf.notary.signingAgent"
# Critical headers this module processes; any other critical one fails.
UNDERSTOOD_CRITICAL = frozenset({H_SCHEME, H_EXPIRY, H_SIGNING_TIME})

# COSE labels (RFC 9052 / IANA): alg, crit, content type, x5chain.
COSE_ALG, COSE_CRIT, COSE_CTY, COSE_X5CHAIN = 1, 2, 3, 33
COSE_SIGN1_TAG = 18
CBOR_EPOCH_TAG = 1

# Bounds: notation writes an envelope of 2-4 KiB (three certificates), a
# protected header of ~300 bytes and a payload of ~200 bytes plus the
# user's annotations; everything here comes from a registry, so each
# decoded part is bounded before it is parsed.
MAX_ENVELOPE_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADER_ENTRIES = 32
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_CERT_BYTES = 64 * 1024
MAX_SIGNATURE_BYTES = 1024  # RSA-4096: 512 bytes, ES512: 132
MAX_CBOR_DEPTH = 8

MEDIA_TYPES_OF_KIND: Mapping[str, tuple[str, ...]] = {
    "manifest": MANIFEST_TYPES,
    "index": INDEX_TYPES,
}
DESCRIPTOR_FIELDS = frozenset(
    {"mediaType", "digest", "size", "annotations", "artifactType", "urls", "data", "platform"}
)
# EKUs the Notary Project's code-signing profile forbids in a signing leaf.
EXCLUDED_EKUS = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
}


@dataclass(frozen=True)
class Algorithm:
    """One of the six signature algorithms the Notary Project allows."""

    name: str  # the JWS `alg`
    cose: int  # the COSE `alg` label
    key: str  # "RSA" or "EC"
    size: int  # RSA modulus bits, EC curve bits
    hash: type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]


ALGORITHMS = (
    Algorithm("PS256", -37, "RSA", 2048, hashes.SHA256),
    Algorithm("PS384", -38, "RSA", 3072, hashes.SHA384),
    Algorithm("PS512", -39, "RSA", 4096, hashes.SHA512),
    Algorithm("ES256", -7, "EC", 256, hashes.SHA256),
    Algorithm("ES384", -35, "EC", 384, hashes.SHA384),
    Algorithm("ES512", -36, "EC", 521, hashes.SHA512),
)
BY_JWS = {a.name: a for a in ALGORITHMS}
BY_COSE = {a.cose: a for a in ALGORITHMS}


@dataclass(frozen=True)
class Header:
    """The signed headers of either format, typed (content type and scheme are checked
    to be the one each may be)."""

    algorithm: Algorithm
    signing_time: datetime.datetime
    expiry: datetime.datetime | None


@dataclass(frozen=True)
class Envelope:
    """What both formats come down to: headers, chain, payload, and the signed bytes."""

    format: str  # "JWS" or "COSE", for messages
    header: Header
    certificates: tuple[bytes, ...]  # DER, leaf first
    payload: bytes
    signature: bytes
    signed: bytes  # what the signature is over
    # golang-jwt (notation's JWS) verifies PS* with any salt length, go-cose
    # (its COSE) with the hash's length (RFC 8230); each format is held to
    # what notation itself accepts, no more.
    pss_any_salt: bool


def verify_notation(
    envelope: bytes,
    media_type: str,
    trust: CertTrust,
    subjects: Mapping[str, str],
    *,
    source: str = "",
    now: datetime.datetime | None = None,
) -> Verified:
    """The Notary Project envelope `envelope` (JWS or COSE, by `media_type`) checked
    against `trust`: Verified naming the digest it signs, one of `subjects`
    (digest -> "manifest" or "index"); SignatureRejected saying why not."""
    unknown = {kind for kind in subjects.values() if kind not in MEDIA_TYPES_OF_KIND}
    if unknown:
        raise ValueError(f"subject kinds {sorted(unknown)}: want manifest or index")
    when = _aware(now or datetime.datetime.now(datetime.UTC))
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise _malformed(f"envelope of {len(envelope)} bytes (at most {MAX_ENVELOPE_BYTES})")
    if media_type == JWS_MEDIA_TYPE:
        parsed = parse_jws(envelope)
    elif media_type == COSE_MEDIA_TYPE:
        parsed = parse_cose(envelope)
    else:
        raise _malformed(f"envelope media type {media_type!r} is neither JWS nor COSE")
    leaf, intermediates, key = _chain(parsed)
    # notary.x509 without a verified timestamp: notation checks the chain
    # at the time of verification, and so do we. The signing time in the
    # header is the signer's own claim (the specification: "not used in
    # trust decisions") and the timestamp countersignature needs TSA roots a
    # rule does not have, so neither may move the clock back to before a
    # certificate expired.
    identity = trust.check(leaf, intermediates, at=when)
    _check_leaf_profile(leaf)
    _check_signature(parsed, key)
    digest = _check_target(parsed.payload, subjects)
    expiry = parsed.header.expiry
    if expiry is not None and when >= expiry:
        # Ranked with a bad signature: everything else held, so this is the
        # most useful thing to say (re-sign, or sign without --expiry).
        raise SignatureRejected(
            f"Notary Project signature by {identity.short()} expired at "
            f"{expiry.isoformat()} (its io.cncf.notary.expiry)",
            RANK_BAD_SIGNATURE,
        )
    return Verified(kind="notation", signer=identity.short(), digest=digest, source=source)


# -- JWS ------------------------------------------------------------------------------

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})")
JWS_FIELDS = frozenset({"payload", "protected", "header", "signature"})
JWS_UNPROTECTED = frozenset({"x5c", U_TIMESTAMP, U_AGENT})
# Registered JWS/JWA names may not be listed in crit (RFC 7515 4.1.11).
# fmt: off
JWS_REGISTERED = frozenset({
    "alg", "jku", "jwk", "kid", "x5u", "x5c", "x5t", "x5t#S256", "typ", "cty", "crit",
    "enc", "zip", "epk", "apu", "apv", "iv", "tag", "p2s", "p2c", "b64",
})
# fmt: on


def parse_jws(data: bytes) -> Envelope:
    """A flattened JWS JSON envelope as notation writes it."""
    doc = _json_object(data, "JWS envelope")
    if set(doc) != JWS_FIELDS:
        raise _malformed(
            f"JWS envelope has fields {_show(sorted(doc))}, want exactly {sorted(JWS_FIELDS)}"
        )
    protected_b64 = _string(doc["protected"], "JWS protected")
    payload_b64 = _string(doc["payload"], "JWS payload")
    raw_header = _b64url(protected_b64, "JWS protected header", MAX_HEADER_BYTES)
    payload = _b64url(payload_b64, "JWS payload", MAX_PAYLOAD_BYTES)
    signature = _b64url(
        _string(doc["signature"], "JWS signature"), "JWS signature", MAX_SIGNATURE_BYTES
    )
    if not signature:
        raise _malformed("JWS signature is empty")
    unprotected = doc["header"]
    if not isinstance(unprotected, dict):
        raise _malformed("JWS unprotected header is not an object")
    extra = set(unprotected) - JWS_UNPROTECTED
    if extra:
        raise _malformed(f"JWS unprotected header has unknown entries {_show(sorted(extra)[:3])}")
    header = _json_object(raw_header, "JWS protected header")
    both = set(header) & set(unprotected)
    if both:  # RFC 7515 4: the two must be disjoint
        raise _malformed(f"JWS headers {_show(sorted(both))} are both protected and unprotected")
    # The timestamp and the signing agent are unsigned and not used (module
    # docstring): the specification says the agent must not fail validation.
    x5c = unprotected.get("x5c")
    if not isinstance(x5c, list):
        raise _malformed("JWS envelope has no certificate chain (header.x5c)")
    certs = tuple(_b64std(_string(c, "x5c entry"), "x5c certificate") for c in x5c[: MAX_CERTS + 1])
    return Envelope(
        format="JWS",
        header=_jws_header(header),
        certificates=_bounded_chain(certs),
        payload=payload,
        signature=signature,
        signed=protected_b64.encode("ascii") + b"." + payload_b64.encode("ascii"),
        pss_any_salt=True,
    )


def _jws_header(doc: dict[str, Any]) -> Header:
    if len(doc) > MAX_HEADER_ENTRIES:
        raise _malformed(f"JWS protected header has {len(doc)} entries")
    alg = doc.get("alg")
    if not isinstance(alg, str) or alg not in BY_JWS:
        raise _malformed(f"JWS alg {_show(alg)} is not one of {', '.join(BY_JWS)}")
    crit = doc.get("crit")
    if not isinstance(crit, list) or not all(isinstance(c, str) for c in crit):
        raise _malformed("JWS crit is missing or not a list of header names")
    registered = [c for c in crit if c in JWS_REGISTERED]
    if registered:
        raise _malformed(f"JWS crit lists registered header {registered[0]!r}")
    return _header(
        "JWS",
        algorithm=BY_JWS[alg],
        content_type=doc.get("cty"),
        critical=crit,
        present=set(doc),
        scheme=doc.get(H_SCHEME),
        times={
            label: _rfc3339(doc[label], label)
            for label in (H_SIGNING_TIME, H_AUTHENTIC_TIME, H_EXPIRY)
            if label in doc
        },
    )


def _b64url(text: str, what: str, limit: int) -> bytes:
    """Unpadded base64url (RFC 7515 section 2), strictly: no padding, no other characters."""
    if len(text) > limit * 4 // 3 + 4:
        raise _malformed(f"{what} is larger than {limit} bytes")
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise _malformed(f"{what} is not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64std(text: str, what: str) -> bytes:
    """Padded standard base64, as x5c (RFC 7515 4.1.6) and Go's []byte in JSON are."""
    if len(text) > MAX_CERT_BYTES * 4 // 3 + 4:
        raise _malformed(f"{what} is larger than {MAX_CERT_BYTES} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _malformed(f"{what} is not base64") from None


def _rfc3339(value: object, label: str) -> datetime.datetime:
    match = _RFC3339.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise _malformed(f"JWS {label} {_show(value)} is not an RFC 3339 time")
    date, clock, fraction, zone = match.groups()
    micro = f".{(fraction or '')[:6]:0<6}"
    try:
        return datetime.datetime.fromisoformat(
            f"{date}T{clock}{micro}{'+00:00' if zone == 'Z' else zone}"
        )
    except ValueError:
        raise _malformed(f"JWS {label} {value!r} is not a valid time") from None


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object, refusing duplicate keys (which parsers resolve differently)
    and the non-standard NaN/Infinity."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise _malformed(f"{what} repeats the key {key!r}")
            out[key] = value
        return out

    def constant(name: str) -> None:
        raise _malformed(f"{what} holds {name}, which is not JSON")

    try:
        doc = json.loads(data, object_pairs_hook=pairs, parse_constant=constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise _malformed(f"{what} is not JSON") from None
    if not isinstance(doc, dict):
        raise _malformed(f"{what} is not a JSON object")
    return doc


# -- COSE -----------------------------------------------------------------------------

# Every tag cbor2 would turn into an object of its own (dates, bignums,
# decimals, shared references that can make cycles, regular expressions,
# ...) comes back as a plain CBORTag instead, so no hostile tag costs work
# or memory, and the walk below admits only tags 18 and 1.
# fmt: off
_CBOR_BUILTIN_TAGS = (
    0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004,
    43000, 55799,
)
# fmt: on
COSE_UNPROTECTED = frozenset({COSE_X5CHAIN, U_TIMESTAMP, U_AGENT})


def _as_tag(tag: int) -> Any:
    def decode(value: Any, immutable: bool) -> cbor2.CBORTag:
        return cbor2.CBORTag(tag, value)

    return decode


_SEMANTIC = {tag: _as_tag(tag) for tag in _CBOR_BUILTIN_TAGS}


def _cbor(data: bytes, what: str) -> Any:
    """One CBOR item filling `data`: definite lengths, no duplicate keys, bounded depth."""
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(
            stream,
            semantic_decoders=_SEMANTIC,
            max_depth=MAX_CBOR_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        ).decode()
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError, EOFError):
        raise _malformed(f"{what} is not valid CBOR") from None
    if stream.tell() != len(data):
        raise _malformed(f"{what} has {len(data) - stream.tell()} bytes after its CBOR item")
    _plain(value, what, top=True)
    return value


def _plain(value: object, what: str, *, top: bool = False) -> None:
    """Refuse anything but CBOR's basic types, epoch times, and COSE_Sign1 at the top."""
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return
    if isinstance(value, cbor2.CBORTag):
        if value.tag == COSE_SIGN1_TAG and top:
            _plain(value.value, what)
            return
        if value.tag == CBOR_EPOCH_TAG and isinstance(value.value, int | float):
            return
        raise _malformed(f"{what} holds CBOR tag {value.tag}, which COSE_Sign1 does not use")
    if isinstance(value, list | tuple):
        for item in value:
            _plain(item, what)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            _plain(key, what)
            _plain(item, what)
        return
    raise _malformed(f"{what} holds a CBOR {type(value).__name__}")


def parse_cose(data: bytes) -> Envelope:
    """A COSE_Sign1_Tagged envelope as notation writes it."""
    item = _cbor(data, "COSE envelope")
    if not isinstance(item, cbor2.CBORTag) or item.tag != COSE_SIGN1_TAG:
        raise _malformed("COSE envelope is not a COSE_Sign1 (CBOR tag 18)")
    parts = item.value
    if not isinstance(parts, list | tuple) or len(parts) != 4:
        raise _malformed("COSE_Sign1 is not an array of 4")
    protected_raw, unprotected, payload, signature = parts
    if not isinstance(protected_raw, bytes) or len(protected_raw) > MAX_HEADER_BYTES:
        raise _malformed("COSE protected header is not a byte string of bounded size")
    if not isinstance(unprotected, Mapping):
        raise _malformed("COSE unprotected header is not a map")
    if not isinstance(payload, bytes):
        raise _malformed("COSE payload is detached or not a byte string")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise _malformed(f"COSE payload of {len(payload)} bytes is too large")
    if not isinstance(signature, bytes) or not 0 < len(signature) <= MAX_SIGNATURE_BYTES:
        raise _malformed("COSE signature is not a byte string of plausible size")
    protected = _cbor(protected_raw, "COSE protected header")
    if not isinstance(protected, Mapping):
        raise _malformed("COSE protected header is not a map")
    extra = set(unprotected) - COSE_UNPROTECTED
    if extra:
        raise _malformed(f"COSE unprotected header has unknown labels {_labels(extra)}")
    both = set(protected) & set(unprotected)
    if both:
        raise _malformed(f"COSE labels {_labels(both)} are both protected and unprotected")
    # The specification allows x5chain in the protected header too.
    x5chain = unprotected.get(COSE_X5CHAIN, protected.get(COSE_X5CHAIN))
    if not isinstance(x5chain, list | tuple) or not all(isinstance(c, bytes) for c in x5chain):
        raise _malformed("COSE envelope has no certificate chain (x5chain, label 33)")
    # Sig_structure (RFC 9052 4.4): context, the protected bytes as sent,
    # empty external_aad, payload.
    signed = cbor2.dumps(["Signature1", protected_raw, b"", payload])
    return Envelope(
        format="COSE",
        header=_cose_header(protected),
        certificates=_bounded_chain(tuple(x5chain)),
        payload=payload,
        signature=signature,
        signed=signed,
        pss_any_salt=False,
    )


def _cose_header(protected: Mapping[Any, Any]) -> Header:
    if len(protected) > MAX_HEADER_ENTRIES:
        raise _malformed(f"COSE protected header has {len(protected)} entries")
    if any(not isinstance(k, int | str) or isinstance(k, bool) for k in protected):
        raise _malformed("COSE protected header has a label that is neither int nor text")
    alg = protected.get(COSE_ALG)
    if not isinstance(alg, int) or isinstance(alg, bool) or alg not in BY_COSE:
        raise _malformed(
            f"COSE alg {_show(alg)} is not one of {', '.join(str(a) for a in BY_COSE)}"
        )
    crit = protected.get(COSE_CRIT)
    if not isinstance(crit, list | tuple) or not all(
        isinstance(c, int | str) and not isinstance(c, bool) for c in crit
    ):
        raise _malformed("COSE crit is missing or not an array of labels")
    common = [c for c in crit if isinstance(c, int) and 0 <= c <= 8]
    if common:
        raise _malformed(f"COSE crit lists the common header label {common[0]}")
    return _header(
        "COSE",
        algorithm=BY_COSE[alg],
        content_type=protected.get(COSE_CTY),
        critical=list(crit),
        present=set(protected),
        scheme=protected.get(H_SCHEME),
        times={
            label: _epoch(protected[label], label)
            for label in (H_SIGNING_TIME, H_AUTHENTIC_TIME, H_EXPIRY)
            if label in protected
        },
    )


def _epoch(value: object, label: str) -> datetime.datetime:
    """An RFC 8949 epoch date/time: tag 1 over a number of seconds (notation refuses
    the tag 0 text form, and so do we)."""
    if not isinstance(value, cbor2.CBORTag) or value.tag != CBOR_EPOCH_TAG:
        raise _malformed(f"COSE {label} is not an epoch time (CBOR tag 1)")
    seconds = value.value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise _malformed(f"COSE {label} is not a number of seconds")
    try:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        raise _malformed(f"COSE {label} {seconds!r} is out of range") from None


def _labels(labels: set[Any]) -> str:
    return ", ".join(_show(label) for label in sorted(labels, key=repr)[:3])


# -- both formats ---------------------------------------------------------------------


def _header(
    fmt: str,
    *,
    algorithm: Algorithm,
    content_type: object,
    critical: list[Any],
    present: set[Any],
    scheme: object,
    times: Mapping[str, datetime.datetime],
) -> Header:
    """The signed headers' meaning, the same rules for JWS and COSE."""
    if content_type != PAYLOAD_MEDIA_TYPE:
        raise _malformed(
            f"{fmt} payload content type {_show(content_type)}, want {PAYLOAD_MEDIA_TYPE}"
        )
    if scheme == SCHEME_SIGNING_AUTHORITY:
        raise _malformed(
            f"signing scheme {SCHEME_SIGNING_AUTHORITY} is not supported (its authentic "
            "signing time needs a signing-authority trust store); sign with notary.x509"
        )
    if scheme != SCHEME_X509:
        raise _malformed(f"{fmt} signing scheme {_show(scheme)}, want {SCHEME_X509}")
    _check_critical(fmt, critical, present, expiry=H_EXPIRY in times)
    if H_AUTHENTIC_TIME in times:
        raise _malformed(f"{H_AUTHENTIC_TIME} is not allowed with {SCHEME_X509}")
    signing_time = times.get(H_SIGNING_TIME)
    if signing_time is None:
        raise _malformed(f"{fmt} protected header has no {H_SIGNING_TIME}")
    expiry = times.get(H_EXPIRY)
    if expiry is not None and expiry <= signing_time:
        raise _malformed(f"expiry {expiry.isoformat()} is not after the signing time")
    return Header(algorithm, signing_time, expiry)


def _check_critical(fmt: str, critical: list[Any], present: set[Any], *, expiry: bool) -> None:
    """Every critical header must be present and understood (RFC 7515 4.1.11, RFC 9052
    3.1, and the Notary Project: unknown critical attributes MUST fail verification);
    the signing scheme, and the expiry when present, must be marked critical."""
    if not critical or len(set(critical)) != len(critical):
        raise _malformed(f"{fmt} crit is empty or repeats a header")
    missing = [c for c in critical if c not in present]
    if missing:
        raise _malformed(f"{fmt} crit lists {_show(missing[0])}, which is not in the header")
    for plugin_header in (H_PLUGIN, H_PLUGIN_MIN_VERSION):
        if plugin_header in critical:
            raise _malformed(
                "signature needs a Notary Project verification plugin, which csi-oci does not run"
            )
    unknown = [c for c in critical if c not in UNDERSTOOD_CRITICAL]
    if unknown:
        raise _malformed(f"{fmt} header {_show(unknown[0])} is critical but not understood")
    needed = [h for h in (H_SCHEME, H_EXPIRY if expiry else None) if h and h not in critical]
    if needed:
        raise _malformed(f"{fmt} header {needed[0]} must be marked critical")


def _bounded_chain(certs: tuple[bytes, ...]) -> tuple[bytes, ...]:
    if not certs:
        raise _malformed("envelope has an empty certificate chain")
    if len(certs) > MAX_CERTS:
        raise _malformed(f"envelope carries more than {MAX_CERTS} certificates")
    if any(len(c) > MAX_CERT_BYTES for c in certs):
        raise _malformed(f"envelope carries a certificate over {MAX_CERT_BYTES} bytes")
    return certs


def _chain(parsed: Envelope) -> tuple[x509.Certificate, list[x509.Certificate], PublicKey]:
    """The leaf, the rest of the chain, and the leaf's key, which must be the kind and
    size the header's alg names (the specification's defence against substitution)."""
    try:
        certs = [_certificate(der) for der in parsed.certificates]
    except Exception:  # see _certificate: hostile DER fails in many ways
        raise _malformed(
            f"{parsed.format} certificate chain holds an unparseable certificate"
        ) from None
    leaf = certs[0]
    try:
        key = checked_key(leaf.public_key(), "signing certificate")
    except ValueError as exc:
        raise _malformed(str(exc)) from None
    want = _algorithm_of(key)
    alg = parsed.header.algorithm
    if want is None:
        raise _malformed(
            f"signing certificate's key ({_describe(key)}) has no Notary Project algorithm"
        )
    if want != alg:
        raise _malformed(
            f"{parsed.format} alg {alg.name} does not match the signing "
            f"certificate's {_describe(key)} key (which signs {want.name})"
        )
    return leaf, certs[1:], key


def _certificate(der: bytes) -> x509.Certificate:
    """A DER certificate, every field the checks read decoded now: cryptography
    decodes names, extensions and keys lazily, so a hostile field would otherwise
    raise from deep inside the chain or identity checks. What it raises then is an
    open set (ValueError, TypeError, UnsupportedAlgorithm, InvalidVersion,
    DuplicateExtension, ... found by mutating real envelopes), hence the caller's
    broad except."""
    cert = x509.load_der_x509_certificate(der)
    _ = (cert.version, cert.subject, cert.issuer, cert.extensions, cert.not_valid_after_utc)
    cert.public_key()
    return cert


def _algorithm_of(key: PublicKey) -> Algorithm | None:
    if isinstance(key, rsa.RSAPublicKey):
        kind, size = "RSA", key.key_size
    elif isinstance(key, ec.EllipticCurvePublicKey):
        kind, size = "EC", key.curve.key_size
    else:
        return None
    return next((a for a in ALGORITHMS if a.key == kind and a.size == size), None)


def _describe(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    return type(key).__name__


def _check_leaf_profile(leaf: x509.Certificate) -> None:
    """The Notary Project's code-signing leaf requirements beyond what CertTrust checks:
    not a CA, a critical key usage that only signs, none of the EKUs that mark a
    certificate for another purpose."""
    ext = leaf.extensions
    try:
        if ext.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise _untrusted("signing certificate is a CA certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        usage = ext.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        raise _untrusted("signing certificate has no key usage extension") from None
    ku = usage.value
    if not usage.critical or not ku.digital_signature:
        raise _untrusted("signing certificate's key usage is not critical digitalSignature")
    if (
        ku.key_cert_sign
        or ku.crl_sign
        or ku.key_encipherment
        or ku.data_encipherment
        or ku.key_agreement
    ):
        raise _untrusted("signing certificate's key usage allows more than signing")
    try:
        eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    other = [name for oid, name in EXCLUDED_EKUS.items() if oid in eku]
    if other:
        raise _untrusted(f"signing certificate's extended key usage includes {other[0]}")


def _check_signature(parsed: Envelope, key: PublicKey) -> None:
    alg = parsed.header.algorithm
    algorithm = alg.hash()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(
                parsed.signature,
                parsed.signed,
                padding.PSS(
                    padding.MGF1(algorithm),
                    padding.PSS.AUTO if parsed.pss_any_salt else padding.PSS.DIGEST_LENGTH,
                ),
                algorithm,
            )
        elif isinstance(key, ec.EllipticCurvePublicKey):
            try:
                der = raw_ecdsa_to_der(parsed.signature, key)
            except SignatureRejected as exc:
                raise InvalidSignature(str(exc)) from None
            key.verify(der, parsed.signed, ec.ECDSA(algorithm))
        else:  # _chain admits only RSA and EC keys
            raise InvalidSignature
    except InvalidSignature:
        raise SignatureRejected(
            f"{parsed.format} signature does not verify with its signing certificate "
            f"({alg.name}): the envelope was altered or is corrupt",
            RANK_BAD_SIGNATURE,
        ) from None


def _check_target(payload: bytes, subjects: Mapping[str, str]) -> str:
    """The digest the (verified) payload names, if it is one of `subjects`, named as
    the media type it is."""
    doc = _json_object(payload, "Notary Project payload")
    if set(doc) != {"targetArtifact"} or not isinstance(doc["targetArtifact"], dict):
        raise _malformed('Notary Project payload is not {"targetArtifact": <descriptor>}')
    target: dict[str, Any] = doc["targetArtifact"]
    extra = set(target) - DESCRIPTOR_FIELDS
    if extra:
        raise _malformed(f"targetArtifact has unknown fields {_show(sorted(extra)[:3])}")
    digest = target.get("digest")
    media_type = target.get("mediaType")
    size = target.get("size")
    if not isinstance(digest, str) or digest_or_none(digest) is None:
        raise _malformed(f"targetArtifact digest {_show(digest)} is not a digest")
    if not isinstance(media_type, str):
        raise _malformed("targetArtifact has no mediaType")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_MANIFEST_BYTES:
        raise _malformed(f"targetArtifact size {_show(size)} is not a manifest's size")
    annotations = target.get("annotations", {})
    if not isinstance(annotations, dict) or not all(
        isinstance(v, str) for v in annotations.values()
    ):
        raise _malformed("targetArtifact annotations are not a map of strings")
    kind = subjects.get(digest)
    if kind is None:
        raise SignatureRejected(
            f"Notary Project signature names {digest}, not "
            f"{' or '.join(sorted(subjects)) or 'this image'}",
            RANK_OTHER_DIGEST,
        )
    if media_type not in MEDIA_TYPES_OF_KIND[kind]:
        raise _malformed(
            f"targetArtifact names {digest} as {_show(media_type)}, but it is the {kind}"
        )
    return digest


# -- small helpers --------------------------------------------------------------------


def _aware(when: datetime.datetime) -> datetime.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _malformed(f"{what} is not a string")
    return value


def _show(value: object) -> str:
    """A value from the envelope, short and printable, for a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _malformed(message: str) -> SignatureRejected:
    return SignatureRejected(f"Notary Project signature: {message}", RANK_MALFORMED)


def _untrusted(message: str) -> SignatureRejected:
    return SignatureRejected(f"Notary Project signature: {message}", RANK_UNTRUSTED)
