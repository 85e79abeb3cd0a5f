"""What a policy trusts (public keys, certificate roots, identities) and the checks on them.

Every signature format that csi-oci verifies ends in one of two questions:
does this signature over these bytes verify with one of the rule's public
keys, or with a certificate that chains to one of the rule's roots and names
an identity the rule accepts? Both are answered here, once, with
`cryptography`, so cosign, Notary Project and model-signing envelopes only
differ in how they carry the bytes.

Nothing here touches the network: no OCSP, no CRL fetch, no transparency
log. A rule that wants a log's proof names a Sigstore trusted root
(csi_oci.verify.bundle)."""

from __future__ import annotations

import datetime
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

# Fulcio's certificate extensions: the OIDC issuer that vouched for the
# identity (.1.1 is the deprecated raw-string form, .1.8 the DER UTF8String).
OID_FULCIO_ISSUER_V1 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
OID_FULCIO_ISSUER_V2 = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")

MAX_CHAIN_DEPTH = 8
MAX_PEM_BYTES = 256 * 1024  # a certificate chain carried in an annotation or header
MAX_CERTS = 10
MIN_RSA_BITS = 2048
EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class SignatureRejected(Exception):
    """One signature did not satisfy a requirement; the message says why, for the pod event.

    Internal to csi_oci.verify: the verifier collects these per candidate and
    turns the most telling one into csi_oci.errors.SignatureDenied.
    """

    # How close the candidate came, to pick the message that helps most:
    # a signature by an unknown key says more than an unparseable one.
    rank: int = 1

    def __init__(self, message: str, rank: int = 1) -> None:
        super().__init__(message)
        self.rank = rank


@dataclass(frozen=True)
class Verified:
    """A signature that satisfied a requirement: who signed which digest, how."""

    kind: str  # "cosign", "notation" or "model-signing"
    signer: str  # the key's name or the certificate's identity (CertificateIdentity.short)
    digest: str  # the manifest or index digest the signature names (for model-signing:
    # the digest of the tree's signed manifest of files)
    source: str = ""  # where it was found: "tag sha256-<hex>.sig", "referrer sha256:..."


RANK_MALFORMED = 1  # not a signature we can read
RANK_OTHER_DIGEST = 2  # a valid envelope for another digest (tag moved after signing)
RANK_UNTRUSTED = 3  # signed, but by a key or CA the rule does not trust
RANK_IDENTITY = 4  # trusted CA, wrong identity
RANK_BAD_SIGNATURE = 5  # names a trusted key or certificate, but the bytes do not verify


def key_fingerprint(key: PublicKey) -> str:
    """sha256 of the SubjectPublicKeyInfo, short: how messages and records name a key."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()[:16]


def load_public_key(pem: bytes, where: str) -> PublicKey:
    """A PEM public key (or the key of a PEM certificate) of a type we verify with."""
    key: object
    try:
        if b"CERTIFICATE" in pem:
            key = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        raise ValueError(f"{where}: not a PEM public key or certificate ({exc})") from None
    return checked_key(key, where)


def checked_key(key: object, where: str) -> PublicKey:
    """`key`, if it is of a type and size csi-oci accepts for signatures."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, EC_CURVES):
            raise ValueError(f"{where}: ECDSA curve {key.curve.name} is not accepted")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"{where}: RSA key of {key.key_size} bits; at least {MIN_RSA_BITS}")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise ValueError(f"{where}: key type {type(key).__name__} is not accepted")


def load_certificates(pem: bytes, where: str) -> list[x509.Certificate]:
    """Certificates of a PEM bundle, bounded in size and count, every field decoded."""
    if len(pem) > MAX_PEM_BYTES:
        raise ValueError(f"{where}: certificate bundle of {len(pem)} bytes is too large")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except (ValueError, x509.InvalidVersion) as exc:
        raise ValueError(f"{where}: not PEM certificates ({exc})") from None
    if len(certs) > MAX_CERTS:
        raise ValueError(f"{where}: {len(certs)} certificates; at most {MAX_CERTS}")
    return [decoded(cert, where) for cert in certs]


def load_der_certificate(der: bytes, where: str) -> x509.Certificate:
    """One DER certificate, every field decoded; ValueError if it does not parse."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion) as exc:
        raise ValueError(f"{where}: not a DER certificate ({str(exc)[:80]})") from None
    return decoded(cert, where)


def decoded(cert: x509.Certificate, where: str) -> x509.Certificate:
    """`cert`, once every field the checks read has decoded. cryptography decodes
    names, extensions and keys lazily, so a hostile field would otherwise raise
    from deep inside the chain or identity checks, and not only ValueError
    (DuplicateExtension, UnsupportedAlgorithm, ...: found by fuzzing, see
    csi_oci.verify.notation._certificate), hence the broad except: ValueError."""
    try:
        _ = (cert.version, cert.subject, cert.issuer, cert.extensions, cert.not_valid_after_utc)
        _ = (cert.not_valid_before_utc, cert.subject.rfc4514_string())
        cert.public_key()
    except Exception as exc:
        raise ValueError(
            f"{where}: malformed certificate ({type(exc).__name__}: {str(exc)[:80]})"
        ) from None
    return cert


def _hashes_for(key: PublicKey) -> tuple[hashes.HashAlgorithm, ...]:
    """The digests signers pair with this key, most usual first.

    cosign signs ECDSA with SHA-256 whatever the curve, Notary Project pairs
    P-384 with SHA-384 and P-521 with SHA-512; the signature binds the
    message under any of them, so trying each is no weaker than one.
    """
    if isinstance(key, ec.EllipticCurvePublicKey):
        by_curve: dict[str, hashes.HashAlgorithm] = {
            "secp256r1": hashes.SHA256(),
            "secp384r1": hashes.SHA384(),
            "secp521r1": hashes.SHA512(),
        }
        first = by_curve.get(key.curve.name, hashes.SHA256())
        return (
            first,
            *(
                h
                for h in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512())
                if h.name != first.name
            ),
        )
    return (hashes.SHA256(), hashes.SHA384(), hashes.SHA512())


def signature_verifies(
    key: PublicKey, signature: bytes, data: bytes, *, prehashed: bool = False
) -> bool:
    """Whether `signature` over `data` verifies with `key` (ECDSA DER, RSA PKCS#1 v1.5
    or PSS, Ed25519). `prehashed`: `data` is already the SHA-256 digest of the
    message (a Sigstore bundle's message signature)."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        if prehashed:
            return False  # Ed25519 signs the message itself, never a digest
        try:
            key.verify(signature, data)
            return True
        except InvalidSignature:
            return False
    algorithms: tuple[hashes.HashAlgorithm, ...] = (
        (hashes.SHA256(),) if prehashed else _hashes_for(key)
    )
    for algorithm in algorithms:
        chosen: hashes.HashAlgorithm | Prehashed = Prehashed(algorithm) if prehashed else algorithm
        try:
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, data, ec.ECDSA(chosen))
            else:
                try:
                    key.verify(signature, data, padding.PKCS1v15(), chosen)
                except InvalidSignature:
                    key.verify(
                        signature,
                        data,
                        padding.PSS(padding.MGF1(algorithm), padding.PSS.AUTO),
                        chosen,
                    )
            return True
        except InvalidSignature:
            continue
    return False


def raw_ecdsa_to_der(signature: bytes, key: PublicKey) -> bytes:
    """JOSE and COSE carry ECDSA as r||s; cryptography wants DER."""
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    if not isinstance(key, ec.EllipticCurvePublicKey):
        return signature
    size = (key.curve.key_size + 7) // 8
    if len(signature) != 2 * size:
        raise SignatureRejected(
            f"ECDSA signature is {len(signature)} bytes, want {2 * size} for {key.curve.name}"
        )
    r = int.from_bytes(signature[:size], "big")
    s = int.from_bytes(signature[size:], "big")
    return encode_dss_signature(r, s)


# -- identities --------------------------------------------------------------------


def _full_match(pattern: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{where}: bad regular expression {pattern!r}: {exc}") from None


@dataclass(frozen=True)
class IdentityPattern:
    """Whom a certificate must name. Each set field is a regular expression that
    must match the whole value: `subject` the RFC 4514 subject DN, `san` any
    subject alternative name (email, URI or DNS), `issuer` the OIDC issuer of a
    Fulcio-style certificate (its 1.3.6.1.4.1.57264.1.8 or .1.1 extension)."""

    subject: str | None = None
    san: str | None = None
    issuer: str | None = None

    @classmethod
    def parse(cls, data: object, where: str) -> IdentityPattern:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: an identity is a table of subject, san and issuer")
        unknown = set(data) - {"subject", "san", "issuer"}
        if unknown:
            raise ValueError(f"{where}: unknown identity keys {sorted(unknown)}")
        values: dict[str, str | None] = {}
        for name in ("subject", "san", "issuer"):
            value = data.get(name)
            if value is not None:
                if not isinstance(value, str) or not value:
                    raise ValueError(f"{where}.{name}: want a non-empty regular expression")
                _full_match(value, f"{where}.{name}")
            values[name] = value
        if not any(values.values()):
            raise ValueError(f"{where}: an identity needs at least one of subject, san, issuer")
        return cls(**values)

    def describe(self) -> str:
        parts = [
            f"{k}={v}"
            for k, v in (("subject", self.subject), ("san", self.san), ("issuer", self.issuer))
            if v
        ]
        return ", ".join(parts)

    def matches(self, found: CertificateIdentity) -> bool:
        if self.subject and not re.fullmatch(self.subject, found.subject):
            return False
        if self.san and not any(re.fullmatch(self.san, name) for name in found.sans):
            return False
        return not (self.issuer and not (found.issuer and re.fullmatch(self.issuer, found.issuer)))


@dataclass(frozen=True)
class CertificateIdentity:
    """What a signing certificate says about its holder."""

    subject: str
    sans: tuple[str, ...]
    issuer: str | None  # OIDC issuer (Fulcio extension), when present

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertificateIdentity:
        sans: list[str] = []
        try:
            ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            for general in ext.value:
                if isinstance(
                    general, x509.RFC822Name | x509.UniformResourceIdentifier | x509.DNSName
                ):
                    sans.append(general.value)
                elif isinstance(general, x509.OtherName):
                    sans.append(_der_utf8(general.value) or "")
        except x509.ExtensionNotFound:
            pass
        return cls(cert.subject.rfc4514_string(), tuple(s for s in sans if s), _oidc_issuer(cert))

    def describe(self) -> str:
        text = f"subject {self.subject or '(empty)'}"
        if self.sans:
            text += f", san {', '.join(self.sans[:3])}"
        if self.issuer:
            text += f", issuer {self.issuer}"
        return text

    def short(self) -> str:
        """The one name a record shows: the first SAN, else the subject's CN, else the DN."""
        if self.sans:
            return self.sans[0]
        for part in self.subject.split(","):
            name, _, value = part.partition("=")
            if name.strip().upper() == "CN" and value:
                return value
        return self.subject


def _der_utf8(value: bytes) -> str | None:
    """A DER UTF8String (tag 12, short or one-byte long length), else None."""
    if len(value) >= 2 and value[0] == 0x0C:
        length, start = value[1], 2
        if length == 0x81 and len(value) >= 3:
            length, start = value[2], 3
        if start + length == len(value):
            try:
                return value[start:].decode()
            except UnicodeDecodeError:
                return None
    return None


def _oidc_issuer(cert: x509.Certificate) -> str | None:
    for oid, decode in ((OID_FULCIO_ISSUER_V2, _der_utf8), (OID_FULCIO_ISSUER_V1, _raw_text)):
        try:
            ext = cert.extensions.get_extension_for_oid(oid)
        except x509.ExtensionNotFound:
            continue
        value = ext.value
        if isinstance(value, x509.UnrecognizedExtension):
            text = decode(value.value)
            if text:
                return text
    return None


def _raw_text(value: bytes) -> str | None:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None


# -- trust anchors -------------------------------------------------------------------


@dataclass(frozen=True)
class KeyTrust:
    """Public keys, each with the name a record shows (the file name, or its fingerprint)."""

    keys: tuple[tuple[str, PublicKey], ...]

    def find(self, signature: bytes, data: bytes) -> str | None:
        """The name of the key that verifies `signature` over `data`, or None."""
        for name, key in self.keys:
            if signature_verifies(key, signature, data):
                return name
        return None

    def describe(self) -> str:
        return ", ".join(name for name, _ in self.keys)


@dataclass(frozen=True)
class CertTrust:
    """Root certificates and the identities a leaf under them may have (any of them)."""

    roots: tuple[x509.Certificate, ...]
    identities: tuple[IdentityPattern, ...] = field(default=())
    # Roots' files, for messages and the rule's fingerprint.
    names: tuple[str, ...] = field(default=())

    def describe_identities(self) -> str:
        return " or ".join(i.describe() for i in self.identities) or "any identity"

    def check(
        self,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate],
        at: datetime.datetime | None = None,
    ) -> CertificateIdentity:
        """The leaf's identity, when it chains to a root at `at` (default now), may sign
        code, and matches one of the identities; SignatureRejected otherwise."""
        when = at or datetime.datetime.now(datetime.UTC)
        try:
            # cryptography parses extensions lazily: a hostile certificate
            # fails here, on first use, not where it was loaded.
            found = CertificateIdentity.of(leaf)
            return self._check(leaf, intermediates, when, found)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise SignatureRejected(
                f"a signing certificate is malformed ({exc})", RANK_MALFORMED
            ) from None

    def _check(
        self,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate],
        when: datetime.datetime,
        found: CertificateIdentity,
    ) -> CertificateIdentity:
        try:
            # webpki rules for the CAs (basic constraints, key usage, path
            # length); the leaf is a code-signing certificate, not a web
            # server's, so its extensions are checked below instead.
            verifier = (
                PolicyBuilder()
                .store(Store(list(self.roots)))
                .time(when)
                .max_chain_depth(MAX_CHAIN_DEPTH)
                .extension_policies(
                    ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                    ee_policy=ExtensionPolicy.permit_all(),
                )
                .build_client_verifier()
            )
            verifier.verify(leaf, list(intermediates))
        except VerificationError as exc:
            raise SignatureRejected(
                f"signed by certificate ({found.describe()}) that does not chain to a trusted "
                f"root ({_short_verification_error(exc)})",
                RANK_UNTRUSTED,
            ) from None
        _check_code_signing(leaf, found)
        if self.identities and not any(i.matches(found) for i in self.identities):
            raise SignatureRejected(
                f"certificate identity {found.describe()}, wanted {self.describe_identities()}",
                RANK_IDENTITY,
            )
        return found


def _check_code_signing(leaf: x509.Certificate, found: CertificateIdentity) -> None:
    try:
        eku: x509.ExtendedKeyUsage | None = leaf.extensions.get_extension_for_class(
            x509.ExtendedKeyUsage
        ).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        raise SignatureRejected(
            f"certificate ({found.describe()}) may not sign code (no codeSigning in its "
            "extended key usage)",
            RANK_UNTRUSTED,
        )
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.digital_signature:
        raise SignatureRejected(
            f"certificate ({found.describe()}) may not sign (no digitalSignature key usage)",
            RANK_UNTRUSTED,
        )


def _short_verification_error(exc: VerificationError) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no path to a root"
