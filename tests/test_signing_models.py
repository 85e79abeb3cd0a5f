"""OpenSSF model signing at mount (csi_oci.verify.models) against real model-signing 1.1.1
signatures: the CLI signs with a key or a certificate from a test CA, csi-oci checks the tree."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from csi_oci.verify.models import verify_model_tree
from csi_oci.verify.policy import Kind, Requirement
from csi_oci.verify.trust import (
    RANK_BAD_SIGNATURE,
    RANK_IDENTITY,
    RANK_MALFORMED,
    RANK_OTHER_DIGEST,
    RANK_UNTRUSTED,
    CertTrust,
    IdentityPattern,
    KeyTrust,
    SignatureRejected,
    load_public_key,
)
from tests.support import signing as support
from tests.support.signing import generate_key_pair, make_pki

MODEL_SIGNING = Path(sys.executable).parent / "model_signing"
SOURCE = "model.sig in the artifact"


def _model_signing(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The model-signing CLI, offline (key and certificate methods need no network)."""
    return subprocess.run(
        [str(MODEL_SIGNING), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _sign_key(model: Path, key: Path, signature: Path, *extra: str) -> bytes:
    done = _model_signing(
        "sign", "key", model, "--private_key", key, "--signature", signature, *extra
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return signature.read_bytes()


def _sign_cert(model: Path, pki: support.TestPKI, signature: Path) -> bytes:
    done = _model_signing(
        "sign", "certificate", model,
        "--private_key", pki.leaf.key.private_path,
        "--signing_certificate", pki.leaf.path,
        "--certificate_chain", pki.chain_path,
        "--signature", signature,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    return signature.read_bytes()


def _make_model(root: Path) -> Path:
    model = root / "model"
    (model / "weights").mkdir(parents=True)
    (model / "config.json").write_text('{"layers": 2}\n')
    (model / "weights" / "shard-0.bin").write_bytes(os.urandom(70_000))
    (model / "weights" / "shard-1.bin").write_bytes(os.urandom(5_000))
    (model / "README.md").write_text("a test model\n")
    return model


def _key_rule(*pubs: Path) -> Requirement:
    keys = tuple((p.name, load_public_key(p.read_bytes(), p.name)) for p in pubs)
    return Requirement(kind=Kind.MODEL_SIGNING, keys=KeyTrust(keys), certs=None)


def _cert_rule(pki: support.TestPKI, san: str) -> Requirement:
    root = x509.load_pem_x509_certificate(pki.root_path.read_bytes())
    certs = CertTrust(
        roots=(root,), identities=(IdentityPattern(san=san),), names=(pki.root_path.name,)
    )
    return Requirement(kind=Kind.MODEL_SIGNING, keys=None, certs=certs)


def _rejected(tree: Path, bundle: bytes, rule: Requirement) -> SignatureRejected:
    with pytest.raises(SignatureRejected) as info:
        verify_model_tree(tree, bundle, rule, source=SOURCE)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return info.value


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A signing key (private, public) and an unrelated public key."""
    d = tmp_path_factory.mktemp("keys")
    release = generate_key_pair("ecdsa-p256", d, "release")
    other = generate_key_pair("ecdsa-p256", d, "other")
    return release.private_path, release.public_path, other.public_path


@pytest.fixture(scope="module")
def key_signed(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path, Path]
) -> tuple[Path, bytes]:
    """A model signed by key, its model.sig inside the tree (model-signing's default)."""
    model = _make_model(tmp_path_factory.mktemp("keysigned"))
    return model, _sign_key(model, keys[0], model / "model.sig")


@pytest.fixture
def copy(tmp_path: Path, key_signed: tuple[Path, bytes]) -> Path:
    """A copy of the key-signed model a test may change."""
    model = tmp_path / "model"
    shutil.copytree(key_signed[0], model, symlinks=True)
    return model


def test_key_signed_tree_verifies(key_signed: tuple[Path, bytes], keys: tuple[Path, Path, Path]):
    model, bundle = key_signed
    verified = verify_model_tree(model, bundle, _key_rule(keys[2], keys[1]), source=SOURCE)
    assert verified.kind == "model-signing"
    assert verified.signer == "release.pub"
    assert verified.source == SOURCE
    payload = base64.b64decode(json.loads(bundle)["dsseEnvelope"]["payload"])
    assert verified.digest == "sha256:" + hashlib.sha256(payload).hexdigest()


def test_model_signing_cli_agrees(
    key_signed: tuple[Path, bytes], keys: tuple[Path, Path, Path], copy: Path
):
    model, _ = key_signed
    good = _model_signing(
        "verify", "key", model, "--signature", model / "model.sig", "--public_key", keys[1]
    )
    assert good.returncode == 0, good.stderr + good.stdout
    (copy / "config.json").write_text('{"layers": 3}\n')
    bad = _model_signing(
        "verify", "key", copy, "--signature", copy / "model.sig", "--public_key", keys[1]
    )
    assert bad.returncode != 0
    wrong_key = _model_signing(
        "verify", "key", model, "--signature", model / "model.sig", "--public_key", keys[2]
    )
    assert wrong_key.returncode != 0
    for rule, tree in ((_key_rule(keys[1]), copy), (_key_rule(keys[2]), model)):
        _rejected(tree, (model / "model.sig").read_bytes(), rule)


def test_unknown_key(key_signed: tuple[Path, bytes], keys: tuple[Path, Path, Path]):
    model, bundle = key_signed
    exc = _rejected(model, bundle, _key_rule(keys[2]))
    assert exc.rank == RANK_UNTRUSTED
    assert "signed, but by an unknown key" in str(exc)
    assert "other.pub" in str(exc)


def test_certificate_rule_refuses_key_signature(key_signed: tuple[Path, bytes], tmp_path: Path):
    pki = make_pki(tmp_path)
    exc = _rejected(key_signed[0], key_signed[1], _cert_rule(pki, r".*"))
    assert exc.rank == RANK_UNTRUSTED


def test_altered_payload_is_a_bad_signature(
    key_signed: tuple[Path, bytes], keys: tuple[Path, Path, Path]
):
    model, bundle = key_signed
    doc = json.loads(bundle)
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    statement["predicate"]["serialization"]["ignore_paths"].append("config.json")
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    exc = _rejected(model, json.dumps(doc).encode(), _key_rule(keys[1]))
    assert exc.rank == RANK_BAD_SIGNATURE
    assert "release.pub" in str(exc)


def test_modified_file(copy: Path, key_signed: tuple[Path, bytes], keys: tuple[Path, Path, Path]):
    data = bytearray((copy / "weights" / "shard-0.bin").read_bytes())
    data[1234] ^= 1
    (copy / "weights" / "shard-0.bin").write_bytes(bytes(data))
    exc = _rejected(copy, key_signed[1], _key_rule(keys[1]))
    assert exc.rank == RANK_OTHER_DIGEST
    assert "'weights/shard-0.bin' has different content" in str(exc)


def test_added_file(copy: Path, key_signed: tuple[Path, bytes], keys: tuple[Path, Path, Path]):
    (copy / "weights" / "extra.py").write_text("import os\n")
    exc = _rejected(copy, key_signed[1], _key_rule(keys[1]))
    assert exc.rank == RANK_OTHER_DIGEST
    assert "'weights/extra.py' is not signed" in str(exc)


def test_removed_file(copy: Path, key_signed: tuple[Path, bytes], keys: tuple[Path, Path, Path]):
    (copy / "weights" / "shard-1.bin").unlink()
    exc = _rejected(copy, key_signed[1], _key_rule(keys[1]))
    assert exc.rank == RANK_OTHER_DIGEST
    assert "'weights/shard-1.bin' is signed but missing" in str(exc)


def test_signature_shipped_in_tree_is_skipped(tmp_path: Path, keys: tuple[Path, Path, Path]):
    """Signed with the bundle outside the tree (so not in the signed ignore list), then
    shipped inside it: the bundle is not a model file. A different name is one."""
    model = _make_model(tmp_path)
    bundle = _sign_key(model, keys[0], tmp_path / "elsewhere.sig")
    statement = json.loads(base64.b64decode(json.loads(bundle)["dsseEnvelope"]["payload"]))
    assert "model.sig" not in statement["predicate"]["serialization"].get("ignore_paths", [])
    (model / "model.sig").write_bytes(bundle)
    assert verify_model_tree(model, bundle, _key_rule(keys[1]), source=SOURCE).signer
    (model / "model.sig").rename(model / "other.sig")
    exc = _rejected(model, bundle, _key_rule(keys[1]))
    assert "'other.sig' is not signed" in str(exc)
    (model / "other.sig").rename(model / "custom.sig")
    verified = verify_model_tree(
        model, bundle, _key_rule(keys[1]), source=SOURCE, signature_name="custom.sig"
    )
    assert verified.signer == "release.pub"


def test_signed_ignore_paths_are_honoured(tmp_path: Path, keys: tuple[Path, Path, Path]):
    model = _make_model(tmp_path)
    (model / "notes").mkdir()
    (model / "notes" / "draft.txt").write_text("x")
    # The CLI resolves --ignore-paths against its working directory.
    bundle = _sign_key(model, keys[0], model / "model.sig", "--ignore-paths", str(model / "notes"))
    (model / "notes" / "draft.txt").write_text("changed")
    (model / "notes" / "new.txt").write_text("added")
    assert verify_model_tree(model, bundle, _key_rule(keys[1]), source=SOURCE)
    # .git is ignored because the signer said so, not because a verifier assumes it.
    (model / ".git").mkdir()
    (model / ".git" / "HEAD").write_text("ref: x\n")
    assert verify_model_tree(model, bundle, _key_rule(keys[1]), source=SOURCE)
    plain = tmp_path / "plain"
    shutil.copytree(model, plain)
    shutil.rmtree(plain / ".git")
    shutil.rmtree(plain / "notes")
    bundle = _sign_key(plain, keys[0], plain / "model.sig", "--no-ignore-git-paths")
    (plain / ".git").mkdir()
    (plain / ".git" / "HEAD").write_text("ref: x\n")
    exc = _rejected(plain, bundle, _key_rule(keys[1]))
    assert "'.git/HEAD' is not signed" in str(exc)


def test_certificate_signed_with_identity(tmp_path: Path):
    pki = make_pki(tmp_path / "pki", emails=("release@acme.test",))
    model = _make_model(tmp_path)
    bundle = _sign_cert(model, pki, model / "model.sig")
    verified = verify_model_tree(
        model, bundle, _cert_rule(pki, r"release@acme\.test"), source=SOURCE
    )
    assert verified.signer == "release@acme.test"
    cli = _model_signing(
        "verify",
        "certificate",
        model,
        "--signature",
        model / "model.sig",
        "--certificate_chain",
        pki.root_path,
    )
    assert cli.returncode == 0, cli.stderr + cli.stdout

    exc = _rejected(model, bundle, _cert_rule(pki, r"someone@acme\.test"))
    assert exc.rank == RANK_IDENTITY
    assert "release@acme.test" in str(exc)

    stranger = make_pki(tmp_path / "other", name="stranger")
    exc = _rejected(model, bundle, _cert_rule(stranger, r".*"))
    assert exc.rank == RANK_UNTRUSTED

    exc = _rejected(model, bundle, Requirement(Kind.MODEL_SIGNING, keys=KeyTrust(()), certs=None))
    assert exc.rank == RANK_UNTRUSTED

    (model / "config.json").write_text("{}\n")
    exc = _rejected(model, bundle, _cert_rule(pki, r"release@acme\.test"))
    assert exc.rank == RANK_OTHER_DIGEST


def test_links_in_the_tree(tmp_path: Path, keys: tuple[Path, Path, Path]):
    outside = tmp_path / "secret"
    outside.write_text("node secret\n")
    model = _make_model(tmp_path)
    (model / "latest.bin").symlink_to("weights/shard-1.bin")
    bundle = _sign_key(model, keys[0], model / "model.sig", "--allow_symlinks")
    assert verify_model_tree(model, bundle, _key_rule(keys[1]), source=SOURCE)

    (model / "leak").symlink_to("../secret")
    exc = _rejected(model, bundle, _key_rule(keys[1]))
    assert exc.rank == RANK_OTHER_DIGEST
    assert "'leak' is a link out of the model" in str(exc)
    (model / "leak").unlink()
    (model / "weights" / "abs").symlink_to(outside)
    assert "'weights/abs' is a link out of the model" in str(
        _rejected(model, bundle, _key_rule(keys[1]))
    )
    (model / "weights" / "abs").unlink()
    # The signed link now points elsewhere in the tree: other content, same name.
    (model / "latest.bin").unlink()
    (model / "latest.bin").symlink_to("weights/shard-0.bin")
    assert "'latest.bin'" in str(_rejected(model, bundle, _key_rule(keys[1])))


def test_link_refused_when_signed_without_links(
    copy: Path, key_signed: tuple[Path, bytes], keys: tuple[Path, Path, Path]
):
    (copy / "alias.json").symlink_to("config.json")
    exc = _rejected(copy, key_signed[1], _key_rule(keys[1]))
    assert "'alias.json' is a link, and the model was signed without links" in str(exc)


def test_sharded_signature(tmp_path: Path, keys: tuple[Path, Path, Path]):
    """model-signing's shard serialization (library API: the CLI has no option for it)."""
    from model_signing import hashing, signing

    model = _make_model(tmp_path)
    signature = model / "model.sig"
    hashing_config = hashing.Config().use_shard_serialization(shard_size=16_384)
    hashing_config.set_ignored_paths(paths=["model.sig"])
    signing.Config().use_elliptic_key_signer(private_key=keys[0]).set_hashing_config(
        hashing_config
    ).sign(model, signature)
    bundle = signature.read_bytes()
    assert verify_model_tree(model, bundle, _key_rule(keys[1]), source=SOURCE)

    with (model / "weights" / "shard-0.bin").open("ab") as f:
        f.write(b"more")
    exc = _rejected(model, bundle, _key_rule(keys[1]))
    assert "'weights/shard-0.bin' has a different size" in str(exc)


@pytest.mark.parametrize(
    "bundle",
    [
        b"",
        b"\x00\x01garbage",
        b"[]",
        b'{"mediaType": "application/json"}',
        b'{"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json", "messageSignature": {}}',
        b'{"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json", "dsseEnvelope": '
        b'{"payloadType": "application/vnd.in-toto+json", "payload": "!!", "signatures": []}}',
        b"{" * 100_000,
        b" " * (5 * 1024 * 1024),
    ],
    ids=["empty", "binary", "array", "media", "message", "envelope", "deep", "huge"],
)
def test_garbage_bundle(
    bundle: bytes, key_signed: tuple[Path, bytes], keys: tuple[Path, Path, Path]
):
    exc = _rejected(key_signed[0], bundle, _key_rule(keys[1]))
    assert exc.rank == RANK_MALFORMED
    assert str(exc).startswith("model signature:")


def test_resource_names_must_stay_in_tree(tmp_path: Path, keys: tuple[Path, Path, Path]):
    """A statement naming ../ (signed by a trusted key, to reach the name checks)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from csi_oci.verify.bundle import Envelope

    model = _make_model(tmp_path)
    bundle = json.loads(_sign_key(model, keys[0], model / "model.sig"))
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["name"] = "../etc/passwd"
    payload = json.dumps(statement).encode()
    key = serialization.load_pem_private_key(keys[0].read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    pae = Envelope("application/vnd.in-toto+json", payload, ()).pae()
    sig = key.sign(pae, ec.ECDSA(hashes.SHA256()))
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(payload).decode()
    bundle["dsseEnvelope"]["signatures"] = [{"sig": base64.b64encode(sig).decode()}]
    exc = _rejected(model, json.dumps(bundle).encode(), _key_rule(keys[1]))
    assert exc.rank == RANK_MALFORMED
    assert "'../etc/passwd' is not a relative path inside the model" in str(exc)
