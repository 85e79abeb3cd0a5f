"""The lazy FUSE filesystem, mounted for real (pyfuse3, /dev/fuse, root), over
blobs written by the reference tools: an eStargz lower layer from
stargz-snapshotter's estargz module and a zstd:chunked upper layer from
skopeo that whites out and adds files."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest

from tests.support.lazyfixtures import estargz_blob, make_layer_tar, skopeo_zstd_chunked

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="FUSE mounts need root and /dev/fuse",
)

LOWER = {
    "models/config.json": b'{"hidden_size": 64}',
    "models/weights.safetensors": os.urandom(9_000_000),
    "models/old.bin": b"to be whited out",
    "data/a.txt": b"a",
    "data/b.txt": b"b",
}
UPPER = {
    "models/.wh.old.bin": b"",
    "data/.wh..wh..opq": b"",
    "data/c.txt": b"c from the upper layer",
    "README.md": b"# lazy\n",
}


def mounted(path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == str(path) for line in f)


@pytest.fixture
def lazy_mount(tmp_path):
    lower = estargz_blob(
        make_layer_tar(LOWER, dirs=("models", "data"), symlinks={"cfg": "models/config.json"}),
        tmp_path / "lower",
        chunk_size=1 << 20,
        prioritized=("models/config.json",),
    )
    upper = skopeo_zstd_chunked(make_layer_tar(UPPER, dirs=("models", "data")), tmp_path / "upper")
    layers = []
    for name, blob in (("lower", lower), ("upper", upper)):
        path = tmp_path / f"{name}.blob"
        path.write_bytes(blob.blob)
        layers.append(
            {"path": str(path), "media_type": blob.media_type, "annotations": blob.annotations}
        )
    spec = tmp_path / "layers.json"
    spec.write_text(json.dumps(layers))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = open(tmp_path / "lazyfs.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "csi_oci.lazy.fs", str(mnt), str(spec)],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    for _ in range(200):
        if mounted(mnt) or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert mounted(mnt), (tmp_path / "lazyfs.log").read_text()
    yield mnt, tmp_path, lower
    subprocess.run(["umount", str(mnt)], check=False)
    proc.wait(timeout=20)
    log.close()


def test_merged_tree_reads_equal_the_originals(lazy_mount):
    mnt, _, _ = lazy_mount
    assert sorted(os.listdir(mnt)) == ["README.md", "cfg", "data", "models"], "landmarks/TOC hidden"
    assert sorted(os.listdir(mnt / "models")) == ["config.json", "weights.safetensors"]
    assert sorted(os.listdir(mnt / "data")) == ["c.txt"], "opaque dir hides the lower layer's files"
    for name, data in LOWER.items():
        if name == "models/old.bin" or name.startswith("data/"):
            assert not (mnt / name).exists()
            continue
        assert (mnt / name).read_bytes() == data, name
    assert (mnt / "data/c.txt").read_bytes() == UPPER["data/c.txt"]
    assert (mnt / "README.md").read_bytes() == UPPER["README.md"]
    assert os.readlink(mnt / "cfg") == "models/config.json"
    assert (mnt / "cfg").read_bytes() == LOWER["models/config.json"]
    weights = LOWER["models/weights.safetensors"]
    with open(mnt / "models/weights.safetensors", "rb") as f:
        f.seek(4_000_000)
        assert f.read(3_000_000) == weights[4_000_000:7_000_000]
    st = os.stat(mnt / "models/weights.safetensors")
    assert st.st_size == len(weights) and st.st_mode & 0o6000 == 0


def test_read_only(lazy_mount):
    mnt, _, _ = lazy_mount
    with pytest.raises(OSError) as info:
        open(mnt / "models/config.json", "r+b")
    assert info.value.errno in (errno.EROFS, errno.EACCES)


def test_tampered_piece_is_eio_and_other_files_still_read(lazy_mount):
    mnt, tmp_path, lower = lazy_mount
    # Damage the lower blob on disk after mounting: the server reads it on demand.
    from csi_oci.lazy.reader import open_toc

    data = lower.blob
    toc = open_toc(lower.media_type, lower.annotations, len(data), lambda o, n: data[o : o + n])
    piece = toc.entries["models/weights.safetensors"].pieces[3]
    with open(tmp_path / "lower.blob", "r+b") as f:
        f.seek(piece.offset + 100)
        byte = f.read(1)
        f.seek(piece.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open(mnt / "models/weights.safetensors", "rb") as f:
        f.seek(piece.chunk_offset)
        with pytest.raises(OSError) as info:
            f.read(4096)
        assert info.value.errno == errno.EIO
    assert (mnt / "models/config.json").read_bytes() == LOWER["models/config.json"]
