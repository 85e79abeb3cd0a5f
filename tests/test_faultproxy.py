"""Tests of the robustness-test infrastructure itself: FaultProxy, TLS, mirrors."""

import hashlib
import json
import random
import socket
import ssl
import time
from urllib.parse import urlsplit

import pytest
import requests

from tests.support.artifacts import digest_of, oras_files, push_artifact
from tests.support.faultproxy import (
    FaultProxy,
    RecordingBlobServer,
    classify,
    corrupt,
    cut,
    ignore_range,
    manifest_status,
    redirect,
    stall_body,
    stall_first_byte,
    status,
    truncate,
    wait_for,
)
from tests.support.mirrors import mirror_pair
from tests.support.registry import ACCEPT_MANIFESTS, Registry
from tests.support.tlsutil import issue_client_cert, issue_server_cert, make_ca

BLOB_SIZE = 300_000
REPO = "faultproxy/model"


def _data(seed: int, size: int = BLOB_SIZE) -> bytes:
    return random.Random(seed).randbytes(size)


def _push(registry: Registry, data: bytes, repo: str = REPO, tag: str = "v1") -> str:
    push_artifact(registry, oras_files({"model.bin": data}), f"{repo}:{tag}")
    return digest_of(data)


@pytest.fixture(scope="module")
def blob(registry):
    """(digest, data) of a blob pushed to the session's anonymous registry."""
    data = _data(1)
    return _push(registry, data), data


@pytest.fixture
def proxy(registry):
    with FaultProxy(registry.url) as p:
        yield p


def _blob_url(base: str, digest: str, repo: str = REPO) -> str:
    return f"{base}/v2/{repo}/blobs/{digest}"


def _raw_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET over a plain socket: (status, headers, every body byte until EOF).

    urllib3 drops the last partial chunk when a body breaks, so exact cut
    offsets are checked at the socket level.
    """
    parts = urlsplit(url)
    lines = [f"GET {parts.path} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        buf = bytearray()
        while chunk := sock.recv(65536):
            buf += chunk
    head, _, body = bytes(buf).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), hdrs, body


def _read_partial(resp: requests.Response) -> tuple[bytes, Exception | None]:
    """Read a streamed body until it ends or breaks (the last partial chunk may be lost)."""
    got = bytearray()
    try:
        for chunk in resp.iter_content(8192):
            got += chunk
    except requests.RequestException as exc:
        return bytes(got), exc
    return bytes(got), None


# -- pass-through --------------------------------------------------------------


def test_classify():
    assert classify("/v2/a/b/blobs/sha256:abc") == ("blob", "sha256:abc")
    assert classify("/v2/a/b/manifests/v1") == ("manifest", "v1")
    assert classify("/v2/a/blobs/uploads/123") == ("other", None)
    assert classify("/v2/") == ("other", None)


def test_passthrough_get_head_manifest(proxy, blob):
    digest, data = blob
    resp = requests.get(_blob_url(proxy.url, digest), timeout=10)
    assert resp.status_code == 200
    assert resp.content == data
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Content-Length"] == str(len(data))
    assert resp.headers["Connection"] == "close"

    head = requests.head(_blob_url(proxy.url, digest), timeout=10)
    assert head.status_code == 200
    assert head.headers["Content-Length"] == str(len(data))

    man = requests.get(
        f"{proxy.url}/v2/{REPO}/manifests/v1", headers={"Accept": ACCEPT_MANIFESTS}, timeout=10
    )
    assert man.status_code == 200
    assert json.loads(man.content)["layers"][0]["digest"] == digest

    assert proxy.bytes_sent(digest) == len(data)  # HEAD sends no body
    recs = proxy.requests
    assert [(r.method, r.kind) for r in recs] == [
        ("GET", "blob"),
        ("HEAD", "blob"),
        ("GET", "manifest"),
    ]
    assert recs[0].key == digest and recs[0].complete and recs[0].status == 200
    assert recs[0].range is None and not recs[0].authorization and not recs[0].faults
    assert recs[2].key == "v1"
    assert proxy.request_count(digest) == 2
    assert proxy.request_count(digest, "GET") == 1


def test_passthrough_range_and_404(proxy, blob):
    digest, data = blob
    resp = requests.get(_blob_url(proxy.url, digest), headers={"Range": "bytes=10-99"}, timeout=10)
    assert resp.status_code == 206
    assert resp.content == data[10:100]
    assert resp.headers["Content-Range"] == f"bytes 10-99/{len(data)}"
    assert proxy.requests[-1].range == "bytes=10-99"
    assert proxy.bytes_sent(digest) == 90

    missing = "sha256:" + "0" * 64
    resp = requests.get(_blob_url(proxy.url, missing), timeout=10)
    assert resp.status_code == 404
    assert resp.json()["errors"][0]["code"] == "BLOB_UNKNOWN"


def test_upload_through_proxy_rewrites_location(proxy, registry):
    data = b"uploaded through the proxy"
    start = requests.post(f"{proxy.url}/v2/{REPO}/blobs/uploads/", timeout=10)
    assert start.status_code == 202
    location = start.headers["Location"]
    assert location.startswith(proxy.url + "/v2/"), location
    sep = "&" if "?" in location else "?"
    put = requests.put(f"{location}{sep}digest={digest_of(data)}", data=data, timeout=10)
    assert put.status_code == 201, put.text
    assert put.headers["Location"].startswith(proxy.url)
    assert registry.get_blob(REPO, digest_of(data)).content == data


def test_authorization_forwarded(basic_registry):
    data = _data(2, 5000)
    digest = _push(basic_registry, data)
    with FaultProxy(basic_registry.url) as proxy:
        anon = requests.get(_blob_url(proxy.url, digest), timeout=10)
        assert anon.status_code == 401
        assert anon.headers["WWW-Authenticate"].startswith("Basic ")
        resp = requests.get(
            _blob_url(proxy.url, digest), auth=basic_registry.credentials, timeout=10
        )
        assert resp.status_code == 200 and resp.content == data
        assert [r.authorization for r in proxy.requests] == [False, True]


# -- scenarios -----------------------------------------------------------------


def test_cut_is_deterministic_and_counts_per_blob(proxy, blob):
    digest, data = blob
    scenario = cut(times=2, seed=7)
    proxy.set_scenario(scenario)
    offsets = [scenario.offset(digest, len(data), n) for n in range(2)]
    assert all(0 < o < len(data) for o in offsets)
    # what a client sees: full Content-Length, then a body that ends early
    resp = requests.get(_blob_url(proxy.url, digest), stream=True, timeout=10)
    assert resp.status_code == 200
    assert resp.headers["Content-Length"] == str(len(data))
    got, exc = _read_partial(resp)
    assert isinstance(exc, requests.exceptions.ChunkedEncodingError), exc
    assert "IncompleteRead" in str(exc)
    assert len(got) <= offsets[0] and got == data[: len(got)]
    # exactly where: at the socket level
    code, headers, got = _raw_get(_blob_url(proxy.url, digest))
    assert code == 200 and headers["Content-Length"] == str(len(data))
    assert got == data[: offsets[1]]
    resp = requests.get(_blob_url(proxy.url, digest), timeout=10)
    assert resp.content == data  # third time: used up

    recs = proxy.blob_requests(digest)
    assert [r.faults for r in recs] == [["cut"], ["cut"], []]
    assert [r.body_bytes for r in recs] == [*offsets, len(data)]
    assert [r.complete for r in recs] == [False, False, True]
    assert proxy.bytes_sent(digest) == sum(offsets) + len(data)
    assert scenario.applied(digest) == 2

    # the same seed cuts at the same places again (counters reset by set_scenario)
    proxy.set_scenario(scenario)
    assert _raw_get(_blob_url(proxy.url, digest))[2] == data[: offsets[0]]
    # a different seed cuts elsewhere
    assert cut(seed=8).offset(digest, len(data)) != offsets[0]


def test_cut_ranged_and_other_blob(proxy, registry, blob):
    digest, data = blob
    other = _data(3, 4000)
    other_digest = _push(registry, other, tag="other")
    proxy.set_scenario(cut(times=1, seed=1))
    scenario = proxy.scenarios[0]
    code, headers, got = _raw_get(_blob_url(proxy.url, digest), {"Range": "bytes=1000-"})
    assert code == 206 and headers["Content-Length"] == str(len(data) - 1000)
    assert got == data[1000 : 1000 + scenario.offset(digest, len(data) - 1000)]
    # counted per blob: the other blob is cut once too
    code, headers, got = _raw_get(_blob_url(proxy.url, other_digest))
    assert got == other[: scenario.offset(other_digest, len(other))]
    assert requests.get(_blob_url(proxy.url, other_digest), timeout=10).content == other


@pytest.mark.parametrize(("code", "retry_after"), [(503, 3), (429, 1.5), (500, None)])
def test_status(proxy, blob, code, retry_after):
    digest, data = blob
    proxy.set_scenario(status(code, times=2, retry_after=retry_after))
    first = requests.get(_blob_url(proxy.url, digest), timeout=10)
    second = requests.head(_blob_url(proxy.url, digest), timeout=10)
    third = requests.get(_blob_url(proxy.url, digest), timeout=10)
    assert (first.status_code, second.status_code, third.status_code) == (code, code, 200)
    assert first.json()["errors"][0]["code"]
    assert third.content == data
    if retry_after is None:
        assert "Retry-After" not in first.headers
    else:
        assert float(first.headers["Retry-After"]) == retry_after
        assert second.headers["Retry-After"] == first.headers["Retry-After"]
    # manifests are not affected by a blob status scenario
    proxy.set_scenario(status(code, times=5))
    man = requests.get(
        f"{proxy.url}/v2/{REPO}/manifests/v1", headers={"Accept": ACCEPT_MANIFESTS}, timeout=10
    )
    assert man.status_code == 200


def test_manifest_status(proxy, blob):
    digest, _ = blob
    proxy.set_scenario(manifest_status(503, times=1, retry_after=2))
    url = f"{proxy.url}/v2/{REPO}/manifests/v1"
    first = requests.get(url, headers={"Accept": ACCEPT_MANIFESTS}, timeout=10)
    assert first.status_code == 503 and first.headers["Retry-After"] == "2"
    assert requests.get(url, headers={"Accept": ACCEPT_MANIFESTS}, timeout=10).status_code == 200
    assert requests.get(_blob_url(proxy.url, digest), timeout=10).status_code == 200
    assert [r.faults for r in proxy.requests] == [["status"], [], []]


def test_stall_first_byte(proxy, blob):
    digest, data = blob
    proxy.set_scenario(stall_first_byte(0.5))
    t0 = time.monotonic()
    resp = requests.get(_blob_url(proxy.url, digest), stream=True, timeout=10)
    headers_after = time.monotonic() - t0
    assert resp.status_code == 200
    assert resp.content == data
    assert headers_after >= 0.5
    proxy.set_scenario()
    t0 = time.monotonic()
    requests.get(_blob_url(proxy.url, digest), stream=True, timeout=10).close()
    assert time.monotonic() - t0 < 0.5
    # a read timeout shorter than the stall trips the client
    proxy.set_scenario(stall_first_byte(1.0))
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(_blob_url(proxy.url, digest), timeout=(5, 0.2))


def test_stall_body(proxy, blob):
    digest, data = blob
    proxy.set_scenario(stall_body(0.5, after_bytes=1000))
    resp = requests.get(_blob_url(proxy.url, digest), stream=True, timeout=10)
    t0 = time.monotonic()
    head = resp.raw.read(1000)
    t1 = time.monotonic()
    rest = resp.raw.read()
    t2 = time.monotonic()
    assert head + rest == data
    assert t1 - t0 < t2 - t1
    assert t2 - t1 >= 0.45
    assert proxy.requests[-1].faults == ["stall_body"]


def test_redirect_drops_authorization(basic_registry):
    data = _data(4, 20_000)
    digest = _push(basic_registry, data)
    with (
        RecordingBlobServer(basic_registry) as storage,
        FaultProxy(basic_registry.url) as proxy,
    ):
        proxy.set_scenario(redirect(storage.url))
        resp = requests.get(
            _blob_url(proxy.url, digest),
            auth=basic_registry.credentials,
            headers={"Range": "bytes=0-"},
            timeout=10,
        )
        assert resp.status_code == 206
        assert hashlib.sha256(resp.content).hexdigest() == digest.split(":")[1]
        assert resp.history[0].status_code == 307
        assert resp.history[0].headers["Location"] == storage.url + f"/v2/{REPO}/blobs/{digest}"
        (rec,) = proxy.requests
        assert rec.authorization and rec.status == 307 and rec.faults == ["redirect"]
        (served,) = storage.requests
        assert served.path == f"/v2/{REPO}/blobs/{digest}"
        assert served.header("Range") == "bytes=0-"
        assert served.header("Authorization") is None
        assert not storage.authorization_seen

        # a client that forwards Authorization is caught
        requests.get(storage.url + served.path, headers={"Authorization": "Basic eDp5"})
        assert storage.authorization_seen


def test_redirect_target_by_url(registry, proxy, blob):
    digest, data = blob
    with RecordingBlobServer(registry.url) as storage:
        proxy.set_scenario(redirect(storage.url, times=1))
        assert requests.get(_blob_url(proxy.url, digest), timeout=10).content == data
        head = requests.head(storage.url + f"/v2/{REPO}/blobs/{digest}", timeout=10)
        assert head.headers["Content-Length"] == str(len(data))
        resp = requests.get(_blob_url(proxy.url, digest), timeout=10)
        assert resp.content == data and not resp.history  # times=1: served directly now
        assert [r.method for r in storage.requests] == ["GET", "HEAD"]


@pytest.mark.parametrize("offset", [None, 0, BLOB_SIZE - 1])
def test_corrupt(proxy, blob, offset):
    digest, data = blob
    proxy.set_scenario(corrupt(offset=offset))
    resp = requests.get(_blob_url(proxy.url, digest), timeout=10)
    assert resp.status_code == 200
    got = resp.content
    assert len(got) == len(data)
    assert digest_of(got) != digest
    diff = [i for i in range(len(data)) if got[i] != data[i]]
    assert diff == [len(data) // 2 if offset is None else offset]
    assert got[diff[0]] == data[diff[0]] ^ 0xFF


def test_truncate(proxy, blob):
    digest, data = blob
    proxy.set_scenario(truncate(keep=1000))
    resp = requests.get(_blob_url(proxy.url, digest), stream=True, timeout=10)
    assert resp.headers["Content-Length"] == str(len(data))
    got, exc = _read_partial(resp)
    assert data[:1000].startswith(got)
    assert isinstance(exc, requests.exceptions.ChunkedEncodingError)
    assert _raw_get(_blob_url(proxy.url, digest))[2] == data[:1000]
    assert proxy.bytes_sent(digest) == 2000
    # keep=0: headers, then nothing
    proxy.set_scenario(truncate(keep=0))
    got, exc = _read_partial(requests.get(_blob_url(proxy.url, digest), stream=True))
    assert got == b"" and exc is not None


def test_ignore_range(proxy, blob):
    digest, data = blob
    proxy.set_scenario(ignore_range())
    resp = requests.get(_blob_url(proxy.url, digest), headers={"Range": "bytes=100-"}, timeout=10)
    assert resp.status_code == 200
    assert resp.content == data
    assert "Content-Range" not in resp.headers
    rec = proxy.requests[-1]
    assert rec.range == "bytes=100-" and rec.faults == ["ignore_range"]
    # no Range, nothing to ignore
    requests.get(_blob_url(proxy.url, digest), timeout=10)
    assert proxy.requests[-1].faults == []
    assert proxy.bytes_sent(digest) == 2 * len(data)


def test_scenarios_combine(proxy, blob):
    digest, data = blob
    proxy.set_scenario(stall_first_byte(0.2, times=1), corrupt(offset=5, times=1))
    t0 = time.monotonic()
    got = requests.get(_blob_url(proxy.url, digest), timeout=10).content
    assert time.monotonic() - t0 >= 0.2
    assert got[5] == data[5] ^ 0xFF
    assert proxy.requests[-1].faults == ["stall_first_byte", "corrupt"]
    assert requests.get(_blob_url(proxy.url, digest), timeout=10).content == data


# -- TLS -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    server = issue_server_cert(ca, d)
    client = issue_client_cert(ca, d)
    other_ca = make_ca(d, "other-ca")
    stranger = issue_client_cert(other_ca, d, name="stranger")
    return ca, server, client, stranger


@pytest.mark.slow
def test_tls_registry(tmp_path, pki):
    ca, server, _, _ = pki
    with Registry(tmp_path, tls=server, tls_ca=ca.cert_path) as reg:
        assert reg.url == f"https://{reg.host}"
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{reg.url}/v2/", timeout=10)
        assert requests.get(f"{reg.url}/v2/", verify=str(ca.cert_path), timeout=10).ok
        localhost = f"https://localhost:{reg.port}/v2/"
        assert requests.get(localhost, verify=str(ca.cert_path), timeout=10).ok

        data = _data(5, 10_000)
        digest = _push(reg, data)  # Registry.request speaks TLS
        assert reg.get_blob(REPO, digest).content == data

        # FaultProxy in front of a TLS upstream
        ctx = ssl.create_default_context(cafile=str(ca.cert_path))
        with FaultProxy(reg.url, truncate(keep=10), upstream_ssl_context=ctx) as proxy:
            got, exc = _read_partial(requests.get(_blob_url(proxy.url, digest), stream=True))
            assert data[:10].startswith(got) and exc is not None
            assert _raw_get(_blob_url(proxy.url, digest))[2] == data[:10]
            proxy.set_scenario()
            assert requests.get(_blob_url(proxy.url, digest), timeout=10).content == data


def test_tls_client_certificates(tmp_path, pki):
    ca, server, client, stranger = pki
    verify = str(ca.cert_path)
    with Registry(
        tmp_path / "a", tls=server, tls_ca=ca.cert_path, client_ca=ca.cert_path, client_cert=client
    ) as reg:
        url = f"{reg.url}/v2/"
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(url, verify=verify, timeout=10)
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(url, verify=verify, cert=tuple(map(str, stranger)), timeout=10)
        assert requests.get(url, verify=verify, cert=tuple(map(str, client)), timeout=10).ok
        assert reg.request("GET", "/v2/").ok
        assert "client didn't provide a certificate" in reg.log_text()
    # without client_cert the registry still starts (readiness = listening)
    with Registry(tmp_path / "b", tls=server, tls_ca=ca.cert_path, client_ca=ca.cert_path) as reg:
        with pytest.raises(requests.exceptions.SSLError):
            reg.request("GET", "/v2/")
        assert reg.request("GET", "/v2/", cert=tuple(map(str, client))).ok


# -- mirrors -------------------------------------------------------------------


def test_mirror_pair_serves_upstream_blobs(tmp_path):
    with mirror_pair(tmp_path, fault_proxy=True) as pair:
        data = _data(6, 50_000)
        digest = _push(pair.upstream, data)
        assert pair.mirror.request("GET", "/v2/").ok
        man = pair.mirror.get_manifest(REPO, "v1")
        assert man.status_code == 200
        assert json.loads(man.content)["layers"][0]["digest"] == digest
        assert pair.mirror.get_blob(REPO, digest).content == data
        proxy = pair.proxy
        assert proxy is not None
        # distribution 2.8 fetches a first-pulled blob upstream twice: once
        # streamed to the client, once (concurrently) to store it; the copy
        # lands in storage asynchronously.
        assert proxy.bytes_sent(digest) >= len(data)
        assert wait_for(pair.mirror.blob_path(digest).exists)
        assert wait_for(lambda: all(r.complete for r in proxy.blob_requests(digest)))
        assert pair.mirror.blob_path(digest).read_bytes() == data
        # cached now: served without going upstream again
        proxy.reset_stats()
        assert pair.mirror.get_blob(REPO, digest).content == data
        assert proxy.blob_requests(digest, method=None) == []
        # a manifest by digest is served from the cache too; by tag it is checked
        manifest_digest = pair.upstream.manifest_digest(REPO, "v1")
        assert pair.mirror.get_manifest(REPO, manifest_digest).status_code == 200
        assert proxy.request_count(manifest_digest) == 0
        # pushes to a pull-through cache are refused
        start = pair.mirror.request("POST", f"/v2/{REPO}/blobs/uploads/")
        assert start.status_code == 405
        assert start.json()["errors"][0]["code"] == "UNSUPPORTED"


@pytest.mark.slow
def test_mirror_with_failing_upstream(tmp_path):
    with mirror_pair(tmp_path, fault_proxy=True) as pair:
        proxy = pair.proxy
        assert proxy is not None
        data = _data(7, 10_000)
        digest = _push(pair.upstream, data)
        assert pair.mirror.get_manifest(REPO, "v1").status_code == 200
        # upstream refuses the blob: the mirror answers 500 UNKNOWN, not the 503
        proxy.set_scenario(status(503, times=None, retry_after=5))
        resp = pair.mirror.get_blob(REPO, digest)
        assert resp.status_code == 500
        assert "Retry-After" not in resp.headers
        assert "503" in resp.text
        # upstream refuses manifests: a cached tag is still served
        proxy.set_scenario(manifest_status(503, times=None))
        assert pair.mirror.get_manifest(REPO, "v1").status_code == 200
        assert proxy.requests[-1].faults == ["status"]
