"""Tests of the test infrastructure itself: real registries, skopeo pushes."""

import gzip
import hashlib
import io
import socket
import tarfile
import time
import uuid

import pytest
import requests
import zstandard

from tests.support.images import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_LAYER,
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_LAYER_ZSTD,
    MEDIA_TYPE_MANIFEST,
    CharDevice,
    Dir,
    Fifo,
    File,
    Hardlink,
    Image,
    Index,
    Layer,
    Opaque,
    SkopeoError,
    Symlink,
    Whiteout,
    push_image,
    registry_digests,
    sha256_digest,
    write_oci_layout,
)
from tests.support.registry import (
    TEST_PASSWORD,
    TEST_USER,
    Registry,
    RegistryStartError,
    parse_challenge,
)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def unique_repo(prefix: str = "test") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:10]}"


def three_layer_image(salt: bytes = b"") -> Image:
    return Image(
        [
            Layer([Dir("etc"), File("etc/plain", b"plain" * 300 + salt)], "none"),
            Layer([File("gz/data", b"gzip" * 4000 + salt)], "gzip", members=2),
            Layer([File("zst/data", b"zstd" * 4000 + salt, mode=0o600)], "zstd", members=2),
        ]
    )


# -- builders (no registry) ---------------------------------------------------


def test_layer_entries_make_the_expected_tar():
    raw = tarfile.TarInfo("odd/./name")
    raw.type = tarfile.REGTYPE
    layer = Layer(
        [
            Dir("d", mode=0o700),
            File("/d/f", b"hello", mode=0o640, uid=1000, gid=1001),
            Symlink("d/link", "f"),
            Hardlink("d/hard", "d/f"),
            Whiteout("gone/file"),
            Whiteout("top"),
            Opaque("d"),
            Fifo("d/fifo"),
            CharDevice("d/null", 1, 3),
            raw,
        ],
        compression="none",
    )
    assert layer.media_type == MEDIA_TYPE_LAYER
    assert layer.blob == layer.tar_bytes and layer.digest == layer.diff_id
    with tarfile.open(fileobj=io.BytesIO(layer.tar_bytes)) as tar:
        members = tar.getmembers()
        by_name = {m.name: m for m in members}
        assert [m.name for m in members] == [
            "d",
            "d/f",
            "d/link",
            "d/hard",
            "gone/.wh.file",
            ".wh.top",
            "d/.wh..wh..opq",
            "d/fifo",
            "d/null",
            "odd/./name",
        ]
        assert by_name["d"].isdir() and by_name["d"].mode == 0o700
        f = by_name["d/f"]
        assert (f.mode, f.uid, f.gid) == (0o640, 1000, 1001)
        assert tar.extractfile(f).read() == b"hello"
        assert by_name["d/link"].issym() and by_name["d/link"].linkname == "f"
        assert by_name["d/hard"].islnk() and by_name["d/hard"].linkname == "d/f"
        assert by_name["d/.wh..wh..opq"].size == 0
        assert by_name["d/fifo"].isfifo()
        null = by_name["d/null"]
        assert null.ischr() and (null.devmajor, null.devminor) == (1, 3)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_multi_member_compression_concatenates(compression):
    data = bytes(range(256)) * 200
    layer = Layer([File("blob", data)], compression, members=3)
    if compression == "gzip":
        assert layer.media_type == MEDIA_TYPE_LAYER_GZIP
        assert layer.blob.count(b"\x1f\x8b\x08") >= 3
        assert gzip.decompress(layer.blob) == layer.tar_bytes
    else:
        assert layer.media_type == MEDIA_TYPE_LAYER_ZSTD
        assert layer.blob.count(b"\x28\xb5\x2f\xfd") >= 3
        # A single-frame decoder stops early: readers must go across frames.
        first = zstandard.ZstdDecompressor().decompress(layer.blob)
        assert len(first) < len(layer.tar_bytes)
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(layer.blob), read_across_frames=True
        )
        assert reader.read() == layer.tar_bytes
    assert layer.diff_id == sha(layer.tar_bytes)
    assert layer.digest == sha(layer.blob)


def test_write_oci_layout_keeps_other_tags(tmp_path):
    a = Image([Layer([File("a", b"a")])])
    b = Image([Layer([File("b", b"b")])], architecture="arm64", variant="v8")
    write_oci_layout(tmp_path, a, "one")
    desc = write_oci_layout(tmp_path, [a, b], "two")
    assert desc["mediaType"] == MEDIA_TYPE_INDEX
    index = Index([a, b])
    assert desc["digest"] == index.manifest_digest
    assert [m["platform"] for m in index.index["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    top = (tmp_path / "index.json").read_text()
    assert '"one"' in top and '"two"' in top
    for digest in [*index.blobs(), a.config_digest]:
        blob = tmp_path / "blobs" / "sha256" / digest.split(":")[1]
        assert sha(blob.read_bytes()) == digest


# -- registries ---------------------------------------------------------------


def test_registries_start(registry, basic_registry, token_registry):
    assert requests.get(f"{registry.url}/v2/", timeout=5).status_code == 200
    assert requests.get(f"{basic_registry.url}/v2/", timeout=5).status_code == 401
    assert requests.get(f"{token_registry.url}/v2/", timeout=5).status_code == 401
    assert registry.host.startswith("127.0.0.1:")
    assert len({registry.host, basic_registry.host, token_registry.host}) == 3
    digest = "sha256:" + "ab" * 32
    assert registry.blob_path(digest) == (
        registry.root / "docker/registry/v2/blobs/sha256/ab" / ("ab" * 32) / "data"
    )


def test_registry_start_failure_reports_log_tail(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        with pytest.raises(RegistryStartError, match="address already in use"):
            Registry(tmp_path, port=port)


def test_push_three_layer_image_preserves_digests(registry, tmp_path):
    image = three_layer_image()
    repo = unique_repo()
    digest = push_image(registry, image, f"{repo}:v1", tmp_path)
    # --preserve-digests: the registry holds exactly what was built.
    assert digest == image.manifest_digest

    resp = registry.get_manifest(repo, "v1")
    assert resp.status_code == 200
    assert sha(resp.content) == image.manifest_digest
    assert resp.headers["Docker-Content-Digest"] == image.manifest_digest
    manifest = resp.json()
    assert manifest["mediaType"] == MEDIA_TYPE_MANIFEST
    assert [layer["mediaType"] for layer in manifest["layers"]] == [
        MEDIA_TYPE_LAYER,
        MEDIA_TYPE_LAYER_GZIP,
        MEDIA_TYPE_LAYER_ZSTD,
    ]
    for layer in image.layers:
        blob = registry.get_blob(repo, layer.digest)
        assert blob.status_code == 200
        assert sha(blob.content) == layer.digest
        assert registry.blob_path(layer.digest).read_bytes() == layer.blob
    config = registry.get_blob(repo, image.config_digest)
    assert config.content == image.config_bytes
    assert config.json()["rootfs"]["diff_ids"] == [layer.diff_id for layer in image.layers]
    assert registry_digests(registry, f"{repo}@{digest}")["layers"] == [
        layer.digest for layer in image.layers
    ]


def test_uncompressed_layer_is_gzipped_without_preserve_digests(registry, tmp_path):
    image = Image([Layer([File("x", uuid.uuid4().bytes)], "none")])
    repo = unique_repo()
    digest = push_image(registry, image, f"{repo}:v1", tmp_path, preserve_digests=False)
    assert digest != image.manifest_digest
    manifest = registry.get_manifest(repo, "v1").json()
    assert manifest["layers"][0]["mediaType"] == MEDIA_TYPE_LAYER_GZIP
    blob = registry.get_blob(repo, manifest["layers"][0]["digest"]).content
    assert gzip.decompress(blob) == image.layers[0].tar_bytes


def test_push_two_platform_index(registry, tmp_path):
    amd64 = Image([Layer([File("arch", b"amd64")])])
    arm64 = Image([Layer([File("arch", b"arm64")], "zstd")], architecture="arm64", variant="v8")
    repo = unique_repo()
    digest = push_image(registry, [amd64, arm64], f"{repo}:multi", tmp_path)
    assert digest == Index([amd64, arm64]).manifest_digest
    index = registry.get_manifest(repo, "multi").json()
    assert index["mediaType"] == MEDIA_TYPE_INDEX
    assert [(m["digest"], m["platform"]["architecture"]) for m in index["manifests"]] == [
        (amd64.manifest_digest, "amd64"),
        (arm64.manifest_digest, "arm64"),
    ]
    child = registry.get_manifest(repo, arm64.manifest_digest)
    assert child.status_code == 200 and child.content == arm64.manifest_bytes


def test_push_format_v2s2(registry, tmp_path):
    repo = unique_repo()
    image = Image([Layer([File("a", b"docker")]), Layer([File("b", b"two")], members=2)])
    push_image(registry, image, f"{repo}:single", tmp_path, format="v2s2")
    resp = registry.get_manifest(repo, "single")
    manifest = resp.json()
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert resp.headers["Content-Type"] == DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    # gzip layers are carried over unchanged, only relabelled.
    assert [layer["digest"] for layer in manifest["layers"]] == [
        layer.digest for layer in image.layers
    ]
    assert {layer["mediaType"] for layer in manifest["layers"]} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    }

    amd64 = Image([Layer([File("arch", b"v2s2-amd64")])])
    arm64 = Image([Layer([File("arch", b"v2s2-arm64")])], architecture="arm64")
    push_image(registry, [amd64, arm64], f"{repo}:list", tmp_path, format="v2s2")
    listing = registry.get_manifest(repo, "list").json()
    assert listing["mediaType"] == DOCKER_MANIFEST_LIST
    for entry in listing["manifests"]:
        assert entry["mediaType"] == DOCKER_MANIFEST

    zstd_image = Image([Layer([File("z", b"zstd")], "zstd")])
    with pytest.raises(SkopeoError, match="zstd"):
        push_image(registry, zstd_image, f"{repo}:zstd", tmp_path, format="v2s2")


def test_proxy_registry_pulls_through(registry, tmp_path):
    image = Image([Layer([File("proxied", b"through")])])
    repo = unique_repo()
    push_image(registry, image, f"{repo}:v1", tmp_path)
    with Registry(tmp_path / "proxy", proxy_remote_url=registry.url) as proxy:
        resp = proxy.get_manifest(repo, "v1")
        assert resp.status_code == 200 and sha(resp.content) == image.manifest_digest
        blob = proxy.get_blob(repo, image.layers[0].digest)
        assert blob.content == image.layers[0].blob


# -- auth ---------------------------------------------------------------------


def test_basic_registry_refuses_anonymous_and_accepts_alice(basic_registry, tmp_path):
    resp = requests.get(f"{basic_registry.url}/v2/", timeout=5)
    assert resp.status_code == 401
    assert parse_challenge(resp.headers["WWW-Authenticate"])[0] == "basic"
    assert requests.get(f"{basic_registry.url}/v2/", auth=(TEST_USER, TEST_PASSWORD)).ok
    assert requests.get(f"{basic_registry.url}/v2/", auth=(TEST_USER, "nope")).status_code == 401

    image = Image([Layer([File("secret", b"basic")])])
    repo = unique_repo()
    with pytest.raises(SkopeoError):
        push_image(basic_registry, image, f"{repo}:v1", tmp_path, creds=None)
    digest = push_image(basic_registry, image, f"{repo}:v1", tmp_path)
    assert digest == image.manifest_digest
    assert basic_registry.get_manifest(repo, "v1", credentials=None).status_code == 401
    resp = basic_registry.get_manifest(repo, "v1")
    assert resp.status_code == 200 and sha(resp.content) == digest
    blob = basic_registry.get_blob(repo, image.layers[0].digest)
    assert sha256_digest(blob.content) == image.layers[0].digest


def test_token_registry_flow(token_registry, tmp_path):
    server = token_registry.token_server
    resp = requests.get(f"{token_registry.url}/v2/", timeout=5)
    assert resp.status_code == 401
    scheme, challenge = parse_challenge(resp.headers["WWW-Authenticate"])
    assert scheme == "bearer"
    assert challenge["realm"] == server.realm
    assert challenge["service"] == server.service

    image = Image([Layer([File("secret", b"token")])])
    repo = unique_repo()
    before = server.tokens_issued
    digest = push_image(token_registry, image, f"{repo}:v1", tmp_path)
    assert digest == image.manifest_digest
    assert server.tokens_issued > before  # skopeo and the read-back used tokens

    manifest_url = f"{token_registry.url}/v2/{repo}/manifests/v1"
    accept = {"Accept": MEDIA_TYPE_MANIFEST}
    assert requests.get(manifest_url, headers=accept, timeout=5).status_code == 401

    params = {"service": server.service, "scope": f"repository:{repo}:pull"}
    token_resp = requests.get(server.realm, params=params, auth=(TEST_USER, TEST_PASSWORD))
    assert token_resp.status_code == 200
    body = token_resp.json()
    assert body["token"] == body["access_token"] and body["expires_in"] > 0
    bearer = {**accept, "Authorization": f"Bearer {body['token']}"}
    resp = requests.get(manifest_url, headers=bearer, timeout=5)
    assert resp.status_code == 200 and sha(resp.content) == digest

    # Wrong password and anonymous requests get no token.
    assert requests.get(server.realm, params=params, auth=(TEST_USER, "nope")).status_code == 401
    assert requests.get(server.realm, params=params).status_code == 401

    # A token for another repository, or an expired one, does not open it.
    other = server.make_token(TEST_USER, [{"type": "repository", "name": "x", "actions": ["pull"]}])
    headers = {**accept, "Authorization": f"Bearer {other}"}
    assert requests.get(manifest_url, headers=headers, timeout=5).status_code == 401
    access = [{"type": "repository", "name": repo, "actions": ["pull"]}]
    expired = server.make_token(TEST_USER, access, expires_in=-120)  # past the 60 s leeway
    headers = {**accept, "Authorization": f"Bearer {expired}"}
    assert requests.get(manifest_url, headers=headers, timeout=5).status_code == 401
    fresh = server.make_token(TEST_USER, access)
    headers = {**accept, "Authorization": f"Bearer {fresh}"}
    assert requests.get(manifest_url, headers=headers, timeout=5).status_code == 200


def test_token_server_records_requests(token_registry):
    server = token_registry.token_server
    start = time.time()
    resp = token_registry.request("GET", "/v2/_catalog", scope="registry:catalog:*")
    assert resp.status_code == 200
    last = server.requests[-1]
    assert (last.user, last.status, last.scopes) == (TEST_USER, 200, ["registry:catalog:*"])
    assert time.time() - start < 5
