"""Sigstore bundles against a rule's trusted root, offline: real keyless bundles
from Sigstore's public-good and staging instances (tests/data/sigstore), checked
by sigstore-python (chain at the logged time, SCT, tlog inclusion proof and
checkpoint, timestamps) and then by the rule's identity patterns."""

from __future__ import annotations

import base64
import importlib.resources
import json
from pathlib import Path

import pytest

from csi_oci.verify import bundle
from csi_oci.verify.policy import Kind, Requirement
from csi_oci.verify.trust import (
    RANK_BAD_SIGNATURE,
    RANK_IDENTITY,
    RANK_MALFORMED,
    RANK_OTHER_DIGEST,
    CertTrust,
    IdentityPattern,
    SignatureRejected,
)

DATA = Path(__file__).parent / "data" / "sigstore"
PUBLIC_GOOD = DATA / "public-good-github-actions.sigstore.json"
STAGING = DATA / "staging-email.sigstore.json"
PUBLIC_DIGEST = "sha256:c4e92e9ecc828bef2aa7dba1de8ac983511f7532a0df11c770d39099a25cf201"
STAGING_DIGEST = "sha256:5e6ae9de58c1177bea615b4fcbfb2fd688e8c4b51c2e56b6a38e817833ec24a2"
WORKFLOW = (
    r"https://github\.com/trailofbits/rfc8785\.py/\.github/workflows/release\.yml@refs/tags/v.*"
)
ACTIONS = r"https://token\.actions\.githubusercontent\.com"


def trusted_root(instance: str) -> Path:
    store = importlib.resources.files("sigstore") / "_store"
    return Path(str(store / f"https%3A%2F%2Ftuf-repo-cdn.{instance}.dev" / "trusted_root.json"))


def requirement(instance: str, **identity: str) -> Requirement:
    root = trusted_root(instance)
    certs = CertTrust((), (IdentityPattern(**identity),), (root.name,))
    return Requirement(Kind.COSIGN, None, certs, root, root.read_bytes())


def verify(data: bytes, req: Requirement, digest: str):
    return bundle.verify_image_bundle(data, req, {digest: "manifest"}, source="test")


def rejected(data: bytes, req: Requirement, digest: str) -> SignatureRejected:
    with pytest.raises(SignatureRejected) as err:
        verify(data, req, digest)
    return err.value


def test_public_good_bundle_verifies_offline_with_its_identity():
    verified = verify(
        PUBLIC_GOOD.read_bytes(), requirement("sigstore", san=WORKFLOW, issuer=ACTIONS),
        PUBLIC_DIGEST,
    )  # fmt: skip
    assert verified.signer.startswith("https://github.com/trailofbits/rfc8785.py/")
    assert verified.digest == PUBLIC_DIGEST
    staged = verify(STAGING.read_bytes(), requirement("sigstage", san=r".*@yossarian\.net"),
                    STAGING_DIGEST)  # fmt: skip
    assert staged.signer == "william@yossarian.net"


def test_identity_issuer_and_instance_must_all_match():
    data = PUBLIC_GOOD.read_bytes()
    err = rejected(data, requirement("sigstore", san=r".*/other/repo/.*"), PUBLIC_DIGEST)
    assert err.rank == RANK_IDENTITY
    assert "san https://github.com/trailofbits/rfc8785.py/" in str(err)
    assert "wanted san=.*/other/repo/.*" in str(err)
    err = rejected(data, requirement("sigstore", san=WORKFLOW, issuer="https://accounts\\.google\\.com"),
                   PUBLIC_DIGEST)  # fmt: skip
    assert err.rank == RANK_IDENTITY and f"issuer {ACTIONS.replace(chr(92), '')}" in str(err)
    # The staging root does not vouch for a public-good signature.
    err = rejected(data, requirement("sigstage", san=".*"), PUBLIC_DIGEST)
    assert err.rank == RANK_BAD_SIGNATURE and "does not verify against trusted root" in str(err)


def _tampered(path: Path, edit) -> bytes:
    doc = json.loads(path.read_text())
    edit(doc)
    return json.dumps(doc).encode()


def test_tampered_proofs_and_signatures_are_refused():
    req = requirement("sigstore", san=WORKFLOW, issuer=ACTIONS)

    def proof(doc):
        hashes = doc["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]["hashes"]
        hashes[0] = base64.b64encode(bytes(32)).decode()

    def checkpoint(doc):
        entry = doc["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]
        lines = entry["checkpoint"]["envelope"].split("\n")
        lines[1] = str(int(lines[1]) + 1)  # another tree size than the log signed
        entry["checkpoint"]["envelope"] = "\n".join(lines)

    def signature(doc):
        sig = base64.b64decode(doc["messageSignature"]["signature"])
        doc["messageSignature"]["signature"] = base64.b64encode(sig[:-1] + b"\0").decode()

    def digest(doc):
        doc["messageSignature"]["messageDigest"]["digest"] = base64.b64encode(bytes(32)).decode()

    for edit in (proof, checkpoint, signature):
        err = rejected(_tampered(PUBLIC_GOOD, edit), req, PUBLIC_DIGEST)
        assert err.rank in (RANK_BAD_SIGNATURE, RANK_MALFORMED), (edit.__name__, err)
    # A digest changed to name the image: the signature no longer covers it.
    err = rejected(_tampered(PUBLIC_GOOD, digest), req, "sha256:" + "00" * 32)
    assert err.rank in (RANK_BAD_SIGNATURE, RANK_MALFORMED)
    # And the genuine bundle for another digest is not a signature of this one.
    err = rejected(PUBLIC_GOOD.read_bytes(), req, STAGING_DIGEST)
    assert err.rank == RANK_OTHER_DIGEST and PUBLIC_DIGEST in str(err)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b'{"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json"}',
        b'{"mediaType": "text/plain", "verificationMaterial": {}}',
        b"{" * 100_000,
        b'{"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json", '
        b'"verificationMaterial": {"certificate": {"rawBytes": "!!"}}, "messageSignature": {}}',
        b" " * (bundle.MAX_BUNDLE_BYTES + 1),
    ],
)
def test_garbage_bundles_are_malformed_never_a_crash(data):
    err = rejected(data, requirement("sigstore", san=".*"), PUBLIC_DIGEST)
    assert err.rank == RANK_MALFORMED


def test_json_nested_too_deeply_is_malformed_never_a_crash():
    """A payload of `[[[[...` thousands deep stops json's parser with RecursionError:
    a cosign payload, and a bundle's DSSE statement (read for every bundle a
    registry lists, before any signature is checked), are refused, not crashed on."""
    from csi_oci.verify import cosign

    deep = b"[" * 50_000 + b"]" * 50_000
    with pytest.raises(SignatureRejected) as err:
        cosign.signed_digest(deep)
    assert err.value.rank == RANK_MALFORMED
    envelope = {"payloadType": "application/vnd.in-toto+json",
                "payload": base64.b64encode(deep).decode(),
                "signatures": [{"sig": base64.b64encode(b"x").decode()}]}  # fmt: skip
    data = json.dumps({
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {"publicKey": {"hint": ""}},
        "dsseEnvelope": envelope,
    }).encode()  # fmt: skip
    assert bundle.is_model_signing(data) is False
    err2 = rejected(data, requirement("sigstore", san=".*"), PUBLIC_DIGEST)
    assert err2.rank == RANK_MALFORMED


@pytest.mark.parametrize(
    ("status", "body", "supported", "failed"),
    [
        (404, b"", False, False),  # distribution 2.8: no such route
        (405, b"", False, False),
        (400, b"", False, True),  # plain HTTP: the registry speaks HTTPS, said
        (200, b'{"schemaVersion": 2, "manifests": null}', True, False),  # olareg 0.1
        (500, b"", False, True),  # an error, said in the denial
        (200, b"[[[[", False, True),  # not an index
    ],
)
def test_referrers_api_answers_are_classified(status, body, supported, failed):
    """The referrers API: 404 and 405 mean a registry without it (the fallback tag is
    read instead), `manifests: null` is an empty list, anything else is an
    error that a denial names; never a crash."""
    from csi_oci.oci.config import RegistryConfig
    from csi_oci.oci.registry import RegistryClient
    from csi_oci.spec.reference import parse_reference
    from tests.support.hostile_server import HostileServer, Reply

    server = HostileServer(lambda request: Reply(status, {}, body))
    try:
        client = RegistryClient(
            parse_reference(f"{server.host}/models/m:v1"), config=RegistryConfig(max_attempts=1)
        )
        listed = client.get_referrers(PUBLIC_DIGEST)
    finally:
        server.stop()
    if not supported and not failed:
        assert listed is None
        return
    assert listed is not None
    entries, errors = listed
    assert entries == []
    assert bool(errors) is failed
