"""mode: lazy through NodePublishVolume: an eStargz image (written by
stargz-snapshotter's estargz module) served from the registry by a FUSE
process per image, fetching byte ranges on demand; the volume survives a
restart of the gRPC server; the last unpublish stops the FUSE server."""

from __future__ import annotations

import os

import grpc
import pytest

from tests.support.driver import Driver, mount_options
from tests.support.images import File, Image, Layer, push_image
from tests.support.lazyfixtures import estargz_blob, make_layer_tar, push_lazy_image

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="FUSE mounts need root and /dev/fuse",
)

FILES = {
    "models/config.json": b'{"hidden_size": 64}',
    "models/model.safetensors": os.urandom(12_000_000),
    "README.md": b"# lazily served\n",
}


@pytest.fixture(scope="module")
def lazy_image(registry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lazy-image")
    blob = estargz_blob(
        make_layer_tar(FILES, dirs=("models",)),
        tmp / "blob",
        chunk_size=1 << 20,
        prioritized=("models/config.json",),
    )
    pushed = push_lazy_image(registry, [blob], "lazy/model:v1", tmp)
    return pushed.reference, len(blob.blob)


def target_in(tmp_path, name="v"):
    parent = tmp_path / "pods" / name
    parent.mkdir(parents=True, exist_ok=True)
    return parent / "mount"


@pytest.mark.slow
def test_lazy_publish_reads_on_demand_and_survives_a_restart(registry, lazy_image, tmp_path):
    ref, blob_size = lazy_image
    d = Driver(tmp_path / "drv")
    target = target_in(tmp_path)
    try:
        before = registry.blob_bytes_sent("lazy/model")
        attrs = {"image": ref, "mode": "lazy", "subPath": "models", "prefetch": "none"}
        d.publish(target, attrs)
        assert {"ro", "nosuid", "nodev"} <= (mount_options(target) or set())
        assert (target / "config.json").read_bytes() == FILES["models/config.json"]
        fetched = registry.blob_bytes_sent("lazy/model") - before
        assert fetched < blob_size // 4, (fetched, blob_size)  # TOC + one small member
        stats = lazy_stats(d.state_dir)  # what /metrics reports for the FUSE server
        assert stats["read_bytes"] >= len(FILES["models/config.json"])
        assert 0 < stats["on_demand_fetched_bytes"] <= fetched and stats["cache_misses"] >= 1
        assert stats["image"] == ref and stats["prefetch_total_bytes"] == 0
        d.restart()  # the FUSE server is its own process: the volume keeps serving
        assert (target / "model.safetensors").read_bytes() == FILES["models/model.safetensors"]
        d.publish(target, attrs)  # idempotent
        d.unpublish(target)
        assert not target.exists()
        lazy_mounts = [line for line in open("/proc/self/mountinfo") if str(d.state_dir) in line]
        assert lazy_mounts == [], "the last unpublish stops the image's FUSE server"
    finally:
        d.stop()


def lazy_stats(state_dir, timeout=10.0):
    import json
    import time

    deadline = time.monotonic() + timeout
    while True:
        for path in (state_dir / "lazy").glob("*/stats.json"):
            stats = json.loads(path.read_text())
            if stats["read_bytes"] > 0:
                return stats
        assert time.monotonic() < deadline, "no lazy stats written"
        time.sleep(0.2)


@pytest.mark.slow
def test_lazy_mode_refuses_layers_without_a_toc(registry, tmp_path):
    push_image(registry, Image([Layer([File("f", b"x")])]), "lazy/plain:v1", tmp_path)
    d = Driver(tmp_path / "drv")
    try:
        with pytest.raises(grpc.RpcError) as info:
            d.publish(
                target_in(tmp_path), {"image": f"{registry.host}/lazy/plain:v1", "mode": "lazy"}
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (
            "TOC digest annotation" in info.value.details()
            and "mode auto or unpack" in info.value.details()
        )
    finally:
        d.stop()


@pytest.mark.slow
def test_a_dead_fuse_server_fails_fast_and_is_restarted(registry, lazy_image, tmp_path):
    import errno
    import signal
    import time

    ref, _ = lazy_image
    d = Driver(tmp_path / "drv")
    target = target_in(tmp_path, "revive")
    try:
        d.publish(target, {"image": ref, "mode": "lazy", "prefetch": "none"})
        assert (target / "README.md").read_bytes() == FILES["README.md"]
        [pid_file] = (d.state_dir / "lazy").glob("*/server.pid")  # written by the server
        server = int(pid_file.read_text())
        os.kill(server, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(OSError) as info:  # no hang: the kernel aborts the connection
            for _ in range(100):
                (target / "models" / "config.json").read_bytes()
                time.sleep(0.02)
        assert info.value.errno in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED)
        assert time.monotonic() - started < 5
        deadline = time.monotonic() + 20
        while True:  # the driver's watchdog starts it again and binds the volume anew
            try:
                if (target / "models" / "config.json").read_bytes() == FILES["models/config.json"]:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, d.log_text()[-2000:]
            time.sleep(0.2)
        assert "bound vol-1 again" in d.log_text()
        d.unpublish(target)
        assert [line for line in open("/proc/self/mountinfo") if str(d.state_dir) in line] == []
    finally:
        d.stop()


def blob_gets(registry, repo):
    return sum(
        1
        for line in registry.log_text().splitlines()
        if f'"GET /v2/{repo}/blobs/' in line and "csi-oci" in line
    )


@pytest.mark.slow
def test_prefetch_all_then_reads_never_touch_the_network(registry, lazy_image, tmp_path):
    import time

    ref, _ = lazy_image
    d = Driver(tmp_path / "drv")
    target = target_in(tmp_path, "prefetch")
    try:
        d.publish(target, {"image": ref, "mode": "lazy"})  # prefetch: all is the default
        logs = list((d.state_dir / "lazy").glob("*/lazyfs.log"))
        deadline = time.monotonic() + 30
        while not any("prefetch (all)" in p.read_text() for p in logs):
            assert time.monotonic() < deadline, "prefetch did not finish"
            time.sleep(0.1)
        (layer_file,) = (d.state_dir / "lazy" / "chunks").iterdir()
        payload = sum(len(data) for data in FILES.values())
        assert layer_file.stat().st_blocks * 512 >= payload, "the whole layer is on disk"
        before = blob_gets(registry, "lazy/model")
        for name, data in FILES.items():
            assert (target / name).read_bytes() == data
        assert blob_gets(registry, "lazy/model") == before, "served from the cache"
        status = __import__("json").loads(
            __import__("subprocess")
            .run(
                [
                    __import__("sys").executable,
                    "-m",
                    "csi_oci.cli",
                    "status",
                    "--state-dir",
                    str(d.state_dir),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout
        )
        assert status["volumes"][0]["image"].endswith("lazy/model:v1")
        d.unpublish(target)
    finally:
        d.stop()


@pytest.mark.slow
def test_auto_serves_lazy_images_lazily_and_others_unpacked(registry, lazy_image, tmp_path):
    ref, _ = lazy_image
    push_image(registry, Image([Layer([File("f", b"plain")])]), "lazy/plain-auto:v1", tmp_path)
    d = Driver(tmp_path / "drv")
    lazy_target, plain_target = target_in(tmp_path, "auto-lazy"), target_in(tmp_path, "auto-plain")
    try:
        d.publish(lazy_target, {"image": ref, "prefetch": "none"}, volume_id="a")  # mode auto
        d.publish(plain_target, {"image": f"{registry.host}/lazy/plain-auto:v1"}, volume_id="b")
        assert (lazy_target / "README.md").read_bytes() == FILES["README.md"]
        assert (plain_target / "f").read_bytes() == b"plain"
        info = open("/proc/self/mountinfo").read().splitlines()
        fs_of = {line.split(" ")[4]: line.split(" - ")[1].split(" ")[0] for line in info}
        assert fs_of[str(lazy_target)].startswith("fuse"), "eStargz with a TOC: served lazily"
        assert not fs_of[str(plain_target)].startswith("fuse"), "plain gzip layers: unpacked"
        # with include too: a lazily served partial tree
        inc_target = target_in(tmp_path, "auto-include")
        d.publish(inc_target, {"image": ref, "include": "*.json"}, volume_id="c")
        assert sorted(os.listdir(inc_target)) == ["models"]
        assert sorted(os.listdir(inc_target / "models")) == ["config.json"]
        info = open("/proc/self/mountinfo").read().splitlines()
        fs_of = {line.split(" ")[4]: line.split(" - ")[1].split(" ")[0] for line in info}
        assert fs_of[str(inc_target)].startswith("fuse")
        for vid, t in (("a", lazy_target), ("b", plain_target), ("c", inc_target)):
            d.unpublish(t, volume_id=vid)
    finally:
        d.stop()


@pytest.mark.slow
def test_auto_unpacks_zstd_chunked_unless_the_node_opts_in(registry, tmp_path):
    """auto follows the loader benchmark: zstd:chunked is unpacked by default."""
    blob = estargz_blob(
        make_layer_tar(FILES, dirs=("models",)), tmp_path / "blob", fmt="zstdchunked"
    )
    ref = push_lazy_image(registry, [blob], "lazy/zstd-auto:v1", tmp_path).reference

    def filesystem_at(target):
        info = open("/proc/self/mountinfo").read().splitlines()
        return {line.split(" ")[4]: line.split(" - ")[1].split(" ")[0] for line in info}[
            str(target)
        ]

    for opt_in, lazily in ((None, False), ("estargz,zstd:chunked", True)):
        extra = [] if opt_in is None else [f"--auto-lazy={opt_in}"]
        d = Driver(tmp_path / f"drv-{lazily}", extra_args=extra)
        target = target_in(tmp_path, f"zstd-auto-{lazily}")
        try:
            d.publish(target, {"image": ref, "prefetch": "none"})  # mode auto
            assert (target / "README.md").read_bytes() == FILES["README.md"]
            assert filesystem_at(target).startswith("fuse") is lazily, opt_in
            d.unpublish(target)
        finally:
            d.stop()


@pytest.mark.slow
def test_lazy_include_serves_and_fetches_only_matching_files(registry, lazy_image, tmp_path):
    ref, blob_size = lazy_image
    d = Driver(tmp_path / "drv")
    target, whole = target_in(tmp_path, "inc"), target_in(tmp_path, "whole")
    try:
        before = registry.blob_bytes_sent("lazy/model")
        attrs = {"image": ref, "mode": "lazy", "include": "*.json,README.md", "prefetch": "all"}
        d.publish(target, attrs)
        assert sorted(os.listdir(target)) == ["README.md", "models"]
        assert os.listdir(target / "models") == ["config.json"]
        assert not (target / "models" / "model.safetensors").exists()
        assert (target / "models" / "config.json").read_bytes() == FILES["models/config.json"]
        lazy_dir = d.state_dir / "lazy"
        assert wait_for_prefetch(lazy_dir)
        fetched = registry.blob_bytes_sent("lazy/model") - before
        # prefetch all of an include set: its files, never the 12 MB weights
        assert fetched < len(FILES["models/model.safetensors"]) // 4, (fetched, blob_size)
        # the same image without include is another tree, served by another server
        d.publish(whole, {"image": ref, "mode": "lazy", "prefetch": "none"}, volume_id="w")
        assert (whole / "models" / "model.safetensors").read_bytes() == FILES[
            "models/model.safetensors"
        ]
        assert len(list(lazy_dir.glob("*/image.json"))) == 2
        d.publish(
            target_in(tmp_path, "sub"),
            {**attrs, "subPath": "models"},
            volume_id="s",
        )
        assert os.listdir(target_in(tmp_path, "sub")) == ["config.json"]
        for vid, t in (("vol-1", target), ("w", whole), ("s", target_in(tmp_path, "sub"))):
            d.unpublish(t, volume_id=vid)
        assert [line for line in open("/proc/self/mountinfo") if str(d.state_dir) in line] == []
    finally:
        d.stop()


def wait_for_prefetch(lazy_dir, timeout=20.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = "".join(p.read_text() for p in lazy_dir.glob("*/lazyfs.log"))
        if "prefetch (all)" in logs:
            return True
        time.sleep(0.1)
    return False


def _lazy_mounts(state_dir) -> list[str]:
    lazy = str(state_dir / "lazy")
    with open("/proc/self/mountinfo") as f:
        return [line.split(" ")[4] for line in f if line.split(" ")[4].startswith(lazy)]


@pytest.mark.slow
@pytest.mark.parametrize("servers", ["inline", "inline-restarted", "external"])
def test_unpublish_then_stop_leaves_no_fuse_server_behind(registry, lazy_image, tmp_path, servers):
    """The last volume of an image goes and the driver stops at once: its FUSE
    mount and server are gone by the time the stop returns, not at the next start.
    `inline-restarted`: the server was started by an earlier driver (not a child)."""
    from tests.support.driver import LazyServerProcess, fuse_pids

    ref, _ = lazy_image
    lazy_server = None
    args: list[str] = []
    state = tmp_path / "drv" / "state"
    if servers == "external":
        runtime = tmp_path / "run"
        lazy_server = LazyServerProcess(state, runtime, tmp_path / "ls.log")
        args = ["--lazy-server", "external", "--runtime-dir", str(runtime)]
    d = Driver(tmp_path / "drv", extra_args=args)
    try:
        target = target_in(tmp_path)
        d.publish(target, {"image": ref, "mode": "lazy"})
        pids = fuse_pids(state)
        assert pids and _lazy_mounts(state)
        if servers == "inline-restarted":
            d.restart()
            assert fuse_pids(state) == pids, "the FUSE server outlives a driver restart"
        d.unpublish(target)
        assert d.stop() == 0
        if lazy_server is not None:
            lazy_server.stop()
        assert _lazy_mounts(state) == []
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and _not_zombie(p)]
        assert alive == [], f"FUSE servers still running: {alive}"
    finally:
        d.stop()
        if lazy_server is not None:
            lazy_server.stop()


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
