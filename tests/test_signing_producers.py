"""The real signing tools, driven offline by tests/support/signing.py, against
docker-registry 2.8 (no referrers API: tag fallback) and olareg (referrers API).

Each test pins what a pinned tool writes (media types, tags, payloads, which
digest is signed, which hash) and that the tool's own verifier accepts it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support import signing as s
from tests.support.producers import ProducerError, missing_producers


def need(*tools: str) -> None:
    missing = missing_producers(*tools)
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (run hack/install-deps)")


def repo_tag(prefix: str) -> str:
    return f"sig/{prefix}-{uuid.uuid4().hex[:8]}:v1"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def accepted_hashes(pub, sig: bytes, data: bytes) -> list[str]:
    """Which (scheme, hash) verify ``sig`` over ``data``."""
    found = []
    if isinstance(pub, ed25519.Ed25519PublicKey):
        try:
            pub.verify(sig, data)
            found.append("ed25519")
        except InvalidSignature:
            pass
        return found
    for h in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512()):
        schemes = (
            [("ecdsa", ec.ECDSA(h))]
            if isinstance(pub, ec.EllipticCurvePublicKey)
            else [
                ("pkcs1v15", padding.PKCS1v15()),
                ("pss", padding.PSS(padding.MGF1(h), padding.PSS.AUTO)),
            ]
        )
        for name, scheme in schemes:
            try:
                if isinstance(pub, rsa.RSAPublicKey):
                    pub.verify(sig, data, scheme, h)
                else:
                    pub.verify(sig, data, scheme)
                found.append(f"{name}-{h.name}")
            except InvalidSignature:
                pass
    return found


def pae(payload_type: str, payload: bytes) -> bytes:
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> s.TestPKI:
    return s.make_pki(
        tmp_path_factory.mktemp("pki"),
        emails=["signer@example.test"],
        uris=["https://ci.example.test/build"],
        oidc_issuer="https://issuer.example.test",
    )


@pytest.fixture(scope="module")
def leaf_cosign_key(pki, tmp_path_factory) -> s.CosignKey:
    need("cosign")
    return s.cosign_import_key(pki.leaf.key, tmp_path_factory.mktemp("cosign"), name="leaf")


# -- PKI and registries ---------------------------------------------------------------


def test_pki_leaf_meets_notation_and_fulcio_rules(pki):
    leaf = pki.leaf.certificate
    ext = leaf.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CODE_SIGNING
    ]
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["signer@example.test"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "https://ci.example.test/build"
    ]
    v1 = ext.get_extension_for_oid(s.OID_FULCIO_ISSUER_V1).value.value
    v2 = ext.get_extension_for_oid(s.OID_FULCIO_ISSUER_V2).value.value
    assert v1 == b"https://issuer.example.test"
    assert v2 == b"\x0c\x1b" + b"https://issuer.example.test"  # DER UTF8String
    # chain order: issuer first, root last; fullchain = leaf + chain
    chain = x509.load_pem_x509_certificates(pki.chain_path.read_bytes())
    assert [c.subject for c in chain] == [
        pki.intermediate.certificate.subject,
        pki.root.certificate.subject,
    ]
    full = x509.load_pem_x509_certificates(pki.fullchain_path.read_bytes())
    assert full[0] == leaf and full[1:] == chain
    leaf.verify_directly_issued_by(pki.intermediate.certificate)
    pki.intermediate.certificate.verify_directly_issued_by(pki.root.certificate)


def test_olareg_referrers_api_push_and_retag(referrers_registry):
    reg = referrers_registry
    a = s.push_tiny_image(reg, repo_tag("olareg"), content=b"a")
    b = s.push_tiny_image(reg, f"{a.repo}:other", content=b"b")
    assert a.digest != b.digest
    # no referrers: olareg answers {"manifests": null}
    resp = reg.request("GET", f"/v2/{a.repo}/referrers/{a.digest}")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == s.OCI_INDEX
    assert resp.json()["manifests"] is None
    assert s.list_referrers(reg, a.repo, a.digest) == []
    # moving a tag
    assert s.retag(reg, a.repo, "other", a.tag) == b.digest
    assert reg.manifest_digest(a.repo, a.tag) == b.digest


# -- cosign ---------------------------------------------------------------------------

COSIGN_HASHES = {
    # cosign 2.5.3 signs with SHA-256 whatever the curve; RSA is PKCS#1 v1.5.
    "ecdsa-p256": "ecdsa-sha256",
    "ecdsa-p384": "ecdsa-sha256",
    "ecdsa-p521": "ecdsa-sha256",
    "rsa-3072": "pkcs1v15-sha256",
    "ed25519": "ed25519",
}


@pytest.mark.parametrize("key_type", sorted(COSIGN_HASHES))
def test_cosign_sign_key_simple_signing(registry, tmp_path, key_type):
    need("cosign")
    keys = s.generate_key_pair(key_type, tmp_path / "keys")
    ck = s.cosign_import_key(keys, tmp_path)
    assert ck.private_path.read_text().startswith("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----")
    image = s.push_tiny_image(registry, repo_tag(f"cosign-{key_type}"), content=key_type.encode())
    signed = s.cosign_sign_key(registry, image, tmp_path, ck)
    assert signed.tag == f"sha256-{image.digest.removeprefix('sha256:')}.sig"
    manifest = s.get_json(registry, image.repo, signed.manifests[0])
    assert manifest["mediaType"] == s.OCI_MANIFEST
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert "subject" not in manifest and "artifactType" not in manifest
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == s.COSIGN_SIMPLESIGNING
    payload = s.get_blob_bytes(registry, image.repo, layer["digest"])
    doc = json.loads(payload)
    assert doc["critical"] == {
        "identity": {"docker-reference": f"{registry.host}/{image.repo}"},
        "image": {"docker-manifest-digest": image.digest},
        "type": "cosign container image signature",
    }
    assert doc["optional"] is None
    sig = base64.b64decode(layer["annotations"]["dev.cosignproject.cosign/signature"])
    assert accepted_hashes(keys.public_key, sig, payload) == [COSIGN_HASHES[key_type]]
    out = s.cosign_verify(registry, image, tmp_path, key=ck)
    assert image.digest in out.stdout


def test_cosign_sign_uses_sig_tag_even_with_referrers_api(
    referrers_registry, tmp_path, leaf_cosign_key
):
    reg = referrers_registry
    image = s.push_tiny_image(reg, repo_tag("cosign-olareg"))
    signed = s.cosign_sign_key(reg, image, tmp_path, leaf_cosign_key)
    assert s.tag_exists(reg, image.repo, signed.tag)
    assert s.list_referrers(reg, image.repo, image.digest) == []


def test_cosign_sign_certificate_chain(registry, tmp_path, pki, leaf_cosign_key):
    image = s.push_tiny_image(registry, repo_tag("cosign-cert"))
    signed = s.cosign_sign_cert(registry, image, tmp_path, leaf_cosign_key, pki)
    manifest = s.get_json(registry, image.repo, signed.manifests[0])
    ann = manifest["layers"][0]["annotations"]
    assert x509.load_pem_x509_certificate(ann["dev.sigstore.cosign/certificate"].encode()) == (
        pki.leaf.certificate
    )
    assert x509.load_pem_x509_certificates(ann["dev.sigstore.cosign/chain"].encode()) == [
        c.certificate for c in pki.cas
    ]
    payload = s.get_blob_bytes(registry, image.repo, manifest["layers"][0]["digest"])
    sig = base64.b64decode(ann["dev.cosignproject.cosign/signature"])
    assert accepted_hashes(pki.leaf.key.public_key, sig, payload) == ["ecdsa-sha256"]
    out = s.cosign_verify(
        registry, image, tmp_path, pki=pki,
        identity="signer@example.test", oidc_issuer="https://issuer.example.test",
    )  # fmt: skip
    (claim,) = json.loads(out.stdout)
    # cosign reports the certificate identity in the (unsigned) "optional" part
    assert claim["optional"]["Subject"] == "signer@example.test"
    assert claim["optional"]["Issuer"] == "https://issuer.example.test"
    with pytest.raises(ProducerError, match="none of the expected identities matched"):
        s.cosign_verify(
            registry, image, tmp_path, pki=pki,
            identity="mallory@example.test", oidc_issuer="https://issuer.example.test",
        )  # fmt: skip


def test_cosign_referrers_mode_oci_1_1(referrers_registry, tmp_path, leaf_cosign_key):
    reg = referrers_registry
    image = s.push_tiny_image(reg, repo_tag("cosign-oci11"))
    signed = s.cosign_sign_key(reg, image, tmp_path, leaf_cosign_key, referrers_mode=True)
    assert signed.tag is None
    assert not s.tag_exists(reg, image.repo, s.referrers_tag(image.digest, ".sig"))
    (desc,) = s.list_referrers(reg, image.repo, image.digest)
    assert desc["artifactType"] == s.COSIGN_ARTIFACT_TYPE_SIG
    manifest = s.get_json(reg, image.repo, signed.manifests[0])
    assert "artifactType" not in manifest  # the API derives it from config.mediaType
    assert manifest["config"]["mediaType"] == s.COSIGN_ARTIFACT_TYPE_SIG
    assert manifest["subject"]["digest"] == image.digest
    assert manifest["layers"][0]["mediaType"] == s.COSIGN_SIMPLESIGNING
    s.cosign_verify(reg, image, tmp_path, key=leaf_cosign_key, experimental_oci11=True)
    with pytest.raises(ProducerError, match="no signatures found"):
        s.cosign_verify(reg, image, tmp_path, key=leaf_cosign_key)


@pytest.mark.parametrize("with_cert", [False, True], ids=["key", "cert"])
@pytest.mark.parametrize("which", ["olareg", "distribution"])
def test_cosign_attest_new_bundle_format(request, tmp_path, pki, leaf_cosign_key, with_cert, which):
    reg = request.getfixturevalue("referrers_registry" if which == "olareg" else "registry")
    image = s.push_tiny_image(reg, repo_tag("cosign-bundle"))
    signed = s.cosign_sign_bundle(
        reg, image, tmp_path, leaf_cosign_key, pki if with_cert else None,
        predicate={"hello": "world"},
    )  # fmt: skip
    (digest,) = signed.manifests
    (desc,) = s.list_referrers(reg, image.repo, image.digest)
    if which == "olareg":
        assert signed.tag is None
        assert desc["artifactType"] == s.SIGSTORE_BUNDLE_V03
        assert desc["annotations"]["dev.sigstore.bundle.content"] == "dsse-envelope"
    else:
        assert signed.tag == s.referrers_tag(image.digest)
        # cosign's fallback index entry names the *config* media type
        assert desc["artifactType"] == s.OCI_EMPTY
    manifest = s.get_json(reg, image.repo, digest)
    assert manifest["artifactType"] == s.SIGSTORE_BUNDLE_V03
    assert manifest["config"]["mediaType"] == s.OCI_EMPTY
    assert manifest["config"]["artifactType"] == s.SIGSTORE_BUNDLE_V03
    assert manifest["subject"]["digest"] == image.digest
    assert manifest["annotations"]["dev.sigstore.bundle.content"] == "dsse-envelope"
    assert manifest["annotations"]["dev.sigstore.bundle.predicateType"] == (
        "https://cosign.sigstore.dev/attestation/v1"
    )
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == s.SIGSTORE_BUNDLE_V03
    bundle = json.loads(s.get_blob_bytes(reg, image.repo, layer["digest"]))
    assert set(bundle) == {"mediaType", "verificationMaterial", "dsseEnvelope"}
    vm = bundle["verificationMaterial"]
    if with_cert:
        assert set(vm) == {"certificate"}  # leaf only: no chain, no tlog entries
        cert = x509.load_der_x509_certificate(base64.b64decode(vm["certificate"]["rawBytes"]))
        assert cert == pki.leaf.certificate
    else:
        spki = pki.leaf.key.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert vm == {
            "publicKey": {"hint": base64.b64encode(hashlib.sha256(spki).digest()).decode()}
        }
    env = bundle["dsseEnvelope"]
    assert env["payloadType"] == s.IN_TOTO_PAYLOAD
    payload = base64.b64decode(env["payload"])
    statement = json.loads(payload)
    assert statement["_type"] == "https://in-toto.io/Statement/v0.1"
    assert statement["subject"] == [
        {
            "name": f"{reg.host}/{image.repo}",
            "digest": {"sha256": image.digest.removeprefix("sha256:")},
        }
    ]
    assert json.loads(statement["predicate"]["Data"]) == {"hello": "world"}
    (sig,) = env["signatures"]
    assert set(sig) == {"sig"}
    assert accepted_hashes(
        pki.leaf.key.public_key, base64.b64decode(sig["sig"]), pae(env["payloadType"], payload)
    ) == ["ecdsa-sha256"]
    if not with_cert:
        s.cosign_verify(reg, image, tmp_path, key=leaf_cosign_key, pki=pki, bundle=True)
        return
    # The bundle verifier (sigstore-go) sees ONE SAN: the URI wins over the email.
    s.cosign_verify(
        reg, image, tmp_path, pki=pki, bundle=True,
        identity="https://ci.example.test/build", oidc_issuer="https://issuer.example.test",
    )  # fmt: skip
    with pytest.raises(ProducerError, match=r'expected SAN value "signer@example\.test"'):
        s.cosign_verify(
            reg, image, tmp_path, pki=pki, bundle=True,
            identity="signer@example.test", oidc_issuer="https://issuer.example.test",
        )  # fmt: skip


def test_cosign_blob_bundle_referrer_signs_manifest_bytes(
    referrers_registry, tmp_path, pki, leaf_cosign_key
):
    need("oras")
    reg = referrers_registry
    image = s.push_tiny_image(reg, repo_tag("cosign-blob"))
    signed = s.cosign_sign_blob_bundle(reg, image, tmp_path, leaf_cosign_key)
    (desc,) = s.list_referrers(reg, image.repo, image.digest, s.SIGSTORE_BUNDLE_V03)
    manifest = s.get_json(reg, image.repo, signed.manifests[0])
    assert desc["digest"] == signed.manifests[0]
    assert manifest["artifactType"] == s.SIGSTORE_BUNDLE_V03
    assert manifest["config"] == {
        "mediaType": s.OCI_EMPTY,
        "digest": s.sha256_digest(b"{}"),
        "size": 2,
        "data": "e30=",
    }
    bundle = json.loads(s.get_blob_bytes(reg, image.repo, manifest["layers"][0]["digest"]))
    ms = bundle["messageSignature"]
    raw = reg.get_manifest(image.repo, image.digest).content
    assert ms["messageDigest"] == {
        "algorithm": "SHA2_256",
        "digest": base64.b64encode(hashlib.sha256(raw).digest()).decode(),
    }
    sig = base64.b64decode(ms["signature"])
    assert accepted_hashes(pki.leaf.key.public_key, sig, raw) == ["ecdsa-sha256"]


def test_tag_moved_after_signing(registry, tmp_path, leaf_cosign_key):
    signed_img = s.push_tiny_image(registry, repo_tag("moved"), content=b"good")
    other = s.push_tiny_image(registry, f"{signed_img.repo}:evil", content=b"evil")
    sig = s.cosign_sign_key(registry, signed_img, tmp_path, leaf_cosign_key, by_tag=True)
    assert sig.subject == signed_img.digest
    s.retag(registry, signed_img.repo, "evil", signed_img.tag)
    assert registry.manifest_digest(signed_img.repo, signed_img.tag) == other.digest
    # the signature still names the old digest; nothing is signed for the new one
    assert s.tag_exists(registry, signed_img.repo, s.referrers_tag(signed_img.digest, ".sig"))
    assert not s.tag_exists(registry, signed_img.repo, s.referrers_tag(other.digest, ".sig"))
    moved = s.Pushed(signed_img.reference, other.digest)
    with pytest.raises(ProducerError, match="no signatures found"):
        s.cosign_verify(registry, moved, tmp_path, key=leaf_cosign_key)


# -- notation ------------------------------------------------------------------------

NOTATION_ALG = {
    "rsa-2048": ("PS256", -37),
    "rsa-3072": ("PS384", -38),
    "ecdsa-p256": ("ES256", -7),
    "ecdsa-p384": ("ES384", -35),
    "ecdsa-p521": ("ES512", -36),
}


@pytest.fixture(scope="module", params=sorted(NOTATION_ALG))
def notation_pki(request, tmp_path_factory):
    need("notation")
    pki = s.make_pki(
        tmp_path_factory.mktemp("notation-pki"),
        leaf_key_type=request.param,
        subject_cn="csi-oci notation signer",
        emails=(),
        name=f"notation-{request.param}",
    )
    return request.param, pki, s.notation_setup(tmp_path_factory.mktemp("notation"), pki)


@pytest.mark.parametrize("fmt", ["jws", "cose"])
@pytest.mark.parametrize("which", ["olareg", "distribution"])
def test_notation_sign(request, notation_pki, fmt, which):
    key_type, pki, config = notation_pki
    reg = request.getfixturevalue("referrers_registry" if which == "olareg" else "registry")
    image = s.push_tiny_image(reg, repo_tag(f"notation-{fmt}"), content=f"{fmt}{key_type}".encode())
    signed = s.notation_sign(reg, image, config, signature_format=fmt)
    (digest,) = signed.manifests
    if which == "olareg":
        assert signed.tag is None and not s.tag_exists(
            reg, image.repo, s.referrers_tag(image.digest)
        )
    else:
        assert signed.tag == s.referrers_tag(image.digest)
    (desc,) = s.list_referrers(reg, image.repo, image.digest)
    assert desc["artifactType"] == s.NOTATION_ARTIFACT_TYPE
    manifest = s.get_json(reg, image.repo, digest)
    assert "artifactType" not in manifest
    assert manifest["config"] == {
        "mediaType": s.NOTATION_ARTIFACT_TYPE,
        "digest": s.sha256_digest(b"{}"),
        "size": 2,
    }
    assert manifest["subject"] == {"mediaType": s.OCI_MANIFEST, "digest": image.digest, "size": 401}
    thumbs = json.loads(manifest["annotations"]["io.cncf.notary.x509chain.thumbprint#S256"])
    chain = [pki.leaf, *pki.cas]
    assert thumbs == [
        sha256_hex(c.certificate.public_bytes(serialization.Encoding.DER)) for c in chain
    ]
    (layer,) = manifest["layers"]
    blob = s.get_blob_bytes(reg, image.repo, layer["digest"])
    jws_alg, cose_alg = NOTATION_ALG[key_type]
    target = {"targetArtifact": {"mediaType": s.OCI_MANIFEST, "digest": image.digest, "size": 401}}
    if fmt == "jws":
        assert layer["mediaType"] == s.NOTATION_JWS
        env = json.loads(blob)
        assert set(env) == {"payload", "protected", "header", "signature"}
        protected = json.loads(base64.urlsafe_b64decode(env["protected"] + "=="))
        assert protected["alg"] == jws_alg
        assert protected["cty"] == s.NOTATION_PAYLOAD
        assert protected["crit"] == ["io.cncf.notary.signingScheme"]
        assert protected["io.cncf.notary.signingScheme"] == "notary.x509"
        assert "io.cncf.notary.signingTime" in protected
        x5c = [base64.b64decode(c) for c in env["header"]["x5c"]]
        assert env["header"]["io.cncf.notary.signingAgent"] == "notation-go/1.3.2"
        assert json.loads(base64.urlsafe_b64decode(env["payload"] + "==")) == target
    else:
        assert layer["mediaType"] == s.NOTATION_COSE
        msg = cbor2.loads(blob)
        assert msg.tag == 18  # COSE_Sign1
        protected_raw, unprotected, payload, _sig = msg.value
        protected = cbor2.loads(protected_raw)
        assert protected[1] == cose_alg
        assert protected[2] == ["io.cncf.notary.signingScheme"]
        assert protected[3] == s.NOTATION_PAYLOAD
        assert protected["io.cncf.notary.signingScheme"] == "notary.x509"
        assert "io.cncf.notary.signingTime" in protected
        x5c = list(unprotected[33])  # COSE x5chain (label 33), DER, leaf first
        assert unprotected["io.cncf.notary.signingAgent"] == "notation-go/1.3.2"
        assert json.loads(payload) == target
    assert x5c == [c.certificate.public_bytes(serialization.Encoding.DER) for c in chain]
    out = s.notation_verify(reg, image, config)
    assert "Successfully verified" in out.stdout


def test_notation_default_tag_schema_is_invisible_to_referrers_api(
    referrers_registry, notation_pki
):
    _, _, config = notation_pki
    reg = referrers_registry
    image = s.push_tiny_image(reg, repo_tag("notation-forced-tag"))
    signed = s.notation_sign(reg, image, config, force_referrers_tag=True)
    assert signed.tag == s.referrers_tag(image.digest) and len(signed.manifests) == 1
    # olareg keeps the tag index apart from its referrers API ...
    assert s.list_referrers(reg, image.repo, image.digest) == []
    # ... so notation verify (which asks the API) does not find the signature
    with pytest.raises(ProducerError, match="no signature is associated"):
        s.notation_verify(reg, image, config)


# -- model-signing -------------------------------------------------------------------

MODEL_FILES = {
    "weights.bin": b"\0" * 4096,
    "config.json": b"{}",
    "sub/tokenizer.txt": b"tok",
    ".gitattributes": b"*.bin filter=lfs\n",
    ".git/HEAD": b"ref: refs/heads/main\n",
}


def make_model(root: Path) -> Path:
    for name, data in MODEL_FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.mark.parametrize("mode", ["key-p256", "key-p384", "cert"])
def test_model_sign(tmp_path, pki, mode):
    model = make_model(tmp_path / "mymodel")
    if mode == "cert":
        sig = s.model_sign(model, tmp_path, pki=pki)
    else:
        keys = s.generate_key_pair("ecdsa-" + mode[-4:], tmp_path / "keys")
        sig = s.model_sign(model, tmp_path, key=keys)
    assert sig.path == model / "model.sig"
    b = sig.bundle
    assert b["mediaType"] == s.SIGSTORE_BUNDLE_V03
    vm = b["verificationMaterial"]
    assert vm["tlogEntries"] == []
    if mode == "cert":
        certs = [
            base64.b64decode(c["rawBytes"]) for c in vm["x509CertificateChain"]["certificates"]
        ]
        assert certs == [
            c.certificate.public_bytes(serialization.Encoding.DER) for c in [pki.leaf, *pki.cas]
        ]
        pub = pki.leaf.key.public_key
        expected = ["ecdsa-sha256"]
    else:
        # the hint is the hex sha256 of the PEM (not DER) public key file
        assert vm["publicKey"]["hint"] == sha256_hex(keys.public_path.read_bytes())
        pub = keys.public_key
        expected = ["ecdsa-sha256" if mode == "key-p256" else "ecdsa-sha384"]
    env = b["dsseEnvelope"]
    assert env["payloadType"] == s.IN_TOTO_PAYLOAD
    payload = base64.b64decode(env["payload"])
    (signature,) = env["signatures"]
    assert (
        accepted_hashes(pub, base64.b64decode(signature["sig"]), pae(env["payloadType"], payload))
        == expected
    )
    st = sig.statement
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == s.MODEL_SIGNING_PREDICATE
    assert sorted(st["predicate"]["serialization"]["ignore_paths"]) == sorted(
        ["model.sig", ".git", ".github", ".gitignore", ".gitattributes"]
    )
    assert st["predicate"]["serialization"]["method"] == "files"
    assert st["predicate"]["serialization"]["hash_type"] == "sha256"
    assert sig.resources == {
        n: sha256_hex(d) for n, d in MODEL_FILES.items() if not n.startswith(".git")
    }
    assert [r["name"] for r in st["predicate"]["resources"]] == sorted(sig.resources)
    concat = b"".join(bytes.fromhex(r["digest"]) for r in st["predicate"]["resources"])
    assert st["subject"] == [{"name": "mymodel", "digest": {"sha256": sha256_hex(concat)}}]
    kw = {"pki": pki} if mode == "cert" else {"key": keys}
    s.model_verify(model, sig.path, tmp_path, **kw)
    (model / "extra.txt").write_bytes(b"x")
    with pytest.raises(ProducerError, match="Extra files found"):
        s.model_verify(model, sig.path, tmp_path, **kw)


@pytest.mark.parametrize("key_type", ["rsa-3072", "ed25519"])
def test_model_sign_refuses_non_ec_keys(tmp_path, key_type):
    keys = s.generate_key_pair(key_type, tmp_path / "keys")
    with pytest.raises(ProducerError, match="has no attribute 'curve'"):
        s.model_sign(make_model(tmp_path / "m"), tmp_path, key=keys)


@pytest.mark.parametrize("which", ["olareg", "distribution"])
def test_model_push_and_attach_signature(request, tmp_path, pki, which):
    need("oras")
    reg = request.getfixturevalue("referrers_registry" if which == "olareg" else "registry")
    model = make_model(tmp_path / "m")
    sig = s.model_sign(model, tmp_path, pki=pki)
    pushed = s.push_model_with_signature(reg, repo_tag("model"), tmp_path, model)
    manifest = s.get_json(reg, pushed.repo, pushed.digest)
    titles = {ly["annotations"]["org.opencontainers.image.title"]: ly for ly in manifest["layers"]}
    assert sorted(titles) == sorted([*MODEL_FILES, "model.sig"])
    assert titles["model.sig"]["digest"] == s.sha256_digest(sig.path.read_bytes())
    attached = s.attach_model_signature(reg, pushed, tmp_path, sig.path)
    (desc,) = s.list_referrers(reg, pushed.repo, pushed.digest)
    assert desc["digest"] == attached.manifests[0]
    assert desc["artifactType"] == s.SIGSTORE_BUNDLE_V03
    ref = s.get_json(reg, pushed.repo, attached.manifests[0])
    assert ref["subject"]["digest"] == pushed.digest
    (layer,) = ref["layers"]
    assert layer["mediaType"] == s.SIGSTORE_BUNDLE_V03
    assert layer["annotations"]["org.opencontainers.image.title"] == "model.sig"
    assert s.get_blob_bytes(reg, pushed.repo, layer["digest"]) == sig.path.read_bytes()
    assert attached.tag == (None if which == "olareg" else s.referrers_tag(pushed.digest))
