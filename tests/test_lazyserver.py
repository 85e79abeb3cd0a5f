"""The lazy-server: FUSE servers in their own process (their own container in
the DaemonSet), apart from the gRPC server.

* killing the gRPC server leaves lazy volumes serving;
* killing the lazy-server and every FUSE server it ran (what a container
  restart does) makes reads fail at once (no hang); the restarted
  lazy-server serves the images again with the pod's credentials and binds
  every recorded volume again at its target path, within seconds;
* a registry failing during an on-demand read: that read gets EIO after a
  few quick retries, the log names volume, file and offset, and the next
  read succeeds;
* a registry token expiring mid-life is renewed for on-demand reads.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.driver import Driver, LazyServerProcess
from tests.support.faultproxy import FaultProxy, status
from tests.support.lazyfixtures import estargz_blob, make_layer_tar, push_lazy_image
from tests.support.registry import TEST_PASSWORD, TEST_USER, Registry
from tests.support.tokenserver import TokenServer

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="FUSE mounts need root and /dev/fuse",
)

FILES = {
    "models/config.json": b'{"hidden_size": 64}',
    "models/model.safetensors": os.urandom(6_000_000),
    "models/tokenizer.json": os.urandom(3_000_000),
    "README.md": b"# served by the lazy-server\n",
}
SECRETS = {"username": TEST_USER, "password": TEST_PASSWORD}


@pytest.fixture
def node(tmp_path):
    """A gRPC server in external mode and a lazy-server sharing its state dir."""
    state = tmp_path / "drv" / "state"
    runtime = tmp_path / "run"
    lazy = LazyServerProcess(state, runtime, tmp_path / "lazy-server.log")
    driver = Driver(
        tmp_path / "drv",
        extra_args=["--lazy-server", "external", "--runtime-dir", str(runtime)],
    )
    try:
        yield driver, lazy
    finally:
        driver.stop()
        lazy.stop()
        for pid in lazy.fuse_pids():  # a failed test must not leave FUSE servers behind
            os.kill(pid, signal.SIGKILL)
        for line in reversed(open("/proc/self/mountinfo").read().splitlines()):
            mountpoint = line.split(" ")[4]
            if mountpoint.startswith(str(tmp_path)):
                subprocess.run(["umount", "-l", mountpoint], check=False)


def push_model(registry: Registry, tmp_path: Path, repo_tag: str) -> str:
    blob = estargz_blob(
        make_layer_tar(FILES, dirs=("models",)),
        tmp_path / "blob",
        chunk_size=1 << 20,
        prioritized=("models/config.json",),
    )
    return push_lazy_image(registry, [blob], repo_tag, tmp_path).reference


def target_in(tmp_path: Path, name: str) -> Path:
    parent = tmp_path / "pods" / name
    parent.mkdir(parents=True, exist_ok=True)
    return parent / "mount"


def read_until(path: Path, expected: bytes, timeout: float) -> float:
    """Seconds until `path` reads as `expected` (failing reads are retried)."""
    started = time.monotonic()
    while True:
        try:
            if path.read_bytes() == expected:
                return time.monotonic() - started
        except OSError:
            pass
        assert time.monotonic() - started < timeout, f"{path} did not come back"
        time.sleep(0.1)


@pytest.mark.slow
def test_gRPC_server_restart_leaves_lazy_volumes_serving(registry, node, tmp_path):
    driver, lazy = node
    ref = push_model(registry, tmp_path, "lazysrv/restart:v1")
    target = target_in(tmp_path, "a")
    attrs = {"image": ref, "mode": "lazy", "prefetch": "none"}
    driver.publish(target, attrs)
    assert (target / "README.md").read_bytes() == FILES["README.md"]
    [fuse_pid] = lazy.fuse_pids()
    assert os.getsid(fuse_pid) != os.getsid(driver.proc.pid)  # not the gRPC server's child
    driver.restart(hard=True)  # SIGKILL: the gRPC container crashed
    path = target / "models" / "model.safetensors"
    assert path.read_bytes() == FILES["models/model.safetensors"]  # fetched after the crash
    driver.publish(target, attrs)  # idempotent after the restart
    driver.unpublish(target)
    assert not target.exists()
    deadline = time.monotonic() + 10
    while lazy.fuse_pids():  # the last unpublish stops the image's FUSE server
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not list((driver.state_dir / "lazy").glob("*/image.json"))


@pytest.mark.slow
def test_lazy_server_restart_rebinds_volumes_with_the_pods_credentials(
    basic_registry, node, tmp_path
):
    driver, lazy = node
    ref = push_model(basic_registry, tmp_path, "lazysrv/private:v1")
    targets = [target_in(tmp_path, "p1"), target_in(tmp_path, "p2")]
    driver.publish(targets[0], {"image": ref, "mode": "lazy", "prefetch": "none"}, secrets=SECRETS)
    driver.publish(
        targets[1],
        {"image": ref, "mode": "lazy", "prefetch": "none", "subPath": "models"},
        volume_id="vol-2",
        secrets=SECRETS,
    )
    assert (targets[0] / "README.md").read_bytes() == FILES["README.md"]
    creds = list((tmp_path / "run").iterdir())
    assert len(creds) == 1 and creds[0].stat().st_mode & 0o777 == 0o600
    [image_json] = (driver.state_dir / "lazy").glob("*/image.json")
    assert TEST_PASSWORD not in image_json.read_text()  # secrets stay on tmpfs

    lazy.kill_container()
    started = time.monotonic()
    with pytest.raises(OSError) as info:  # no hang: the dead connection refuses at once
        (targets[0] / "models" / "config.json").read_bytes()
    assert info.value.errno in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED)
    assert time.monotonic() - started < 2

    lazy.start()
    # Files never read before: fetched from the private registry after the
    # restart, so the credentials survived it.
    waited = read_until(targets[1] / "tokenizer.json", FILES["models/tokenizer.json"], timeout=20)
    assert waited < 10, waited
    assert (targets[0] / "models" / "model.safetensors").read_bytes() == FILES[
        "models/model.safetensors"
    ]
    assert "bound vol-1 again" in lazy.log_text() and "bound vol-2 again" in lazy.log_text()
    assert TEST_PASSWORD not in lazy.log_text() + driver.log_text() + lazy.fuse_log_text()
    print(f"\n[lazy-server restart] volumes serving again {waited:.2f} s after its start")
    for target, vid in zip(targets, ("vol-1", "vol-2"), strict=True):
        driver.unpublish(target, volume_id=vid)
    assert not list((tmp_path / "run").iterdir()), "credentials are removed with the image"


@pytest.mark.slow
def test_a_dead_fuse_server_alone_is_restarted_by_the_lazy_server(registry, node, tmp_path):
    driver, lazy = node
    ref = push_model(registry, tmp_path, "lazysrv/fuse-dies:v1")
    target = target_in(tmp_path, "f")
    driver.publish(target, {"image": ref, "mode": "lazy", "prefetch": "none"})
    assert (target / "README.md").read_bytes() == FILES["README.md"]
    [fuse_pid] = lazy.fuse_pids()
    os.kill(fuse_pid, signal.SIGKILL)
    waited = read_until(target / "models" / "config.json", FILES["models/config.json"], 20)
    assert waited < 10
    assert lazy.fuse_pids() and lazy.fuse_pids() != [fuse_pid]
    assert "bound vol-1 again" in lazy.log_text()
    driver.unpublish(target)


@pytest.mark.slow
def test_registry_failure_during_a_read_is_EIO_for_that_read_only(registry, node, tmp_path):
    driver, lazy = node
    push_model(registry, tmp_path, "lazysrv/flaky:v1")
    with FaultProxy(registry.url) as proxy:
        target = target_in(tmp_path, "flaky")
        ref = f"{proxy.host}/lazysrv/flaky:v1"
        driver.publish(target, {"image": ref, "mode": "lazy", "prefetch": "none"})
        proxy.set_scenario(status(503, times=None))  # the registry is down
        path = target / "models" / "model.safetensors"
        started = time.monotonic()
        with pytest.raises(OSError) as info:
            with open(path, "rb") as f:
                f.seek(3_000_000)
                f.read(4096)
        failed_after = time.monotonic() - started
        assert info.value.errno == errno.EIO
        assert failed_after < 15, failed_after  # a few quick retries, not a pull's patience
        line = next(
            line for line in lazy.fuse_log_text().splitlines() if "on-demand read failed" in line
        )
        assert "volume vol-1" in line and ref in line
        assert "file models/model.safetensors" in line and "offset " in line
        proxy.clear_scenario()  # the registry is back: the next read works
        assert path.read_bytes() == FILES["models/model.safetensors"]
        print(f"\n[on-demand failure] EIO after {failed_after:.2f} s; {line.split('ERROR')[-1]}")
        driver.unpublish(target)


@pytest.mark.slow
def test_an_expiring_registry_token_is_renewed_for_on_demand_reads(node, tmp_path):
    driver, _lazy_server = node
    tokens = TokenServer(
        username=TEST_USER, password=TEST_PASSWORD, expires_in=2, workdir=tmp_path / "tokens"
    )
    try:
        reg = Registry(tmp_path / "registry", token_auth=tokens)
        try:
            ref = push_model(reg, tmp_path, "lazysrv/token:v1")
            target = target_in(tmp_path, "t")
            attrs = {"image": ref, "mode": "lazy", "prefetch": "none"}
            driver.publish(target, attrs, secrets=SECRETS)
            assert (target / "README.md").read_bytes() == FILES["README.md"]
            issued = tokens.tokens_issued
            time.sleep(3)  # the token the FUSE server holds has expired
            tokenizer = target / "models" / "tokenizer.json"
            assert tokenizer.read_bytes() == FILES["models/tokenizer.json"]
            assert tokens.tokens_issued > issued
            driver.unpublish(target)
        finally:
            reg.stop()
    finally:
        tokens.stop()


@pytest.mark.slow
def test_restart_rebind_reaches_a_pods_slave_copy_of_the_mount(registry, node, tmp_path):
    """A container with `mountPropagation: HostToContainer` holds a slave copy
    of the target mount (found by hack/e2e-kube on a real kubelet). The rebind
    after a lazy-server restart must propagate into that copy: it is mounted
    on top of the dead bind, not in its place (unmounting it first cut the
    copy off, and the pod read ENOTCONN for good)."""
    driver, lazy = node
    pods = tmp_path / "pods"
    pods.mkdir()
    # kubelet's pods dir is a shared mount (Bidirectional needs it).
    subprocess.run(["mount", "--bind", str(pods), str(pods)], check=True)
    subprocess.run(["mount", "--make-shared", str(pods)], check=True)
    ref = push_model(registry, tmp_path, "lazysrv/slave-copy:v1")
    target = target_in(tmp_path, "htc")
    driver.publish(target, {"image": ref, "mode": "lazy", "prefetch": "none"})
    view = tmp_path / "container-view"  # the container's /models
    view.mkdir()
    subprocess.run(["mount", "--bind", str(target), str(view)], check=True)
    subprocess.run(["mount", "--make-slave", str(view)], check=True)
    assert (view / "README.md").read_bytes() == FILES["README.md"]
    with open(view / "README.md", "rb"):  # a reader keeps the container's copy busy
        lazy.kill_container()
        lazy.start()
        read_until(view / "models" / "config.json", FILES["models/config.json"], timeout=20)
    driver.unpublish(target)
    assert not target.exists()
