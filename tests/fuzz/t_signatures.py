"""Signatures at mount (csi_oci/verify): every envelope a hostile registry can hand over.

Input: a selector byte, then what the handler reads.

  low 4 bits, modulo 9: the handler
    0  cosign.signed_digest(payload)
    1  cosign.verify_simple_signing: payload NUL signature-annotation NUL
       certificate-PEM NUL chain-PEM (the annotations are text, as a
       manifest's JSON gives them: lone surrogates included)
    2  bundle.parse_bundle + bundle.is_model_signing + models.parse_bundle
    3  bundle.verify_image_bundle
    4  notation.verify_notation, application/jose+json
    5  notation.verify_notation, application/cose
    6  models.parse_statement (the signed in-toto statement)
    7  models.verify_model_tree against a tiny fixed tree (MODEL_FILES)
    8  trust.load_certificates + CertTrust.check (a PEM bundle, leaf first)
  bit 4: re-seal: the harness signs the (mutated) content again with the key
         or leaf the rule trusts, as a signer would, so the input gets past the
         signature check to the parsers behind it (payload, statement, target)
  bit 5: the subjects include the digest the content names (found by the
         harness's own code), so the input gets past the digest check
  bits 6-7: the requirement: keys; certificates (an identity that matches
            the harness's leaf); both; certificates with an identity nobody has

The trust is built once, at import, from fixed secrets (KEYS below), so the
seeds made by the real tools (tests/fuzz/seeds.py signs with the same keys
and the same CA names) verify, and a re-sealed input does too. Expected
refusals are SignatureRejected (and ValueError from load_certificates, which
documents it); anything else escaping is a finding.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from csi_oci.verify import bundle, cosign, models, notation
from csi_oci.verify.policy import Kind, Requirement
from csi_oci.verify.trust import (
    CertTrust,
    IdentityPattern,
    KeyTrust,
    SignatureRejected,
    load_certificates,
)
from tests.support.signing import key_usage

from .common import scratch_root, split

NAME = "signatures"
MAX_LEN = 16 << 10
HANDLERS = 9

# -- the trust, from fixed secrets (the seeds are signed with the same) -----------------

SIGNER_EMAIL = "signer@example.test"
OIDC_ISSUER = "https://issuer.fuzz.test"
OID_FULCIO_ISSUER_V1 = ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
OID_FULCIO_ISSUER_V2 = ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
NOT_AFTER = datetime.datetime(2099, 1, 1, tzinfo=datetime.UTC)
MODEL_FILES = {
    "config.json": b'{"architectures": ["fuzz"]}\n',
    "weights/model.bin": bytes(range(256)) * 8,
}


def _scalar(label: str) -> int:
    return int.from_bytes(hashlib.sha256(b"csi-oci fuzz " + label.encode()).digest()) >> 2


def _ec(label: str, curve: ec.EllipticCurve) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(_scalar(label), curve)


KEYS: dict[str, ec.EllipticCurvePrivateKey] = {
    "signer": _ec("signer", ec.SECP256R1()),  # cosign and model-signing keys
    "root": _ec("root", ec.SECP384R1()),
    "intermediate": _ec("intermediate", ec.SECP384R1()),
    "leaf": _ec("leaf", ec.SECP256R1()),  # the certificate signer (cosign, notation, models)
}
ED25519 = ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"csi-oci fuzz ed").digest())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "csi-oci fuzz"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _cert(name: str, issuer: str | None, serial: int) -> x509.Certificate:
    """root, intermediate (CA, issued by root) or leaf (code signing, by intermediate):
    the profile tests/support/signing.py's issue_ca/issue_leaf give, which cosign,
    notation and model-signing accept; the names and keys are fixed, so a chain the
    seeds carry links to the harness's root."""
    key = KEYS[name].public_key()
    leaf = name == "leaf"
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(f"fuzz {name}"))
        .issuer_name(_name(f"fuzz {issuer or name}"))
        .public_key(key)
        .serial_number(serial)
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(
            x509.BasicConstraints(ca=not leaf, path_length=None if leaf or not issuer else 0),
            critical=True,
        )
        .add_extension(key_usage(ca=not leaf), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(KEYS[issuer].public_key()),
            critical=False,
        )
    if leaf:
        builder = (
            builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.RFC822Name(SIGNER_EMAIL)]), critical=False
            )
            .add_extension(
                x509.UnrecognizedExtension(OID_FULCIO_ISSUER_V1, OIDC_ISSUER.encode()),
                critical=False,
            )
            .add_extension(
                x509.UnrecognizedExtension(
                    OID_FULCIO_ISSUER_V2, bytes([0x0C, len(OIDC_ISSUER)]) + OIDC_ISSUER.encode()
                ),
                critical=False,
            )
        )
    signer = KEYS[issuer or name]
    return builder.sign(signer, hashes.SHA384())


ROOT = _cert("root", None, 1)
INTERMEDIATE = _cert("intermediate", "root", 2)
LEAF = _cert("leaf", "intermediate", 3)

KEY_TRUST = KeyTrust(
    (("signer.pub", KEYS["signer"].public_key()), ("ed25519.pub", ED25519.public_key()))
)
CERT_TRUST = CertTrust(
    roots=(ROOT,),
    identities=(
        IdentityPattern(san=r"signer@example\.test", issuer=r"https://issuer\.fuzz\.test"),
    ),
    names=("root.pem",),
)
# A rule that lists the intermediate as an anchor too (cosign's bundles carry the leaf alone).
CERT_TRUST_INTERMEDIATE = CertTrust(
    roots=(ROOT, INTERMEDIATE),
    identities=(IdentityPattern(subject=r".*CN=fuzz leaf.*"),),
    names=("root.pem", "intermediate.pem"),
)
CERT_TRUST_NOBODY = CertTrust(
    roots=(ROOT, INTERMEDIATE), identities=(IdentityPattern(san="nobody"),), names=("root.pem",)
)
REQUIREMENTS = (
    Requirement(Kind.COSIGN, KEY_TRUST, None),
    Requirement(Kind.COSIGN, None, CERT_TRUST_INTERMEDIATE),
    Requirement(Kind.COSIGN, KEY_TRUST, CERT_TRUST),
    Requirement(Kind.COSIGN, None, CERT_TRUST_NOBODY),
)
MODEL_REQUIREMENTS = tuple(Requirement(Kind.MODEL_SIGNING, r.keys, r.certs) for r in REQUIREMENTS)
NOTATION_TRUST = (CERT_TRUST, CERT_TRUST_INTERMEDIATE, CERT_TRUST, CERT_TRUST_NOBODY)
OTHER_SUBJECTS = {
    "sha256:" + "1" * 64: "manifest",
    "sha256:" + "2" * 64: "index",
}


def _model_tree() -> Path:
    """MODEL_FILES under the scratch root (removed by the runner after the child)."""
    tree = Path(tempfile.mkdtemp(prefix="csi-oci-fuzz-model-", dir=scratch_root()))
    for name, data in MODEL_FILES.items():
        path = tree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return tree


_tree: Path | None = None


def model_tree() -> Path:
    global _tree
    if _tree is None or not _tree.is_dir():
        _tree = _model_tree()
    return _tree


# -- the harness's own reading and signing (never the driver's parsers) ----------------


def _b64decode(text: object) -> bytes | None:
    if not isinstance(text, str):
        return None
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.b64decode(padded.replace("-", "+").replace("_", "/"))
    except ValueError:
        return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _json(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _pae(payload_type: str, payload: bytes) -> bytes:
    kind = payload_type.encode("utf-8", "surrogatepass")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _sign_der(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def _sign_raw(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(_sign_der(key, data))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _reseal_bundle(data: bytes) -> bytes:
    """A Sigstore bundle signed again: the DSSE envelope over its PAE, or the message
    digest; by the leaf when the bundle carries certificates, else by the signer key."""
    doc = _json(data)
    if not isinstance(doc, dict):
        return data
    material = doc.get("verificationMaterial")
    with_cert = isinstance(material, dict) and (
        "certificate" in material or "x509CertificateChain" in material
    )
    key = KEYS["leaf" if with_cert else "signer"]
    env = doc.get("dsseEnvelope")
    msg = doc.get("messageSignature")
    if isinstance(env, dict):
        payload = _b64decode(env.get("payload"))
        payload_type = env.get("payloadType")
        if payload is None or not isinstance(payload_type, str):
            return data
        env["signatures"] = [{"sig": _b64(_sign_der(key, _pae(payload_type, payload)))}]
    elif isinstance(msg, dict):
        md = msg.get("messageDigest")
        digest = _b64decode(md.get("digest")) if isinstance(md, dict) else None
        if digest is None or len(digest) != 32:
            return data
        msg["signature"] = _b64(key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
    else:
        return data
    return json.dumps(doc).encode()


def _reseal_jws(data: bytes) -> bytes:
    doc = _json(data)
    if not isinstance(doc, dict):
        return data
    protected, payload = doc.get("protected"), doc.get("payload")
    if not isinstance(protected, str) or not isinstance(payload, str):
        return data
    try:
        signed = f"{protected}.{payload}".encode("ascii")
    except UnicodeEncodeError:
        return data
    doc["signature"] = _b64url(_sign_raw(KEYS["leaf"], signed))
    return json.dumps(doc).encode()


def _reseal_cose(data: bytes) -> bytes:
    try:
        item = cbor2.loads(data)
    except Exception:  # the harness's own read: anything it cannot read stays as it is
        return data
    parts = item.value if isinstance(item, cbor2.CBORTag) and item.tag == 18 else None
    if not isinstance(parts, list | tuple) or len(parts) != 4:
        return data
    protected, unprotected, payload, _ = parts
    if not isinstance(protected, bytes) or not isinstance(payload, bytes):
        return data
    signed = cbor2.dumps(["Signature1", protected, b"", payload])
    try:
        return cbor2.dumps(
            cbor2.CBORTag(18, [protected, unprotected, payload, _sign_raw(KEYS["leaf"], signed)])
        )
    except Exception:
        return data


def _cose_payload(data: bytes) -> bytes | None:
    try:
        item = cbor2.loads(data)
    except Exception:
        return None
    parts = item.value if isinstance(item, cbor2.CBORTag) else None
    if isinstance(parts, list | tuple) and len(parts) == 4 and isinstance(parts[2], bytes):
        return parts[2]
    return None


def _named(handler: int, data: bytes) -> list[object]:
    """The digests the content names, read by the harness (tolerantly)."""
    if handler in (0, 1):
        doc = _json(split(data, 2)[0])
        path = ("critical", "image", "docker-manifest-digest")
        for part in path:
            doc = doc.get(part) if isinstance(doc, dict) else None
        return [doc]
    if handler == 3:
        doc = _json(data)
        if not isinstance(doc, dict):
            return []
        env, msg = doc.get("dsseEnvelope"), doc.get("messageSignature")
        if isinstance(env, dict):
            statement = _json(_b64decode(env.get("payload")))
            subjects = statement.get("subject") if isinstance(statement, dict) else None
            out: list[object] = []
            for entry in subjects if isinstance(subjects, list) else []:
                digests = entry.get("digest") if isinstance(entry, dict) else None
                if isinstance(digests, dict) and isinstance(digests.get("sha256"), str):
                    out.append("sha256:" + digests["sha256"].lower())
            return out[:4]
        md = msg.get("messageDigest") if isinstance(msg, dict) else None
        raw = _b64decode(md.get("digest")) if isinstance(md, dict) else None
        return ["sha256:" + raw.hex()] if raw else []
    if handler in (4, 5):
        if handler == 4:
            doc = _json(data)
            payload = _b64decode(doc.get("payload")) if isinstance(doc, dict) else None
        else:
            payload = _cose_payload(data)
        target = _json(payload)
        target = target.get("targetArtifact") if isinstance(target, dict) else None
        return [target.get("digest")] if isinstance(target, dict) else []
    return []


def _text(raw: bytes) -> str:
    """Annotation text as a manifest's JSON can give it: any code point, lone
    surrogates (JSON's \\ud800) included."""
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace")


# -- the handlers -----------------------------------------------------------------------


def _simple_signing(
    data: bytes, requirement: Requirement, subjects: dict[str, str], reseal: bool
) -> None:
    payload, signature, cert, chain = split(data, 4)
    annotations = {cosign.ANNOTATION_SIGNATURE: _text(signature)}
    if reseal:
        key = KEYS["leaf" if cert else "signer"]
        annotations[cosign.ANNOTATION_SIGNATURE] = _b64(_sign_der(key, payload))
    if cert:
        annotations[cosign.ANNOTATION_CERTIFICATE] = _text(cert)
    if chain:
        annotations[cosign.ANNOTATION_CHAIN] = _text(chain)
    cosign.verify_simple_signing(payload, annotations, requirement, subjects, source="fuzz")


def _bundles(data: bytes) -> None:
    try:
        parsed = bundle.parse_bundle(data)
        _ = (parsed.envelope.pae() if parsed.envelope else None, parsed.message_digest)
    except SignatureRejected:
        pass
    bundle.is_model_signing(data)
    try:
        parsed = models.parse_bundle(data)
    except SignatureRejected:
        return
    assert parsed.envelope is not None
    parsed.envelope.pae()


def _certificates(data: bytes, trust: CertTrust) -> None:
    try:
        certs = load_certificates(data, "fuzz")
    except ValueError:  # documented: a bundle that is not PEM certificates
        return
    if certs:
        identity = trust.check(certs[0], certs[1:])
        _ = (identity.describe(), identity.short())


def target(data: bytes) -> None:
    if not data:
        return
    select, rest = data[0], data[1:]
    handler = (select & 15) % HANDLERS
    reseal = bool(select & 16)
    variant = select >> 6
    requirement = REQUIREMENTS[variant]
    subjects = dict(OTHER_SUBJECTS)
    if select & 32:
        for digest in _named(handler, rest):
            if isinstance(digest, str) and len(digest) < 200:
                subjects[digest] = "manifest"
    try:
        if handler == 0:
            cosign.signed_digest(rest)
        elif handler == 1:
            _simple_signing(rest, requirement, subjects, reseal)
        elif handler == 2:
            _bundles(rest)
        elif handler == 3:
            data = _reseal_bundle(rest) if reseal else rest
            bundle.verify_image_bundle(data, requirement, subjects, source="fuzz")
        elif handler in (4, 5):
            media_type = notation.JWS_MEDIA_TYPE if handler == 4 else notation.COSE_MEDIA_TYPE
            if reseal:
                rest = _reseal_jws(rest) if handler == 4 else _reseal_cose(rest)
            notation.verify_notation(rest, media_type, NOTATION_TRUST[variant], subjects)
        elif handler == 6:
            models.parse_statement(rest)
        elif handler == 7:
            data = _reseal_bundle(rest) if reseal else rest
            models.verify_model_tree(model_tree(), data, MODEL_REQUIREMENTS[variant], source="f")
        else:
            _certificates(rest, CERT_TRUST if variant != 1 else CERT_TRUST_INTERMEDIATE)
    except SignatureRejected:
        pass


# -- the dictionary ---------------------------------------------------------------------

DICT = [
    # cosign simple signing
    b'"critical"',
    b'"identity"',
    b'"docker-reference"',
    b'"image"',
    b'"docker-manifest-digest"',
    b'"type"',
    b'"optional"',
    b'"cosign container image signature"',
    b'"sha256:',
    b'"sha512:',
    # Sigstore bundles and DSSE, in-toto
    b'"mediaType"',
    b'"application/vnd.dev.sigstore.bundle.v0.3+json"',
    b'"application/vnd.dev.sigstore.bundle+json;version=0.2"',
    b'"verificationMaterial"',
    b'"publicKey"',
    b'"hint"',
    b'"certificate"',
    b'"x509CertificateChain"',
    b'"certificates"',
    b'"rawBytes"',
    b'"tlogEntries"',
    b'"dsseEnvelope"',
    b'"payload"',
    b'"payloadType"',
    b'"application/vnd.in-toto+json"',
    b'"signatures"',
    b'"sig"',
    b'"keyid"',
    b'"messageSignature"',
    b'"messageDigest"',
    b'"algorithm"',
    b'"SHA2_256"',
    b'"digest"',
    b'"signature"',
    b'"_type"',
    b'"https://in-toto.io/Statement/v1"',
    b'"subject"',
    b'"name"',
    b'"predicateType"',
    b'"predicate"',
    # model-signing
    b'"https://model_signing/signature/v1.0"',
    b'"https://model_signing/Digests/v0.1"',
    b'"serialization"',
    b'"method"',
    b'"files"',
    b'"shards"',
    b'"hash_type"',
    b'"blake2"',
    b'"blake3"',
    b'"shard_size"',
    b'"allow_symlinks"',
    b'"ignore_paths"',
    b'"resources"',
    b'"sha256-sharded-',
    b":0:",
    # Notary Project JWS
    b'"protected"',
    b'"header"',
    b'"x5c"',
    b'"alg"',
    b'"ES256"',
    b'"PS256"',
    b'"cty"',
    b'"crit"',
    b'"application/vnd.cncf.notary.payload.v1+json"',
    b'"io.cncf.notary.signingScheme"',
    b'"io.cncf.notary.signingTime"',
    b'"io.cncf.notary.expiry"',
    b'"io.cncf.notary.authenticSigningTime"',
    b'"io.cncf.notary.signingAgent"',
    b'"io.cncf.notary.timestampSignature"',
    b'"io.cncf.notary.verificationPlugin"',
    b'"notary.x509"',
    b'"notary.x509.signingAuthority"',
    b'"targetArtifact"',
    b'"size"',
    b'"annotations"',
    b'"application/vnd.oci.image.manifest.v1+json"',
    b'"application/vnd.oci.image.index.v1+json"',
    b"2024-01-01T00:00:00Z",
    b"9999-12-31T23:59:59.999999999+14:00",
    # COSE / CBOR: COSE_Sign1 tag + array(4), alg labels, x5chain, epoch tag
    b"\xd2\x84",
    b"\x01\x26",
    b"\x01\x38\x24",
    b"\x01\x38\x22",
    b"\x02\x81",
    b"\x03\x78\x2b",
    b"\x18\x21",
    b"\xc1\x1a",
    b"\xc1\xfb",
    b"\xc1\x1b\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\xc2\x49",
    b"\xd8\x1c",
    b"\xf9\x7c\x00",
    b"\x9f",
    b"\xbf",
    b"\xff",
    b"\x5f",
    # base64 and PEM
    b"-----BEGIN CERTIFICATE-----\n",
    b"-----END CERTIFICATE-----\n",
    b"MII",
    b"eyJ",
    b"LS0tLS1CRUdJTi",
    b"0oRY",
    b"==",
    b"\\ud800",
    b"\\u0000",
    b"1e999",
    b"\x00",
]
