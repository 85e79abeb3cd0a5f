"""Registries as clusters have them, end to end through the real `csi-oci serve`:

1. the TOML registry config: clear errors, mirrors, reloads (mtime, SIGHUP),
   a broken file keeping the previous configuration;
2. real pull-through-cache mirrors (two distribution servers): used, down,
   tampering, and where tags are resolved;
3. TLS: a private CA, skip_verify, client certificates;
4. node docker configs (`--docker-config`) against volume secrets;
5. the disk budget on a small tmpfs: LRU eviction that never touches what is
   published, RESOURCE_EXHAUSTED, `csi-oci gc`, the free-space floor;
6. pull policies with a moving tag.

Needs root (bind mounts, tmpfs).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi_oci.errors import InvalidArgument
from csi_oci.oci.config import parse_config
from csi_oci.unpack.budget import ENTRY_DISK_BYTES
from tests.support.driver import Driver, mount_options, tree_of, wait_for
from tests.support.faultproxy import FaultProxy, corrupt
from tests.support.images import File, Image, Layer, push_image
from tests.support.mirrors import MirrorPair, mirror_pair
from tests.support.registry import TEST_PASSWORD, TEST_USER, Registry
from tests.support.tlsutil import CA, issue_client_cert, issue_server_cert, make_ca

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts and tmpfs need root")

MiB = 1 << 20
UA = '"csi-oci/'  # the driver's User-Agent, as registries log it
MIRROR_UA = '"Go-http-client/'  # distribution's own proxy fetches


# -- helpers ----------------------------------------------------------------------------


def target_in(base: Path, name: str) -> Path:
    """A kubelet-shaped target path whose parent exists (kubelet creates it)."""
    parent = base / "pods" / name / "volumes" / "kubernetes.io~csi" / "vol"
    parent.mkdir(parents=True, exist_ok=True)
    return parent / "mount"


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


def image_of(files: dict[str, bytes], compression: str = "gzip") -> Image:
    return Image(
        [Layer([File(name, data)], compression=compression) for name, data in files.items()]
    )


def blob_digests(img: Image) -> set[str]:
    return {layer.digest for layer in img.layers} | {img.config_digest}


def log_lines(registry: Registry, *needles: str) -> list[str]:
    return [
        line
        for line in registry.log_text().splitlines()
        if all(needle in line for needle in needles)
    ]


def blob_gets(
    registry: Registry, repo: str, agent: str = UA, *, expect: set[str] | None = None
) -> set[str]:
    """Digests of blobs GET from `repo` by `agent`, from the registry's access log.

    The registry logs a request after its response is complete, so the last
    line may land a moment after the client is done: with `expect`, wait
    (up to 5 s) for the log to show at least those.
    """
    deadline = time.monotonic() + 5
    while True:
        out = set()
        for line in log_lines(registry, f'"GET /v2/{repo}/blobs/', agent):
            out.add(line.split(f"/v2/{repo}/blobs/", 1)[1].split()[0])
        if expect is None or expect <= out or time.monotonic() > deadline:
            return out
        time.sleep(0.05)


def write_config(path: Path, text: str) -> None:
    """Rewrite the registry config the way an operator (or a ConfigMap) does.

    The driver notices a change by (mtime, size). Two rewrites of equal size
    within one tick of the kernel's coarse file clock look identical; that
    is what SIGHUP is for, and is tested on its own below, so here an
    unchanged stamp is moved forward a millisecond.
    """
    before = path.stat() if path.exists() else None
    path.write_text(text)
    after = path.stat()
    if before is not None and (before.st_mtime_ns, before.st_size) == (
        after.st_mtime_ns,
        after.st_size,
    ):
        os.utime(path, ns=(after.st_atime_ns, after.st_mtime_ns + 1_000_000))


def mirror_toml(host: str, url: str, *, extra: str = "", top: str = "") -> str:
    return f'{top}\n[[hosts."{host}".mirrors]]\nurl = "{url}"\n{extra}\n'


def cli(state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "csi_oci.cli", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"csi-oci {args} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def trees(state: Path) -> set[str]:
    """Manifest digests of the trees in the store."""
    images = state / "images" / "sha256"
    return {"sha256:" + p.name for p in images.iterdir()} if images.is_dir() else set()


def sighup(driver: Driver) -> None:
    """SIGHUP the driver and wait until the reload has run (and logged its outcome)."""

    def reloads() -> int:
        log = driver.log_text()
        return log.count("loaded registry config") + log.count("not loaded, keeping")

    seen = reloads()
    assert driver.proc is not None
    driver.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: reloads() > seen, timeout=10), "no reload after SIGHUP"


def dockerconfig(auths: dict[str, tuple[str, str]]) -> str:
    return json.dumps(
        {
            "auths": {
                key: {"auth": base64.b64encode(f"{user}:{pw}".encode()).decode()}
                for key, (user, pw) in auths.items()
            }
        }
    )


def _unmount_under(path: Path) -> None:
    prefix = str(path) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split(" ")[4] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


@pytest.fixture(autouse=True)
def _no_leftover_mounts(tmp_path) -> Iterator[None]:
    """A failing test must not leave bind mounts behind (tmp_path cleanup trips on them)."""
    yield
    _unmount_under(tmp_path)


# -- the node under test: one driver whose config files the tests rewrite ----------------

NODE_WRONG_PASSWORD = "node-wide-wrong-password"
SECRET_WRONG_PASSWORD = "volume-secret-wrong-password"


@dataclass
class Node:
    driver: Driver
    config: Path  # --registry-config
    docker_config: Path  # --docker-config
    work: Path


@pytest.fixture(scope="module")
def node(tmp_path_factory, make_module_driver, basic_registry) -> Node:
    work = tmp_path_factory.mktemp("registries-node")
    config = work / "registries.toml"
    config.write_text("# nothing configured yet\n")
    docker_config = work / "kubelet-config.json"
    host = basic_registry.host
    # host-wide entry with a wrong password, a path-prefix entry with the right one:
    # the longest match must win (kubelet's rule), per repository.
    docker_config.write_text(
        dockerconfig(
            {
                f"http://{host}": (TEST_USER, NODE_WRONG_PASSWORD),
                f"{host}/creds": (TEST_USER, TEST_PASSWORD),
            }
        )
    )
    d = make_module_driver("--registry-config", str(config), "--docker-config", str(docker_config))
    return Node(d, config, docker_config, work)


# == 1. the registry config file ===========================================================

SOURCE = "/etc/csi-oci/registries.toml"


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        pytest.param("mirrors = []\n", [SOURCE, "unknown keys", "'mirrors'"], id="unknown-top-key"),
        pytest.param(
            '[hosts."r.example"]\ninsecur = true\n',
            [SOURCE, "hosts.r.example", "'insecur'"],
            id="unknown-host-key",
        ),
        pytest.param(
            '[[hosts."r.example".mirrors]]\nurl = "http://m"\nresolve_tag = true\n',
            [SOURCE, "hosts.r.example", "resolve_tag"],
            id="unknown-mirror-key",
        ),
        pytest.param(
            '[[hosts."r.example".mirrors]]\nurl = "ftp://m.example"\n',
            ["mirror 1 of r.example", "ftp://m.example", "http(s)://host[:port]"],
            id="bad-mirror-url",
        ),
        pytest.param(
            '[[hosts."r.example".mirrors]]\nheaders = {}\n',
            ["mirror 1 of r.example", "url"],
            id="mirror-without-url",
        ),
        pytest.param(
            '[hosts."r.example"]\nca = "/ca.pem"\n\n[hosts."r.example"\n',
            [SOURCE, "not valid TOML", "line 4"],
            id="toml-syntax",
        ),
        pytest.param("max_attempts = 0\n", [SOURCE, "positive"], id="zero-attempts"),
        pytest.param(
            '[hosts."r.example"]\nclient_cert = "/c.pem"\n',
            ["client_cert", "client_key", "r.example"],
            id="client-cert-without-key",
        ),
        pytest.param(
            '[[hosts."r.example".mirrors]]\nurl = "http://m"\nclient_key = "/k.pem"\n',
            ["client_cert", "client_key", "mirror 1 of r.example"],
            id="mirror-client-key-without-cert",
        ),
    ],
)
def test_config_errors_are_clear(text, needles):
    with pytest.raises(InvalidArgument) as info:
        parse_config(text, SOURCE)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            '[hosts."r.example"]\nskip_verify = "false"\n',
            id="skip_verify-string",
        ),
        pytest.param(
            '[hosts."r.example"]\ninsecure = "false"\n',
            id="insecure-string",
        ),
        pytest.param(
            'max_attempts = "six"\n',
            id="number-string",
        ),
        pytest.param(
            'hosts = "r.example"\n',
            id="hosts-not-a-table",
        ),
        pytest.param(
            '[hosts."r.example"]\nmirrors = "mirror.example"\n',
            id="mirrors-not-a-list",
        ),
    ],
)
def test_config_values_of_the_wrong_type_are_refused(text):
    with pytest.raises(InvalidArgument):
        parse_config(text, SOURCE)


def test_mirror_is_used_and_file_edits_apply_to_the_next_publish(node, registry, tmp_path):
    """No restart, no signal: the next publish reads the edited file (mtime/size)."""
    d = node.driver
    proxy = FaultProxy(registry.url)  # a "mirror" that serves the registry's content
    try:
        imgs = {}
        for i in range(3):
            imgs[i] = image_of({"id": f"config-edit-{i}".encode()})
            push_image(registry, imgs[i], f"cfgedit/app{i}:v1", tmp_path)

        node.config.write_text(mirror_toml(registry.host, proxy.url))  # size changes
        t0 = target_in(tmp_path, "edit0")
        d.publish(t0, {"image": f"{registry.host}/cfgedit/app0:v1"})
        assert tree_of(t0) == {"id": b"config-edit-0"}
        served = {r.key for r in proxy.requests if r.kind == "blob" and r.status == 200}
        assert served == blob_digests(imgs[0]), "every blob came through the mirror"

        node.config.write_text("# mirror removed by an operator\n")
        t1 = target_in(tmp_path, "edit1")
        d.publish(t1, {"image": f"{registry.host}/cfgedit/app1:v1"})
        assert tree_of(t1) == {"id": b"config-edit-1"}
        assert not any(r.key in blob_digests(imgs[1]) for r in proxy.requests)

        node.config.write_text(mirror_toml(registry.host, proxy.url, extra="# back again"))
        t2 = target_in(tmp_path, "edit2")
        d.publish(t2, {"image": f"{registry.host}/cfgedit/app2:v1"})
        assert blob_digests(imgs[2]) <= {r.key for r in proxy.requests}
        assert d.proc is not None and d.proc.poll() is None
        assert d.log_text().count(f"loaded registry config {node.config}") >= 3
        for i, t in enumerate((t0, t1, t2)):
            d.unpublish(t)
            assert not t.exists(), i
    finally:
        proxy.stop()


def test_sighup_reloads_the_config(node, registry, tmp_path):
    """An edit the (mtime, size) check cannot see is picked up on SIGHUP."""
    d = node.driver
    first, second = FaultProxy(registry.url), FaultProxy(registry.url)
    try:
        imgs = {}
        for i in range(3):
            imgs[i] = image_of({"id": f"sighup-{i}".encode()})
            push_image(registry, imgs[i], f"sighup/app{i}:v1", tmp_path)
        text1 = mirror_toml(registry.host, first.url)
        text2 = mirror_toml(registry.host, second.url)
        width = max(len(text1), len(text2)) + 10
        text1, text2 = (t + "#" * (width - len(t) - 1) + "\n" for t in (text1, text2))
        write_config(node.config, text1)

        t0 = target_in(tmp_path, "hup0")
        d.publish(t0, {"image": f"{registry.host}/sighup/app0:v1"})
        assert blob_digests(imgs[0]) <= {r.key for r in first.requests}

        # Same size, same mtime: invisible to the stat check.
        st = node.config.stat()
        node.config.write_text(text2)
        os.utime(node.config, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert node.config.stat().st_size == st.st_size
        t1 = target_in(tmp_path, "hup1")
        d.publish(t1, {"image": f"{registry.host}/sighup/app1:v1"})
        assert blob_digests(imgs[1]) <= {r.key for r in first.requests}, "not re-read yet"
        assert not second.requests

        sighup(d)
        t2 = target_in(tmp_path, "hup2")
        d.publish(t2, {"image": f"{registry.host}/sighup/app2:v1"})
        assert blob_digests(imgs[2]) <= {r.key for r in second.requests}
        assert not any(r.key in blob_digests(imgs[2]) for r in first.requests)
        assert "reloading the registry configuration" in d.log_text()
        for t in (t0, t1, t2):
            d.unpublish(t)
    finally:
        first.stop()
        second.stop()


def test_broken_config_keeps_the_previous_one_and_logs_an_error(node, registry, tmp_path):
    d = node.driver
    proxy = FaultProxy(registry.url)
    try:
        imgs = {}
        for i in range(4):
            imgs[i] = image_of({"id": f"broken-{i}".encode()})
            push_image(registry, imgs[i], f"broken/app{i}:v1", tmp_path)
        write_config(node.config, mirror_toml(registry.host, proxy.url))
        targets = []

        def publish_through_mirror(i: int) -> None:
            t = target_in(tmp_path, f"broken{i}")
            targets.append(t)
            d.publish(t, {"image": f"{registry.host}/broken/app{i}:v1"})
            assert tree_of(t) == {"id": f"broken-{i}".encode()}
            assert blob_digests(imgs[i]) <= {r.key for r in proxy.requests}, i

        publish_through_mirror(0)
        # not TOML at all, picked up by the stat check
        write_config(node.config, '[[hosts."oops".mirrors]\nurl = \n')
        publish_through_mirror(1)
        log = d.log_text()
        assert f"registry config {node.config} not loaded, keeping the previous one" in log
        assert "not valid TOML" in log
        assert "ERROR csi_oci.oci.config" in log
        # valid TOML, invalid config, picked up on SIGHUP
        write_config(node.config, f'[hosts."{registry.host}"]\nskip_verfy = true\n')
        sighup(d)
        assert d.proc is not None and d.proc.poll() is None, "a bad file does not kill the driver"
        assert "unknown keys ['skip_verfy']" in d.log_text()
        publish_through_mirror(2)
        # fixed again: the new file applies
        write_config(node.config, "# no mirrors\n")
        t = target_in(tmp_path, "broken3")
        targets.append(t)
        d.publish(t, {"image": f"{registry.host}/broken/app3:v1"})
        assert not any(r.key in blob_digests(imgs[3]) for r in proxy.requests)
        for t in targets:
            d.unpublish(t)
    finally:
        proxy.stop()


@pytest.mark.slow
def test_sighup_with_a_mistyped_number_keeps_the_driver_alive(tmp_path):
    config = tmp_path / "registries.toml"
    config.write_text("max_attempts = 3\n")
    d = Driver(tmp_path / "drv", extra_args=["--registry-config", str(config)])
    try:
        write_config(config, 'max_attempts = "six"\n')
        d.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert d.proc.poll() is None, "the driver died on SIGHUP"
        assert "not loaded, keeping the previous one" in d.log_text()
        err = rpc_error(d.publish, target_in(tmp_path, "x"), {"image": "127.0.0.1:9/x/y:v1"})
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()  # previous config kept
    finally:
        d.kill()


# == 2. mirrors, for real: distribution's pull-through cache ================================


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[MirrorPair]:
    with mirror_pair(tmp_path_factory.mktemp("mirror-pair")) as p:
        yield p


def test_pull_goes_through_the_mirror(node, pair, tmp_path):
    files = {"weights.bin": os.urandom(300_000), "config.json": b'{"layers": 2}'}
    img = image_of(files)
    push_image(pair.upstream, img, "mirrored/model:v1", tmp_path)
    write_config(node.config, mirror_toml(pair.upstream.host, pair.mirror.url))
    target = target_in(tmp_path, "mirrored")
    node.driver.publish(target, {"image": f"{pair.upstream.host}/mirrored/model:v1"})
    try:
        assert tree_of(target) == files
        wanted = blob_digests(img)
        assert blob_gets(pair.mirror, "mirrored/model", expect=wanted) == wanted
        assert blob_gets(pair.upstream, "mirrored/model") == set(), "no blob from the upstream"
        # ... which the mirror fetched from the upstream itself
        assert blob_gets(pair.upstream, "mirrored/model", MIRROR_UA, expect=wanted) == wanted
        # the tag was resolved at the registry, never at the (untrusted) mirror
        assert log_lines(pair.upstream, '"GET /v2/mirrored/model/manifests/v1 ', UA)
        assert not log_lines(pair.mirror, "/v2/mirrored/model/manifests/", UA)
    finally:
        node.driver.unpublish(target)


def test_mirror_down_falls_back_to_the_registry(node, tmp_path):
    files = {"a": os.urandom(50_000), "b": b"bee"}
    img = image_of(files)
    with mirror_pair(tmp_path / "pair") as p:
        push_image(p.upstream, img, "down/model:v1", tmp_path)
        # two attempts per endpoint keep the test quick
        write_config(
            node.config, mirror_toml(p.upstream.host, p.mirror.url, top="max_attempts = 2")
        )
        p.mirror.stop()
        target = target_in(tmp_path, "down")
        node.driver.publish(target, {"image": f"{p.upstream.host}/down/model:v1"})
        try:
            assert tree_of(target) == files
            wanted = blob_digests(img)
            assert blob_gets(p.upstream, "down/model", expect=wanted) == wanted
            log = node.driver.log_text()
            assert f"cannot connect to mirror {p.mirror.url}: connection refused" in log
            assert "trying the next endpoint" in log
        finally:
            node.driver.unpublish(target)


def test_refusing_mirror_costs_no_backoff(node, tmp_path):
    files = {"only": b"one layer"}
    with mirror_pair(tmp_path / "pair") as p:
        push_image(p.upstream, image_of(files), "refused/model:v1", tmp_path)
        # 4 attempts: today >= 2 blobs x (0.125 + 0.25 + 0.5) s of sleeps; a fix: ~0.1 s
        write_config(
            node.config, mirror_toml(p.upstream.host, p.mirror.url, top="max_attempts = 4")
        )
        p.mirror.stop()
        target = target_in(tmp_path, "refused")
        started = time.monotonic()
        node.driver.publish(target, {"image": f"{p.upstream.host}/refused/model:v1"})
        elapsed = time.monotonic() - started
        node.driver.unpublish(target)
        assert elapsed < 1.0, f"a refused connection to a mirror cost {elapsed:.2f}s"


def test_tampering_mirror_is_detected_and_the_registry_used(node, pair, tmp_path):
    files = {"weights.bin": os.urandom(200_000)}
    raw = {"tokenizer.json": os.urandom(100_000)}
    img = Image(
        [
            Layer([File(n, b) for n, b in files.items()], compression="gzip"),
            Layer([File(n, b) for n, b in raw.items()], compression="none"),
        ]
    )
    push_image(pair.upstream, img, "tampered/model:v1", tmp_path)
    # A proxy in front of the mirror flips a byte of every blob longer than 1000 bytes
    # (the layers; the config passes untouched), and is what the driver calls the mirror.
    liar = FaultProxy(pair.mirror.url, corrupt(offset=1000))
    try:
        write_config(node.config, mirror_toml(pair.upstream.host, liar.url))
        target = target_in(tmp_path, "tampered")
        node.driver.publish(target, {"image": f"{pair.upstream.host}/tampered/model:v1"})
        try:
            assert tree_of(target) == {**files, **raw}
            assert any("corrupt" in r.faults for r in liar.requests), "the mirror did lie"
            log = node.driver.log_text()
            assert f"mirror {liar.url} served bytes that do not match" in log
            assert "using the registry itself" in log
            layer_digests = {layer.digest for layer in img.layers}
            assert layer_digests <= blob_gets(pair.upstream, "tampered/model")
        finally:
            node.driver.unpublish(target)
    finally:
        liar.stop()
    hexd = img.manifest_digest.split(":")[1]
    assert (node.driver.state_dir / "images" / "sha256" / hexd).is_dir()
    assert list((node.driver.state_dir / "staging").iterdir()) == []


def test_tags_are_resolved_at_the_registry_unless_the_mirror_resolves_tags(node, pair, tmp_path):
    """A mirror that would answer another manifest for the tag must not win,
    unless it is trusted with `resolve_tags = true`."""
    other = Registry(tmp_path / "other")  # stands in for a mirror with stale/forged tags
    try:
        upstream_files = {"who": b"the registry's v1"}
        other_files = {"who": b"the mirror's v1"}
        push_image(pair.upstream, image_of(upstream_files), "tags/app:v1", tmp_path)
        push_image(other, image_of(other_files), "tags/app:v1", tmp_path)
        ref = f"{pair.upstream.host}/tags/app:v1"

        write_config(node.config, mirror_toml(pair.upstream.host, other.url))
        t1 = target_in(tmp_path, "tags-registry")
        node.driver.publish(t1, {"image": ref, "pullPolicy": "Always"})
        assert tree_of(t1) == upstream_files
        assert not log_lines(other, "/v2/tags/app/manifests/v1 ", UA), "tag asked at the mirror"
        # the mirror was asked for the blobs (by digest: safe), had none, the registry served
        assert blob_gets(other, "tags/app")

        write_config(
            node.config, mirror_toml(pair.upstream.host, other.url, extra="resolve_tags = true")
        )
        t2 = target_in(tmp_path, "tags-mirror")
        node.driver.publish(t2, {"image": ref, "pullPolicy": "Always"})
        assert tree_of(t2) == other_files
        assert log_lines(other, '"GET /v2/tags/app/manifests/v1 ', UA)
        assert tree_of(t1) == upstream_files, "the first volume keeps what it had"
        node.driver.unpublish(t1)
        node.driver.unpublish(t2)
    finally:
        other.stop()


# == 3. TLS ==================================================================================


@dataclass
class Pki:
    ca: CA
    client_ca: CA
    client_cert: Path
    client_key: Path
    tls: Registry  # server certificate from `ca`
    mtls: Registry  # the same, and client certificates from `client_ca` required
    foreign_cert: Path  # a client certificate from another CA
    foreign_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Iterator[Pki]:
    work = tmp_path_factory.mktemp("pki")
    ca = make_ca(work / "pki", "ca")
    server_cert, server_key = issue_server_cert(ca, work / "pki")
    client_ca = make_ca(work / "pki", "client-ca")
    client_cert, client_key = issue_client_cert(client_ca, work / "pki")
    stranger = make_ca(work / "pki", "stranger")
    foreign_cert, foreign_key = issue_client_cert(stranger, work / "pki", name="foreign")
    tls = Registry(work / "tls", tls=(server_cert, server_key), tls_ca=ca.cert_path)
    try:
        mtls = Registry(
            work / "mtls",
            tls=(server_cert, server_key),
            tls_ca=ca.cert_path,
            client_ca=client_ca.cert_path,
            client_cert=(client_cert, client_key),
        )
    except BaseException:
        tls.stop()
        raise
    cert_dir = work / "skopeo-certs"  # skopeo: <name>.cert + <name>.key
    cert_dir.mkdir()
    shutil.copy(client_cert, cert_dir / "client.cert")
    shutil.copy(client_key, cert_dir / "client.key")
    for tag in ("ca", "skip"):
        push_image(tls, image_of({"tls": tag.encode()}), f"tls/app:{tag}", work)
    push_image(
        mtls,
        image_of({"mtls": b"client cert accepted"}),
        "mtls/app:v1",
        work,
        extra_args=["--dest-cert-dir", str(cert_dir)],
    )
    yield Pki(ca, client_ca, client_cert, client_key, tls, mtls, foreign_cert, foreign_key)
    mtls.stop()
    tls.stop()


def test_private_ca_registry(node, pki, tmp_path):
    host = pki.tls.host
    d = node.driver
    target = target_in(tmp_path, "tls")

    write_config(node.config, f'[hosts."{host}"]\ninsecure = false\n')  # https, system CAs
    err = rpc_error(d.publish, target, {"image": f"{host}/tls/app:ca", "pullPolicy": "Always"})
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "TLS error" in err.details() and "CERTIFICATE_VERIFY_FAILED" in err.details()
    assert "private CA" in err.details() and "--registry-config" in err.details()
    assert not target.exists()

    write_config(node.config, f'[hosts."{host}"]\nca = "{pki.ca.cert_path}"\n')
    d.publish(target, {"image": f"{host}/tls/app:ca"})
    assert tree_of(target) == {"tls": b"ca"}
    d.unpublish(target)

    write_config(node.config, f'[hosts."{host}"]\ninsecure = false\nskip_verify = true\n')
    d.publish(target, {"image": f"{host}/tls/app:skip"})
    assert tree_of(target) == {"tls": b"skip"}
    d.unpublish(target)
    assert len(log_lines(pki.tls, '"GET /v2/tls/app/blobs/', UA)) == 4


def test_plain_http_to_a_tls_registry_says_so(node, pki, tmp_path):
    write_config(node.config, "# nothing for the TLS registry\n")
    err = rpc_error(
        node.driver.publish,
        target_in(tmp_path, "plain"),
        {"image": f"{pki.tls.host}/tls/app:ca", "pullPolicy": "Always"},  # not the cached tree
    )
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "https" in err.details().lower() or "tls" in err.details().lower(), err.details()


def test_client_certificate(node, pki, tmp_path):
    host = pki.mtls.host
    d = node.driver
    target = target_in(tmp_path, "mtls")
    ref = f"{host}/mtls/app:v1"

    write_config(node.config, f'[hosts."{host}"]\nca = "{pki.ca.cert_path}"\n')
    err = rpc_error(d.publish, target, {"image": ref, "pullPolicy": "Always"})
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    assert "TLS error" in err.details() and "client certificate" in err.details()
    assert not target.exists()

    write_config(
        node.config,
        f'[hosts."{host}"]\nca = "{pki.ca.cert_path}"\n'
        f'client_cert = "{pki.foreign_cert}"\nclient_key = "{pki.foreign_key}"\n',
    )
    err = rpc_error(d.publish, target, {"image": ref, "pullPolicy": "Always"})
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    assert "TLS error" in err.details()

    write_config(
        node.config,
        f'[hosts."{host}"]\nca = "{pki.ca.cert_path}"\n'
        f'client_cert = "{pki.client_cert}"\nclient_key = "{pki.client_key}"\n',
    )
    d.publish(target, {"image": ref})
    assert tree_of(target) == {"mtls": b"client cert accepted"}
    d.unpublish(target)


# == 4. node credentials ======================================================================


def test_node_docker_config_and_volume_secrets(node, basic_registry, tmp_path):
    reg = basic_registry
    d = node.driver
    write_config(node.config, "# no mirrors\n")
    push_image(reg, image_of({"m": b"private model"}), "creds/model:v1", tmp_path)
    push_image(reg, image_of({"o": b"other"}), "elsewhere/model:v1", tmp_path)

    # No secret: the node's docker config, its most specific entry (host/creds).
    t1 = target_in(tmp_path, "node-creds")
    d.publish(t1, {"image": f"{reg.host}/creds/model:v1"})
    assert tree_of(t1) == {"m": b"private model"}

    # Another repository matches only the node's host-wide entry: a wrong password.
    err = rpc_error(
        d.publish, target_in(tmp_path, "elsewhere"), {"image": f"{reg.host}/elsewhere/model:v1"}
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "with the given credentials" in err.details()

    # A volume's secret for the host wins over the node's (right) entry.
    wrong = {".dockerconfigjson": dockerconfig({reg.host: (TEST_USER, SECRET_WRONG_PASSWORD)})}
    t2 = target_in(tmp_path, "secret-wins")
    attrs = {"image": f"{reg.host}/creds/model:v1", "pullPolicy": "Always"}
    err = rpc_error(d.publish, t2, attrs, volume_id="vol-secret", secrets=wrong)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "nodePublishSecretRef" in err.details()
    assert not t2.exists()

    # A secret with nothing for this host leaves the node's entry in charge.
    unrelated = {".dockerconfigjson": dockerconfig({"other.example": ("bob", "bobs-secret")})}
    d.publish(t2, attrs, volume_id="vol-secret", secrets=unrelated)
    assert tree_of(t2) == {"m": b"private model"}
    d.unpublish(t1)
    d.unpublish(t2, volume_id="vol-secret")

    log = d.log_text()
    for secret in (TEST_PASSWORD, NODE_WRONG_PASSWORD, SECRET_WRONG_PASSWORD, "bobs-secret"):
        assert secret not in log, secret
    for pw in (TEST_PASSWORD, NODE_WRONG_PASSWORD, SECRET_WRONG_PASSWORD):
        assert base64.b64encode(f"{TEST_USER}:{pw}".encode()).decode() not in log
    assert base64.b64encode(b"bob:bobs-secret").decode() not in log


# == 5. disk budget, eviction and gc on a small tmpfs =========================================


@dataclass
class Disk:
    driver: Driver
    state: Path
    work: Path
    refs: dict[str, str]  # name -> reference
    digests: dict[str, str]  # name -> manifest digest
    payloads: dict[str, bytes]
    big_bytes: int  # declared bytes of "big"


# The `disk` tests share one driver and store and build on each other in order:
# they are all marked slow, so `-m "not slow"` leaves the chain out whole.
@pytest.fixture(scope="module")
def disk(tmp_path_factory, registry) -> Iterator[Disk]:
    work = tmp_path_factory.mktemp("disk")
    payloads = {name: os.urandom(8 * MiB) for name in ("a", "b", "c")}
    refs, digests = {}, {}
    for name, data in payloads.items():
        img = Image([Layer([File(f"{name}.bin", data)], compression="none")])  # sizes declared
        digests[name] = push_image(registry, img, f"budget/{name}:v1", work)
        refs[name] = f"{registry.host}/budget/{name}:v1"
    big = Image([Layer([File("big.bin", bytes(30 * MiB))], compression="none")])
    digests["big"] = push_image(registry, big, "budget/big:v1", work)
    refs["big"] = f"{registry.host}/budget/big:v1"
    gz = Image([Layer([File("g.bin", os.urandom(8 * MiB))], compression="gzip")])  # undeclared
    digests["gzip"] = push_image(registry, gz, "budget/gzip:v1", work)
    refs["gzip"] = f"{registry.host}/budget/gzip:v1"
    small = Image([Layer([File("s.txt", b"small")])])
    digests["small"] = push_image(registry, small, "budget/small:v1", work)
    refs["small"] = f"{registry.host}/budget/small:v1"

    mnt = work / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    d = None
    try:
        d = Driver(work / "drv", state_dir=mnt / "state", extra_args=["--cache-max-bytes", "20Mi"])
        yield Disk(d, mnt / "state", work, refs, digests, payloads, big.layers[0].size)
    finally:
        if d is not None:
            d.stop()
        _unmount_under(work / "pods")
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_budget_evicts_lru_but_never_a_published_tree(disk):
    d, state, dig = disk.driver, disk.state, disk.digests
    ta, tb, tc = (target_in(disk.work, n) for n in ("a", "b", "c"))
    d.publish(ta, {"image": disk.refs["a"]}, volume_id="vol-a")
    d.publish(tb, {"image": disk.refs["b"]}, volume_id="vol-b")
    assert trees(state) == {dig["a"], dig["b"]}
    d.unpublish(ta, volume_id="vol-a")
    d.publish(tc, {"image": disk.refs["c"]}, volume_id="vol-c")  # 24 MiB > 20 MiB: evict
    assert trees(state) == {dig["b"], dig["c"]}, "A (least recently used, unused) evicted"
    assert f"evicting tree {disk.refs['a']}" in d.log_text()
    assert (tb / "b.bin").read_bytes() == disk.payloads["b"]

    # 30 MiB declared can never fit a 20 MiB budget: refused up front, sizes named.
    tbig = target_in(disk.work, "big")
    err = rpc_error(d.publish, tbig, {"image": disk.refs["big"]}, volume_id="vol-big")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert f"needs {disk.big_bytes} bytes" in err.details()
    assert f"cache budget {20 * MiB} bytes" in err.details()
    assert list((state / "staging").iterdir()) == []
    assert trees(state) == {dig["b"], dig["c"]}, "the store is intact"
    assert not tbig.exists() and mount_options(tbig) is None
    assert (tb / "b.bin").read_bytes() == disk.payloads["b"]
    assert mount_options(tb) is not None and mount_options(tc) is not None

    # B is now the least recently used tree, but published: C goes instead.
    d.unpublish(tc, volume_id="vol-c")
    d.publish(ta, {"image": disk.refs["a"]}, volume_id="vol-a")
    assert trees(state) == {dig["a"], dig["b"]}
    assert (ta / "a.bin").read_bytes() == disk.payloads["a"]
    assert (tb / "b.bin").read_bytes() == disk.payloads["b"]
    status = json.loads(cli(state, "status").stdout)  # read-only: fine while serving
    assert sum(i["unpacked_bytes"] for i in status["images"]) <= 20 * MiB
    assert {i["digest"]: i["volumes"] for i in status["images"]} == {dig["a"]: 1, dig["b"]: 1}


@pytest.mark.slow
def test_a_pull_that_can_never_fit_evicts_nothing(disk):
    d, state = disk.driver, disk.state
    t = target_in(disk.work, "small")
    d.publish(t, {"image": disk.refs["small"]}, volume_id="vol-small")
    d.unpublish(t, volume_id="vol-small")
    assert disk.digests["small"] in trees(state)
    err = rpc_error(d.publish, target_in(disk.work, "big2"), {"image": disk.refs["big"]})
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert disk.digests["small"] in trees(state), "a cached tree was evicted for nothing"


@pytest.mark.slow
def test_cli_gc_all_removes_the_unused_but_not_the_published(disk):
    d, state, dig = disk.driver, disk.state, disk.digests
    ta, tb = target_in(disk.work, "a"), target_in(disk.work, "b")
    d.unpublish(ta, volume_id="vol-a")
    d.stop()
    proc = cli(state, "--cache-max-bytes", "20Mi", "gc", "--all")
    assert "freed" in proc.stdout
    assert trees(state) == {dig["b"]}, "everything unused went, the published tree stayed"
    listing = cli(state, "ls").stdout
    assert disk.refs["b"] in listing and "1 volume" in listing
    d.start()
    assert mount_options(tb) is not None and (tb / "b.bin").read_bytes() == disk.payloads["b"]
    d.publish(tb, {"image": disk.refs["b"]}, volume_id="vol-b")  # identical republish: no-op
    d.stop()
    cli(state, "gc", "--all")  # still in use after the restart: kept
    assert trees(state) == {dig["b"]}
    d.start()


@pytest.mark.slow
def test_free_space_floor(disk):
    d, state = disk.driver, disk.state
    d.stop()
    st = os.statvfs(state)
    floor = st.f_bavail * st.f_frsize - 4 * MiB  # 4 MiB of room left above the floor
    d.extra_args = ["--cache-max-bytes", "20Mi", "--cache-min-free-bytes", str(floor)]
    d.start()
    before = trees(state)

    # declared sizes: refused before downloading
    t = target_in(disk.work, "floor")
    err = rpc_error(d.publish, t, {"image": disk.refs["c"]}, volume_id="vol-floor")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert f"free-space floor {floor} bytes" in err.details()
    # sizes unknown (gzip): stopped while unpacking, when the floor would be crossed
    err = rpc_error(d.publish, t, {"image": disk.refs["gzip"]}, volume_id="vol-floor")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert "room for" in err.details() and "--cache-min-free-bytes" in err.details()
    assert list((state / "staging").iterdir()) == []
    assert not list((state / "blobs" / "sha256").glob("*.partial"))
    assert trees(state) == before
    assert not t.exists()
    st = os.statvfs(state)
    assert st.f_bavail * st.f_frsize >= floor, "the floor held"
    tb = target_in(disk.work, "b")
    assert (tb / "b.bin").read_bytes() == disk.payloads["b"]
    d.unpublish(tb, volume_id="vol-b")


def test_cli_gc_brings_the_store_under_budget(registry, tmp_path):
    state = tmp_path / "state"
    digests = []
    for name in ("old", "new"):
        img = Image([Layer([File(f"{name}.bin", os.urandom(MiB))], compression="none")])
        digests.append(push_image(registry, img, f"gc/{name}:v1", tmp_path))
        cli(state, "pull", f"{registry.host}/gc/{name}:v1")
    old = state / "images" / "sha256" / digests[0].split(":")[1] / "image.json"
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # least recently used
    proc = cli(state, "--cache-max-bytes", "1536Ki", "gc")
    assert trees(state) == {digests[1]}, proc.stdout
    # A tree's bytes on disk: its one file, and that file's entry (applier.ENTRY_DISK_BYTES).
    assert f"freed {MiB + ENTRY_DISK_BYTES} bytes" in proc.stdout


# == 6. pull policies with a moving tag ==========================================================


@pytest.mark.slow
def test_pull_policies_with_a_moving_tag(tmp_path):
    reg = Registry(tmp_path / "registry")
    config = tmp_path / "registries.toml"
    config.write_text("max_attempts = 1\n")  # a dead registry fails at once
    d = Driver(tmp_path / "drv", extra_args=["--registry-config", str(config)])
    targets: list[tuple[Path, str]] = []
    try:
        ref = f"{reg.host}/policy/app:moving"
        v1 = push_image(reg, image_of({"version": b"v1"}), "policy/app:moving", tmp_path)

        def publish(name: str, policy: str) -> Path:
            t = target_in(tmp_path, name)
            d.publish(t, {"image": ref, "pullPolicy": policy}, volume_id=name)
            targets.append((t, name))
            return t

        t1 = publish("vol1", "Always")
        v2 = push_image(reg, image_of({"version": b"v2"}), "policy/app:moving", tmp_path)
        assert v1 != v2
        t2 = publish("vol2", "Always")
        assert tree_of(t2) == {"version": b"v2"}
        assert tree_of(t1) == {"version": b"v1"}, "a moved tag does not touch volume 1"

        # An unused tree, for gc to have something to remove.
        push_image(reg, image_of({"x": b"unused"}), "policy/unused:v1", tmp_path)
        tu = target_in(tmp_path, "unused")
        d.publish(tu, {"image": f"{reg.host}/policy/unused:v1"}, volume_id="unused")
        d.unpublish(tu, volume_id="unused")
        d.stop()
        cli(d.state_dir, "gc", "--all")
        assert trees(d.state_dir) == {v1, v2}, "v1 is untagged now, but volume 1 uses it"
        d.start()
        assert tree_of(t1) == {"version": b"v1"}

        seen = len(reg.log_text().splitlines())
        t3 = publish("vol3", "IfNotPresent")
        assert tree_of(t3) == {"version": b"v2"}, "the node's last resolution of the tag"
        assert len(reg.log_text().splitlines()) == seen, "IfNotPresent asked the registry"

        reg.stop()
        t4 = publish("vol4", "Never")
        assert tree_of(t4) == {"version": b"v2"}
        err = rpc_error(
            d.publish, target_in(tmp_path, "vol5"), {"image": ref, "pullPolicy": "Always"}
        )
        assert err.code() == grpc.StatusCode.UNAVAILABLE, "Always must ask the (dead) registry"
        assert "cannot connect" in err.details()
        assert len(reg.log_text().splitlines()) == seen
        assert "pulled" not in d.log_text().split("received SIGTERM")[-1], "nothing was pulled"
    finally:
        for t, vid in targets:
            if d.proc is not None:
                d.unpublish(t, volume_id=vid)
        d.stop()
        reg.stop()
