"""Issue 14, finding 3 and the disk budget: a pull cannot flush the node's cache with
claims, and what lands on disk (directories and links too) is charged.

The attacker writes the manifest, so every size in it is a claim. Eviction
must follow bytes that arrive, never declared sizes: a descriptor that claims
90% of --cache-max-bytes for a 5-byte blob used to evict every unused image
before failing, breaking pods with pullPolicy Never on that node.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import grpc
import pytest

from tests.support.driver import Driver
from tests.support.hostile import image_config, image_manifest, push_manifest
from tests.support.images import File, Image, Layer, push_image, sha256_digest

MiB = 1 << 20
CACHE = 64 * MiB


def target(tmp_path: Path, name: str) -> Path:
    parent = tmp_path / "pods" / name
    parent.mkdir(parents=True, exist_ok=True)
    return parent / "mount"


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


def peak_rss_mb(d: Driver) -> float:
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def trees(state: Path) -> set[str]:
    root = state / "images" / "sha256"
    return {f"sha256:{p.name}" for p in root.iterdir()} if root.is_dir() else set()


@pytest.fixture
def cached_victim(registry, make_driver, tmp_path):
    """A driver with a 64 MiB cache holding one unused image (published, then unpublished)."""
    digest = push_image(
        registry, Image([Layer([File("weights.bin", b"victim" * 1000)])]), "victim/m:v1", tmp_path
    )
    ref = f"{registry.host}/victim/m:v1"
    d = make_driver("--cache-max-bytes", str(CACHE))  # stopped even if the setup fails
    t = target(tmp_path, "victim")
    d.publish(t, {"image": ref}, volume_id="victim")
    d.unpublish(t, volume_id="victim")
    assert digest in trees(d.state_dir)
    return d, ref, digest


def assert_victim_survived(d: Driver, ref: str, digest: str, tmp_path: Path) -> None:
    assert digest in trees(d.state_dir), "a failed pull evicted an unused image"
    t = target(tmp_path, "victim-again")
    d.publish(t, {"image": ref, "pullPolicy": "Never"}, volume_id="victim-again")
    assert (t / "weights.bin").read_bytes() == b"victim" * 1000
    d.unpublish(t, volume_id="victim-again")
    assert list((d.state_dir / "staging").iterdir()) == []


@pytest.mark.parametrize(
    "media_type",
    [
        "application/vnd.oci.image.layer.v1.tar",  # uncompressed: the size is "declared"
        "application/vnd.oci.image.layer.v1.tar+gzip",
    ],
)
def test_a_descriptor_claiming_most_of_the_cache_evicts_nothing(
    registry, cached_victim, tmp_path, media_type
):
    d, victim_ref, victim_digest = cached_victim
    small = Layer(
        [File("x", b"hello")], compression="none" if media_type.endswith("tar") else "gzip"
    )
    config = image_config([small.diff_id])
    lie = {"mediaType": media_type, "digest": small.digest, "size": int(CACHE * 0.9)}
    push_manifest(registry, "hostile/liar:v1", image_manifest(config, [lie]), [config, small.blob])
    err = rpc_error(
        d.publish, target(tmp_path, "liar"), {"image": f"{registry.host}/hostile/liar:v1"}
    )
    assert err.code() in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNAVAILABLE), err.details()
    assert_victim_survived(d, victim_ref, victim_digest, tmp_path)


def test_a_raw_artifact_file_claiming_most_of_the_cache_evicts_nothing(
    registry, cached_victim, tmp_path
):
    """ModelPack weights are raw blobs written as they arrive: charged per chunk, not per claim."""
    d, victim_ref, victim_digest = cached_victim
    blob = b"tiny"
    config = b'{"descriptor": {"name": "m"}, "modelfs": {"type": "layers", "diffIds": []}}'
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.cncf.model.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.cncf.model.config.v1+json",
            "digest": sha256_digest(config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.cncf.model.weight.v1.raw",
                "digest": sha256_digest(blob),
                "size": int(CACHE * 0.9),
                "annotations": {"org.cncf.model.filepath": "model.safetensors"},
            }
        ],
    }
    push_manifest(registry, "hostile/raw-liar:v1", manifest, [config, blob])
    err = rpc_error(
        d.publish, target(tmp_path, "raw-liar"), {"image": f"{registry.host}/hostile/raw-liar:v1"}
    )
    assert err.code() != grpc.StatusCode.OK, err.details()
    assert_victim_survived(d, victim_ref, victim_digest, tmp_path)


def dirs_bomb(n: int) -> bytes:
    """A gzip tar layer of `n` empty directories: a few MB that used to be charged nothing."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(n):
            info = tarfile.TarInfo(f"d{i // 1000}/{i}")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tf.addfile(info)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb_image(registry, tmp_path_factory):
    tar = dirs_bomb(120_000)
    layer = Layer.from_tar(tar, compression="gzip")
    print(f"\n[dirs bomb] 120,000 directories: {len(layer.blob) / MiB:.1f} MiB gzipped")
    push_image(registry, Image([layer]), "hostile/dirs:v1", tmp_path_factory.mktemp("bomb"))
    return f"{registry.host}/hostile/dirs:v1"


@pytest.mark.slow
def test_a_directory_bomb_stops_at_the_entry_cap_and_evicts_nothing(registry, bomb_image, tmp_path):
    digest = push_image(
        registry, Image([Layer([File("weights.bin", b"victim" * 1000)])]), "victim/m:v1", tmp_path
    )
    ref = f"{registry.host}/victim/m:v1"
    d = Driver(tmp_path / "drv", extra_args=["--max-image-entries", "50000"])
    try:
        t = target(tmp_path, "victim")
        d.publish(t, {"image": ref}, volume_id="victim")
        d.unpublish(t, volume_id="victim")
        err = rpc_error(d.publish, target(tmp_path, "bomb"), {"image": bomb_image})
        peak = peak_rss_mb(d)
        print(f"\n[dirs bomb] refused at the entry cap; driver peak RSS {peak:.0f} MB")
        assert peak < 300, peak
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert "more than 50000 entries" in err.details()
        assert "--max-image-entries" in err.details()
        assert_victim_survived(d, ref, digest, tmp_path)
    finally:
        d.stop()


@pytest.mark.slow
def test_a_directory_bomb_is_charged_a_block_per_directory(bomb_image, tmp_path):
    """16 MiB of cache is 4,096 entries at 4 KiB: refused long before 120,000 directories."""
    d = Driver(tmp_path / "drv", extra_args=["--cache-max-bytes", "16Mi"])
    try:
        err = rpc_error(d.publish, target(tmp_path, "bomb"), {"image": bomb_image})
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert "room for" in err.details() and "--cache-max-bytes" in err.details()
        assert list((d.state_dir / "staging").iterdir()) == []
    finally:
        d.stop()


@pytest.mark.slow
def test_a_tree_counts_its_entries_in_the_cache(registry, tmp_path):
    """A committed tree's bytes include a block per entry, as its pull was charged."""
    import json

    from csi_oci.unpack.budget import ENTRY_DISK_BYTES

    files = [File(f"dir/f{i}", b"") for i in range(50)]
    push_image(registry, Image([Layer(files)]), "entries/m:v1", tmp_path)
    d = Driver(tmp_path / "drv")
    try:
        t = target(tmp_path, "e")
        d.publish(t, {"image": f"{registry.host}/entries/m:v1"})
        (record,) = (d.state_dir / "images" / "sha256").glob("*/image.json")
        own = json.loads(record.read_text())["own_bytes"]
        assert own >= 51 * ENTRY_DISK_BYTES, own  # 50 empty files and their directory
        d.unpublish(t)
    finally:
        d.stop()
