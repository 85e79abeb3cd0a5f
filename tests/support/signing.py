"""Real signatures for tests: keys, a test PKI, a referrers-API registry, and
the real signing tools (cosign, notation, model-signing) driven offline.

Keys and certificates are generated here with ``cryptography`` (nothing is
checked in); tools run like producers.py's (clean env, HOME in ``workdir``,
stdin /dev/null, timeout).  No transparency log, Fulcio, TSA or TUF is
contacted: ``--tlog-upload=false`` to sign, ``--insecure-ignore-tlog`` (and a
local TrustedRoot for bundles) to verify.  Checked by
tests/test_signing_producers.py; samples in the issue-18 notes.

FACTS of the pinned versions:

* cosign 2.5.3 ``sign --key`` (simple signing): an OCI manifest tagged
  ``sha256-<hex>.sig`` in the image's repository, also on a registry WITH the
  referrers API; config ``application/vnd.oci.image.config.v1+json`` (a dummy
  image config), one layer ``application/vnd.dev.cosign.simplesigning.v1+json``
  whose bytes are the signed payload ``{"critical": {"identity":
  {"docker-reference": "HOST/REPO"}, "image": {"docker-manifest-digest":
  "sha256:..."}, "type": "cosign container image signature"}, "optional":
  null}`` (``-a k=v`` fills ``optional``); the base64 signature is the layer
  annotation ``dev.cosignproject.cosign/signature``.  The signature is over
  the payload bytes with SHA-256 for EVERY key type: ECDSA P-256/P-384/P-521
  -> ECDSA-SHA256 (ASN.1 DER), RSA -> PKCS#1 v1.5 SHA-256, Ed25519 -> pure
  Ed25519.  ``import-key-pair`` takes PKCS#8 ECDSA (all three curves), RSA
  and Ed25519 keys and writes ``ENCRYPTED SIGSTORE PRIVATE KEY`` PEM.
* ``sign --certificate LEAF --certificate-chain CHAIN``: same, plus layer
  annotations ``dev.sigstore.cosign/certificate`` (leaf PEM) and
  ``dev.sigstore.cosign/chain`` (PEM, intermediate first, root last).
  ``verify`` then reports SAN/issuer under the UNSIGNED ``optional``
  (``Subject``, ``Issuer``, ``1.3.6.1.4.1.57264.1.1``).
* ``sign --registry-referrers-mode=oci-1-1`` (refused unless
  ``COSIGN_EXPERIMENTAL=1``): same layer, pushed as a referrer, no tag; the
  manifest has NO ``artifactType``, config media type
  ``application/vnd.dev.cosign.artifact.sig.v1+json`` (the referrers API
  reports that as artifactType); only ``verify --experimental-oci11`` finds it.
* cosign 2.5.3 ``sign`` has no ``--new-bundle-format``; ``attest
  --new-bundle-format`` pushes a Sigstore bundle v0.3 referrer: manifest
  ``artifactType`` ``application/vnd.dev.sigstore.bundle.v0.3+json``, config
  = the empty descriptor (``application/vnd.oci.empty.v1+json``) carrying
  ``artifactType`` too, one layer of that bundle media type, annotations
  ``dev.sigstore.bundle.content: dsse-envelope``,
  ``dev.sigstore.bundle.predicateType`` and ``org.opencontainers.image.created``.
  The bundle is ``{mediaType, verificationMaterial, dsseEnvelope}``: with a key
  ``publicKey.hint`` = base64(sha256(SPKI DER)); with ``--certificate``
  ``certificate.rawBytes`` = the LEAF only (chain dropped); never
  ``tlogEntries``/timestamps.  DSSE payloadType ``application/vnd.in-toto+json``,
  statement v0.1, subject ``[{"name": "HOST/REPO", "digest": {"sha256": HEX}}]``,
  signature over PAE with SHA-256, no ``keyid``.  Without the referrers API
  it falls back to the ``sha256-<hex>`` index, whose entry for it says
  ``artifactType: application/vnd.oci.empty.v1+json`` (the config type).
  Verifying needs ``--trusted-root`` (``cosign trusted-root create``) for key
  and certificate bundles alike; its identity check sees ONE SAN (a URI SAN
  wins over an email SAN).
* ``sign-blob --new-bundle-format`` (key only: no ``--certificate`` flag):
  ``messageSignature`` bundle, ``messageDigest.algorithm`` ``SHA2_256``; of the
  image manifest bytes it is what newer cosign attaches (via oras here).
* notation 1.3.2 with a local key (``signingkeys.json`` keyPath/certPath, no
  plugin): referrer manifest WITHOUT ``artifactType``, config media type
  ``application/vnd.cncf.notary.signature`` (``{}``), one layer
  ``application/jose+json`` or ``application/cose``, ``subject``, annotations
  ``io.cncf.notary.x509chain.thumbprint#S256`` (JSON list of sha256 hex of
  each certificate's DER, leaf first) and ``org.opencontainers.image.created``.
  ``--force-referrers-tag`` defaults to TRUE: the ``sha256-<hex>`` index is
  written even on olareg, whose referrers API then does not list it.  The
  signed payload is ``{"targetArtifact": {"mediaType", "digest", "size"}}``
  (the subject descriptor).  JWS: flattened JSON ``{payload, protected,
  header: {x5c (std base64 DER, leaf..root), io.cncf.notary.signingAgent},
  signature}``, protected ``alg`` (RSA-2048/3072/4096 -> PS256/384/512,
  P-256/384/521 -> ES256/384/512), ``cty``
  ``application/vnd.cncf.notary.payload.v1+json``, ``crit``
  ``["io.cncf.notary.signingScheme"]``, ``io.cncf.notary.signingScheme``
  ``notary.x509``, ``io.cncf.notary.signingTime``.  COSE: tag 18 COSE_Sign1,
  protected ``{1: alg (-37/-38/-39 PS, -7/-35/-36 ES), 2: crit, 3: cty,
  signingScheme, signingTime (CBOR tag 1)}``, unprotected ``{33: [DER...],
  signingAgent}``, payload attached.
* model-signing 1.1.1: ``model.sig`` is a bundle v0.3 with
  ``verificationMaterial`` ``{publicKey: {hint: hex sha256 of the PEM public
  key FILE}, tlogEntries: []}`` or ``{x509CertificateChain: {certificates:
  [leaf, ...chain as given]}, tlogEntries: []}``; DSSE in-toto Statement v1,
  predicateType ``https://model_signing/signature/v1.0``, predicate
  ``serialization {method: files, hash_type: sha256, allow_symlinks,
  ignore_paths}`` and ``resources [{name (relative POSIX), digest (hex),
  algorithm}]`` sorted by name; subject ``[{name: <dir basename>, digest:
  {sha256: sha256(concatenated raw resource digests)}}]``.  Ignored by
  default: ``.git``, ``.github``, ``.gitignore``, ``.gitattributes`` and the
  signature file itself when inside the directory.  ECDSA keys only (P-384
  signs with SHA-384); RSA and Ed25519 fail ("has no attribute 'curve'").
* olareg 0.1.2: referrers API; ``{"manifests": null}`` when there are none.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from .producers import (
    DEFAULT_TIMEOUT,
    ProducerError,
    Pushed,
    find_producer,
    run_tool,
    tool_env,
)
from .registry import (
    ACCEPT_MANIFESTS,
    Registry,
    RegistryProcess,
    RegistryStartError,
    free_port,
)

# -- constants ------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

COSIGN_SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
COSIGN_ARTIFACT_TYPE_SIG = "application/vnd.dev.cosign.artifact.sig.v1+json"
SIGSTORE_BUNDLE_V03 = "application/vnd.dev.sigstore.bundle.v0.3+json"
NOTATION_ARTIFACT_TYPE = "application/vnd.cncf.notary.signature"
NOTATION_JWS = "application/jose+json"
NOTATION_COSE = "application/cose"
NOTATION_PAYLOAD = "application/vnd.cncf.notary.payload.v1+json"
IN_TOTO_PAYLOAD = "application/vnd.in-toto+json"
MODEL_SIGNING_PREDICATE = "https://model_signing/signature/v1.0"

OID_FULCIO_ISSUER_V1 = ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
OID_FULCIO_ISSUER_V2 = ObjectIdentifier("1.3.6.1.4.1.57264.1.8")

KeyType = Literal[
    "ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519"
]
KEY_TYPES: tuple[KeyType, ...] = (
    "ecdsa-p256",
    "ecdsa-p384",
    "ecdsa-p521",
    "rsa-2048",
    "rsa-3072",
    "rsa-4096",
    "ed25519",
)
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

COSIGN_TEST_PASSWORD = "csi-oci-test"


class SigningError(ProducerError):
    """A signing tool failed or wrote something unexpected."""


# -- keys -------------------------------------------------------------------------


def new_private_key(key_type: KeyType) -> PrivateKey:
    """A fresh private key of ``key_type``."""
    if key_type.startswith("ecdsa-p"):
        curve = {"256": ec.SECP256R1(), "384": ec.SECP384R1(), "521": ec.SECP521R1()}
        return ec.generate_private_key(curve[key_type.removeprefix("ecdsa-p")])
    if key_type.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r}")


def private_pem(key: PrivateKey, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM of ``key`` (encrypted with ``password`` when given)."""
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def public_pem(key: PrivateKey | PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM of ``key``'s public half."""
    pub: PublicKey = (
        key.public_key()
        if isinstance(
            key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
        )
        else key
    )
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class KeyPair:
    """A private key and its PEM files (``private_path`` unencrypted PKCS#8)."""

    key_type: KeyType
    private_key: PrivateKey
    private_path: Path
    public_path: Path

    @property
    def public_key(self) -> PublicKey:
        return self.private_key.public_key()


def generate_key_pair(key_type: KeyType, directory: Path, name: str | None = None) -> KeyPair:
    """Generate a key and write ``NAME.key`` (PKCS#8) and ``NAME.pub`` (SPKI)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = name or key_type
    key = new_private_key(key_type)
    priv = directory / f"{name}.key"
    pub = directory / f"{name}.pub"
    priv.write_bytes(private_pem(key))
    priv.chmod(0o600)
    pub.write_bytes(public_pem(key))
    return KeyPair(key_type, key, priv, pub)


# -- a test PKI -------------------------------------------------------------------


def _der_utf8string(value: str) -> bytes:
    raw = value.encode()
    if len(raw) < 0x80:
        return bytes([0x0C, len(raw)]) + raw
    length = len(raw).to_bytes((len(raw).bit_length() + 7) // 8, "big")
    return bytes([0x0C, 0x80 | len(length)]) + length + raw


def _signing_hash(key: PrivateKey) -> hashes.HashAlgorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}[
            key.curve.key_size
        ]
    return hashes.SHA256()


def _name(cn: str, organization: str | None = None) -> x509.Name:
    attrs = []
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


@dataclass(frozen=True)
class Cert:
    """A certificate, its key pair and its PEM file."""

    certificate: x509.Certificate
    key: KeyPair
    path: Path

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class TestPKI:
    """root -> (intermediate) -> leaf.  PEM files:

    * ``chain_path``: the CA certificates above the leaf, parent first, root
      last (cosign's ``--certificate-chain`` and model-signing's
      ``--certificate_chain`` order);
    * ``fullchain_path``: leaf first, then ``chain_path``'s content (notation's
      ``certPath``; also a model-signing chain including the leaf);
    * ``root_path`` / ``intermediates_path``: the trust anchor and the
      intermediates alone (``cosign verify --ca-roots/--ca-intermediates``,
      notation's trust store).
    """

    __test__ = False  # not a pytest test class

    root: Cert
    intermediate: Cert | None
    leaf: Cert
    chain_path: Path
    fullchain_path: Path
    root_path: Path
    intermediates_path: Path

    @property
    def cas(self) -> list[Cert]:
        return [c for c in (self.intermediate, self.root) if c is not None]


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0)


def key_usage(*, ca: bool) -> x509.KeyUsage:
    """digitalSignature for all; keyCertSign and cRLSign for a CA."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def issue_ca(
    subject_cn: str,
    key: KeyPair,
    path: Path,
    *,
    issuer: Cert | None = None,
    path_length: int | None = None,
    not_before: _dt.datetime | None = None,
    not_after: _dt.datetime | None = None,
) -> Cert:
    """A CA certificate (self-signed when ``issuer`` is None)."""
    now = _now()
    subject = _name(subject_cn, "csi-oci tests")
    signer_key = issuer.key.private_key if issuer else key.private_key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(key.public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - _dt.timedelta(days=1))
        .not_valid_after(not_after or now + _dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key),
            critical=False,
        )
    cert = builder.sign(signer_key, _signing_hash(signer_key))  # type: ignore[arg-type]
    Path(path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Cert(cert, key, Path(path))


def issue_leaf(
    issuer: Cert,
    key: KeyPair,
    path: Path,
    *,
    subject_cn: str = "csi-oci test signer",
    organization: str | None = "csi-oci tests",
    emails: Sequence[str] = (),
    uris: Sequence[str] = (),
    oidc_issuer: str | None = None,
    code_signing: bool = True,
    not_before: _dt.datetime | None = None,
    not_after: _dt.datetime | None = None,
) -> Cert:
    """A code-signing leaf certificate that cosign, notation and model-signing accept.

    Notation's rules (notaryproject signing-scheme / notation-core-go
    ``ValidateCodeSigningCertChain``): basicConstraints present with CA false,
    keyUsage digitalSignature (critical) and no keyCertSign, EKU codeSigning
    only, RSA >= 2048 or ECDSA P-256/384/521.  Sigstore-style identities go in
    the SAN (``emails``, ``uris``); ``oidc_issuer`` adds Fulcio's issuer
    extensions 1.3.6.1.4.1.57264.1.1 (raw string, deprecated) and .1.8 (DER
    UTF8String).
    """
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject_cn, organization))
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - _dt.timedelta(hours=1))
        .not_valid_after(not_after or now + _dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(ca=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key),
            critical=False,
        )
    )
    if code_signing:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
        )
    sans: list[x509.GeneralName] = [x509.RFC822Name(e) for e in emails]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=not subject_cn)
    if oidc_issuer:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(OID_FULCIO_ISSUER_V1, oidc_issuer.encode()), critical=False
        )
        builder = builder.add_extension(
            x509.UnrecognizedExtension(OID_FULCIO_ISSUER_V2, _der_utf8string(oidc_issuer)),
            critical=False,
        )
    signer = issuer.key.private_key
    cert = builder.sign(signer, _signing_hash(signer))  # type: ignore[arg-type]
    Path(path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Cert(cert, key, Path(path))


def make_pki(
    directory: Path,
    *,
    leaf_key_type: KeyType = "ecdsa-p256",
    ca_key_type: KeyType = "ecdsa-p384",
    intermediate: bool = True,
    subject_cn: str = "csi-oci test signer",
    organization: str | None = "csi-oci tests",
    emails: Sequence[str] = ("signer@example.test",),
    uris: Sequence[str] = (),
    oidc_issuer: str | None = None,
    code_signing: bool = True,
    leaf_not_before: _dt.datetime | None = None,
    leaf_not_after: _dt.datetime | None = None,
    name: str = "pki",
) -> TestPKI:
    """Generate a root CA, an optional intermediate and a code-signing leaf.

    Files go to ``directory/NAME-*.{key,pub,pem}``.  The defaults satisfy
    cosign, notation and model-signing alike.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    root = issue_ca(
        f"{name} test root CA",
        generate_key_pair(ca_key_type, d, f"{name}-root"),
        d / f"{name}-root.pem",
    )
    parent = root
    inter: Cert | None = None
    if intermediate:
        inter = issue_ca(
            f"{name} test intermediate CA",
            generate_key_pair(ca_key_type, d, f"{name}-intermediate"),
            d / f"{name}-intermediate.pem",
            issuer=root,
            path_length=0,
        )
        parent = inter
    leaf = issue_leaf(
        parent,
        generate_key_pair(leaf_key_type, d, f"{name}-leaf"),
        d / f"{name}-leaf.pem",
        subject_cn=subject_cn,
        organization=organization,
        emails=emails,
        uris=uris,
        oidc_issuer=oidc_issuer,
        code_signing=code_signing,
        not_before=leaf_not_before,
        not_after=leaf_not_after,
    )
    cas = [c for c in (inter, root) if c is not None]
    chain = d / f"{name}-chain.pem"
    chain.write_bytes(b"".join(c.pem for c in cas))
    fullchain = d / f"{name}-fullchain.pem"
    fullchain.write_bytes(leaf.pem + chain.read_bytes())
    intermediates = d / f"{name}-intermediates.pem"
    intermediates.write_bytes(inter.pem if inter else b"")
    return TestPKI(root, inter, leaf, chain, fullchain, root.path, intermediates)


# -- a registry with the referrers API --------------------------------------------


def _stop_proc(proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    log.close()


class OlaregRegistry(RegistryProcess):
    """``olareg serve`` on 127.0.0.1 (plain HTTP, anonymous, push enabled).

    olareg 0.1.2 implements the OCI 1.1 referrers API
    (``GET /v2/<repo>/referrers/<digest>[?artifactType=...]``); with no
    referrers it answers ``{"manifests": null}`` (not ``[]``).  ``store``
    ``"mem"`` (default) keeps everything in memory; ``"dir"`` stores an OCI
    layout per repository under ``workdir/store``.  Garbage collection is off.
    Duck-types the HTTP helpers of :class:`~tests.support.registry.Registry`
    (``host``, ``url``, ``credentials``, ``request``, ``get_manifest``,
    ``get_blob``, ``manifest_digest``), so the producers in producers.py work.
    """

    credentials: tuple[str, str] | None = None
    htpasswd: tuple[str, str] | None = None
    token_server = None
    scheme = "http"
    verify = True
    client_cert = None
    referrers_api = True

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        store: Literal["mem", "dir"] = "mem",
        port: int | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        self._binary = find_producer("olareg")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="csi-oci-olareg-")
            workdir = Path(self._tmp.name)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.root = self.workdir / "store"
        self.root.mkdir(exist_ok=True)
        self.log_path = self.workdir / "olareg.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        attempts = 1 if port is not None else 3
        for attempt in range(attempts):
            self.port = port if port is not None else free_port()
            self.host = f"127.0.0.1:{self.port}"
            self.url = f"http://{self.host}"
            try:
                self._start(startup_timeout)
                return
            except RegistryStartError as exc:
                if "address already in use" not in str(exc) or attempt + 1 >= attempts:
                    self.stop()
                    raise

    def _start(self, timeout: float) -> None:
        args = [
            self._binary,
            "serve",
            "--addr", "127.0.0.1",
            "--port", str(self.port),
            "--store-type", self.store,
            "--dir", str(self.root),
            "--gc-frequency", "-1s",
            "--api-delete",
            "-v", "info",
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # closed by _stop_proc
        proc = subprocess.Popen(
            args,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={"PATH": os.environ.get("PATH", os.defpath), "HOME": str(self.workdir)},
            start_new_session=True,
        )
        self._proc = proc
        self._finalizer = weakref.finalize(self, _stop_proc, proc, log)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                self._finalizer()
                raise RegistryStartError(
                    f"olareg exited with {proc.returncode} on {self.host}:\n{self.log_text()}"
                )
            try:
                if requests.get(f"{self.url}/v2/", timeout=0.5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self._finalizer()
                raise RegistryStartError(f"olareg did not answer on {self.url}/v2/ in {timeout}s")
            time.sleep(0.05)

    def __repr__(self) -> str:
        return f"<OlaregRegistry {self.url}>"

    # -- HTTP helpers (same names as Registry's) ---------------------------

    def request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> requests.Response:
        kwargs.pop("credentials", None)
        kwargs.pop("scope", None)
        kwargs.setdefault("timeout", 30)
        return requests.request(method, f"{self.url}{path}", headers=headers or {}, **kwargs)

    def get_manifest(self, repo: str, reference: str, **_: Any) -> requests.Response:
        return self.request(
            "GET", f"/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT_MANIFESTS}
        )

    def get_blob(self, repo: str, digest: str, **_: Any) -> requests.Response:
        return self.request("GET", f"/v2/{repo}/blobs/{digest}")

    def manifest_digest(self, repo: str, reference: str) -> str:
        resp = self.request(
            "HEAD", f"/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT_MANIFESTS}
        )
        resp.raise_for_status()
        return resp.headers["Docker-Content-Digest"]


AnyRegistry = Registry | OlaregRegistry


def has_referrers_api(registry: AnyRegistry) -> bool:
    """True for a registry that serves ``/v2/<repo>/referrers/<digest>``."""
    return bool(getattr(registry, "referrers_api", False))


# -- registry reads ---------------------------------------------------------------


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def referrers_tag(digest: str, suffix: str = "") -> str:
    """The fallback tag for ``digest``: ``sha256-<hex>`` (+ cosign's ``.sig``/``.att``)."""
    algo, _, hexdigest = digest.partition(":")
    return f"{algo}-{hexdigest}{suffix}"


def get_json(registry: AnyRegistry, repo: str, reference: str) -> dict[str, Any]:
    """The manifest ``repo:reference`` (tag or digest) as JSON; checks its digest."""
    resp = registry.get_manifest(repo, reference)
    resp.raise_for_status()
    if reference.startswith("sha256:") and sha256_digest(resp.content) != reference:
        raise SigningError(f"{repo}@{reference} served bytes with another digest")
    return resp.json()  # type: ignore[no-any-return]


def get_blob_bytes(registry: AnyRegistry, repo: str, digest: str) -> bytes:
    resp = registry.get_blob(repo, digest)
    resp.raise_for_status()
    if sha256_digest(resp.content) != digest:
        raise SigningError(f"blob {digest} in {repo} does not match its digest")
    return resp.content


def list_referrers(
    registry: AnyRegistry, repo: str, digest: str, artifact_type: str | None = None
) -> list[dict[str, Any]]:
    """Descriptors of the manifests whose ``subject`` is ``digest``.

    Uses the referrers API on a registry that has it, else the referrers tag
    schema (an OCI index tagged ``sha256-<hex>``; missing tag = none).
    """
    if has_referrers_api(registry):
        params = {"artifactType": artifact_type} if artifact_type else None
        resp = registry.request("GET", f"/v2/{repo}/referrers/{digest}", params=params)
        resp.raise_for_status()
        manifests = resp.json().get("manifests") or []
    else:
        resp = registry.get_manifest(repo, referrers_tag(digest))
        if resp.status_code == 404:
            return []
        resp.raise_for_status()
        manifests = resp.json().get("manifests") or []
    if artifact_type:
        manifests = [m for m in manifests if m.get("artifactType") == artifact_type]
    return list(manifests)


def tag_exists(registry: AnyRegistry, repo: str, tag: str) -> bool:
    resp = registry.request(
        "HEAD", f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT_MANIFESTS}
    )
    return resp.status_code == 200


# -- images to sign -----------------------------------------------------------------


def _split_repo_tag(repo_tag: str) -> tuple[str, str]:
    repo, sep, tag = repo_tag.rpartition(":")
    if not sep or not repo or "/" in tag or "@" in repo_tag:
        raise ValueError(f"expected 'repo:tag', got {repo_tag!r}")
    return repo, tag


def _put_blob(registry: AnyRegistry, repo: str, data: bytes) -> str:
    digest = sha256_digest(data)
    resp = registry.request("POST", f"/v2/{repo}/blobs/uploads/")
    resp.raise_for_status()
    location = resp.headers["Location"]
    if location.startswith("/"):
        location = registry.url + location
    sep = "&" if "?" in location else "?"
    put = requests.put(
        f"{location}{sep}digest={digest}",
        data=data,
        headers={"Content-Type": "application/octet-stream"},
        timeout=30,
    )
    if put.status_code != 201:
        raise SigningError(f"blob upload to {repo} failed: {put.status_code} {put.text}")
    return digest


def put_manifest(
    registry: AnyRegistry,
    repo: str,
    reference: str,
    manifest: bytes,
    media_type: str = OCI_MANIFEST,
) -> str:
    """PUT raw manifest bytes under ``reference`` (tag or digest); returns its digest."""
    resp = registry.request(
        "PUT",
        f"/v2/{repo}/manifests/{reference}",
        data=manifest,
        headers={"Content-Type": media_type},
    )
    if resp.status_code != 201:
        raise SigningError(f"manifest PUT {repo}:{reference}: {resp.status_code} {resp.text}")
    return sha256_digest(manifest)


def push_tiny_image(registry: AnyRegistry, repo_tag: str, *, content: bytes = b"hello\n") -> Pushed:
    """Push a one-layer OCI image (a gzip tar holding ``hello.txt``) over the
    registry API (no tool needed); different ``content`` = different digest."""
    import gzip
    import io
    import tarfile

    repo, tag = _split_repo_tag(repo_tag)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mtime, info.mode = len(content), 1_700_000_000, 0o644
        tar.addfile(info, io.BytesIO(content))
    raw = buf.getvalue()
    layer = gzip.compress(raw, mtime=0)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(raw)]},
            "config": {},
        },
        separators=(",", ":"),
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _put_blob(registry, repo, config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": _put_blob(registry, repo, layer),
                    "size": len(layer),
                }
            ],
        },
        separators=(",", ":"),
    ).encode()
    digest = put_manifest(registry, repo, tag, manifest)
    if registry.manifest_digest(repo, tag) != digest:
        raise SigningError(f"{repo}:{tag} does not hold the manifest just pushed")
    return Pushed(f"{registry.host}/{repo}:{tag}", digest)


def retag(registry: AnyRegistry, repo: str, source: str, tag: str) -> str:
    """Point ``repo:tag`` at the manifest ``source`` (tag or digest), byte for
    byte (e.g. to move a signed tag to another image); returns its digest."""
    resp = registry.get_manifest(repo, source)
    resp.raise_for_status()
    media_type = resp.headers.get("Content-Type", OCI_MANIFEST).split(";")[0]
    return put_manifest(registry, repo, tag, resp.content, media_type)


# -- what a signing helper pushed -------------------------------------------------


@dataclass(frozen=True)
class Signed:
    """What a signing helper pushed for one subject.

    ``subject`` is the signed manifest digest, ``manifests`` the digests of the
    signature manifests this call added, ``tag`` the tag that now lists or
    holds them (cosign's ``sha256-<hex>.sig`` or the referrers fallback index
    ``sha256-<hex>``), None when they are only reachable by the referrers API.
    """

    tool: str
    registry_host: str
    repo: str
    subject: str
    manifests: tuple[str, ...]
    tag: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def subject_reference(self) -> str:
        return f"{self.registry_host}/{self.repo}@{self.subject}"


def _image_parts(image: Pushed) -> tuple[str, str]:
    return image.repo, image.digest


def _subject_ref(registry: AnyRegistry, image: Pushed, by_tag: bool = False) -> str:
    if by_tag:
        return f"{registry.host}/{image.repo}:{image.tag}"
    return f"{registry.host}/{image.repo}@{image.digest}"


def _new_referrers(
    registry: AnyRegistry, repo: str, digest: str, before: Sequence[Mapping[str, Any]]
) -> tuple[str, ...]:
    seen = {m["digest"] for m in before}
    return tuple(
        m["digest"] for m in list_referrers(registry, repo, digest) if m["digest"] not in seen
    )


def _fallback_tag(registry: AnyRegistry, repo: str, digest: str) -> str | None:
    tag = referrers_tag(digest)
    return tag if tag_exists(registry, repo, tag) else None


# -- cosign -------------------------------------------------------------------------


@dataclass(frozen=True)
class CosignKey:
    """A key pair in cosign's format (``ENCRYPTED SIGSTORE PRIVATE KEY``, scrypt +
    secretbox, ``password``) made by ``cosign import-key-pair`` from ``source``."""

    private_path: Path
    public_path: Path
    password: str
    source: KeyPair


def cosign_env(workdir: Path, password: str = COSIGN_TEST_PASSWORD) -> dict[str, str]:
    """:func:`tool_env` plus COSIGN_PASSWORD and a TUF cache inside ``workdir``."""
    env = tool_env(workdir)
    env["COSIGN_PASSWORD"] = password
    env["TUF_ROOT"] = str(Path(env["HOME"]) / ".sigstore")
    return env


def cosign_import_key(
    key: KeyPair, workdir: Path, *, password: str = COSIGN_TEST_PASSWORD, name: str | None = None
) -> CosignKey:
    """``cosign import-key-pair --key PEM -o PREFIX`` (all of ECDSA P-256/384/521,
    RSA and Ed25519 PKCS#8 keys import and sign with cosign 2.5.3)."""
    cosign = find_producer("cosign")
    workdir = Path(workdir)
    prefix = workdir / "cosign-keys" / (name or f"cosign-{key.key_type}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    run_tool(
        [cosign, "import-key-pair", "--key", str(key.private_path), "-o", str(prefix), "-y"],
        cwd=workdir,
        env=cosign_env(workdir, password),
    )
    return CosignKey(Path(f"{prefix}.key"), Path(f"{prefix}.pub"), password, key)


def _cosign_common(registry: AnyRegistry) -> list[str]:
    return ["--allow-http-registry"] if getattr(registry, "scheme", "http") == "http" else []


def cosign_sign_key(
    registry: AnyRegistry,
    image: Pushed,
    workdir: Path,
    key: CosignKey,
    *,
    referrers_mode: bool = False,
    annotations: Mapping[str, str] | None = None,
    by_tag: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> Signed:
    """``cosign sign --key K --tlog-upload=false`` (simple signing).

    Default: the signature manifest is tagged ``sha256-<hex>.sig`` in the
    image's repository (even on a registry with the referrers API).
    ``referrers_mode``: ``--registry-referrers-mode=oci-1-1`` (needs
    ``COSIGN_EXPERIMENTAL=1``): the same layer pushed as a referrer, config
    media type ``application/vnd.dev.cosign.artifact.sig.v1+json``, no tag.
    """
    return _cosign_sign(
        registry, image, workdir, key, [], referrers_mode, annotations, by_tag, timeout
    )


def cosign_sign_cert(
    registry: AnyRegistry,
    image: Pushed,
    workdir: Path,
    key: CosignKey,
    pki: TestPKI,
    *,
    chain: bool = True,
    referrers_mode: bool = False,
    by_tag: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> Signed:
    """``cosign sign --key K --certificate LEAF [--certificate-chain CHAIN]``
    (no Fulcio, tlog off).  ``key`` must hold the leaf's private key
    (``cosign_import_key(pki.leaf.key, ...)``).  The leaf PEM lands in the
    layer annotation ``dev.sigstore.cosign/certificate`` and the chain
    (intermediate first, root last) in ``dev.sigstore.cosign/chain``."""
    extra = ["--certificate", str(pki.leaf.path)]
    if chain:
        extra += ["--certificate-chain", str(pki.chain_path)]
    return _cosign_sign(registry, image, workdir, key, extra, referrers_mode, None, by_tag, timeout)


def _cosign_sign(
    registry: AnyRegistry,
    image: Pushed,
    workdir: Path,
    key: CosignKey,
    extra: Sequence[str],
    referrers_mode: bool,
    annotations: Mapping[str, str] | None,
    by_tag: bool,
    timeout: float,
) -> Signed:
    cosign = find_producer("cosign")
    repo, digest = _image_parts(image)
    env = cosign_env(workdir, key.password)
    args = [cosign, "sign", "--key", str(key.private_path), *extra, "--tlog-upload=false", "-y"]
    args += _cosign_common(registry)
    for k, v in (annotations or {}).items():
        args += ["-a", f"{k}={v}"]
    before = list_referrers(registry, repo, digest) if referrers_mode else []
    if referrers_mode:
        env["COSIGN_EXPERIMENTAL"] = "1"
        args.append("--registry-referrers-mode=oci-1-1")
    args.append(_subject_ref(registry, image, by_tag))
    run_tool(args, cwd=Path(workdir), env=env, timeout=timeout)
    if referrers_mode:
        manifests = _new_referrers(registry, repo, digest, before)
        return Signed(
            "cosign", registry.host, repo, digest, manifests, _fallback_tag(registry, repo, digest)
        )
    tag = referrers_tag(digest, ".sig")
    return Signed(
        "cosign", registry.host, repo, digest, (registry.manifest_digest(repo, tag),), tag
    )


def cosign_sign_bundle(
    registry: AnyRegistry,
    image: Pushed,
    workdir: Path,
    key: CosignKey,
    pki: TestPKI | None = None,
    *,
    predicate: Mapping[str, Any] | None = None,
    predicate_type: str = "custom",
    by_tag: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> Signed:
    """A Sigstore bundle v0.3 stored as an OCI 1.1 referrer.

    cosign 2.5.3's ``sign`` has no ``--new-bundle-format``: the only command
    that pushes a new-format bundle to a registry is
    ``cosign attest --new-bundle-format``, so this is that (a DSSE envelope
    with an in-toto statement whose subject is the image digest), offline
    (``--tlog-upload=false``), with a key or with ``pki``'s leaf certificate
    (``--certificate``; the bundle carries the leaf only, never the chain).
    Works on a registry without the referrers API too (fallback tag index).
    """
    cosign = find_producer("cosign")
    repo, digest = _image_parts(image)
    workdir = Path(workdir)
    env = cosign_env(workdir, key.password)
    pred = workdir / "predicate.json"
    pred.write_text(json.dumps(dict(predicate or {"csi-oci": "test"})))
    args = [cosign, "attest", "--key", str(key.private_path), "--new-bundle-format"]
    if pki is not None:
        args += ["--certificate", str(pki.leaf.path), "--certificate-chain", str(pki.chain_path)]
    args += ["--predicate", str(pred), "--type", predicate_type, "--tlog-upload=false", "-y"]
    args += [*_cosign_common(registry), _subject_ref(registry, image, by_tag)]
    before = list_referrers(registry, repo, digest)
    run_tool(args, cwd=workdir, env=env, timeout=timeout)
    manifests = _new_referrers(registry, repo, digest, before)
    return Signed(
        "cosign", registry.host, repo, digest, manifests, _fallback_tag(registry, repo, digest)
    )


def cosign_sign_blob_bundle(
    registry: AnyRegistry,
    image: Pushed,
    workdir: Path,
    key: CosignKey,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Signed:
    """A *messageSignature* bundle over the image manifest bytes, attached as a
    referrer: ``cosign sign-blob --new-bundle-format --bundle B`` of the raw
    manifest, then ``oras attach --artifact-type
    application/vnd.dev.sigstore.bundle.v0.3+json``.  (The shape cosign >= 2.6
    ``sign --new-bundle-format`` uses; 2.5.3 cannot push it itself.)  Key
    only: 2.5.3's ``sign-blob`` has no ``--certificate`` flag."""
    cosign = find_producer("cosign")
    repo, digest = _image_parts(image)
    workdir = Path(workdir)
    blob = workdir / "subject-manifest.json"
    resp = registry.get_manifest(repo, digest)
    resp.raise_for_status()
    blob.write_bytes(resp.content)
    bundle = workdir / "blob.sigstore.json"
    args = [cosign, "sign-blob", "--key", str(key.private_path), "--new-bundle-format"]
    args += ["--bundle", str(bundle), "--tlog-upload=false", "-y", str(blob)]
    run_tool(args, cwd=workdir, env=cosign_env(workdir, key.password), timeout=timeout)
    return oras_attach(
        registry, image, workdir, bundle, SIGSTORE_BUNDLE_V03, SIGSTORE_BUNDLE_V03, timeout=timeout
    )


def cosign_trusted_root(pki: TestPKI, workdir: Path, name: str = "trusted_root.json") -> Path:
    """``cosign trusted-root create --fulcio url=...,certificate-chain=CHAIN``:
    a Sigstore TrustedRoot JSON naming the test CA (no tlog, no CT log), which
    ``cosign verify[-attestation] --new-bundle-format --trusted-root`` needs
    for both key and certificate bundles."""
    cosign = find_producer("cosign")
    out = Path(workdir) / name
    run_tool(
        [
            cosign, "trusted-root", "create",
            "--fulcio", f"url=https://fulcio.csi-oci.test,certificate-chain={pki.chain_path}",
            "--out", str(out),
        ],
        cwd=Path(workdir),
        env=cosign_env(workdir),
    )  # fmt: skip
    return out


def cosign_verify(
    registry: AnyRegistry,
    image: Pushed,
    workdir: Path,
    *,
    key: CosignKey | None = None,
    pki: TestPKI | None = None,
    identity: str | None = None,
    oidc_issuer: str | None = None,
    bundle: bool = False,
    attestation_type: str = "custom",
    experimental_oci11: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run ``cosign verify`` (or ``verify-attestation --new-bundle-format`` with
    ``bundle``) offline; raises :class:`ProducerError` when it rejects."""
    cosign = find_producer("cosign")
    workdir = Path(workdir)
    cmd = "verify-attestation" if bundle else "verify"
    args = [cosign, cmd, "--insecure-ignore-tlog", *_cosign_common(registry)]
    if key is not None:
        args += ["--key", str(key.public_path)]
    if bundle:
        args += ["--new-bundle-format", "--type", attestation_type]
        if pki is None:
            raise ValueError("bundle verification needs a pki for the trusted root")
        args += ["--trusted-root", str(cosign_trusted_root(pki, workdir))]
    elif pki is not None and key is None:
        args += ["--certificate-chain", str(pki.chain_path)]
    if key is None:
        args += ["--insecure-ignore-sct"]
        args += (
            ["--certificate-identity", identity or ".*"]
            if identity
            else ["--certificate-identity-regexp", ".*"]
        )
        args += (
            ["--certificate-oidc-issuer", oidc_issuer]
            if oidc_issuer
            else ["--certificate-oidc-issuer-regexp", ".*"]
        )
    if experimental_oci11:
        args.append("--experimental-oci11")
    args.append(_subject_ref(registry, image))
    return run_tool(args, cwd=workdir, env=cosign_env(workdir), timeout=timeout)


# -- oras attach ------------------------------------------------------------------


def oras_attach(
    registry: AnyRegistry,
    image: Pushed,
    workdir: Path,
    file: Path,
    artifact_type: str,
    media_type: str | None = None,
    *,
    annotations: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Signed:
    """``oras attach --artifact-type T REF@DIGEST FILE[:MEDIATYPE]`` from the
    file's directory (title = its basename); falls back to the referrers tag
    schema by itself on a registry without the API."""
    oras = find_producer("oras")
    repo, digest = _image_parts(image)
    file = Path(file)
    args = [oras, "attach", "--plain-http", "--no-tty", "--format", "json"]
    args += ["--artifact-type", artifact_type]
    for k, v in (annotations or {}).items():
        args += ["--annotation", f"{k}={v}"]
    spec = f"{file.name}:{media_type}" if media_type else file.name
    args += [_subject_ref(registry, image), spec]
    proc = run_tool(args, cwd=file.parent, env=tool_env(Path(workdir)), timeout=timeout)
    try:
        pushed = json.loads(proc.stdout)["digest"]
    except (ValueError, KeyError) as exc:
        raise SigningError(f"unexpected 'oras attach' output: {proc.stdout!r}") from exc
    return Signed(
        "oras", registry.host, repo, digest, (pushed,), _fallback_tag(registry, repo, digest)
    )


# -- notation -----------------------------------------------------------------------


@dataclass(frozen=True)
class NotationConfig:
    """Notation's config dir (``$XDG_CONFIG_HOME/notation`` of ``workdir``'s
    tool env) with a local signing key, a CA trust store and a trust policy."""

    workdir: Path
    config_dir: Path
    key_name: str
    trust_store: str


def notation_setup(
    workdir: Path,
    pki: TestPKI,
    *,
    key_name: str = "csi-oci-test",
    trusted_identities: Sequence[str] = ("*",),
) -> NotationConfig:
    """Write notation 1.3.2's config for ``pki`` (no plugin needed):

    * ``signingkeys.json``: ``{"default": NAME, "keys": [{"name", "keyPath",
      "certPath"}]}``, ``keyPath`` the leaf's PKCS#8 key, ``certPath`` the
      full chain (leaf first, root last: notation puts it all in x5c);
    * ``truststore/x509/ca/NAME/root.pem``: the root CA;
    * ``trustpolicy.json`` (version 1.0, one policy for ``*``, level strict,
      ``trustStores: ["ca:NAME"]``, ``trusted_identities``; an identity is
      ``x509.subject: <DN>``).
    """
    env = tool_env(Path(workdir))
    cfg = Path(env["XDG_CONFIG_HOME"]) / "notation"
    cfg.mkdir(parents=True, exist_ok=True)
    keys = {
        "default": key_name,
        "keys": [
            {
                "name": key_name,
                "keyPath": str(pki.leaf.key.private_path),
                "certPath": str(pki.fullchain_path),
            }
        ],
    }
    (cfg / "signingkeys.json").write_text(json.dumps(keys, indent=2))
    store = cfg / "truststore" / "x509" / "ca" / key_name
    store.mkdir(parents=True, exist_ok=True)
    (store / "root.pem").write_bytes(pki.root.pem)
    policy = {
        "version": "1.0",
        "trustPolicies": [
            {
                "name": "csi-oci-test",
                "registryScopes": ["*"],
                "signatureVerification": {"level": "strict"},
                "trustStores": [f"ca:{key_name}"],
                "trustedIdentities": list(trusted_identities),
            }
        ],
    }
    (cfg / "trustpolicy.json").write_text(json.dumps(policy, indent=2))
    return NotationConfig(Path(workdir), cfg, key_name, f"ca:{key_name}")


def notation_sign(
    registry: AnyRegistry,
    image: Pushed,
    config: NotationConfig,
    *,
    signature_format: Literal["jws", "cose"] = "jws",
    force_referrers_tag: bool | None = None,
    user_metadata: Mapping[str, str] | None = None,
    by_tag: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> Signed:
    """``notation sign --insecure-registry --signature-format F`` with the
    local key of ``config``.

    notation 1.3.2 defaults to ``--force-referrers-tag=true`` (always the
    ``sha256-<hex>`` index, even where the referrers API exists, and then
    ``notation verify`` on olareg does not find it).  ``force_referrers_tag``
    None means: ``false`` on a registry with the API, ``true`` otherwise.
    """
    notation = find_producer("notation")
    repo, digest = _image_parts(image)
    if force_referrers_tag is None:
        force_referrers_tag = not has_referrers_api(registry)
    args = [notation, "sign", "--insecure-registry", "--signature-format", signature_format]
    args += [f"--force-referrers-tag={'true' if force_referrers_tag else 'false'}"]
    args += ["--key", config.key_name]
    for k, v in (user_metadata or {}).items():
        args += ["-m", f"{k}={v}"]
    args.append(_subject_ref(registry, image, by_tag))
    if force_referrers_tag or not has_referrers_api(registry):
        before = (
            []
            if not tag_exists(registry, repo, referrers_tag(digest))
            else list(get_json(registry, repo, referrers_tag(digest)).get("manifests") or [])
        )
    else:
        before = list_referrers(registry, repo, digest)
    run_tool(args, cwd=config.workdir, env=tool_env(config.workdir), timeout=timeout)
    if force_referrers_tag or not has_referrers_api(registry):
        tag = referrers_tag(digest)
        index = get_json(registry, repo, tag).get("manifests") or []
        seen = {m["digest"] for m in before}
        manifests = tuple(m["digest"] for m in index if m["digest"] not in seen)
        return Signed("notation", registry.host, repo, digest, manifests, tag)
    manifests = _new_referrers(registry, repo, digest, before)
    return Signed("notation", registry.host, repo, digest, manifests, None)


def notation_verify(
    registry: AnyRegistry,
    image: Pushed,
    config: NotationConfig,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """``notation verify --insecure-registry REF@DIGEST`` with ``config``'s policy."""
    notation = find_producer("notation")
    args = [notation, "verify", "--insecure-registry", _subject_ref(registry, image)]
    return run_tool(args, cwd=config.workdir, env=tool_env(config.workdir), timeout=timeout)


# -- model-signing (OpenSSF model signing) ----------------------------------------------


def model_signing_cli() -> str:
    """The ``model_signing`` CLI of the running venv (model-signing 1.1.1)."""
    import sys

    candidate = Path(sys.executable).with_name("model_signing")
    if candidate.is_file():
        return str(candidate)
    return find_producer("model_signing")


@dataclass(frozen=True)
class ModelSignature:
    """A model-signing bundle: ``path`` (``model.sig``), its JSON and the
    decoded in-toto statement."""

    path: Path
    bundle: dict[str, Any]

    @property
    def statement(self) -> dict[str, Any]:
        return json.loads(base64.b64decode(self.bundle["dsseEnvelope"]["payload"]))  # type: ignore[no-any-return]

    @property
    def resources(self) -> dict[str, str]:
        """``name -> sha256 hex`` of every signed file."""
        return {r["name"]: r["digest"] for r in self.statement["predicate"]["resources"]}


def model_sign(
    model_dir: Path,
    workdir: Path,
    *,
    key: KeyPair | None = None,
    pki: TestPKI | None = None,
    signature: Path | None = None,
    ignore_paths: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> ModelSignature:
    """``model_signing sign key|certificate MODEL_DIR --signature SIG``.

    ``key`` (an ECDSA key: model-signing 1.1.1 refuses RSA and Ed25519 with
    ``'...RSA' object has no attribute 'curve'``) or ``pki`` (its leaf key,
    leaf certificate and ``chain_path``).  ``signature`` defaults to
    ``MODEL_DIR/model.sig``; a signature inside the directory is added to the
    statement's ``ignore_paths`` by the tool.
    """
    if (key is None) == (pki is None):
        raise ValueError("give exactly one of key and pki")
    model_dir = Path(model_dir)
    signature = Path(signature) if signature else model_dir / "model.sig"
    args = [model_signing_cli(), "sign"]
    if key is not None:
        args += ["key", "--private_key", str(key.private_path)]
    else:
        assert pki is not None
        args += ["certificate", "--private_key", str(pki.leaf.key.private_path)]
        args += ["--signing_certificate", str(pki.leaf.path)]
        args += ["--certificate_chain", str(pki.chain_path)]
    for p in ignore_paths:
        args += ["--ignore-paths", p]
    args += ["--signature", str(signature), str(model_dir)]
    run_tool(args, cwd=Path(workdir), env=tool_env(Path(workdir)), timeout=timeout)
    return ModelSignature(signature, json.loads(signature.read_text()))


def model_verify(
    model_dir: Path,
    signature: Path,
    workdir: Path,
    *,
    key: KeyPair | None = None,
    pki: TestPKI | None = None,
    ignore_paths: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """``model_signing verify key --public_key PUB`` or ``verify certificate
    --certificate_chain CHAIN`` (the CA chain, root included)."""
    if (key is None) == (pki is None):
        raise ValueError("give exactly one of key and pki")
    args = [model_signing_cli(), "verify"]
    if key is not None:
        args += ["key", "--public_key", str(key.public_path)]
    else:
        assert pki is not None
        args += ["certificate", "--certificate_chain", str(pki.chain_path)]
    for p in ignore_paths:
        args += ["--ignore-paths", p]
    args += ["--signature", str(signature), str(model_dir)]
    return run_tool(args, cwd=Path(workdir), env=tool_env(Path(workdir)), timeout=timeout)


def push_model_with_signature(
    registry: AnyRegistry,
    repo_tag: str,
    workdir: Path,
    model_dir: Path,
    *,
    artifact_type: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Pushed:
    """``oras push`` every regular file under ``model_dir`` (``model.sig``
    included) as its own layer, titled with its path relative to
    ``model_dir`` (run from there), media type ``application/vnd.oci.image.layer.v1.tar``."""
    oras = find_producer("oras")
    model_dir = Path(model_dir)
    names = sorted(
        p.relative_to(model_dir).as_posix()
        for p in model_dir.rglob("*")
        if p.is_file() and not p.is_symlink()
    )
    args = [oras, "push", "--plain-http", "--no-tty", "--format", "json"]
    if artifact_type:
        args += ["--artifact-type", artifact_type]
    args += [f"{registry.host}/{repo_tag}", *names]
    proc = run_tool(args, cwd=model_dir, env=tool_env(Path(workdir)), timeout=timeout)
    digest = json.loads(proc.stdout)["digest"]
    repo, tag = _split_repo_tag(repo_tag)
    if registry.manifest_digest(repo, tag) != digest:
        raise SigningError(f"oras pushed {digest} but {repo}:{tag} is something else")
    return Pushed(f"{registry.host}/{repo_tag}", digest)


def attach_model_signature(
    registry: AnyRegistry,
    image: Pushed,
    workdir: Path,
    signature: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Signed:
    """Attach ``model.sig`` to ``image`` as a referrer: ``oras attach
    --artifact-type application/vnd.dev.sigstore.bundle.v0.3+json``, layer
    media type the same, title = the file's basename."""
    return oras_attach(
        registry, image, workdir, Path(signature), SIGSTORE_BUNDLE_V03, SIGSTORE_BUNDLE_V03,
        timeout=timeout,
    )  # fmt: skip
