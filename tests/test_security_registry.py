"""Issue 14, findings 2 and 4: what a registry the pod names can make the driver do.

The pod author runs the registry (and so its token realm, its redirects and
its error bodies). These tests put the real driver in front of a scripted
hostile registry (tests/support/hostile_server.py) and check that:

* bodies the driver reads whole are capped on the wire and after decoding:
  the driver's peak RSS stays under 300 MB through a 2 GiB gzip bomb in a
  token response, an error body, a tag list and a manifest (each used to
  take it to 5-6 GB);
* connections, redirects and token realms obey the egress policy, and
  credentials go to a token service on another host only when configured;
* a username/password Secret never reaches a mirror, and pullPolicy Always
  proves the pod's access at the registry itself.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import grpc
import pytest

from csi_oci.oci.egress import EgressPolicy, EgressRefused, check_redirect
from tests.support.driver import Driver
from tests.support.hostile_server import HostileServer, Reply, Request, gzip_bomb, registry_ping
from tests.support.images import File, Image, Layer, push_image
from tests.support.mirrors import mirror_pair
from tests.support.registry import TEST_PASSWORD, TEST_USER
from tests.support.tlsutil import issue_server_cert, make_ca

BOMB = 2 << 30  # inflated bytes; 2.1 MB on the wire
MAX_RSS_MB = 300
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def target(tmp_path: Path, name: str) -> Path:
    parent = tmp_path / "pods" / name
    parent.mkdir(parents=True, exist_ok=True)
    return parent / "mount"


def peak_rss_mb(d: Driver) -> float:
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def one_attempt_driver(tmp_path: Path, config: str = "", name: str = "drv") -> Driver:
    """A driver of the test's own: one attempt per request (max_attempts = 1) and `config`."""
    path = tmp_path / f"{name}-registries.toml"
    path.write_text("max_attempts = 1\n" + config)
    return Driver(tmp_path / name, extra_args=["--registry-config", str(path)])


def publish_error(d: Driver, tmp_path: Path, attrs: dict, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        d.publish(target(tmp_path, f"t{len(list((tmp_path / 'pods').glob('*')))}"), attrs, **kw)
    return info.value


def cache_an_unused_image(d: Driver, registry, tmp_path: Path) -> str:
    """Publish and unpublish a small image: it stays cached, used by no volume."""
    digest = push_image(registry, Image([Layer([File("v", b"victim")])]), "victim/v:1", tmp_path)
    t = target(tmp_path, "victim")
    d.publish(t, {"image": f"{registry.host}/victim/v:1"}, volume_id="victim")
    d.unpublish(t, volume_id="victim")
    assert digest in cached_trees(d)
    return digest


def cached_trees(d: Driver) -> set[str]:
    return {f"sha256:{p.name}" for p in (d.state_dir / "images" / "sha256").iterdir()}


def gzipped(status: int, body: bytes, content_type: str = "application/json") -> Reply:
    return Reply(status, {"Content-Encoding": "gzip", "Content-Type": content_type}, body)


# -- finding 2: memory bombs ----------------------------------------------------------------------


def token_bomb(server_url: str, inflated: int = BOMB):
    def handler(request: Request) -> Reply:
        if request.path.rstrip("/") == "/v2":
            challenge = f'Bearer realm="{server_url}/token",service="evil"'
            return Reply(401, {"WWW-Authenticate": challenge})
        if request.path.startswith("/token"):
            return gzipped(200, gzip_bomb(inflated))
        return Reply(401, {"WWW-Authenticate": f'Bearer realm="{server_url}/token"'})

    return handler


def chunked(make_handler):
    """The same bomb without a Content-Length: only the decoded size can say no."""

    def make(url: str):
        inner = make_handler(url)

        def handler(request: Request) -> Reply:
            reply = inner(request)
            if isinstance(reply.body, bytes) and len(reply.body) > 1 << 16:
                body = reply.body
                reply.body = (body[i : i + (1 << 16)] for i in range(0, len(body), 1 << 16))
            return reply

        return handler

    return make


def error_body_bomb(request: Request) -> Reply:
    if (ping := registry_ping(request)) is not None:
        return ping
    if "/tags/list" in request.path:
        return Reply(404, {}, b'{"errors": [{"code": "NAME_UNKNOWN"}]}')
    return gzipped(404, gzip_bomb(BOMB))


def tag_list_bomb(request: Request) -> Reply:
    if (ping := registry_ping(request)) is not None:
        return ping
    if "/tags/list" in request.path:
        return gzipped(200, gzip_bomb(BOMB))
    return Reply(404, {}, b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no such tag"}]}')


def manifest_bomb(request: Request) -> Reply:
    if (ping := registry_ping(request)) is not None:
        return ping
    return gzipped(200, gzip_bomb(BOMB), MANIFEST_TYPE)


def endless_manifest(request: Request) -> Reply:
    """No Content-Length, no encoding: identity bytes until the reader stops."""
    if (ping := registry_ping(request)) is not None:
        return ping
    return Reply(200, {"Content-Type": MANIFEST_TYPE}, (bytes(1 << 20) for _ in range(4096)))


def zstd_manifest(request: Request) -> Reply:
    if (ping := registry_ping(request)) is not None:
        return ping
    import zstandard

    body = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    return Reply(200, {"Content-Type": MANIFEST_TYPE, "Content-Encoding": "zstd"}, body)


@pytest.mark.parametrize(
    ("name", "make_handler", "code", "words"),
    [
        ("token realm", token_bomb, grpc.StatusCode.UNAVAILABLE, "token response"),
        (
            "token realm, 512 MiB in 0.5 MiB, chunked",
            chunked(lambda url: token_bomb(url, 512 << 20)),
            grpc.StatusCode.UNAVAILABLE,
            "once decompressed",
        ),
        ("404 error body", lambda url: error_body_bomb, grpc.StatusCode.NOT_FOUND, "not found"),
        ("tag list", lambda url: tag_list_bomb, grpc.StatusCode.NOT_FOUND, "not found"),
        ("manifest", lambda url: manifest_bomb, grpc.StatusCode.UNAVAILABLE, "larger than"),
        ("endless manifest", lambda url: endless_manifest, grpc.StatusCode.UNAVAILABLE, "4.0 MiB"),
        ("zstd manifest", lambda url: zstd_manifest, grpc.StatusCode.UNAVAILABLE, "zstd"),
    ],
)
@pytest.mark.slow
def test_bodies_are_capped_and_the_driver_stays_small(
    registry, tmp_path, name, make_handler, code, words
):
    server = HostileServer(lambda r: Reply(500))
    server.handler = make_handler(server.url)
    d = one_attempt_driver(tmp_path)
    try:
        victim = cache_an_unused_image(d, registry, tmp_path)
        err = publish_error(d, tmp_path, {"image": f"{server.host}/evil/model:v1"})
        peak = peak_rss_mb(d)
        print(f"\n[bomb] {name}: {err.code().name}: {err.details()[:160]} | peak RSS {peak:.0f} MB")
        assert err.code() == code, err.details()
        assert words in err.details(), err.details()
        assert peak < MAX_RSS_MB, f"{name}: driver peaked at {peak:.0f} MB"
        assert victim in cached_trees(d), "a failed pull cost an unused cached image"
    finally:
        d.stop()
        server.stop()


@pytest.mark.slow
def test_a_declared_length_over_the_cap_is_refused_before_reading(tmp_path):
    def handler(request: Request) -> Reply:
        if (ping := registry_ping(request)) is not None:
            return ping
        return Reply(200, {"Content-Type": MANIFEST_TYPE, "Content-Length": str(1 << 40)}, [b"x"])

    # A lying Content-Length with chunked bytes is malformed HTTP; the client sees the header.
    with HostileServer(handler) as server:
        d = one_attempt_driver(tmp_path)
        try:
            err = publish_error(d, tmp_path, {"image": f"{server.host}/evil/m:v1"})
            assert "larger than" in err.details() or "connection" in err.details(), err.details()
        finally:
            d.stop()


# -- egress ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "169.254.0.1",
        "fe80::1",
        "fe80::1%eth0",
        "fd00:ec2::254",
        "::ffff:169.254.169.254",
        "100.100.100.200",
        "168.63.129.16",
        "not-an-address",
    ],
)
def test_default_policy_refuses_link_local_and_metadata_addresses(address):
    assert EgressPolicy().refuses(address)


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.5", "::1", "192.168.1.10"])
def test_default_policy_allows_registries(address):
    assert not EgressPolicy().refuses(address)


def test_allow_makes_an_exception_to_the_deny_list():
    from csi_oci.oci.config import parse_config

    cfg = parse_config('[egress]\ndeny = ["10.9.0.0/16"]\nallow = ["169.254.20.10/32"]\n')
    assert cfg.egress.refuses("10.9.1.1") and cfg.egress.refuses("169.254.169.254")
    assert not cfg.egress.refuses("169.254.20.10")


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("https://r.example/v2/", "http://r.example/blob"),
        ("http://r.example/v2/", "file:///etc/passwd"),
        ("http://r.example/v2/", "gopher://r.example/"),
        ("https://r.example/v2/", "ftp://r.example/blob"),
    ],
)
def test_redirects_that_leave_http_or_downgrade_are_refused(src, dst):
    with pytest.raises(EgressRefused):
        check_redirect(src, dst)
    check_redirect("http://r.example/v2/", "https://s3.example/blob?sig=1")  # fine


def test_a_registry_on_a_denied_address_is_never_contacted(registry, tmp_path):
    """127.0.0.2 stands in for the metadata service (it is loopback, so reachable here)."""
    listener = HostileServer(lambda r: Reply(200))
    d = one_attempt_driver(tmp_path, '[egress]\ndeny = ["127.0.0.0/8"]\n')
    try:
        err = publish_error(d, tmp_path, {"image": f"{listener.host}/evil/m:v1"})
        assert "refusing to connect" in err.details(), err.details()
        assert listener.requests == [], "a request reached a denied address"
    finally:
        d.stop()
        listener.stop()


def test_a_name_that_resolves_to_a_denied_address_is_refused(tmp_path):
    """The check is on the connected socket, after DNS: `localhost` is 127.0.0.1."""
    listener = HostileServer(lambda r: Reply(200))
    d = one_attempt_driver(tmp_path, '[egress]\ndeny = ["127.0.0.1/32", "::1/128"]\n')
    try:
        err = publish_error(d, tmp_path, {"image": f"localhost:{listener.port}/evil/m:v1"})
        assert "refusing to connect" in err.details(), err.details()
        assert listener.requests == []
    finally:
        d.stop()
        listener.stop()


@pytest.mark.slow
def test_a_redirect_to_a_denied_address_is_refused(registry, tmp_path):
    """A registry may redirect blobs (presigned URLs): not to the metadata service."""
    victim_ip = "127.0.0.3"
    victim = HostileServer(lambda r: Reply(200, {}, b"node credentials"), bind=victim_ip)

    def handler(request: Request) -> Reply:
        if (ping := registry_ping(request)) is not None:
            return ping
        return Reply(307, {"Location": f"http://{victim_ip}:{victim.port}/latest/meta-data"})

    server = HostileServer(handler)
    d = one_attempt_driver(tmp_path, f'[egress]\ndeny = ["{victim_ip}/32"]\n')
    try:
        err = publish_error(d, tmp_path, {"image": f"{server.host}/evil/m:v1"})
        assert "refusing to connect" in err.details(), err.details()
        assert victim.requests == []
    finally:
        d.stop()
        server.stop()
        victim.stop()


@pytest.mark.slow
def test_an_https_registry_cannot_redirect_to_plain_http(tmp_path):
    ca = make_ca(tmp_path / "pki")
    cert = issue_server_cert(ca, tmp_path / "pki")
    plain = HostileServer(lambda r: Reply(200, {"Content-Type": MANIFEST_TYPE}, b"{}"))

    def handler(request: Request) -> Reply:
        if (ping := registry_ping(request)) is not None:
            return ping
        return Reply(302, {"Location": f"http://{plain.host}{request.path}"})

    server = HostileServer(handler, tls=cert)
    config = f'[hosts."{server.host}"]\ninsecure = false\nca = "{ca.cert_path}"\n'
    d = one_attempt_driver(tmp_path, config)
    try:
        err = publish_error(d, tmp_path, {"image": f"{server.host}/evil/m:v1"})
        assert "https is never downgraded" in err.details(), err.details()
        assert plain.requests == []
    finally:
        d.stop()
        server.stop()
        plain.stop()


# -- token realms and credentials ---------------------------------------------------------------


@pytest.mark.slow
def test_credentials_go_to_a_realm_on_another_host_only_when_configured(token_registry, tmp_path):
    """The token registry's realm is 127.0.0.1; reached as `localhost`, that is another host."""
    push_image(
        token_registry,
        Image([Layer([File("w", b"private")])]),
        "realm/m:v1",
        tmp_path,
        creds=(TEST_USER, TEST_PASSWORD),
    )
    port = token_registry.host.rpartition(":")[2]
    image = f"localhost:{port}/realm/m:v1"
    secrets = {"username": TEST_USER, "password": TEST_PASSWORD}
    d = one_attempt_driver(tmp_path)
    try:
        err = publish_error(d, tmp_path, {"image": image}, secrets=secrets)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
        assert "realm_hosts" in err.details() and "127.0.0.1" in err.details()
    finally:
        d.stop()
    d = one_attempt_driver(
        tmp_path, f'[hosts."localhost:{port}"]\nrealm_hosts = ["127.0.0.1"]\n', "drv2"
    )
    try:
        t = target(tmp_path, "configured")
        d.publish(t, {"image": image}, secrets=secrets)
        assert (t / "w").read_bytes() == b"private"
        d.unpublish(t)
    finally:
        d.stop()


@pytest.mark.slow
def test_a_username_password_secret_never_reaches_a_mirror(basic_registry, tmp_path):
    push_image(
        basic_registry,
        Image([Layer([File("w", b"weights")])]),
        "private/m:v1",
        tmp_path,
        creds=(TEST_USER, TEST_PASSWORD),
    )
    mirror = HostileServer(
        lambda r: Reply(401, {"WWW-Authenticate": 'Basic realm="give me your password"'})
    )
    config = f'[hosts."{basic_registry.host}"]\nmirrors = ["{mirror.url}"]\n'
    d = one_attempt_driver(tmp_path, config)
    try:
        t = target(tmp_path, "m")
        d.publish(
            t,
            {"image": f"{basic_registry.host}/private/m:v1"},
            secrets={"username": TEST_USER, "password": TEST_PASSWORD},
        )
        assert (t / "w").read_bytes() == b"weights"  # from the registry, after the mirror
        d.unpublish(t)
        assert mirror.requests, "the mirror was tried first"
        sent = [r.headers.get("Authorization", "") for r in mirror.requests]
        token = base64.b64encode(f"{TEST_USER}:{TEST_PASSWORD}".encode()).decode()
        assert not any(token in s for s in sent), "the pod's password went to the mirror"
        assert not any(TEST_PASSWORD in json.dumps(r.headers) for r in mirror.requests)
    finally:
        d.stop()
        mirror.stop()


@pytest.mark.slow
def test_pull_policy_always_proves_access_at_the_registry_not_the_mirror(tmp_path):
    """A pull-through mirror pulls with its own credentials: a pod without a secret
    must not get a private image through it by digest when it asks for Always."""
    with mirror_pair(
        tmp_path / "pair", upstream_kwargs={"htpasswd": (TEST_USER, TEST_PASSWORD)}
    ) as pair:
        digest = push_image(
            pair.upstream,
            Image([Layer([File("w", b"private weights")])]),
            "private/m:v1",
            tmp_path,
            creds=(TEST_USER, TEST_PASSWORD),
        )
        image = f"{pair.upstream.host}/private/m@{digest}"
        config = f'[hosts."{pair.upstream.host}"]\nmirrors = ["{pair.mirror.url}"]\n'
        d = one_attempt_driver(tmp_path, config)
        try:
            err = publish_error(d, tmp_path, {"image": image, "pullPolicy": "Always"})
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
            assert "anonymously" in err.details()
            t = target(tmp_path, "with-secret")
            d.publish(
                t,
                {"image": image, "pullPolicy": "Always"},
                secrets={"username": TEST_USER, "password": TEST_PASSWORD},
                volume_id="with-secret",
            )
            assert (t / "w").read_bytes() == b"private weights"
            d.unpublish(t, volume_id="with-secret")
            # The same pod-less request again, now that the tree is cached: still refused.
            err = publish_error(d, tmp_path, {"image": image, "pullPolicy": "Always"})
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
        finally:
            d.stop()


@pytest.mark.slow
def test_state_and_runtime_dirs_are_private_and_logs_0600(registry, tmp_path):
    """State and runtime dirs 0700, the credentials file and FUSE server logs 0600."""
    from tests.support.lazyfixtures import estargz_blob, make_layer_tar, push_lazy_image

    blob = estargz_blob(make_layer_tar({"w": b"weights"}), tmp_path / "blob")
    ref = push_lazy_image(registry, [blob], "perm/lazy:v1", tmp_path).reference
    runtime = tmp_path / "run"
    d = Driver(tmp_path / "drv", extra_args=["--runtime-dir", str(runtime)])
    try:
        t = target(tmp_path, "p")
        secrets = {"username": "u", "password": "p"}  # kept for the FUSE server's restarts
        d.publish(t, {"image": ref, "mode": "lazy"}, secrets=secrets)
        assert (t / "w").read_bytes() == b"weights"
        mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
        assert mode(d.state_dir) == 0o700
        assert mode(runtime) == 0o700
        (creds,) = runtime.glob("*.json")
        assert mode(creds) == 0o600
        logs = list((d.state_dir / "lazy").glob("**/*.log"))
        assert logs and all(mode(p) == 0o600 for p in logs), [(p, oct(mode(p))) for p in logs]
        d.unpublish(t)
    finally:
        d.stop()
