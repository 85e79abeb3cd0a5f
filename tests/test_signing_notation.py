"""csi_oci.verify.notation against envelopes the real notation CLI (1.3.2) writes.

Images are pushed to docker-registry 2.8 (no referrers API: notation writes
the `sha256-<hex>` fallback index), signed by `notation sign` with a local key
issued by a test CA (tests/support/signing.py), and each envelope is read back
from the registry and fed to verify_notation: JWS and COSE, RSA-3072 and
ECDSA P-256/P-384 leaves, accepted and refused for each reason it names.
"""

from __future__ import annotations

import base64
import datetime
import json
import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509

from csi_oci.verify.notation import COSE_MEDIA_TYPE, JWS_MEDIA_TYPE, verify_notation
from csi_oci.verify.trust import (
    RANK_BAD_SIGNATURE,
    RANK_IDENTITY,
    RANK_MALFORMED,
    RANK_OTHER_DIGEST,
    RANK_UNTRUSTED,
    CertTrust,
    IdentityPattern,
    SignatureRejected,
)
from tests.support import signing as s
from tests.support.producers import find_producer, missing_producers, run_tool, tool_env

SIGNER = "signer@example.test"
MEDIA_TYPES = {"jws": JWS_MEDIA_TYPE, "cose": COSE_MEDIA_TYPE}
# The leaf key types notation signs with here, and the alg each must carry.
LEAVES = {"ecdsa-p256": ("ES256", -7), "ecdsa-p384": ("ES384", -35), "rsa-3072": ("PS384", -38)}


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    missing = missing_producers("notation")
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run hack/install-deps", pytrace=False)


# -- signing with the real CLI ----------------------------------------------------------


class Signer:
    """One test CA (root, for RSA without an intermediate) and its leaf, configured as
    notation's signing key; signs images and returns the envelope from the registry."""

    def __init__(self, registry: s.Registry, workdir: Path, leaf: s.KeyType) -> None:
        self.registry = registry
        self.workdir = workdir
        self.pki = s.make_pki(
            workdir / "pki", leaf_key_type=leaf, intermediate=leaf != "rsa-3072", name=leaf
        )
        self.config = s.notation_setup(workdir / "notation", self.pki)
        self.cache: dict[tuple[str, str], bytes] = {}

    def trust(self, **identity: str) -> CertTrust:
        patterns = (IdentityPattern(**identity),) if identity else ()
        return CertTrust((self.pki.root.certificate,), patterns)

    def envelope(self, image: s.Pushed, fmt: str) -> bytes:
        """The envelope of a signature of `image` in `fmt` (signed once per pair)."""
        if (image.digest, fmt) not in self.cache:
            signed = s.notation_sign(self.registry, image, self.config, signature_format=fmt)
            assert len(signed.manifests) == 1, signed
            self.cache[image.digest, fmt] = fetch_envelope(
                self.registry, signed.repo, signed.manifests[0], fmt
            )
        return self.cache[image.digest, fmt]

    def sign_with_expiry(self, image: s.Pushed, fmt: str, expiry: str) -> bytes:
        """`notation sign --expiry` (the shared helper has no flag for it)."""
        before = set(_index_entries(self.registry, image))
        args = [find_producer("notation"), "sign", "--insecure-registry"]
        args += ["--signature-format", fmt, "--key", self.config.key_name, "--expiry", expiry]
        args.append(f"{self.registry.host}/{image.repo}@{image.digest}")
        run_tool(args, cwd=self.config.workdir, env=tool_env(self.config.workdir))
        (new,) = set(_index_entries(self.registry, image)) - before
        return fetch_envelope(self.registry, image.repo, new, fmt)


def _index_entries(registry: s.Registry, image: s.Pushed) -> list[str]:
    return [m["digest"] for m in s.list_referrers(registry, image.repo, image.digest)]


def fetch_envelope(registry: s.Registry, repo: str, manifest_digest: str, fmt: str) -> bytes:
    """The one layer of a notation signature manifest, checked to be what 1.3.2 writes."""
    manifest = s.get_json(registry, repo, manifest_digest)
    assert manifest["config"]["mediaType"] == s.NOTATION_ARTIFACT_TYPE
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == MEDIA_TYPES[fmt]
    return s.get_blob_bytes(registry, repo, layer["digest"])


@pytest.fixture(scope="module")
def images(registry: s.Registry) -> tuple[s.Pushed, s.Pushed]:
    """Two different images in one repository: A is signed, B is not."""
    repo = f"notation/app-{uuid.uuid4().hex[:8]}"
    a = s.push_tiny_image(registry, f"{repo}:a", content=b"image A\n")
    b = s.push_tiny_image(registry, f"{repo}:b", content=b"image B\n")
    return a, b


@pytest.fixture(scope="module")
def signers(
    registry: s.Registry, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Signer]:
    made: dict[str, Signer] = {}

    def get(leaf: str) -> Signer:
        if leaf not in made:
            made[leaf] = Signer(registry, tmp_path_factory.mktemp(f"notation-{leaf}"), leaf)
        return made[leaf]

    return get


@pytest.fixture(scope="module")
def p256(signers: Callable[[str], Signer]) -> Signer:
    return signers("ecdsa-p256")


def rejected(call: Callable[[], object]) -> SignatureRejected:
    with pytest.raises(SignatureRejected) as info:
        call()
    return info.value


def subjects_of(image: s.Pushed) -> dict[str, str]:
    return {image.digest: "manifest"}


# -- accepted -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jws", "cose"])
@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_real_signature_verifies(signers, images, fmt, leaf):
    signer = signers(leaf)
    image = images[0]
    envelope = signer.envelope(image, fmt)
    verified = verify_notation(
        envelope,
        MEDIA_TYPES[fmt],
        signer.trust(san=SIGNER),
        {image.digest: "manifest", "sha256:" + "1" * 64: "index"},
        source="tag sha256-x",
    )
    assert verified.kind == "notation"
    assert verified.signer == SIGNER
    assert verified.digest == image.digest
    assert verified.source == "tag sha256-x"
    # The envelope carries the alg the spec's table gives this key, which is
    # what makes the check of alg against the key meaningful.
    assert _alg(envelope, fmt) == LEAVES[leaf][0 if fmt == "jws" else 1]


def test_subject_dn_identity_and_no_identity(p256, images):
    envelope = p256.envelope(images[0], "jws")
    subject = r"CN=csi-oci test signer,O=csi-oci tests"
    assert (
        verify_notation(
            envelope, JWS_MEDIA_TYPE, p256.trust(subject=subject), subjects_of(images[0])
        ).signer
        == SIGNER
    )
    assert verify_notation(envelope, JWS_MEDIA_TYPE, p256.trust(), subjects_of(images[0]))


# -- refused ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jws", "cose"])
def test_untrusted_root(signers, p256, images, fmt):
    other = signers("rsa-3072")  # another CA altogether
    err = rejected(
        lambda: verify_notation(
            p256.envelope(images[0], fmt), MEDIA_TYPES[fmt], other.trust(), subjects_of(images[0])
        )
    )
    assert err.rank == RANK_UNTRUSTED
    assert "does not chain to a trusted root" in str(err)
    assert SIGNER in str(err)


@pytest.mark.parametrize("fmt", ["jws", "cose"])
def test_identity_mismatch_names_found_and_wanted(p256, images, fmt):
    err = rejected(
        lambda: verify_notation(
            p256.envelope(images[0], fmt),
            MEDIA_TYPES[fmt],
            p256.trust(san="release@example.test"),
            subjects_of(images[0]),
        )
    )
    assert err.rank == RANK_IDENTITY
    assert f"san {SIGNER}" in str(err)
    assert "wanted san=release@example.test" in str(err)


@pytest.mark.parametrize("fmt", ["jws", "cose"])
def test_signature_of_another_image(p256, images, fmt):
    a, b = images
    err = rejected(
        lambda: verify_notation(
            p256.envelope(a, fmt), MEDIA_TYPES[fmt], p256.trust(san=SIGNER), subjects_of(b)
        )
    )
    assert err.rank == RANK_OTHER_DIGEST
    assert f"names {a.digest}, not {b.digest}" in str(err)


@pytest.mark.parametrize("fmt", ["jws", "cose"])
def test_payload_rewritten_to_name_another_image(p256, images, fmt):
    """The attack the digest check is for: the payload swapped to name B."""
    a, b = images
    tampered = _with_payload(
        p256.envelope(a, fmt), fmt, lambda p: p.replace(a.digest.encode(), b.digest.encode())
    )
    err = rejected(
        lambda: verify_notation(tampered, MEDIA_TYPES[fmt], p256.trust(san=SIGNER), subjects_of(b))
    )
    assert err.rank == RANK_BAD_SIGNATURE
    assert "does not verify" in str(err)


@pytest.mark.parametrize("fmt", ["jws", "cose"])
@pytest.mark.parametrize("where", [0, 40, -3])
def test_payload_byte_flipped(p256, images, fmt, where):
    def flip(payload: bytes) -> bytes:
        i = where % len(payload)
        return payload[:i] + bytes([payload[i] ^ 0x01]) + payload[i + 1 :]

    tampered = _with_payload(p256.envelope(images[0], fmt), fmt, flip)
    err = rejected(
        lambda: verify_notation(
            tampered, MEDIA_TYPES[fmt], p256.trust(san=SIGNER), subjects_of(images[0])
        )
    )
    assert err.rank == RANK_BAD_SIGNATURE, err


@pytest.mark.parametrize("fmt", ["jws", "cose"])
def test_signature_byte_flipped(signers, images, fmt):
    rsa = signers("rsa-3072")
    envelope = rsa.envelope(images[0], fmt)
    if fmt == "jws":
        doc = json.loads(envelope)
        sig = bytearray(_b64url_decode(doc["signature"]))
        sig[10] ^= 0x80
        doc["signature"] = _b64url(bytes(sig))
        tampered = json.dumps(doc).encode()
    else:
        item = cbor2.loads(envelope)
        parts = list(item.value)
        parts[3] = bytes([parts[3][0] ^ 0x80]) + parts[3][1:]
        tampered = cbor2.dumps(cbor2.CBORTag(18, parts))
    err = rejected(
        lambda: verify_notation(tampered, MEDIA_TYPES[fmt], rsa.trust(), subjects_of(images[0]))
    )
    assert err.rank == RANK_BAD_SIGNATURE
    assert "PS384" in str(err)


@pytest.mark.parametrize("fmt", ["jws", "cose"])
def test_expired_signature(p256, images, fmt):
    image = images[0]
    envelope = p256.sign_with_expiry(image, fmt, "1h")
    trust = p256.trust(san=SIGNER)
    # Within the hour it verifies; after it, it is refused, naming when.
    assert verify_notation(envelope, MEDIA_TYPES[fmt], trust, subjects_of(image))
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=2)
    err = rejected(
        lambda: verify_notation(envelope, MEDIA_TYPES[fmt], trust, subjects_of(image), now=later)
    )
    assert err.rank == RANK_BAD_SIGNATURE
    assert f"by {SIGNER} expired at" in str(err)
    assert "io.cncf.notary.expiry" in str(err)


@pytest.mark.parametrize("fmt", ["jws", "cose"])
def test_chain_checked_now_not_at_signing_time(p256, images, fmt):
    """A leaf valid when it signed but expired now is refused: no TSA timestamp is
    verified, so the self-asserted signing time cannot vouch for it."""
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=60)
    err = rejected(
        lambda: verify_notation(
            p256.envelope(images[0], fmt),
            MEDIA_TYPES[fmt],
            p256.trust(san=SIGNER),
            subjects_of(images[0]),
            now=later,
        )
    )
    assert err.rank == RANK_UNTRUSTED


# -- malformed ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jws", "cose"])
def test_truncated_and_garbage_envelopes(p256, images, fmt):
    envelope = p256.envelope(images[0], fmt)
    bad = [envelope[:n] for n in (0, 1, 7, len(envelope) // 2, len(envelope) - 1)]
    bad += [b"garbage", b"\x00" * 64, envelope + b"\x00", b"[]", b"null", b"\xff\xfe"]
    bad.append(b"x" * (1024 * 1024 + 1))
    for data in bad:
        err = rejected(
            lambda data=data: verify_notation(
                data, MEDIA_TYPES[fmt], p256.trust(), subjects_of(images[0])
            )
        )
        assert err.rank == RANK_MALFORMED, (data[:40], err)
        assert str(err).startswith("Notary Project signature: "), err
        assert "\n" not in str(err)


@pytest.mark.parametrize("fmt", ["jws", "cose"])
def test_mutated_envelopes_never_crash(p256, images, fmt):
    """Random byte edits of a real envelope: every outcome is Verified (only an unsigned
    byte changed) or SignatureRejected, never another exception."""
    envelope = p256.envelope(images[0], fmt)
    rnd = random.Random(18)
    outcomes: dict[object, int] = {}
    for _ in range(400):
        data = bytearray(envelope)
        for _ in range(rnd.randint(1, 3)):
            pos = rnd.randrange(len(data))
            if rnd.random() < 0.7:
                data[pos] = rnd.randrange(256)
            else:
                del data[pos : pos + rnd.randint(1, 8)]
        try:
            verified = verify_notation(
                bytes(data), MEDIA_TYPES[fmt], p256.trust(), subjects_of(images[0])
            )
            assert verified.digest == images[0].digest
            outcome: object = "ok"
        except SignatureRejected as exc:
            outcome = exc.rank
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get(RANK_MALFORMED, 0) > 200, outcomes


def test_wrong_media_type(p256, images):
    err = rejected(
        lambda: verify_notation(
            p256.envelope(images[0], "jws"),
            "application/vnd.dev.cosign.simplesigning.v1+json",
            p256.trust(),
            subjects_of(images[0]),
        )
    )
    assert err.rank == RANK_MALFORMED
    assert "neither JWS nor COSE" in str(err)


JWS_HEADER_EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "alg substituted": (lambda h: h.update(alg="ES384"), "does not match the signing"),
    "alg none": (lambda h: h.update(alg="none"), "JWS alg 'none' is not one of"),
    "unknown critical": (
        lambda h: h.update({"x.example": 1, "crit": [*h["crit"], "x.example"]}),
        "'x.example' is critical but not understood",
    ),
    "plugin": (
        lambda h: h.update(
            {
                "io.cncf.notary.verificationPlugin": "com.example.plugin",
                "crit": [*h["crit"], "io.cncf.notary.verificationPlugin"],
            }
        ),
        "needs a Notary Project verification plugin",
    ),
    "critical but absent": (
        lambda h: h.update(crit=[*h["crit"], "io.cncf.notary.expiry"]),
        "which is not in the header",
    ),
    "scheme not critical": (
        lambda h: h.update(crit=["io.cncf.notary.signingTime"]),
        "io.cncf.notary.signingScheme must be marked critical",
    ),
    "signing authority": (
        lambda h: h.update({"io.cncf.notary.signingScheme": "notary.x509.signingAuthority"}),
        "notary.x509.signingAuthority is not supported",
    ),
    "header both protected and unprotected": (
        lambda h: h.update({"io.cncf.notary.signingAgent": "notation-go/1.3.2"}),
        "are both protected and unprotected",
    ),
    "content type": (lambda h: h.update(cty="application/json"), "payload content type"),
    "no signing time": (lambda h: h.pop("io.cncf.notary.signingTime"), "no io.cncf.notary"),
    "bad time": (
        lambda h: h.update({"io.cncf.notary.signingTime": "yesterday"}),
        "is not an RFC 3339 time",
    ),
}


@pytest.mark.parametrize("edit", sorted(JWS_HEADER_EDITS))
def test_jws_protected_header_rules(p256, images, edit):
    change, message = JWS_HEADER_EDITS[edit]
    doc = json.loads(p256.envelope(images[0], "jws"))
    header = json.loads(_b64url_decode(doc["protected"]))
    change(header)
    doc["protected"] = _b64url(json.dumps(header).encode())
    err = rejected(
        lambda: verify_notation(
            json.dumps(doc).encode(), JWS_MEDIA_TYPE, p256.trust(), subjects_of(images[0])
        )
    )
    assert err.rank == RANK_MALFORMED
    assert message in str(err)


def test_jws_strict_json(p256, images):
    raw = p256.envelope(images[0], "jws")
    doc = json.loads(raw)
    cases = {
        "repeats the key": raw[:-1] + b',"payload":"e30"}',
        "want exactly": json.dumps({**doc, "signatures": []}).encode(),
        "unknown entries": json.dumps({**doc, "header": {**doc["header"], "kid": "x"}}).encode(),
        "not unpadded base64url": json.dumps({**doc, "payload": doc["payload"] + "="}).encode(),
        "no certificate chain": json.dumps({**doc, "header": {}}).encode(),
        "more than 10 certificates": json.dumps(
            {**doc, "header": {"x5c": doc["header"]["x5c"] * 4}}
        ).encode(),
        "unparseable certificate": json.dumps(
            {**doc, "header": {"x5c": ["AAAA", *doc["header"]["x5c"]]}}
        ).encode(),
    }
    for message, data in cases.items():
        err = rejected(
            lambda data=data: verify_notation(
                data, JWS_MEDIA_TYPE, p256.trust(), subjects_of(images[0])
            )
        )
        assert err.rank == RANK_MALFORMED, (message, err)
        assert message in str(err), (message, err)


def test_cose_strict_cbor(p256, images):
    raw = p256.envelope(images[0], "cose")
    parts = list(cbor2.loads(raw).value)
    protected = dict(cbor2.loads(parts[0]))
    unprotected = dict(parts[1])

    def header(values: dict[object, object]) -> bytes:
        return cbor2.dumps(values, datetime_as_timestamp=True)  # tag 1, as notation writes

    def sign1(*items: object) -> bytes:
        return cbor2.dumps(cbor2.CBORTag(18, list(items)))

    cases = {
        "not a COSE_Sign1": cbor2.dumps(parts),
        "array of 4": sign1(*parts[:3]),
        "detached": sign1(parts[0], parts[1], None, parts[3]),
        "CBOR tag 2": sign1(parts[0], parts[1], cbor2.CBORTag(2, b"\x01" * 64), parts[3]),
        "CBOR tag 28": sign1(parts[0], {33: cbor2.CBORTag(28, [b"x"])}, parts[2], parts[3]),
        "unknown labels": sign1(parts[0], {**unprotected, 4: b"kid"}, parts[2], parts[3]),
        "no certificate chain": sign1(parts[0], {}, parts[2], parts[3]),
        "both protected and unprotected": sign1(
            header({**protected, 33: unprotected[33]}), unprotected, parts[2], parts[3]
        ),
        "COSE alg": sign1(header({**protected, 1: -257}), unprotected, parts[2], parts[3]),
        "does not match the signing": sign1(
            header({**protected, 1: -38}), unprotected, parts[2], parts[3]
        ),
        "not an epoch time": sign1(
            header({**protected, "io.cncf.notary.signingTime": "2026-01-01T00:00:00Z"}),
            unprotected,
            parts[2],
            parts[3],
        ),
        "is not valid CBOR": raw[:-5],
        "CBOR tag 0": sign1(cbor2.dumps(protected), unprotected, parts[2], parts[3]),
        "bytes after its CBOR item": raw + b"\x00",
        # a map with a repeated key: {1: -7, 1: -7}
        "protected header is not valid CBOR": sign1(
            bytes.fromhex("a2012601 26"), unprotected, parts[2], parts[3]
        ),
    }
    for message, data in cases.items():
        err = rejected(
            lambda data=data: verify_notation(
                data, COSE_MEDIA_TYPE, p256.trust(), subjects_of(images[0])
            )
        )
        assert err.rank == RANK_MALFORMED, (message, err)
        assert message in str(err), (message, err)


def test_unknown_subject_kind_is_a_caller_error(p256, images):
    with pytest.raises(ValueError, match="manifest or index"):
        verify_notation(
            p256.envelope(images[0], "jws"), JWS_MEDIA_TYPE, p256.trust(), {"sha256:x": "blob"}
        )


# -- helpers --------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _alg(envelope: bytes, fmt: str) -> object:
    if fmt == "jws":
        return json.loads(_b64url_decode(json.loads(envelope)["protected"]))["alg"]
    return cbor2.loads(cbor2.loads(envelope).value[0])[1]


def _with_payload(envelope: bytes, fmt: str, change: Callable[[bytes], bytes]) -> bytes:
    """`envelope` with its payload bytes changed and everything else as signed."""
    if fmt == "jws":
        doc = json.loads(envelope)
        new = change(_b64url_decode(doc["payload"]))
        doc["payload"] = _b64url(new)
        return json.dumps(doc).encode()
    parts = list(cbor2.loads(envelope).value)
    parts[2] = change(parts[2])
    return cbor2.dumps(cbor2.CBORTag(18, parts))


def test_helpers_round_trip(p256, images):
    """The tamper helpers change only what they are asked to: unchanged, it verifies."""
    for fmt in ("jws", "cose"):
        same = _with_payload(p256.envelope(images[0], fmt), fmt, lambda p: p)
        assert verify_notation(same, MEDIA_TYPES[fmt], p256.trust(), subjects_of(images[0]))


def test_root_in_x5c_is_not_trusted_by_itself(p256, images):
    """The envelope's own root (notation puts leaf..root in x5c) grants nothing."""
    cert = x509.load_der_x509_certificate(
        base64.b64decode(json.loads(p256.envelope(images[0], "jws"))["header"]["x5c"][-1])
    )
    assert cert.subject == p256.pki.root.certificate.subject
    stranger = s.make_pki(p256.workdir / "stranger", name="stranger")
    err = rejected(
        lambda: verify_notation(
            p256.envelope(images[0], "jws"),
            JWS_MEDIA_TYPE,
            CertTrust((stranger.root.certificate,)),
            subjects_of(images[0]),
        )
    )
    assert err.rank == RANK_UNTRUSTED
