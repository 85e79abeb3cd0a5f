"""NodeGetVolumeStats: the size of the tree a pod sees, and whether it can read it.

kubelet calls it for every published volume (kubelet_volume_stats_* for PVC
volumes; with CSIVolumeHealth, a pod event when the condition is abnormal).
Unpacked volumes answer from the store's record, lazy ones from their FUSE
server's stats file; the condition turns abnormal when the mount is gone,
the FUSE server died, or a lazy volume's reads fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import grpc
import pytest

from csi_oci.csi.v1 import csi_pb2
from tests.support.driver import Driver, LazyServerProcess, wait_for
from tests.support.faultproxy import FaultProxy, Status
from tests.support.images import Dir, File, Image, Layer, Symlink, push_image
from tests.support.lazyfixtures import estargz_blob, make_layer_tar, push_lazy_image

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root"),
    pytest.mark.usefixtures("no_mounts_left"),
]

FILES = {
    "models/config.json": b'{"hidden_size": 64}',
    "models/weights/a.bin": os.urandom(300_000),
    "models/weights/b.bin": os.urandom(200_000),
    "README.md": b"# stats\n",
}


def walk(root):
    """What a pod sees: bytes of regular files and inodes, the root included."""
    nbytes, inodes, seen = 0, 1, set()
    for dirpath, dirnames, filenames in os.walk(root):
        inodes += len(dirnames)
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                inodes += 1
                if os.path.isfile(os.path.join(dirpath, name)) and not os.path.islink(
                    os.path.join(dirpath, name)
                ):
                    nbytes += st.st_size
    return nbytes, inodes


def stats(d, volume_id, path):
    resp = d.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(path))
    )
    by_unit = {u.unit: u for u in resp.usage}
    b, i = by_unit[csi_pb2.VolumeUsage.BYTES], by_unit[csi_pb2.VolumeUsage.INODES]
    assert b.total == b.used and b.available == 0  # read-only: all used, none free
    assert i.total == i.used and i.available == 0
    return b.used, i.used, resp.volume_condition


def target_in(tmp_path, name):
    parent = tmp_path / "pods" / name
    parent.mkdir(parents=True, exist_ok=True)
    return parent / "mount"


@pytest.fixture(scope="module")
def plain_ref(registry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats-plain")
    entries = [Dir("models"), Dir("models/weights")]
    entries += [File(name, data) for name, data in FILES.items()]
    entries.append(Symlink("models/latest", "weights/a.bin"))
    push_image(registry, Image([Layer(entries)]), "stats/plain:v1", tmp)
    return f"{registry.host}/stats/plain:v1"


def test_node_advertises_stats_and_condition(tmp_path):
    d = Driver(tmp_path / "drv")
    try:
        caps = d.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest()).capabilities
        kinds = {c.rpc.type for c in caps}
        rpc = csi_pb2.NodeServiceCapability.RPC
        assert kinds == {rpc.GET_VOLUME_STATS, rpc.VOLUME_CONDITION}
        for volume_id, path, code in (
            ("", "/x", grpc.StatusCode.INVALID_ARGUMENT),
            ("v", "", grpc.StatusCode.INVALID_ARGUMENT),
            ("v", "/some/path", grpc.StatusCode.NOT_FOUND),
        ):
            with pytest.raises(grpc.RpcError) as err:
                d.node.NodeGetVolumeStats(
                    csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path)
                )
            assert err.value.code() == code
    finally:
        d.stop()


def test_unpacked_volume_stats_come_from_the_record(registry, plain_ref, tmp_path):
    d = Driver(tmp_path / "drv")
    whole, sub = target_in(tmp_path, "whole"), target_in(tmp_path, "sub")
    try:
        d.publish(whole, {"image": plain_ref}, volume_id="whole")
        d.publish(sub, {"image": plain_ref, "subPath": "models/weights"}, volume_id="sub")
        nbytes, inodes, condition = stats(d, "whole", whole)
        assert (nbytes, inodes) == walk(whole)
        assert nbytes == sum(len(v) for v in FILES.values())
        assert not condition.abnormal
        # The record holds what the answer says (no walk per call).
        (record_path,) = (d.state_dir / "images" / "sha256").glob("*/image.json")
        record = json.loads(record_path.read_text())
        assert (record["unpacked_bytes"], record["entries"]) == (nbytes, inodes)
        assert stats(d, "sub", sub)[:2] == walk(sub) == (500_000, 3)
        # Asked at another path, or under another id: not this volume.
        for volume_id, path in (("whole", sub.parent / "elsewhere"), ("other", whole)):
            with pytest.raises(grpc.RpcError) as err:
                stats(d, volume_id, path)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # Unmounted behind the driver's back: abnormal, in words.
        subprocess.run(["umount", str(whole)], check=True)
        _, _, condition = stats(d, "whole", whole)
        assert condition.abnormal
        assert condition.message == (
            f"{plain_ref} is no longer mounted at {whole}; delete the pod to publish it again"
        )
        d.unpublish(sub, volume_id="sub")
        d.unpublish(whole, volume_id="whole")
    finally:
        d.stop()


@pytest.fixture(scope="module")
def lazy_blob(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats-lazy")
    tar = make_layer_tar(FILES, dirs=("models", "models/weights"))
    return estargz_blob(tar, tmp / "blob", chunk_size=64 << 10)


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="FUSE needs /dev/fuse")
def test_lazy_volume_stats_and_condition(registry, lazy_blob, tmp_path):
    pushed = push_lazy_image(registry, [lazy_blob], "stats/lazy:v1", tmp_path)
    state, runtime = tmp_path / "drv" / "state", tmp_path / "run"
    # External mode, so that with the lazy-server gone nobody revives a dead server.
    lazy = LazyServerProcess(state, runtime, tmp_path / "lazy-server.log")
    d = Driver(
        tmp_path / "drv", extra_args=["--lazy-server", "external", "--runtime-dir", str(runtime)]
    )
    target, unpacked = target_in(tmp_path, "lazy"), target_in(tmp_path, "unpacked")
    try:
        with FaultProxy(registry.url) as proxy:
            ref = pushed.reference.replace(registry.host, proxy.host)
            d.publish(target, {"image": ref, "mode": "lazy", "prefetch": "none"}, volume_id="l")
            d.publish(unpacked, {"image": ref, "mode": "unpack"}, volume_id="u")
            assert wait_for(lambda: not stats(d, "l", target)[2].abnormal, timeout=15)
            nbytes, inodes, condition = stats(d, "l", target)
            # Counted from the TOC: what the pod sees, which is the unpacked tree
            # without the format's own files (stargz.index.json, the landmark).
            assert (nbytes, inodes) == walk(target)
            u_bytes, u_inodes, _ = stats(d, "u", unpacked)
            assert (u_bytes, u_inodes) == walk(unpacked)
            hidden = [p for p in unpacked.iterdir() if p.name not in ("models", "README.md")]
            assert {p.name for p in hidden} <= {
                "stargz.index.json",
                ".prefetch.landmark",
                ".no.prefetch.landmark",
            }
            assert u_inodes - inodes == len(hidden)
            assert u_bytes - nbytes == sum(p.stat().st_size for p in hidden)
            assert condition.message == "readable"
            # The registry starts refusing: a read of an unfetched piece fails,
            # and the condition says so within a stats period.
            proxy.set_scenario(Status(503, times=None, kinds=("blob",), per_key=False))
            with pytest.raises(OSError):
                (target / "models" / "weights" / "a.bin").read_bytes()
            assert wait_for(lambda: stats(d, "l", target)[2].abnormal, timeout=15)
            message = stats(d, "l", target)[2].message
            assert message.startswith(f"reads of {ref} fail since "), message
            assert "503" in message, message
            # The registry is back: the next read works and the condition clears.
            proxy.set_scenario(None)
            assert (target / "models" / "weights" / "a.bin").read_bytes() == FILES[
                "models/weights/a.bin"
            ]
            assert wait_for(lambda: not stats(d, "l", target)[2].abnormal, timeout=15)
            # The FUSE server dies and nothing restarts it (no lazy-server).
            lazy.proc.kill()
            lazy.proc.wait()
            for pid in lazy.fuse_pids():
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while not stats(d, "l", target)[2].abnormal and time.monotonic() < deadline:
                time.sleep(0.1)
            condition = stats(d, "l", target)[2]
            assert condition.abnormal
            assert condition.message == (
                f"the lazy filesystem serving {ref} is not running (its FUSE server exited); "
                "csi-oci restarts it and binds the volume again"
            )
    finally:
        d.stop()
        lazy.stop()
        for pid in lazy.fuse_pids():
            os.kill(pid, signal.SIGKILL)
