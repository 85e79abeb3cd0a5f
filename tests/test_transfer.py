"""Blob transfer under network faults, end to end and piece by piece.

End to end, the real `csi-oci serve` (support.driver.Driver) pulls through a
FaultProxy in front of a real registry. Each scenario ends either with the
exact tree published (compared byte for byte) or with a clear gRPC error
(code plus a message naming the problem). Wrong bytes are never published or
cached: after a failure there is no tree in the store, staging is empty,
every blob in the blob store hashes to its name, and a later publish without
the fault gives the exact tree.

Piece by piece, in-process: RetryPolicy, and ResumableStream and the
parallel-range path of RegistryClient.blob_stream against the FaultProxy
(RegistryClient + VerifyingReader).

The bytes-sent ratios these tests measure are printed; `pytest -s` shows them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import grpc
import pytest

from csi_oci.errors import IntegrityError, RegistryError
from csi_oci.oci import registry as registry_mod
from csi_oci.oci.config import RegistryConfig
from csi_oci.oci.manifest import Descriptor
from csi_oci.oci.registry import RegistryClient
from csi_oci.oci.transfer import RetryPolicy, TransientError, parse_retry_after
from csi_oci.spec.credentials import Credentials
from csi_oci.spec.reference import parse_reference
from csi_oci.stream.verify import VerifyingReader
from tests.support.artifacts import Artifact, Blob, digest_of, oras_files, push_artifact
from tests.support.driver import Driver, tree_of
from tests.support.faultproxy import (
    Cut,
    FaultProxy,
    RecordingBlobServer,
    Scenario,
    Status,
    corrupt,
    cut,
    ignore_range,
    manifest_status,
    redirect,
    stall_body,
    stall_first_byte,
    status,
    truncate,
)
from tests.support.images import File, Image, Layer, push_image
from tests.support.registry import TEST_PASSWORD, TEST_USER, Registry
from tests.support.tokenserver import TokenServer

MiB = 1 << 20
CONFIG_TYPE = "application/vnd.example.transfer.config.v1+json"
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
SECRETS = {"username": TEST_USER, "password": TEST_PASSWORD}

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="publishing bind-mounts: needs root")


# -- helpers -------------------------------------------------------------------------


def data_for(label: str, size: int) -> bytes:
    """Deterministic bytes, different for every label (the blob store dedups by digest)."""
    return random.Random(label).randbytes(size)


def raw_artifact(files: dict[str, bytes]) -> Artifact:
    """An ORAS artifact (one raw file per layer) with a 4 KiB config.

    oras' own config is `{}`: two bytes, so a cut leaves one byte, and every
    further cut of that one-byte range sends nothing (no progress, full
    backoff). A config with room for real cut offsets keeps the tests about
    the layers and fast.
    """
    art = oras_files(files)
    art.config = Blob(json.dumps({"padding": "x" * 4096}).encode(), CONFIG_TYPE)
    return art


def only(digest: str, scenario: Scenario) -> Scenario:
    """Restrict a FaultProxy scenario to one blob (e.g. leave the config alone)."""
    base = scenario.matches
    scenario.matches = lambda ctx: base(ctx) and ctx.key == digest  # type: ignore[method-assign]
    return scenario


class Spy(Scenario):
    """Acts on nothing: notes when each blob GET arrives and how many GETs of
    the same blob were in flight then (itself included). Put it first: a
    scenario that answers a request itself stops the ones after it."""

    name = "spy"

    def __init__(self, proxy: FaultProxy) -> None:
        super().__init__(None)
        self._proxy = proxy
        self.arrivals: list[tuple[str | None, float]] = []
        self.in_flight: list[int] = []

    def before(self, ctx):
        self.arrivals.append((ctx.key, time.monotonic()))
        self.in_flight.append(sum(1 for r in self._proxy.blob_requests(ctx.key) if not r.complete))
        return False, None

    def arrivals_of(self, digest: str) -> list[float]:
        return [t for key, t in self.arrivals if key == digest]


class ManifestCut(Cut):
    """`cut` for manifest bodies (the stock scenarios cut blob bodies only)."""

    kinds = ("manifest",)


class Revoke(Status):
    """Refuse ranged blob GETs that carry a token with 401 and the registry's
    Bearer challenge, as a registry does for a token that expired or was
    revoked; notes how many tokens had been issued at the first refusal."""

    name = "revoke"

    def __init__(self, proxy: FaultProxy, tokens: TokenServer, scope: str, times: int) -> None:
        super().__init__(401, times, per_key=False)
        self._proxy = proxy
        self._tokens = tokens
        self.challenge = (
            f'Bearer realm="{tokens.realm}",service="{tokens.service}",scope="{scope}",'
            'error="invalid_token"'
        )
        self.issued_at_refusal: int | None = None

    def before(self, ctx):
        latest = [r for r in self._proxy.requests if r.path == ctx.path][-1]
        if ctx.range is None or not latest.authorization:
            return False, None
        acted, reply = super().before(ctx)
        if reply is not None:
            reply.headers.append(("WWW-Authenticate", self.challenge))
            if self.issued_at_refusal is None:
                self.issued_at_refusal = self._tokens.tokens_issued
        return acted, reply


_volumes = itertools.count()


def _target(tmp_path):
    n = next(_volumes)
    target = tmp_path / "pods" / f"uid-{n}" / "volumes" / "vol" / "mount"
    target.parent.mkdir(parents=True, exist_ok=True)
    return target, f"vol-{n}"


def publish_tree(driver: Driver, tmp_path, ref: str, secrets=None) -> dict[str, object]:
    target, volume_id = _target(tmp_path)
    driver.publish(target, {"image": ref}, volume_id=volume_id, secrets=secrets)
    try:
        return tree_of(target)
    finally:
        driver.unpublish(target, volume_id=volume_id)


def publish_error(driver: Driver, tmp_path, ref: str, secrets=None) -> grpc.RpcError:
    target, volume_id = _target(tmp_path)
    with pytest.raises(grpc.RpcError) as info:
        driver.publish(target, {"image": ref}, volume_id=volume_id, secrets=secrets)
    return info.value


def assert_blob_store_sound(driver: Driver) -> None:
    """Every file in the blob store is a complete blob that hashes to its name."""
    blobs = driver.state_dir / "blobs" / "sha256"
    for entry in sorted(blobs.iterdir()) if blobs.is_dir() else []:
        assert re.fullmatch(r"[0-9a-f]{64}", entry.name), f"stray file in the blob store: {entry}"
        with open(entry, "rb") as f:
            got = hashlib.file_digest(f, "sha256").hexdigest()
        assert got == entry.name, f"blob store holds wrong bytes under {entry.name}"


def assert_nothing_kept(driver: Driver) -> None:
    """After a failed pull (on a driver that pulled nothing else): no trace of it."""
    images = driver.state_dir / "images" / "sha256"
    assert not images.is_dir() or not list(images.iterdir()), list(images.iterdir())
    staging = driver.state_dir / "staging"
    assert not staging.is_dir() or not list(staging.iterdir()), list(staging.iterdir())
    assert_blob_store_sound(driver)


def assert_resumed(proxy: FaultProxy, digest: str, size: int, cuts: int) -> float:
    """The blob came in cuts + 1 requests, each resuming exactly where the last
    stopped (`Range: bytes=N-`), so no byte was sent twice; returns the ratio
    of bytes sent to the blob size."""
    reqs = proxy.blob_requests(digest)
    assert len(reqs) == cuts + 1, [(r.range, r.status, r.body_bytes) for r in reqs]
    assert reqs[0].range is None and reqs[0].status == 200
    received = reqs[0].body_bytes
    for r in reqs[1:]:
        m = RANGE.match(r.range or "")
        assert m, f"a resumed request without Range: {r}"
        assert int(m.group(1)) == received, f"resumed at {m.group(1)}, had {received}"
        assert m.group(2) in ("", str(size - 1))
        assert r.status == 206
        received += r.body_bytes
    assert received == size
    ratio = proxy.bytes_sent(digest) / size
    assert ratio < 1.3, ratio
    return ratio


def report(what: str, ratio: float) -> None:
    print(f"\n[bytes sent / size] {what}: {ratio:.3f}")


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver_args():
    """The module's ``driver`` (tests/conftest.py) serves the scenarios that end in
    success (they do not need an empty store); those that need one use make_driver."""
    return ["--first-byte-timeout", "10", "--blob-parallelism", "4"]


@pytest.fixture
def proxy(registry):
    with FaultProxy(registry.url) as p:
        yield p


@pytest.fixture(scope="module")
def big(registry):
    """A 100 MiB raw blob: above the 64 MiB threshold for parallel ranges."""
    data = data_for("big", 100 * MiB)
    push_artifact(registry, raw_artifact({"big.bin": data}), "transfer/big:v1")
    return data


def push_raw(registry: Registry, label: str, size: int, name: str = "w.bin"):
    """Push a one-file artifact; returns (repo:tag, files, layer digest, artifact)."""
    data = data_for(label, size)
    art = raw_artifact({name: data})
    repo_tag = f"transfer/{label}:v1"
    push_artifact(registry, art, repo_tag)
    return repo_tag, {name: data}, digest_of(data), art


# -- connection cut mid-body: resume -----------------------------------------------------


@needs_root
@pytest.mark.slow
def test_cuts_resume_a_raw_blob(driver, registry, proxy, tmp_path):
    repo_tag, files, layer, art = push_raw(registry, "cut-raw", 32 * MiB, "model.bin")
    proxy.set_scenario(cut(times=5, seed=7))
    assert publish_tree(driver, tmp_path, f"{proxy.host}/{repo_tag}") == files
    report("32 MiB raw blob, 5 cuts", assert_resumed(proxy, layer, 32 * MiB, cuts=5))
    assert_resumed(proxy, art.config.digest, len(art.config.data), cuts=5)
    assert_blob_store_sound(driver)


@needs_root
@pytest.mark.slow
def test_cuts_resume_gzip_image_layers(driver, registry, proxy, tmp_path):
    # Two layers: the first is streamed into the tree, the second spooled ahead.
    a, b = data_for("cut-image-a", 3 * MiB), data_for("cut-image-b", 2 * MiB)
    layers = [Layer([File("a.bin", a)]), Layer([File("b.bin", b)])]
    image = Image(layers)
    push_image(registry, image, "transfer/cut-image:v1", tmp_path)
    proxy.set_scenario(cut(times=5, seed=3))
    ref = f"{proxy.host}/transfer/cut-image:v1"
    assert publish_tree(driver, tmp_path, ref) == {"a.bin": a, "b.bin": b}
    for index, layer in enumerate(layers):
        ratio = assert_resumed(proxy, layer.digest, layer.size, cuts=5)
        report(f"gzip image layer {index + 1} ({layer.size} B), 5 cuts", ratio)
    assert_resumed(proxy, image.config_digest, len(image.config_bytes), cuts=5)
    assert_blob_store_sound(driver)


# -- HTTP status answers: retry, Retry-After, give up ---------------------------------------


@needs_root
@pytest.mark.parametrize("code", [500, 503])
def test_server_errors_are_retried(driver, registry, proxy, tmp_path, code):
    repo_tag, files, layer, art = push_raw(registry, f"status-{code}", 256 * 1024)
    proxy.set_scenario(status(code, times=2))
    assert publish_tree(driver, tmp_path, f"{proxy.host}/{repo_tag}") == files
    for digest in (art.config.digest, layer):
        assert [r.status for r in proxy.blob_requests(digest)] == [code, code, 200]
    assert_blob_store_sound(driver)


@needs_root
@pytest.mark.slow
def test_429_waits_for_retry_after(driver, registry, proxy, tmp_path):
    repo_tag, files, layer, _ = push_raw(registry, "status-429", 256 * 1024)
    spy = Spy(proxy)
    proxy.set_scenario(spy, only(layer, status(429, times=2, retry_after=1)))
    assert publish_tree(driver, tmp_path, f"{proxy.host}/{repo_tag}") == files
    assert [r.status for r in proxy.blob_requests(layer)] == [429, 429, 200]
    arrivals = spy.arrivals_of(layer)
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    print(f"\n[429 Retry-After: 1] measured waits before the retries: {gaps}")
    # Backoff alone would wait at most 0.25 s and 0.5 s here: ~1 s is Retry-After.
    assert len(gaps) == 2 and all(0.95 <= g < 1.5 for g in gaps), gaps
    assert_blob_store_sound(driver)


@needs_root
@pytest.mark.slow
def test_status_beyond_max_attempts_is_unavailable(make_driver, registry, proxy, tmp_path):
    d = make_driver(config="max_attempts = 3\n")
    repo_tag, files, layer, _ = push_raw(registry, "status-persists", 256 * 1024)
    ref = f"{proxy.host}/{repo_tag}"
    proxy.set_scenario(only(layer, status(503, times=None)))
    err = publish_error(d, tmp_path, ref)
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    assert "HTTP 503" in err.details()
    assert layer in err.details()
    assert "giving up after 3 attempts" in err.details()
    assert [r.status for r in proxy.blob_requests(layer)] == [503, 503, 503]
    assert_nothing_kept(d)
    proxy.clear_scenario()
    assert publish_tree(d, tmp_path, ref) == files
    assert_blob_store_sound(d)


# -- slow first byte ------------------------------------------------------------------------


@needs_root
@pytest.mark.slow
def test_first_byte_stall_within_timeout_succeeds(driver, registry, proxy, tmp_path):
    # `driver` runs with --first-byte-timeout 10.
    repo_tag, files, layer, _ = push_raw(registry, "stall-ok", 256 * 1024)
    proxy.set_scenario(only(layer, stall_first_byte(3)))
    started = time.monotonic()
    assert publish_tree(driver, tmp_path, f"{proxy.host}/{repo_tag}") == files
    assert time.monotonic() - started >= 3
    assert len(proxy.blob_requests(layer)) == 1  # waited; did not time out and retry
    assert_blob_store_sound(driver)


@needs_root
@pytest.mark.slow
def test_first_byte_stall_beyond_timeout_is_unavailable(make_driver, registry, proxy, tmp_path):
    d = make_driver("--first-byte-timeout", "1", config="max_attempts = 2\n")
    repo_tag, files, layer, _ = push_raw(registry, "stall-timeout", 256 * 1024)
    ref = f"{proxy.host}/{repo_tag}"
    proxy.set_scenario(only(layer, stall_first_byte(3)))
    err = publish_error(d, tmp_path, ref)
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    assert "timed out" in err.details()
    assert layer in err.details()
    assert len(proxy.blob_requests(layer)) == 2
    assert_nothing_kept(d)
    proxy.clear_scenario()
    assert publish_tree(d, tmp_path, ref) == files


# -- redirect to blob storage ---------------------------------------------------------------


@needs_root
def test_redirect_to_blob_storage_drops_authorization(driver, token_registry, tmp_path):
    data = data_for("redirect", 256 * 1024)
    push_artifact(token_registry, raw_artifact({"w.bin": data}), "transfer/redirect:v1")
    layer = digest_of(data)
    with (
        RecordingBlobServer(token_registry) as storage,
        FaultProxy(token_registry.url) as proxy,
    ):
        proxy.set_scenario(redirect(storage.url))
        ref = f"{proxy.host}/transfer/redirect:v1"
        assert publish_tree(driver, tmp_path, ref, secrets=SECRETS) == {"w.bin": data}
        served = [r for r in storage.requests if r.path.endswith(layer)]
        assert served, storage.requests
        assert not storage.authorization_seen, [r.headers for r in storage.requests]
        # The same blob request carried the token to the registry (the proxy).
        asked = proxy.blob_requests(layer)
        assert any(r.authorization and r.status == 307 for r in asked), asked
    assert_blob_store_sound(driver)


# -- wrong bytes ----------------------------------------------------------------------------


def _push_for_corruption(registry, kind, tmp_path):
    """(repo:tag, expected tree, digest of the layer to corrupt)."""
    if kind == "raw":
        repo_tag, files, layer, _ = push_raw(registry, "corrupt-raw", 300_000)
        return repo_tag, files, layer
    data = data_for("corrupt-image", 300_000)
    layer = Layer([File("w.bin", data)])
    push_image(registry, Image([layer]), "transfer/corrupt-image:v1", tmp_path)
    return "transfer/corrupt-image:v1", {"w.bin": data}, layer.digest


@needs_root
@pytest.mark.parametrize("kind", ["raw", "image"])
@pytest.mark.slow
def test_corrupt_byte_is_data_loss_and_nothing_kept(make_driver, registry, proxy, tmp_path, kind):
    d = make_driver()
    repo_tag, files, layer = _push_for_corruption(registry, kind, tmp_path)
    ref = f"{proxy.host}/{repo_tag}"
    proxy.set_scenario(only(layer, corrupt(offset=100_000)))
    err = publish_error(d, tmp_path, ref)
    assert err.code() == grpc.StatusCode.DATA_LOSS, (err.code(), err.details())
    assert layer in err.details()
    assert "digest mismatch" in err.details()
    assert_nothing_kept(d)
    proxy.clear_scenario()
    assert publish_tree(d, tmp_path, ref) == files
    assert_blob_store_sound(d)


# -- body cut short -------------------------------------------------------------------------


@needs_root
def test_truncated_body_is_resumed(driver, registry, proxy, tmp_path):
    size = 1 * MiB
    repo_tag, files, layer, _ = push_raw(registry, "truncate-once", size)
    proxy.set_scenario(only(layer, truncate(keep=size // 2, times=1)))
    assert publish_tree(driver, tmp_path, f"{proxy.host}/{repo_tag}") == files
    first, second = proxy.blob_requests(layer)
    assert first.body_bytes == size // 2
    assert second.range == f"bytes={size // 2}-{size - 1}" and second.status == 206
    report("1 MiB raw blob, truncated once at half", assert_resumed(proxy, layer, size, 1))
    assert_blob_store_sound(driver)


@needs_root
@pytest.mark.slow
def test_truncation_every_time_still_progresses(driver, registry, proxy, tmp_path):
    # Every answer is cut after size/8 bytes: eight failures in a row, more than
    # the default six attempts, but each one brings bytes, so each resets the count.
    size = 1 * MiB
    repo_tag, files, layer, _ = push_raw(registry, "truncate-always", size)
    proxy.set_scenario(only(layer, truncate(keep=size // 8, times=None)))
    assert publish_tree(driver, tmp_path, f"{proxy.host}/{repo_tag}") == files
    report("1 MiB raw blob, every answer cut at 1/8", assert_resumed(proxy, layer, size, 7))
    assert_blob_store_sound(driver)


@needs_root
@pytest.mark.slow
def test_truncation_without_progress_fails_cleanly(make_driver, registry, proxy, tmp_path):
    # A server that ignores Range and drops every connection at the same byte:
    # after the first answer nothing new ever arrives.
    d = make_driver(config="max_attempts = 3\n")
    size = 1 * MiB
    repo_tag, files, layer, _ = push_raw(registry, "truncate-stuck", size)
    ref = f"{proxy.host}/{repo_tag}"
    proxy.set_scenario(only(layer, ignore_range()), only(layer, truncate(keep=size // 2)))
    err = publish_error(d, tmp_path, ref)
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    assert f"giving up after 3 attempts at byte {size // 2} of {size}" in err.details()
    assert layer in err.details()
    # The answer that brought bytes and then broke counts as the first attempt of
    # the fresh budget: three requests in all.
    assert len(proxy.blob_requests(layer)) == 3
    assert_nothing_kept(d)
    proxy.clear_scenario()
    assert publish_tree(d, tmp_path, ref) == files


# -- servers that ignore Range ----------------------------------------------------------------


@needs_root
def test_ignored_range_after_cut_discards_the_prefix(driver, registry, proxy, tmp_path):
    size = 1 * MiB
    repo_tag, files, layer, _ = push_raw(registry, "ignore-range", size)
    proxy.set_scenario(ignore_range(), cut(times=1, seed=5))
    assert publish_tree(driver, tmp_path, f"{proxy.host}/{repo_tag}") == files
    first, second = proxy.blob_requests(layer)
    assert first.range is None and 0 < first.body_bytes < size
    assert second.range == f"bytes={first.body_bytes}-{size - 1}"
    assert second.status == 200 and second.body_bytes == size
    ratio = proxy.bytes_sent(layer) / size
    report("1 MiB raw blob, cut once, Range ignored", ratio)
    assert ratio < 2.1
    assert_blob_store_sound(driver)


# -- parallel ranges --------------------------------------------------------------------------


@needs_root
def test_parallel_ranges(driver, registry, proxy, big, tmp_path):
    # `driver` runs with --blob-parallelism 4. A short pause in every answer
    # makes the overlap of the ranged requests certain.
    digest = digest_of(big)
    spy = Spy(proxy)
    proxy.set_scenario(spy, only(digest, stall_body(0.3, after_bytes=1 * MiB)))
    assert publish_tree(driver, tmp_path, f"{proxy.host}/transfer/big:v1") == {"big.bin": big}
    reqs = proxy.blob_requests(digest)
    assert len(reqs) == 7, [r.range for r in reqs]  # 100 MiB in 16 MiB ranges
    assert all(r.status == 206 and RANGE.match(r.range or "") for r in reqs)
    starts = sorted(int(RANGE.match(r.range).group(1)) for r in reqs)  # type: ignore[union-attr]
    assert starts == list(range(0, 100 * MiB, 16 * MiB))
    in_flight = max(
        n for (key, _), n in zip(spy.arrivals, spy.in_flight, strict=True) if key == digest
    )
    print(f"\n[parallel ranges] at most {in_flight} ranged requests in flight")
    assert in_flight >= 3
    ratio = proxy.bytes_sent(digest) / len(big)
    report("100 MiB raw blob, 4 parallel ranges", ratio)
    assert ratio < 1.01
    assert_blob_store_sound(driver)


@needs_root
@pytest.mark.slow
def test_parallel_ranges_fall_back_when_range_is_ignored(make_driver, registry, big, tmp_path):
    d = make_driver("--blob-parallelism", "4")
    digest = digest_of(big)
    with FaultProxy(registry.url, ignore_range()) as proxy:
        assert publish_tree(d, tmp_path, f"{proxy.host}/transfer/big:v1") == {"big.bin": big}
        reqs = proxy.blob_requests(digest)
        assert reqs and all(r.status == 200 for r in reqs)
        assert any(r.range and r.range != f"bytes=0-{16 * MiB - 1}" for r in reqs)
        ratio = proxy.bytes_sent(digest) / len(big)
    report("100 MiB raw blob, parallelism 4, Range ignored", ratio)
    assert_blob_store_sound(d)


# -- token expiry mid-pull --------------------------------------------------------------------


@needs_root
@pytest.mark.slow
def test_token_expiring_mid_pull_is_renewed(driver, tmp_path):
    tokens = TokenServer(
        username=TEST_USER, password=TEST_PASSWORD, expires_in=2, workdir=tmp_path / "tokens"
    )
    try:
        reg = Registry(tmp_path / "registry", token_auth=tokens)
        try:
            size = 1 * MiB
            data = data_for("token-expiry", size)
            push_artifact(reg, raw_artifact({"w.bin": data}), "transfer/token:v1")
            layer = digest_of(data)
            # The layer stalls 2.5 s half-way, then its connection drops: the
            # resumed request comes after the 2 s token has expired.
            scenarios = [stall_body(2.5, after_bytes=size // 2), truncate(keep=size * 3 // 4)]
            with FaultProxy(reg.url, [only(layer, s) for s in scenarios]) as proxy:
                before = tokens.tokens_issued
                ref = f"{proxy.host}/transfer/token:v1"
                assert publish_tree(driver, tmp_path, ref, secrets=SECRETS) == {"w.bin": data}
                issued = tokens.tokens_issued - before
                print(f"\n[token expiry] tokens issued for one pull: {issued}")
                assert issued > 1
                last = proxy.blob_requests(layer)[-1]
                assert last.status == 206 and last.range == f"bytes={size * 3 // 4}-{size - 1}"
        finally:
            reg.stop()
    finally:
        tokens.stop()


# -- manifests ------------------------------------------------------------------------------


@needs_root
def test_cut_manifest_body_is_retried(driver, registry, proxy, tmp_path):
    repo_tag, files, _, _ = push_raw(registry, "cut-manifest", 64 * 1024)
    proxy.set_scenario(ManifestCut(times=1, seed=1))
    assert publish_tree(driver, tmp_path, f"{proxy.host}/{repo_tag}") == files


# == unit tests: RetryPolicy ===================================================================


def test_backoff_is_exponential_capped_and_jittered():
    policy = RetryPolicy(base_delay=0.25, max_delay=2.0)
    for attempt in range(1, 12):
        cap = min(2.0, 0.25 * 2 ** (attempt - 1))
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0.5 * cap <= d <= cap for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > 0.1 * cap  # jittered, not constant
    assert policy.delay(0) <= 0.25  # attempt numbers start at 1; 0 is not a longer wait


def test_retry_after_is_honoured_and_capped():
    policy = RetryPolicy(base_delay=0.25, max_delay=2.0, max_retry_after=30.0)
    assert policy.delay(1, retry_after=7.0) == 7.0  # exactly, no jitter; above max_delay
    assert policy.delay(5, retry_after=0.5) == 0.5
    assert policy.delay(1, retry_after=3600.0) == 30.0
    assert policy.delay(1, retry_after=-5.0) == 0.0


def test_parse_retry_after():
    assert parse_retry_after("1") == 1.0
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= (parse_retry_after(later) or 0) <= 31
    earlier = format_datetime(datetime.now(UTC) - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(earlier) == 0.0


# == unit tests: RegistryClient blob streams against the FaultProxy =============================


def _client(proxy: FaultProxy, repo: str, **config) -> RegistryClient:
    return RegistryClient(
        parse_reference(f"{proxy.host}/{repo}:v1"), None, config=RegistryConfig(**config)
    )


def _read_verified(client: RegistryClient, digest: str, size: int):
    """The blob through blob_stream + VerifyingReader (readinto, as raw files are read)."""
    desc = Descriptor("application/octet-stream", digest, size, {})
    stream = client.blob_stream(desc, f"blob {digest}")
    try:
        reader = VerifyingReader(stream, digest, size, f"blob {digest}")
        out = bytearray()
        buf = memoryview(bytearray(256 * 1024))
        while n := reader.readinto(buf):
            out += buf[:n]
        assert reader.verified
        return bytes(out), stream
    finally:
        stream.close()


@pytest.fixture(scope="module")
def unit_blob_data():
    return data_for("unit", 2 * MiB)


@pytest.fixture(scope="module")
def unit_blob(registry, unit_blob_data):
    """(repo, data, digest) of a 2 MiB blob for the in-process tests."""
    data = unit_blob_data
    push_artifact(registry, raw_artifact({"u.bin": data}), "transfer/unit:v1")
    return "transfer/unit", data, digest_of(data)


def test_stream_resumes_after_cuts(proxy, unit_blob):
    repo, data, digest = unit_blob
    proxy.set_scenario(cut(times=4, seed=11))
    client = _client(proxy, repo)
    got, stream = _read_verified(client, digest, len(data))
    assert got == data
    assert stream.retries == 4
    assert stream.transferred == len(data) == proxy.bytes_sent(digest)
    assert client.bytes_on_wire == len(data)
    assert_resumed(proxy, digest, len(data), cuts=4)


def test_stream_discards_a_resent_prefix(proxy, unit_blob):
    repo, data, digest = unit_blob
    proxy.set_scenario(ignore_range(), cut(times=1, seed=2))
    got, stream = _read_verified(_client(proxy, repo), digest, len(data))
    assert got == data
    first = proxy.blob_requests(digest)[0].body_bytes
    assert stream.transferred == first + len(data)  # the discarded prefix counts as wire bytes


def test_stream_gives_up_naming_the_status(proxy, unit_blob):
    repo, data, digest = unit_blob
    proxy.set_scenario(status(502, times=None))
    with pytest.raises(RegistryError) as info:
        _read_verified(_client(proxy, repo, max_attempts=2), digest, len(data))
    assert not isinstance(info.value, TransientError)
    assert "HTTP 502" in str(info.value) and "giving up after 2 attempts" in str(info.value)
    assert len(proxy.blob_requests(digest)) == 2


def test_stream_waits_retry_after(proxy, unit_blob):
    repo, data, digest = unit_blob
    spy = Spy(proxy)
    proxy.set_scenario(spy, status(503, times=1, retry_after=0.6))
    got, _ = _read_verified(_client(proxy, repo), digest, len(data))
    assert got == data
    (first, second) = spy.arrivals_of(digest)
    assert 0.55 <= second - first < 1.0


@pytest.fixture
def small_ranges(monkeypatch):
    """Parallel ranges for small blobs: 256 KiB ranges from 1 MiB on."""
    monkeypatch.setattr(registry_mod, "PARALLEL_MIN_BYTES", 1 * MiB)
    monkeypatch.setattr(registry_mod, "RANGE_CHUNK", 256 * 1024)


def test_parallel_ranges_resume_after_cuts(proxy, unit_blob, small_ranges):
    repo, data, digest = unit_blob
    proxy.set_scenario(cut(times=6, seed=4))
    client = _client(proxy, repo, blob_parallelism=4)
    got, _ = _read_verified(client, digest, len(data))
    assert got == data
    reqs = proxy.blob_requests(digest)
    assert len(reqs) == 8 + 6  # eight ranges; each of the six cuts costs one more request
    assert all(r.status == 206 and RANGE.match(r.range or "") for r in reqs)
    assert client.bytes_on_wire == len(data) == proxy.bytes_sent(digest)


def test_parallel_ranges_fall_back_to_one_stream(proxy, unit_blob, small_ranges):
    repo, data, digest = unit_blob
    proxy.set_scenario(ignore_range())
    got, _ = _read_verified(_client(proxy, repo, blob_parallelism=4), digest, len(data))
    assert got == data


def test_stalled_body_times_out_and_resumes(proxy, unit_blob):
    # first_byte_timeout is the socket read timeout: it also ends a body that stalls.
    repo, data, digest = unit_blob
    half = len(data) // 2
    proxy.set_scenario(stall_body(2, after_bytes=half, times=1))
    started = time.monotonic()
    got, stream = _read_verified(_client(proxy, repo, first_byte_timeout=0.5), digest, len(data))
    assert got == data
    assert time.monotonic() - started < 1.8  # gave up on the stalled answer
    assert stream.retries == 1
    assert proxy.blob_requests(digest)[1].range == f"bytes={half}-{len(data) - 1}"


def test_refused_token_mid_pull_is_replaced(token_registry, unit_blob_data):
    # The connection drops once; the resumed request's token is refused (401
    # with a challenge) twice, once more than oras-py retries the same token:
    # the client drops it and fetches a new one, and resumes where it was.
    data = unit_blob_data
    digest = digest_of(data)
    repo = "transfer/refused-token"
    push_artifact(token_registry, raw_artifact({"u.bin": data}), f"{repo}:v1")
    tokens = token_registry.token_server
    with FaultProxy(token_registry.url) as proxy:
        revoke = Revoke(proxy, tokens, f"repository:{repo}:pull", times=2)
        proxy.set_scenario(cut(times=1, seed=9), revoke)
        client = RegistryClient(
            parse_reference(f"{proxy.host}/{repo}:v1"),
            Credentials(TEST_USER, TEST_PASSWORD),
            config=RegistryConfig(),
        )
        got, stream = _read_verified(client, digest, len(data))
        assert got == data
        assert revoke.applied() == 2
        assert revoke.issued_at_refusal is not None
        assert tokens.tokens_issued > revoke.issued_at_refusal  # a fresh token
        reqs = proxy.blob_requests(digest)
        cut_at = next(r.body_bytes for r in reqs if "cut" in r.faults)
        assert reqs[-1].status == 206 and reqs[-1].authorization
        assert reqs[-1].range == f"bytes={cut_at}-{len(data) - 1}"
        assert stream.transferred == len(data)


def test_manifest_status_is_retried(proxy, unit_blob):
    repo, _, _ = unit_blob
    proxy.set_scenario(manifest_status(503, times=2))
    fetched = _client(proxy, repo).get_manifest("v1")
    assert fetched.digest == digest_of(fetched.data)
    assert [r.status for r in proxy.requests if r.kind == "manifest"] == [503, 503, 200]


def test_manifest_status_beyond_max_attempts(proxy, unit_blob):
    repo, _, _ = unit_blob
    proxy.set_scenario(manifest_status(503, times=None))
    with pytest.raises(TransientError, match="HTTP 503"):
        _client(proxy, repo, max_attempts=2).get_manifest("v1")
    assert sum(1 for r in proxy.requests if r.kind == "manifest") == 2


def test_parallel_ranges_give_up_naming_the_status(proxy, unit_blob, small_ranges):
    repo, data, digest = unit_blob
    proxy.set_scenario(status(503, times=None))
    started = time.monotonic()
    with pytest.raises(RegistryError, match="HTTP 503"):
        _read_verified(_client(proxy, repo, blob_parallelism=4, max_attempts=2), digest, len(data))
    assert time.monotonic() - started < 5


def test_parallel_ranges_detect_a_corrupt_byte(proxy, unit_blob, small_ranges):
    repo, data, digest = unit_blob
    proxy.set_scenario(corrupt(offset=1000, times=1))
    with pytest.raises(IntegrityError, match="digest mismatch"):
        _read_verified(_client(proxy, repo, blob_parallelism=4), digest, len(data))
