"""Signatures at mount: NodePublishVolume against the node's signature policy.

Real cosign signatures (tests/support/signing.py) in real registries: olareg
(OCI 1.1 referrers API) and docker-registry 2.8 (tag fallback), published by
the real driver. Every refusal is PERMISSION_DENIED with one line naming
the image, digest, rule and what was found; nothing of a refused image is
pulled.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from tests.support import signing as S
from tests.support.lazyfixtures import estargz_blob, make_layer_tar, push_lazy_image

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root"),
    pytest.mark.usefixtures("no_mounts_left"),
]

_counter = iter(range(10_000))


def fresh_image(reg, content: bytes | None = None, repo: str = "models/m"):
    n = next(_counter)
    return S.push_tiny_image(reg, f"{repo}{n}:v1", content=content or f"model {n}\n".encode())


def write_policy(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def key_rule(name: str, match: str, *keys: Path, mode: str = "enforce", signed: str = "") -> str:
    keys_toml = ", ".join(f'"{k}"' for k in keys)
    extra = f'signed = "{signed}"\n' if signed else ""
    return (
        f'[[rule]]\nname = "{name}"\nmatch = ["{match}"]\nmode = "{mode}"\n{extra}'
        f'[[rule.require]]\ntype = "cosign"\nkeys = [{keys_toml}]\n'
    )


def cert_rule(name: str, match: str, root: Path, identity: str, kind: str = "cosign") -> str:
    return (
        f'[[rule]]\nname = "{name}"\nmatch = ["{match}"]\n[[rule.require]]\ntype = "{kind}"\n'
        f'roots = ["{root}"]\nidentities = [{identity}]\n'
    )


def denied(call) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
    message = err.value.details()
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("signing")


@pytest.fixture(scope="module")
def keys(work):
    """A cosign key of each type cosign signs with, and one nobody trusts."""
    out = {}
    for key_type in ("ecdsa-p256", "ecdsa-p384", "rsa-3072", "ed25519", "ecdsa-p256"):
        name = key_type if key_type not in out else "stranger"
        pair = S.generate_key_pair(key_type, work / "keys", name)
        out[name] = S.cosign_import_key(pair, work, name=name)
    return out


@pytest.fixture(scope="module")
def pki(work):
    return S.make_pki(
        work / "pki",
        emails=("release@acme.test",),
        oidc_issuer="https://accounts.acme.test",
    )


@pytest.fixture(scope="module")
def pki_key(work, pki):
    return S.cosign_import_key(pki.leaf.key, work, name="leaf")


def target(tmp_path: Path, name: str = "t") -> Path:
    parent = tmp_path / "pods" / f"{name}-{next(_counter)}"
    parent.mkdir(parents=True)
    return parent / "mount"


def test_each_key_type_verifies_and_only_signed_digests_publish(
    referrers_registry, make_driver, keys, work, tmp_path
):
    reg = referrers_registry
    images = {}
    for name in ("ecdsa-p256", "ecdsa-p384", "rsa-3072", "ed25519"):
        images[name] = fresh_image(reg)
        S.cosign_sign_key(reg, images[name], work, keys[name])
    unsigned = fresh_image(reg)
    other = fresh_image(reg)
    S.cosign_sign_key(reg, other, work, keys["stranger"])
    pubs = [keys[n].public_path for n in images]
    policy = write_policy(tmp_path / "policy.toml", key_rule("models", f"{reg.host}/models", *pubs))
    d = make_driver("--policy-config", str(policy))
    for name, image in images.items():
        t = target(tmp_path, name)
        d.publish(t, {"image": image.reference})
        assert (t / "hello.txt").read_bytes().startswith(b"model")
    message = denied(lambda: d.publish(target(tmp_path), {"image": unsigned.reference}))
    assert message.startswith(
        f"image {unsigned.reference} ({unsigned.digest}) refused by "
        "signature rule 'models': no cosign signature found"
    )
    assert "wanted a cosign signature by key" in message
    message = denied(lambda: d.publish(target(tmp_path), {"image": other.reference}))
    assert "signed, but by an unknown key" in message
    # Nothing of a refused image was pulled.
    store = d.state_dir / "images" / "sha256"
    pulled = {p.name for p in store.iterdir()}
    assert unsigned.digest.removeprefix("sha256:") not in pulled
    assert other.digest.removeprefix("sha256:") not in pulled
    # image.json and csi-oci ls name the rule and the signer.
    record = json.loads(
        (store / images["rsa-3072"].digest.removeprefix("sha256:") / "image.json").read_text()
    )
    assert record["signatures"] == [
        {
            "rule": "models",
            "kind": "cosign",
            "signer": record["signatures"][0]["signer"],
            "digest": images["rsa-3072"].digest,
            "source": f"tag {S.referrers_tag(images['rsa-3072'].digest, '.sig')}",
        }
    ]
    assert record["signatures"][0]["signer"].startswith("rsa-3072.pub (sha256:")
    listing = subprocess.run(
        [*d.program, "ls", "--state-dir", str(d.state_dir)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "signed (rule models: cosign ed25519.pub" in listing


def test_certificate_identity_is_matched_and_named(
    referrers_registry, make_driver, pki, pki_key, work, tmp_path
):
    reg = referrers_registry
    image = fresh_image(reg)
    S.cosign_sign_cert(reg, image, work, pki_key, pki)
    good = cert_rule(
        "release", f"{reg.host}/models", pki.root_path,
        '{ san = "release@acme\\\\.test", issuer = "https://accounts\\\\.acme\\\\.test" }',
    )  # fmt: skip
    d = make_driver("--policy-config", str(write_policy(tmp_path / "good.toml", good)))
    d.publish(target(tmp_path), {"image": image.reference})
    wrong = cert_rule(
        "release", f"{reg.host}/models", pki.root_path, '{ san = "ci@acme\\\\.test" }'
    )
    d2 = make_driver("--policy-config", str(write_policy(tmp_path / "wrong.toml", wrong)))
    message = denied(lambda: d2.publish(target(tmp_path), {"image": image.reference}))
    assert "certificate identity subject" in message
    assert "san release@acme.test" in message and "wanted san=ci@acme\\.test" in message
    # Signed with --certificate alone (no --certificate-chain): the rule's roots
    # carry the intermediate.
    bare = fresh_image(reg)
    S.cosign_sign_cert(reg, bare, work, pki_key, pki, chain=False)
    with_intermediate = cert_rule(
        "release", f"{reg.host}/models", pki.chain_path, '{ san = "release@acme\\\\.test" }'
    )
    d4 = make_driver("--policy-config", str(write_policy(tmp_path / "i.toml", with_intermediate)))
    d4.publish(target(tmp_path), {"image": bare.reference})
    assert "does not chain to a trusted root" in denied(
        lambda: d.publish(target(tmp_path), {"image": bare.reference})
    )
    other_pki = S.make_pki(tmp_path / "other-pki", name="other")
    untrusted = cert_rule("release", f"{reg.host}/models", other_pki.root_path, '{ san = ".*" }')
    d3 = make_driver("--policy-config", str(write_policy(tmp_path / "untrusted.toml", untrusted)))
    message = denied(lambda: d3.publish(target(tmp_path), {"image": image.reference}))
    assert "does not chain to a trusted root" in message


def test_moved_tag_and_copied_or_tampered_signatures_are_refused(
    referrers_registry, make_driver, keys, work, tmp_path
):
    reg = referrers_registry
    signed = fresh_image(reg)
    S.cosign_sign_key(reg, signed, work, keys["ecdsa-p256"])
    policy = key_rule("models", f"{reg.host}/models", keys["ecdsa-p256"].public_path)
    d = make_driver("--policy-config", str(write_policy(tmp_path / "p.toml", policy)))
    # The tag moves to another image after signing: that image has no signature.
    moved = S.push_tiny_image(reg, f"{signed.repo}:v1", content=b"swapped weights\n")
    assert moved.digest != signed.digest
    message = denied(lambda: d.publish(target(tmp_path), {"image": moved.reference}))
    assert "no cosign signature found" in message and moved.digest in message
    # The attacker copies the real signature to the new digest's tag.
    sig_tag = S.referrers_tag(signed.digest, ".sig")
    S.retag(reg, signed.repo, sig_tag, S.referrers_tag(moved.digest, ".sig"))
    message = denied(lambda: d.publish(target(tmp_path), {"image": moved.reference}))
    assert f"a cosign signature names {signed.digest}, not {moved.digest}" in message
    # A payload altered to name the new digest no longer matches its signature.
    sig_manifest = S.get_json(reg, signed.repo, sig_tag)
    layer = sig_manifest["layers"][0]
    payload = json.loads(S.get_blob_bytes(reg, signed.repo, layer["digest"]))
    payload["critical"]["image"]["docker-manifest-digest"] = moved.digest
    forged = json.dumps(payload).encode()
    layer = {**layer, "digest": S._put_blob(reg, signed.repo, forged), "size": len(forged)}
    S.put_manifest(
        reg, signed.repo, S.referrers_tag(moved.digest, ".sig"),
        json.dumps({**sig_manifest, "layers": [layer]}).encode(),
    )  # fmt: skip
    message = denied(lambda: d.publish(target(tmp_path), {"image": moved.reference}))
    assert "signed, but by an unknown key" in message and "payload was altered" in message
    # The signed digest itself still publishes.
    d.publish(target(tmp_path), {"image": f"{reg.host}/{signed.repo}@{signed.digest}"})


def test_signatures_as_referrers_and_bundles(
    referrers_registry, registry, make_driver, keys, pki, pki_key, work, tmp_path
):
    """cosign's referrers mode, attest --new-bundle-format (DSSE), a message-signature
    bundle attached with oras; on olareg (API) and docker-registry 2.8 (fallback tag).
    cosign's bundles carry the leaf alone, so the policy lists the intermediate too."""
    key = keys["ecdsa-p384"]
    cases = []
    for reg in (referrers_registry, registry):
        a, b, c, e = (fresh_image(reg, repo="bundles/m") for _ in range(4))
        S.cosign_sign_key(reg, a, work, key, referrers_mode=True)
        S.cosign_sign_bundle(reg, b, work, key)
        S.cosign_sign_blob_bundle(reg, c, work, key)
        S.cosign_sign_bundle(reg, e, work, pki_key, pki)
        cases.append((reg, a, b, c, e))
    policy = (
        f'[[rule]]\nname = "bundles"\nmatch = ["*"]\n[[rule.require]]\ntype = "cosign"\n'
        f'keys = ["{key.public_path}"]\nroots = ["{pki.chain_path}"]\n'
        f'identities = [{{ san = "release@acme\\\\.test" }}]\n'
    )
    d = make_driver("--policy-config", str(write_policy(tmp_path / "p.toml", policy)))
    for _reg, *images in cases:
        for image in images:
            d.publish(target(tmp_path), {"image": image.reference})
    logged = d.log_text()
    assert "cosign by release@acme.test (referrer sha256:" in logged
    assert "cosign by ecdsa-p384.pub" in logged


def test_warn_mode_publishes_and_counts(referrers_registry, make_driver, keys, tmp_path):
    reg = referrers_registry
    unsigned = fresh_image(reg)
    policy = key_rule("soft", "*", keys["ecdsa-p256"].public_path, mode="warn")
    d = make_driver("--policy-config", str(write_policy(tmp_path / "p.toml", policy)), metrics=True)
    t = target(tmp_path)
    d.publish(t, {"image": unsigned.reference})
    assert (t / "hello.txt").exists()
    assert "signature rule soft (warn mode) not met; publishing" in d.log_text()
    import requests

    text = requests.get(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=10).text
    assert 'csi_oci_signature_checks_total{outcome="warned",rule="soft"} 1.0' in text


def test_a_volume_may_add_a_stricter_rule_never_drop_one(
    referrers_registry, make_driver, keys, work, tmp_path
):
    reg = referrers_registry
    image = fresh_image(reg)
    S.cosign_sign_key(reg, image, work, keys["ecdsa-p256"])
    policy = key_rule("base", f"{reg.host}/models", keys["ecdsa-p256"].public_path) + key_rule(
        "two-keys", "", keys["rsa-3072"].public_path
    ).replace('match = [""]\n', "")
    d = make_driver("--policy-config", str(write_policy(tmp_path / "p.toml", policy)))
    d.publish(target(tmp_path), {"image": image.reference})
    message = denied(
        lambda: d.publish(
            target(tmp_path), {"image": image.reference, "signaturePolicy": "two-keys"}
        )
    )
    assert "refused by signature rule 'two-keys'" in message
    with pytest.raises(grpc.RpcError) as err:
        d.publish(target(tmp_path), {"image": image.reference, "signaturePolicy": "none"})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "names rule 'none', which the node's signature policy" in err.value.details()
    # Naming the base rule itself (or a warn rule) cannot drop the matching rule.
    unsigned = fresh_image(reg)
    denied(lambda: d.publish(
        target(tmp_path), {"image": unsigned.reference, "signaturePolicy": "base"}
    ))  # fmt: skip


def test_cached_result_serves_warm_publishes_and_a_new_rule_verifies_again(
    referrers_registry, make_driver, keys, work, tmp_path
):
    reg = referrers_registry
    image = fresh_image(reg)
    unsigned = fresh_image(reg)
    S.cosign_sign_key(reg, image, work, keys["ecdsa-p256"])
    # Pulled with no policy at all: in the store, verified by nobody.
    d0 = make_driver()
    d0.publish(target(tmp_path), {"image": unsigned.reference, "pullPolicy": "IfNotPresent"})
    state = d0.state_dir
    d0.stop()
    policy = write_policy(
        tmp_path / "p.toml", key_rule("m", f"{reg.host}/models", keys["ecdsa-p256"].public_path)
    )
    d = make_driver("--policy-config", str(policy), state_dir=state)
    message = denied(lambda: d.publish(target(tmp_path), {"image": unsigned.reference}))
    assert "no cosign signature found" in message
    d.publish(target(tmp_path), {"image": image.reference})
    cached = list((state / "signatures").glob("*.json"))
    assert len(cached) == 1
    # Warm: the result is cached; the registry's signature is not read again.
    sig_tag = S.referrers_tag(image.digest, ".sig")
    S.retag(reg, image.repo, image.digest, sig_tag)  # the signature is gone (overwritten)
    d.publish(target(tmp_path), {"image": image.reference, "pullPolicy": "IfNotPresent"})
    # A new key in the rule changes its fingerprint: verified again, and refused.
    policy.write_text(
        key_rule(
            "m", f"{reg.host}/models", keys["ecdsa-p256"].public_path, keys["rsa-3072"].public_path
        )
    )
    time.sleep(0.01)
    message = denied(lambda: d.publish(target(tmp_path), {"image": image.reference}))
    assert "refused by signature rule 'm'" in message


def test_index_signatures_follow_the_rule(referrers_registry, make_driver, keys, work, tmp_path):
    reg = referrers_registry
    image = fresh_image(reg)
    index = {
        "schemaVersion": 2,
        "mediaType": S.OCI_INDEX,
        "manifests": [
            {
                "mediaType": S.OCI_MANIFEST,
                "digest": image.digest,
                "size": len(reg.get_manifest(image.repo, image.digest).content),
                "platform": {"os": "linux", "architecture": "amd64"},
            }
        ],
    }
    index_digest = S.put_manifest(reg, image.repo, "multi", json.dumps(index).encode(), S.OCI_INDEX)
    from tests.support.producers import Pushed

    multi = Pushed(f"{reg.host}/{image.repo}:multi", index_digest)
    S.cosign_sign_key(reg, multi, work, keys["ecdsa-p256"])  # signs the index only
    pub = keys["ecdsa-p256"].public_path
    for signed, ok in (("either", True), ("index", True), ("manifest", False)):
        policy = write_policy(
            tmp_path / f"{signed}.toml", key_rule("m", f"{reg.host}/models", pub, signed=signed)
        )
        d = make_driver("--policy-config", str(policy))
        call = lambda d=d: d.publish(  # noqa: E731
            target(tmp_path), {"image": multi.reference, "platform": "linux/amd64"}
        )
        if ok:
            call()
        else:
            assert "no cosign signature found" in denied(call)
        d.stop()


def test_mirrors_can_neither_hide_nor_forge_signatures(
    referrers_registry, make_driver, keys, work, tmp_path
):
    upstream = referrers_registry
    mirror = S.OlaregRegistry(tmp_path / "mirror")
    try:
        signed = fresh_image(upstream, content=b"mirrored signed\n")
        S.cosign_sign_key(upstream, signed, work, keys["ecdsa-p256"], referrers_mode=True)
        # The mirror has the image but not its signature (stripped).
        S.push_tiny_image(mirror, f"{signed.repo}:v1", content=b"mirrored signed\n")
        unsigned = fresh_image(upstream, content=b"mirrored unsigned\n")
        copy = S.push_tiny_image(mirror, f"{unsigned.repo}:v1", content=b"mirrored unsigned\n")
        assert copy.digest == unsigned.digest
        # The mirror injects a signature by its own key for the unsigned image.
        S.cosign_sign_key(mirror, copy, work, keys["stranger"], referrers_mode=True)
        config = (
            f'[hosts."{upstream.host}"]\n[[hosts."{upstream.host}".mirrors]]\n'
            f'url = "http://{mirror.host}"\n'
        )
        policy = key_rule("m", f"{upstream.host}/models", keys["ecdsa-p256"].public_path)
        d = make_driver(
            "--policy-config", str(write_policy(tmp_path / "p.toml", policy)), config=config
        )
        d.publish(target(tmp_path), {"image": signed.reference})
        message = denied(lambda: d.publish(target(tmp_path), {"image": unsigned.reference}))
        assert "signed, but by an unknown key" in message
    finally:
        mirror.stop()


def test_lazy_volumes_are_checked_before_their_filesystem_starts(
    referrers_registry, make_driver, keys, work, tmp_path
):
    reg = referrers_registry
    layers = [
        estargz_blob(make_layer_tar({"model/weights.bin": os.urandom(200_000)}), tmp_path)
        for _ in range(2)
    ]
    signed = push_lazy_image(reg, layers[:1], f"lazy/signed{next(_counter)}:v1", tmp_path)
    unsigned = push_lazy_image(reg, layers[1:], f"lazy/unsigned{next(_counter)}:v1", tmp_path)
    from tests.support.producers import Pushed

    S.cosign_sign_key(reg, Pushed(signed.reference, signed.digest), work, keys["ecdsa-p256"])
    policy = key_rule("lazy", f"{reg.host}/lazy", keys["ecdsa-p256"].public_path)
    d = make_driver("--policy-config", str(write_policy(tmp_path / "p.toml", policy)))
    t = target(tmp_path)
    d.publish(t, {"image": signed.reference, "mode": "lazy"})
    assert (t / "model/weights.bin").stat().st_size == 200_000
    message = denied(
        lambda: d.publish(target(tmp_path), {"image": unsigned.reference, "mode": "lazy"})
    )
    assert "refused by signature rule 'lazy'" in message
    # Refused before its FUSE server was asked for.
    assert f"lazy filesystem of {unsigned.digest}" not in d.log_text()


def test_a_broken_policy_fails_closed(referrers_registry, make_driver, keys, work, tmp_path):
    reg = referrers_registry
    image = fresh_image(reg)
    S.cosign_sign_key(reg, image, work, keys["ecdsa-p256"])
    policy = write_policy(tmp_path / "p.toml", "[[rule]]\nname = 'x'\nmatch = 3\n")
    d = make_driver("--policy-config", str(policy))
    message = denied(lambda: d.publish(target(tmp_path), {"image": image.reference}))
    assert "signature policy" in message and "cannot be used" in message
    assert "rule 'x'.match: want a list of strings" in message
    # Fixed: re-read on change, and the image publishes.
    policy.write_text(key_rule("m", f"{reg.host}/models", keys["ecdsa-p256"].public_path))
    d.publish(target(tmp_path), {"image": image.reference})
    # Broken again: the last good policy stays in force (still enforced, still verified).
    policy.write_text("not toml [")
    unsigned = fresh_image(reg)
    assert "no cosign signature found" in denied(
        lambda: d.publish(target(tmp_path), {"image": unsigned.reference})
    )
    assert "keeping the last good one" in d.log_text()


def model_rule(name: str, match: str, key: Path) -> str:
    return (
        f'[[rule]]\nname = "{name}"\nmatch = ["{match}"]\n[[rule.require]]\n'
        f'type = "model-signing"\nkeys = ["{key}"]\n'
    )


def write_model(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_model_signing_is_checked_over_the_published_files(
    referrers_registry, registry, make_driver, tmp_path
):
    """OpenSSF model signing: model.sig shipped in the artifact or attached as a
    referrer, verified against the unpacked tree before it is bound."""
    key = S.generate_key_pair("ecdsa-p256", tmp_path / "keys", "model-key")
    files = {"config.json": b'{"layers": 2}', "weights/part-0.bin": os.urandom(100_000)}
    policy = model_rule("oms", "*", key.public_path)
    d = make_driver("--policy-config", str(write_policy(tmp_path / "p.toml", policy)))
    for reg in (referrers_registry, registry):
        n = next(_counter)
        # Shipped inside the artifact (oras push of the directory with model.sig).
        shipped = write_model(tmp_path / f"shipped{n}", files)
        S.model_sign(shipped, tmp_path, key=key)
        pushed = S.push_model_with_signature(reg, f"oms/shipped{n}:v1", tmp_path, shipped)
        t = target(tmp_path)
        d.publish(t, {"image": pushed.reference})
        assert (t / "weights/part-0.bin").read_bytes() == files["weights/part-0.bin"]
        # Attached as a referrer; the artifact holds the model alone.
        alone = write_model(tmp_path / f"alone{n}", files | {"README.md": f"{n}".encode()})
        sig = S.model_sign(alone, tmp_path, key=key, signature=tmp_path / f"alone{n}.sig")
        pushed = S.push_model_with_signature(reg, f"oms/attached{n}:v1", tmp_path, alone)
        S.attach_model_signature(reg, pushed, tmp_path, sig.path)
        d.publish(target(tmp_path), {"image": pushed.reference})
        # Weights swapped after signing, the old model.sig shipped along.
        tampered = write_model(tmp_path / f"tampered{n}", files)
        S.model_sign(tampered, tmp_path, key=key)
        (tampered / "weights/part-0.bin").write_bytes(b"backdoored weights")
        pushed = S.push_model_with_signature(reg, f"oms/tampered{n}:v1", tmp_path, tampered)
        message = denied(
            lambda pushed=pushed: d.publish(target(tmp_path), {"image": pushed.reference})
        )
        assert "'weights/part-0.bin' has different content than when signed" in message
        assert "refused by signature rule 'oms'" in message
    # A lazy volume cannot be checked file by file before it is bound.
    with pytest.raises(grpc.RpcError) as err:
        d.publish(target(tmp_path), {"image": pushed.reference, "mode": "lazy"})
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "requires a model-signing signature" in err.value.details()


def test_notary_project_signatures_jws_and_cose(
    referrers_registry, registry, make_driver, tmp_path
):
    """notation 1.3.2 signatures (referrers API on olareg, fallback tag on
    docker-registry 2.8) against a rule with the test CA and a subject pattern."""
    pki = S.make_pki(tmp_path / "pki", leaf_key_type="rsa-3072", subject_cn="release")
    notation = S.notation_setup(tmp_path / "notation", pki)
    images = []
    for reg in (referrers_registry, registry):
        for fmt in ("jws", "cose"):
            image = fresh_image(reg, repo="notary/m")
            S.notation_sign(reg, image, notation, signature_format=fmt)
            images.append(image)
    unsigned = fresh_image(referrers_registry, repo="notary/m")
    rule = cert_rule(
        "notary", "*", pki.root_path, '{ subject = "CN=release,O=csi-oci tests" }', "notation"
    )
    d = make_driver("--policy-config", str(write_policy(tmp_path / "p.toml", rule)))
    for image in images:
        d.publish(target(tmp_path), {"image": image.reference})
    assert "notation by signer@example.test (referrer sha256:" in d.log_text()
    message = denied(lambda: d.publish(target(tmp_path), {"image": unsigned.reference}))
    assert "no notation signature found" in message
    wrong = cert_rule("notary", "*", pki.root_path, '{ subject = "CN=ci,O=.*" }', "notation")
    d2 = make_driver("--policy-config", str(write_policy(tmp_path / "w.toml", wrong)))
    message = denied(lambda: d2.publish(target(tmp_path), {"image": images[0].reference}))
    assert "certificate identity subject CN=release,O=csi-oci tests" in message


def test_model_signing_with_include_checks_the_files_published(
    referrers_registry, make_driver, tmp_path
):
    """A partial pull (include) is checked file by file: what it publishes must be
    signed and unchanged; what it leaves out is not missing."""
    reg = referrers_registry
    key = S.generate_key_pair("ecdsa-p256", tmp_path / "keys", "model-key")
    files = {"config.json": b'{"a": 1}', "weights/a.bin": b"A" * 5000, "weights/b.bin": b"B"}
    model = write_model(tmp_path / "model", files)
    S.model_sign(model, tmp_path, key=key)
    (model / "weights/b.bin").write_bytes(b"swapped")  # shipped with the old model.sig
    pushed = S.push_model_with_signature(reg, f"oms/partial{next(_counter)}:v1", tmp_path, model)
    policy = model_rule("oms", "*", key.public_path)
    d = make_driver("--policy-config", str(write_policy(tmp_path / "p.toml", policy)))
    t = target(tmp_path)
    d.publish(t, {"image": pushed.reference, "include": "config.json,weights/a.bin"})
    assert sorted(str(p.relative_to(t)) for p in t.rglob("*") if p.is_file()) == [
        "config.json",
        "weights/a.bin",
    ]
    message = denied(
        lambda: d.publish(target(tmp_path), {"image": pushed.reference, "include": "weights/*"})
    )
    assert "'weights/b.bin' has different content than when signed" in message


def test_unreadable_signatures_are_retryable_not_a_verdict(make_driver, keys, work, tmp_path):
    """The image is on the node, its signature cannot be read (registry gone):
    UNAVAILABLE, which kubelet retries, and nothing is published; a warn rule
    publishes."""
    reg = S.OlaregRegistry(tmp_path / "gone")
    try:
        image = fresh_image(reg)
        S.cosign_sign_key(reg, image, work, keys["ecdsa-p256"])
        d0 = make_driver()
        d0.publish(target(tmp_path), {"image": image.reference, "pullPolicy": "IfNotPresent"})
        d0.stop()
    finally:
        reg.stop()
    pub = keys["ecdsa-p256"].public_path
    d = make_driver(
        "--policy-config", str(write_policy(tmp_path / "p.toml", key_rule("m", "*", pub))),
        state_dir=d0.state_dir, config="max_attempts = 1\n",
    )  # fmt: skip
    with pytest.raises(grpc.RpcError) as err:
        d.publish(target(tmp_path), {"image": image.reference, "pullPolicy": "IfNotPresent"})
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "signatures for signature rule 'm' could not all be read" in err.value.details()
    d.stop()
    warn = write_policy(tmp_path / "w.toml", key_rule("m", "*", pub, mode="warn"))
    d2 = make_driver(
        "--policy-config", str(warn), state_dir=d0.state_dir, config="max_attempts = 1\n"
    )
    d2.publish(target(tmp_path), {"image": image.reference, "pullPolicy": "IfNotPresent"})
