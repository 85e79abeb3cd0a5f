"""Hardening catalogue: one test (or parametrized group) per case T1-T32 of
shared/reference/reliability-perf.md section A1 ("Concrete hardening test cases").

Unit cases apply tars built here into ``<base>/root``, beside ``<base>/canary``
(files and directories with known content, modes, owners, mtimes and link
counts). After every such test the ``env`` fixture checks that the canary is
unchanged, that nothing new exists beside ``root`` and that the host's /etc,
/tmp, / and the working directory gained nothing. The required outcome of every
case is one of: applied inside the root exactly as the OCI layer spec says, or
refused with a clear error (InvalidLayer / IntegrityError / ...) naming the entry.

End-to-end cases run the real `csi-oci serve` (tests/support/driver.py) against
the session registry and check what the store and the staging directory keep.

Bombs, million-entry layers and huge sparse files are streamed from generators
and applied onto a small tmpfs, so a regression fails the test instead of
filling the machine's disk.

Writing this catalogue found seven applier/puller bugs (artifact duplicates
overwriting, PAX global headers merged into entries, GNU atime read as a name
prefix, negative sizes refunding the budget, recursion on chained extension
headers, unbudgeted bytes after the end-of-archive marker, errors without the
entry's name); each is fixed and its test here keeps it fixed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import stat
import subprocess
import tarfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import zstandard

from csi_oci import faults
from csi_oci.errors import InvalidLayer
from csi_oci.oci.packaging import validated_path
from csi_oci.stream.inflate import MAX_ZSTD_WINDOW, GzipReader, ZstdReader
from csi_oci.unpack.applier import MAX_EXTENSION_HEADER_BYTES, LayerApplier, Policy
from csi_oci.unpack.budget import Budget, Limits
from csi_oci.unpack.paths import MAX_SYMLINK_HOPS
from tests.support.artifacts import OCI_EMPTY, ORAS_FILE, TITLE, Artifact, Blob, push_artifact
from tests.support.driver import Driver, mount_options, tree_of, wait_for
from tests.support.images import (
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_LAYER_ZSTD,
    MEDIA_TYPE_MANIFEST,
    BlockDevice,
    CharDevice,
    Dir,
    Fifo,
    File,
    Hardlink,
    Image,
    Layer,
    Opaque,
    Raw,
    Symlink,
    Whiteout,
    build_tar,
    canonical_json,
    push_image,
    sha256_digest,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, mounts)")

EVIL = "csi-oci-hardening-evil"  # a name that never exists on the host
MIB = 1 << 20
GIB = 1 << 30
MTIME = 1_700_000_000
WHAT = "layer sha256:feedface"  # the layer name every refusal must carry

# -- canary environment ------------------------------------------------------------


def snapshot(path: Path) -> dict[str, tuple]:
    """Everything at and under `path`: kind, content/target, mode, owner, mtime, inode,
    link count and xattr names, never following links."""
    out: dict[str, tuple] = {}

    def one(full: str, rel: str) -> None:
        st = os.lstat(full)
        meta = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ino, st.st_nlink)
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("l", os.readlink(full), meta)
        elif stat.S_ISREG(st.st_mode):
            xattrs = tuple(sorted(os.listxattr(full, follow_symlinks=False)))
            out[rel] = ("f", Path(full).read_bytes(), meta, xattrs)
        else:
            out[rel] = ("d", None, meta)

    one(str(path), ".")
    for dirpath, dirnames, filenames in os.walk(path):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            one(full, os.path.relpath(full, path))
    return out


def tree(path: Path) -> dict[str, object]:
    """file -> bytes, dir -> "dir", symlink -> ("->", target), other -> "special"."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, path)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("->", os.readlink(full))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = Path(full).read_bytes()
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            else:
                out[rel] = "special"
    return out


def make_canary(canary: Path) -> None:
    """Files outside the root with distinctive metadata that no layer may change."""
    (canary / "sub").mkdir(parents=True)
    victim = canary / "victim.txt"
    victim.write_bytes(b"precious data\n")
    os.chown(victim, 4321, 8765)
    os.chmod(victim, 0o640)
    perm400 = canary / "perm400"
    perm400.write_bytes(b"read-only secret\n")
    os.chmod(perm400, 0o400)
    (canary / "sub" / "deep.txt").write_bytes(b"\x00\x01binary\xff")
    os.chmod(canary / "sub", 0o750)
    os.symlink("victim.txt", canary / "link")
    for i, p in enumerate([victim, perm400, canary / "sub" / "deep.txt", canary / "sub"]):
        os.utime(p, (1_000_000_000 + i, 1_000_000_000 + i))
    os.utime(canary / "link", (1_000_000_100, 1_000_000_100), follow_symlinks=False)
    os.utime(canary, (1_000_000_200, 1_000_000_200))


HOST_NEVER = (
    f"/{EVIL}",
    f"/etc/{EVIL}",
    f"/tmp/{EVIL}",
    f"/etc/cron.d/{EVIL}",
    "/etc/cron.d/evil",
)


def host_state() -> dict[str, object]:
    passwd = os.lstat("/etc/passwd")
    return {
        "etc": sorted(os.listdir("/etc")),
        "passwd": (passwd.st_ino, passwd.st_nlink, passwd.st_mode, passwd.st_mtime_ns),
        "never": {p: os.path.lexists(p) for p in HOST_NEVER},
        "cwd": os.path.lexists(os.path.join(os.getcwd(), EVIL)),
    }


class Env:
    """A root to apply layers into, beside a canary directory."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.root.mkdir(parents=True)
        self.canary = base / "canary"
        make_canary(self.canary)
        self.canary_before = snapshot(self.canary)
        self.root_ino = os.lstat(self.root).st_ino
        self.host_before = host_state()
        self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        self.applier = LayerApplier(self.fd)
        self.layers = 0

    def reset(
        self,
        *,
        policy: Policy | None = None,
        limits: Limits | None = None,
        budget: Budget | None = None,
    ) -> LayerApplier:
        kw: dict[str, Any] = {"budget": budget}
        if policy is not None:
            kw["policy"] = policy
        self.applier = LayerApplier(self.fd, limits, **kw)
        return self.applier

    def apply(self, layer: Iterable | bytes | Any, what: str | None = None) -> Any:
        """Apply one layer: entries, tar bytes or a readable stream."""
        self.layers += 1
        what = what or f"layer {self.layers}"
        if isinstance(layer, bytes):
            stream: Any = io.BytesIO(layer)
        elif hasattr(layer, "read"):
            stream = layer
        else:
            stream = io.BytesIO(build_tar(layer))
        return self.applier.apply(stream, what)

    def refuse(
        self,
        layer: Iterable | bytes | Any,
        match: str,
        *,
        names: Iterable[str] = (),
        layer_named: bool = True,
    ) -> str:
        """Apply and expect InvalidLayer matching `match` whose message names the layer
        and each of `names` (repr, as the applier quotes entry names)."""
        with pytest.raises(InvalidLayer, match=match) as info:
            self.apply(layer, what=WHAT)
        msg = str(info.value)
        if layer_named:
            assert WHAT in msg, msg
        for name in names:
            assert repr(name) in msg, (name, msg)
        return msg

    def tree(self) -> dict[str, object]:
        return tree(self.root)

    def assert_contained(self) -> None:
        assert snapshot(self.canary) == self.canary_before, "the canary changed"
        assert sorted(os.listdir(self.base)) == ["canary", "root"]
        st = os.lstat(self.root)
        assert stat.S_ISDIR(st.st_mode) and st.st_ino == self.root_ino, "root was replaced"
        assert host_state() == self.host_before, "the host changed"


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path / "case")
    yield e
    os.close(e.fd)
    e.assert_contained()


@pytest.fixture
def tmpfs_env(tmp_path):
    """An Env on a 256 MiB tmpfs: a bomb that gets through fills that, not the disk."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mnt)], check=True)
    try:
        e = Env(mnt / "case")
        yield e
        os.close(e.fd)
        e.assert_contained()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def artifact_policy(claimed: dict[str, str] | None = None, lock: Any = None) -> Policy:
    return Policy(
        image=False,
        claimed={} if claimed is None else claimed,
        claim_lock=lock or threading.Lock(),
    )


# -- hand-made tar members and headers -------------------------------------------------


def info(name: str, type_: bytes = tarfile.REGTYPE, **kw: Any) -> tarfile.TarInfo:
    """A raw TarInfo: the name is kept verbatim (support.images strips a leading '/')."""
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = kw.pop("mode", 0o644)
    ti.mtime = kw.pop("mtime", MTIME)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def raw_file(name: str, data: bytes = b"x", **kw: Any) -> Raw:
    return Raw(info(name, **kw), data)


def raw_dir(name: str, **kw: Any) -> Raw:
    kw.setdefault("mode", 0o755)
    return Raw(info(name, tarfile.DIRTYPE, **kw))


def raw_symlink(name: str, target: str) -> Raw:
    return Raw(info(name, tarfile.SYMTYPE, linkname=target, mode=0o777))


def raw_hardlink(name: str, target: str) -> Raw:
    return Raw(info(name, tarfile.LNKTYPE, linkname=target))


USTAR_MAGIC = b"ustar\x0000"
GNU_MAGIC = b"ustar  \x00"


def header(
    name: str,
    *,
    size: int = 0,
    typeflag: bytes = b"0",
    magic: bytes = USTAR_MAGIC,
    fields: dict[int, bytes] | None = None,
) -> bytes:
    """A hand-made 512-byte header: `fields` overwrites raw bytes at offsets (size is
    at 124, 12 bytes), and the checksum is recomputed afterwards."""
    ti = info(name)
    ti.size = size
    buf = bytearray(ti.tobuf(tarfile.USTAR_FORMAT))
    buf[156:157] = typeflag
    buf[257:265] = magic
    for offset, value in (fields or {}).items():
        buf[offset : offset + len(value)] = value
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\x00 " % sum(buf)
    return bytes(buf)


def base256(n: int, width: int = 12) -> bytes:
    """GNU base-256 numeric field: 0x80 marker (positive) or two's complement (negative)."""
    if n >= 0:
        return b"\x80" + n.to_bytes(width - 1, "big")
    return (n % (1 << (8 * width))).to_bytes(width, "big")  # starts with 0xff


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


END = b"\0" * 1024  # end-of-archive marker


# -- lazily produced streams --------------------------------------------------------------


class ChunkSource:
    """`read(n)` over an iterator of byte chunks, never holding more than one chunk;
    `consumed` counts the bytes handed out. `max_read` caps a single read (a network
    socket gives what it has, not what was asked)."""

    def __init__(self, chunks: Iterable[bytes], max_read: int | None = None) -> None:
        self._it = iter(chunks)
        self._buf = memoryview(b"")
        self._max = max_read
        self.consumed = 0

    def read(self, n: int = -1, /) -> bytes:
        if n is None or n < 0:
            n = MIB
        if self._max is not None:
            n = min(n, self._max)
        while not self._buf:
            try:
                self._buf = memoryview(next(self._it))
            except StopIteration:
                return b""
        out = bytes(self._buf[:n])
        self._buf = self._buf[len(out) :]
        self.consumed += len(out)
        return out


def bounded(fn: Callable[[], Any], seconds: float) -> Any:
    """Run `fn` in a thread; fail the test if it has not finished in `seconds` (a hang)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"did not finish within {seconds}s (hang or unbounded work)")
    if "error" in result:
        raise result["error"]
    return result.get("value")


class Measured:
    """Wall time and tracemalloc peak of a block."""

    def __enter__(self) -> Measured:
        tracemalloc.start()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.monotonic() - self.t0
        self.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


# -- end-to-end helpers -----------------------------------------------------------------


def target_in(tmp_path: Path, name: str = "vol") -> Path:
    parent = tmp_path / "pods" / "uid-1" / "volumes" / "kubernetes.io~csi" / name
    parent.mkdir(parents=True, exist_ok=True)
    return parent / "mount"


def rpc_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info_:
        fn(*args, **kwargs)
    return info_.value


def assert_nothing_kept(d: Driver, manifest_digest: str, blobs: Iterable[str] = ()) -> None:
    """After a failed pull: no staging tree, no tree in the store, no partial or
    leftover spooled layer blobs."""
    state = d.state_dir
    assert list((state / "staging").iterdir()) == []
    assert not (state / "images" / "sha256" / manifest_digest.split(":")[1]).exists()
    assert not list((state / "blobs" / "sha256").glob("*.partial"))
    for digest in blobs:
        assert not (state / "blobs" / "sha256" / digest.split(":")[1]).exists(), digest


def publish_tree(d: Driver, tmp_path: Path, ref: str, name: str = "vol") -> dict[str, object]:
    target = target_in(tmp_path, name)
    d.publish(target, {"image": ref}, volume_id=name)
    try:
        return tree_of(target)
    finally:
        d.unpublish(target, volume_id=name)


def prebuilt_layer(blob: bytes, diff_id: str, media_type: str = MEDIA_TYPE_LAYER_GZIP) -> Layer:
    """A Layer over a blob built here without materialising its (huge) tar."""
    layer = Layer.__new__(Layer)
    layer.compression = "gzip"
    layer.members = 1
    layer.tar_bytes = b""
    layer.blob = blob
    layer.digest = sha256_digest(blob)
    layer.diff_id = diff_id
    layer.size = len(blob)
    layer.media_type = media_type
    layer.annotations = {}
    return layer


def put_manifest(registry: Any, repo: str, tag: str, manifest: dict[str, Any]) -> str:
    """PUT a hand-edited OCI manifest (its blobs already pushed to `repo`)."""
    body = canonical_json(manifest)
    resp = registry.request(
        "PUT",
        f"/v2/{repo}/manifests/{tag}",
        data=body,
        headers={"Content-Type": MEDIA_TYPE_MANIFEST},
    )
    assert resp.status_code == 201, resp.text
    return sha256_digest(body)


# ========================================================================================
# Path names
# ========================================================================================

T01_NAMES = ["../victim/x", "/../victim/x", "a/../../victim/x", "./../x", "../canary/victim.txt"]


@pytest.mark.parametrize("kind", ["file", "dir", "symlink", "hardlink"])
@pytest.mark.parametrize("name", T01_NAMES)
def test_T01_dotdot_names_refused(env, name, kind):
    """T1: `..` names of any entry type -> InvalidLayer naming the entry; nothing escapes."""
    entry = {
        "file": raw_file(name, b"evil"),
        "dir": raw_dir(name),
        "symlink": raw_symlink(name, "/"),
        "hardlink": raw_hardlink(name, "ok"),
    }[kind]
    env.refuse([raw_file("ok", b"ok"), entry], r"'\.\.' in a path is not allowed", names=[name])
    assert env.tree() == {"ok": b"ok"}
    assert not (env.base / "victim").exists()


def test_T01_dotdot_names_refused_by_artifact_policy(env):
    """T1 (artifact): a `..` name -> InvalidLayer naming the entry."""
    env.reset(policy=artifact_policy())
    env.refuse([raw_file("../victim/x", b"evil")], r"'\.\.'", names=["../victim/x"])
    assert env.tree() == {}


# -- T2 ---------------------------------------------------------------------------------


def test_T02_absolute_names_contained_in_image_policy(env):
    """T2 (image): `/etc/passwd` and other absolute names land under the root."""
    canary_abs = str(env.canary / "victim.txt")
    env.apply(
        [
            raw_file("/etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
            raw_file(f"/{EVIL}", b"evil"),
            raw_file(canary_abs, b"pwned"),
            raw_dir("//usr//lib/"),
        ]
    )
    tree = env.tree()
    assert tree["etc/passwd"] == b"root:x:0:0::/root:/bin/sh\n"
    assert tree[EVIL] == b"evil"
    assert tree[canary_abs.lstrip("/")] == b"pwned"
    assert tree["usr/lib"] == "dir"


@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_T02_absolute_names_refused_by_artifact_policy(env, kind):
    """T2 (artifact): an absolute name -> InvalidLayer "absolute path" naming the entry."""
    env.reset(policy=artifact_policy())
    entry = {
        "file": raw_file("/etc/passwd", b"evil"),
        "dir": raw_dir("/etc/passwd"),
        "symlink": raw_symlink("/etc/passwd", "/"),
    }[kind]
    env.refuse([raw_file("ok", b"ok"), entry], "absolute path", names=["/etc/passwd"])
    assert env.tree() == {"ok": b"ok"}


# -- T3 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [".", "/", "./", "", "//", "./."])
def test_T03_names_that_clean_to_root_never_replace_it(env, name):
    """T3 (image): `.`, `/`, `./`, `` entries are ignored; the root is never replaced."""
    os.chmod(env.root, 0o711)
    (env.root / "keep").write_bytes(b"keep")
    before = os.lstat(env.root)
    env.apply(
        [
            raw_dir(name, mode=0o777, uid=999, gid=999, mtime=1),
            raw_file(name, b"replace the root by a file"),
            raw_symlink(name, "/etc"),
            raw_hardlink(name, "keep"),
            File("after", b"a"),
        ]
    )
    after = os.lstat(env.root)
    assert stat.S_ISDIR(after.st_mode) and after.st_ino == before.st_ino
    assert (after.st_mode, after.st_uid, after.st_gid) == (
        before.st_mode,
        before.st_uid,
        before.st_gid,
    )
    assert env.tree() == {"keep": b"keep", "after": b"a"}


@pytest.mark.parametrize("name", [".", "./", ""])
def test_T03_root_names_in_artifact_policy(env, name):
    """T3 (artifact): a root dir entry is a no-op; a link naming the root -> InvalidLayer."""
    env.reset(policy=artifact_policy())
    env.apply([raw_dir(name), File("a", b"a")])
    assert env.tree() == {"a": b"a"}
    env.refuse([raw_symlink(name, "/etc")], "must not name the root")
    assert stat.S_ISDIR(os.lstat(env.root).st_mode)


# -- T4 ---------------------------------------------------------------------------------


def _t04_long_name(kind: str) -> tuple[list, str, str]:
    if kind == "component-256":
        name = "d/" + "a" * 256
        return [raw_file(name)], name, "longer than 255 bytes"
    if kind == "pax-path-4097":
        base = "/".join(["p" * 200] * 20)
        name = base + "/" + "q" * (4096 - len(base))  # 4097 bytes
        assert len(name) == 4097
        ti = info("placeholder")
        ti.pax_headers = {"path": name}
        return [Raw(ti, b"x")], name, "longer than 4096 bytes"
    if kind == "depth-257":
        name = "/".join(["d"] * 257)
        return [raw_dir(name)], name, "deeper than 256"
    if kind == "symlink-target-4096":
        ti = info("s", tarfile.SYMTYPE, mode=0o777)
        ti.pax_headers = {"linkpath": "t" * 4096}
        return [Raw(ti)], "s", "longer than 4096"
    if kind == "hardlink-target-256":
        target = "b" * 256
        return [raw_hardlink("h", target)], "h", "longer than 255 bytes"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["component-256", "pax-path-4097", "depth-257", "symlink-target-4096", "hardlink-target-256"],
)
def test_T04_overlong_names_refused(env, kind):
    """T4: >255-byte component, >4096-byte path or link, depth >256 -> InvalidLayer."""
    entries, name, match = _t04_long_name(kind)
    env.refuse([File("ok", b"ok"), *entries], match, names=[name[:64]])
    assert env.tree() == {"ok": b"ok"}


def test_T04_limits_themselves_are_accepted(env):
    """T4: 255-byte components, a 4095-byte path and depth 256 still apply exactly."""
    deep = "/".join(["d"] * 255) + "/f"
    long_path = "/".join(["p" * 255] * 16)  # 16*255 + 15 = 4095 bytes
    ti = info("placeholder")
    ti.pax_headers = {"path": long_path}
    env.apply([raw_file("n" * 255, b"1"), raw_file(deep, b"2"), Raw(ti, b"3")])
    assert (env.root / ("n" * 255)).read_bytes() == b"1"
    assert (env.root / deep).read_bytes() == b"2"
    fd = os.open(env.root, os.O_RDONLY)
    try:  # longer than PATH_MAX from `/`: walk it relative to the root
        for part in long_path.split("/")[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        with open(os.open(long_path.split("/")[-1], os.O_RDONLY, dir_fd=fd), "rb") as f:
            assert f.read() == b"3"
    finally:
        os.close(fd)


# -- T5 ---------------------------------------------------------------------------------


T05_CASES = {
    # name -> (entry builder, expected tree)
    "trailing-slash-regular-file": (
        lambda: [Raw(info("file/"), b"1")],
        {"file": b"1"},
    ),
    "trailing-slash-old-v7-dir": (
        lambda: header("v7dir/", typeflag=b"\0") + END,
        {"v7dir": "dir"},
    ),
    "control-characters": (
        lambda: [raw_file("a\nb\x01c\x7f", b"1")],
        {"a\nb\x01c\x7f": b"1"},
    ),
    "backslash-is-not-a-separator": (
        lambda: [raw_file("..\\..\\evil", b"1"), raw_file("d\\e/f", b"2")],
        {"..\\..\\evil": b"1", "d\\e": "dir", "d\\e/f": b"2"},
    ),
    "unicode-dot-lookalikes": (
        lambda: [raw_file("\u2024\u2024/\uff0e\uff0e\uff0fx", b"1")],
        {"\u2024\u2024": "dir", "\u2024\u2024/\uff0e\uff0e\uff0fx": b"1"},
    ),
    "non-utf8-bytes": (
        lambda: header("caf\udce9", size=1) + pad(b"1") + END,
        {"caf\udce9": b"1"},
    ),
}


@pytest.mark.parametrize("case", sorted(T05_CASES))
def test_T05_odd_names_are_deterministic(tmp_path, case):
    """T5: trailing `/`, control chars, `\\`, look-alikes, non-UTF-8: same tree every time."""
    build, expected = T05_CASES[case]
    trees = []
    for attempt in range(2):
        e = Env(tmp_path / f"attempt{attempt}")
        try:
            e.apply(build())
            trees.append(e.tree())
        finally:
            os.close(e.fd)
        e.assert_contained()
    assert trees[0] == trees[1] == expected


def test_T05_nul_in_name_refused(env):
    """T5: a NUL byte in a (PAX) name -> InvalidLayer."""
    ti = info("placeholder")
    ti.pax_headers = {"path": "a\0b"}
    env.refuse([Raw(ti, b"x")], "NUL")
    assert env.tree() == {}


# -- T6 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("../x", r"'\.\.'"),
        ("/abs", "absolute"),
        ("", "empty"),
        ("   ", "empty"),
        (".", "names the artifact root"),
        ("./", "names the artifact root"),
        ("a/../../b", r"'\.\.'"),
        (".wh.x", "whiteout"),
        ("dir/.wh..wh..opq", "whiteout"),
        ("a\0b", "NUL"),
        ("c" * 256, "255 bytes"),
    ],
)
def test_T06_annotation_names_refused(name, match):
    """T6: validated_path refuses `../x`, `/abs`, ``, `.`, `a/../../b`, `.wh.x`, naming them."""
    with pytest.raises(InvalidLayer, match=match) as info_:
        validated_path(name, "layer 1 (sha256:abc) title")
    msg = str(info_.value)
    assert "layer 1 (sha256:abc) title" in msg
    if name.strip() and "\0" not in name:
        assert repr(name[:64]) in msg


@pytest.mark.parametrize(
    ("name", "clean"),
    [("weights.bin", "weights.bin"), ("./a//b/c.json", "a/b/c.json"), ("a..b/..c", "a..b/..c")],
)
def test_T06_annotation_names_accepted(name, clean):
    """T6: ordinary relative annotation names pass validated_path, cleaned."""
    assert validated_path(name, "layer") == clean


@pytest.mark.parametrize(
    "kind", ["oras-title-dotdot", "oras-title-absolute", "modelpack-filepath-dotdot"]
)
def test_T06_hostile_annotation_names_end_to_end(driver, registry, tmp_path, kind):
    """T6 e2e: ORAS title / ModelPack filepath `../evil` -> INVALID_ARGUMENT, store clean."""
    if kind == "modelpack-filepath-dotdot":
        name = "../evil"
        meta = '{"name": "x", "size": 4, "typeflag": 48}'
        blob = Blob(
            b"evil",
            "application/vnd.cncf.model.weight.v1.raw",
            {"org.cncf.model.filepath": name, "org.cncf.model.file.metadata+json": meta},
        )
        config_doc = {
            "descriptor": {"name": "m"},
            "modelfs": {"type": "layers", "diffIds": [sha256_digest(b"evil")]},
        }
        config = Blob(json.dumps(config_doc).encode(), "application/vnd.cncf.model.config.v1+json")
        art = Artifact([blob], config, "application/vnd.cncf.model.manifest.v1+json")
    else:
        name = "../evil" if kind == "oras-title-dotdot" else "/etc/evil"
        art = Artifact(
            [Blob(b"evil", ORAS_FILE, {TITLE: name})],
            Blob(b"{}", OCI_EMPTY),
            "application/vnd.example.model",
        )
    ref = push_artifact(registry, art, f"hardening/t06-{kind}:v1")
    target = target_in(tmp_path)
    err = rpc_error(driver.publish, target, {"image": ref})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert repr(name) in err.details()
    assert not target.exists() and mount_options(target) is None
    assert_nothing_kept(driver, art.digest, [art.layers[0].digest])
    for where in (driver.state_dir, driver.workdir, target.parent, tmp_path):
        assert not (where / "evil").exists()
    assert not os.path.lexists("/etc/evil")


# ========================================================================================
# Symlinks
# ========================================================================================


@pytest.mark.parametrize(
    ("links", "lands"),
    [
        ([("x", "/etc")], f"etc/{EVIL}"),  # SymlinkAbsolute
        ([("x", "/dummy/../etc")], f"etc/{EVIL}"),  # SymlinkUpAndOut
        ([("x", "../../../../etc")], f"etc/{EVIL}"),  # relative, clamped at the root
        ([("x", "/y"), ("y", "/z"), ("z", "/etc")], f"etc/{EVIL}"),  # MultipleAbsolute
        ([("x", "y/."), ("y", "../z"), ("z", "../../etc")], f"etc/{EVIL}"),  # MultipleRelative
        ([("x", "<canary>")], f"<canary>/{EVIL}"),  # the host path of the real canary
    ],
    ids=["absolute", "up-and-out", "relative", "chain-absolute", "chain-relative", "canary"],
)
def test_T07_writes_through_symlinks_land_inside_root(env, links, lands):
    """T7: files written through `x -> /etc`, up-and-out or chained links land in the root."""
    canary = str(env.canary)
    entries = [Symlink(name, target.replace("<canary>", canary)) for name, target in links]
    env.apply([*entries, File(f"x/{EVIL}", b"evil")])
    tree = env.tree()
    assert tree[lands.replace("<canary>", canary.lstrip("/"))] == b"evil"
    assert tree["x"] == ("->", links[0][1].replace("<canary>", canary))


# -- T8 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["<canary>/victim.txt", "../canary/victim.txt"])
def test_T08_file_over_symlink_replaces_link_not_target(env, target):
    """T8: an empty file over a link to a host file replaces the link; no truncation."""
    target = target.replace("<canary>", str(env.canary))
    env.apply([Symlink("victim", target), File("victim", b"", mode=0o600)])
    assert env.tree() == {"victim": b""}
    env.apply([Symlink("v2", target)])
    env.apply([File("v2", b"")])  # across layers too
    assert env.tree() == {"victim": b"", "v2": b""}


@pytest.mark.parametrize(
    ("name", "outcome"),
    [("..", "refused"), ("sub/..", "refused"), ("sub/../x", "refused"), ("", "ignored")],
    ids=["dotdot", "sub-dotdot", "sub-dotdot-x", "empty"],
)
def test_T08_symlinks_with_parent_or_empty_names(env, name, outcome):
    """T8: links named `..` / `sub/..` -> InvalidLayer; one named `` is ignored."""
    layer = [Dir("sub"), raw_symlink(name, str(env.canary)), File(f"x{EVIL}", b"after")]
    if outcome == "refused":
        env.refuse(layer, r"'\.\.'", names=[name])
        assert env.tree() == {"sub": "dir"}
    else:
        env.apply(layer)
        assert env.tree() == {"sub": "dir", f"x{EVIL}": b"after"}
    assert stat.S_ISDIR(os.lstat(env.root).st_mode)


# -- T9 ---------------------------------------------------------------------------------


def test_T09_symlink_overrides_directory(env):
    """T9: a link replacing a dir replaces it; writes through it stay in the root."""
    canary = str(env.canary)
    env.apply([Dir("lower"), File("lower/f", b"lower")])
    env.apply(
        [
            Symlink("lower", canary),
            Dir("same"),
            File("same/f", b"same"),
            Symlink("same", "../canary"),
            File("lower/g", b"g"),
            File("same/h", b"h"),
        ]
    )
    tree = env.tree()
    assert tree["lower"] == ("->", canary)
    assert tree["same"] == ("->", "../canary")
    assert tree[f"{canary.lstrip('/')}/g"] == b"g"
    assert tree["canary/h"] == b"h"
    assert "lower/f" not in tree and "same/f" not in tree


def test_T09_directory_overrides_symlink(env):
    """T9: a dir entry over a link to /etc or the canary becomes a real in-root dir."""
    env.apply([Symlink("d", "/etc"), Symlink("c", str(env.canary))])
    env.apply([Dir("d", mode=0o700), File(f"d/{EVIL}", b"x"), Dir("c", mode=0o777)])
    tree = env.tree()
    assert tree == {"d": "dir", f"d/{EVIL}": b"x", "c": "dir"}
    assert stat.S_IMODE(os.lstat(env.root / "d").st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(env.root / "c").st_mode) == 0o777


def test_T09_directory_overrides_symlink_and_hardlink(env):
    """T9: a hard link to a link survives the link's replacement; writes stay in root."""
    env.apply(
        [
            Symlink("lnk", "/etc"),
            Hardlink("hrd", "lnk"),
            Dir("lnk"),
            File(f"hrd/{EVIL}", b"through the hard-linked link"),
        ]
    )
    tree = env.tree()
    assert tree["lnk"] == "dir"
    assert tree["hrd"] == ("->", "/etc")
    assert tree[f"etc/{EVIL}"] == b"through the hard-linked link"


def test_T09_symlink_dir_symlink_on_one_path(env):
    """T9: link, dir, link on one path then a file through it: real /tmp untouched."""
    env.apply([Symlink("x", "/tmp"), Dir("x"), Symlink("x", "/tmp"), File(f"x/{EVIL}", b"e")])
    assert env.tree() == {"x": ("->", "/tmp"), "tmp": "dir", f"tmp/{EVIL}": b"e"}


# -- T10 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "links",
    [
        [("a", "a")],
        [("a", "b"), ("b", "a")],
        [("a", "/b/"), ("b", "./c"), ("c", "../a")],
        [("a", "a/a/a/a")],
        [(f"l{i}", f"l{i + 1}") for i in range(MAX_SYMLINK_HOPS + 1)]
        + [(f"l{MAX_SYMLINK_HOPS + 1}", "/")],
    ],
    ids=["self", "pair", "triple", "self-nested", "chain-42"],
)
def test_T10_symlink_loops_and_long_chains_are_clean_errors(env, links):
    """T10: loops and >40-hop chains -> InvalidLayer "too many levels", no hang."""
    entries = [Symlink(name, target) for name, target in links]
    start = links[0][0]
    msg = bounded(
        lambda: env.refuse(
            [*entries, File(f"{start}/x", b"x")], "too many levels", layer_named=False
        ),
        seconds=10,
    )
    assert repr(start) in msg
    assert f"{start}/x" not in env.tree()


@pytest.mark.parametrize("kind", ["loop", "not-a-directory"])
def test_T10_resolution_errors_name_the_layer_and_entry(env, kind):
    """T10: a loop / non-dir met resolving a parent -> error naming the layer and entry."""
    first = Symlink("a", "a") if kind == "loop" else File("a", b"file")
    env.refuse([first, File("a/x", b"x")], ".", names=["a/x"])


def test_T10_loops_at_the_final_component_are_plain_links(env):
    """T10: looping links nothing goes through are stored, and whited out, without hanging."""
    bounded(lambda: env.apply([Symlink("a", "b"), Symlink("b", "a"), Symlink("c", "c")]), 10)
    bounded(lambda: env.apply([Whiteout("a"), Whiteout("c")]), 10)
    assert env.tree() == {"b": ("->", "a")}


# -- T11 --------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/", "../../..", "<canary>", "./."])
def test_T11_cross_layer_symlink_plant(env, target):
    """T11: layer 1 `x -> /`, layer 2 `x/etc/cron.d/evil` -> the file lands inside root."""
    target = target.replace("<canary>", str(env.canary))
    env.apply([Symlink("x", target)])
    env.apply([File(f"x/etc/cron.d/{EVIL}", b"* * * * * root evil"), File("x/victim", b"p")])
    tree = env.tree()
    base = str(env.canary).lstrip("/") + "/" if target == str(env.canary) else ""
    assert tree["x"] == ("->", target)
    assert tree[f"{base}etc/cron.d/{EVIL}"] == b"* * * * * root evil"
    assert tree[f"{base}victim"] == b"p"


def test_T11_cross_layer_plant_end_to_end(driver, registry, tmp_path):
    """T11 e2e: a published `x -> /` + `x/etc/cron.d/evil` image never writes host /etc."""
    cron_before = sorted(os.listdir("/etc/cron.d")) if os.path.isdir("/etc/cron.d") else None
    evil_before = os.path.lexists("/etc/cron.d/evil")
    img = Image(
        [
            Layer([Symlink("x", "/")], compression="gzip"),
            Layer([File("x/etc/cron.d/evil", b"* * * * * root rm -rf /")], compression="zstd"),
        ]
    )
    push_image(registry, img, "hardening/t11-plant:v1", tmp_path)
    tree = publish_tree(driver, tmp_path, f"{registry.host}/hardening/t11-plant:v1")
    assert tree == {
        "x": "->/",
        "etc": "dir",
        "etc/cron.d": "dir",
        "etc/cron.d/evil": b"* * * * * root rm -rf /",
    }
    assert os.path.lexists("/etc/cron.d/evil") == evil_before
    if cron_before is not None:
        assert sorted(os.listdir("/etc/cron.d")) == cron_before


# -- T12 --------------------------------------------------------------------------------


def test_T12_metadata_never_applied_through_links(env):
    """T12: chmod/chown/utime/truncate/whiteout via links act on links; host unchanged."""
    canary = str(env.canary)
    victim = f"{canary}/victim.txt"
    env.apply(
        [
            Symlink("f", victim),
            Symlink("d", canary),
            Symlink("rel", "../canary"),
            Hardlink("hf", "f"),  # a hard link to the link, not to the host file
            Dir("dd", mtime=1),
            Symlink("dd", canary),  # dir times are set after the layer: O_NOFOLLOW
            Symlink("o", canary),
            Symlink("w", canary),
        ],
        what="layer 1",
    )
    env.apply(
        [
            File("f", b"", mode=0o777, uid=0, gid=0, mtime=5),
            Dir("d", mode=0o777, uid=0, gid=0, mtime=5),
            Dir("rel", mode=0o777, mtime=5),
            File("hf", b"", mode=0o6777, mtime=5),
            Opaque("o"),  # resolved in-root: creates root/<canary path>, clears nothing
            Whiteout("w/victim.txt"),
        ],
        what="layer 2",
    )
    tree = env.tree()
    assert tree["f"] == b"" and tree["hf"] == b""
    assert tree["d"] == "dir" and tree["rel"] == "dir"
    assert tree["dd"] == ("->", canary)
    assert tree["o"] == ("->", canary) and tree["w"] == ("->", canary)
    assert os.stat(env.canary / "victim.txt").st_nlink == 1
    env.assert_contained()


def test_T12_publish_and_unpublish_never_follow_links(driver, registry, tmp_path):
    """T12 e2e: pull, publish, unpublish of links to a canary leave it unchanged."""
    canary = tmp_path / "host-canary"
    make_canary(canary)
    before = snapshot(canary)
    img = Image(
        [
            Layer(
                [
                    Symlink("victim", str(canary / "victim.txt")),
                    Symlink("perm400", str(canary / "perm400")),
                    Symlink("cdir", str(canary)),
                    Symlink("up", "../../../../../../../../.." + str(canary)),
                    Hardlink("hl", "victim"),
                ]
            ),
            Layer([File("cdir/planted", b"p"), Dir("up", mode=0o777), Whiteout("perm400")]),
        ]
    )
    push_image(registry, img, "hardening/t12-links:v1", tmp_path)
    tree = publish_tree(driver, tmp_path, f"{registry.host}/hardening/t12-links:v1")
    assert tree["victim"] == "->" + str(canary / "victim.txt")
    assert tree["hl"] == "->" + str(canary / "victim.txt")
    assert tree["cdir"] == "->" + str(canary)
    assert tree["up"] == "dir" and "perm400" not in tree
    assert tree[str(canary).lstrip("/") + "/planted"] == b"p"
    assert snapshot(canary) == before
    assert not (canary / "planted").exists()


# ========================================================================================
# Hard links
# ========================================================================================


@pytest.mark.parametrize(
    "target",
    [
        "../victim/hello",  # HardlinkRelative
        "/../victim/hello",  # HardlinkDownAndOut
        "../canary/victim.txt",
        "a/../../canary/victim.txt",  # HardlinkRelativeLong
        "/".join([".."] * 20) + "/etc/passwd",  # long ../../.. chain
    ],
)
def test_T13_hardlink_with_dotdot_target_refused(env, target):
    """T13: hard links to `../victim/hello`, `/../..`, long `../..` -> InvalidLayer."""
    env.refuse([File("a/f", b"f"), raw_hardlink("h", target)], "link target", names=["h"])
    assert "h" not in env.tree()
    assert os.stat(env.canary / "victim.txt").st_nlink == 1


def test_T13_hardlink_to_absolute_host_paths_resolves_inside_root(env):
    """T13: hard link to `/etc/passwd` means the image's file: absent -> refused."""
    passwd = os.lstat("/etc/passwd")
    env.refuse([raw_hardlink("h", "/etc/passwd")], "does not exist", names=["h"])
    victim_abs = str(env.canary / "victim.txt")
    env.refuse([raw_hardlink("h2", victim_abs)], "does not exist", names=["h2"])
    env.apply([File("etc/passwd", b"image passwd"), raw_hardlink("h", "/etc/passwd")])
    assert os.stat(env.root / "h").st_ino == os.stat(env.root / "etc/passwd").st_ino
    assert os.lstat("/etc/passwd").st_nlink == passwd.st_nlink
    assert os.stat(env.canary / "victim.txt").st_nlink == 1


# -- T14 --------------------------------------------------------------------------------


def test_T14_hardlink_through_symlinked_parent(env):
    """T14: a hard link target through a link resolves in-root; via a host link: refused."""
    env.apply([File("etc/passwd", b"img"), Symlink("l", "/etc"), Hardlink("h", "l/passwd")])
    assert os.stat(env.root / "h").st_ino == os.stat(env.root / "etc/passwd").st_ino
    env.refuse(
        [Symlink("c", str(env.canary)), raw_hardlink("h2", "c/victim.txt")],
        "does not exist",
        names=["h2"],
    )
    assert os.stat(env.canary / "victim.txt").st_nlink == 1


@pytest.mark.parametrize("target", ["../canary/victim.txt", "<canary>/victim.txt", "later"])
def test_T14_hardlink_to_symlink_links_the_link(env, target):
    """T14: a hard link to a link is a second link, never a link to its target."""
    target = target.replace("<canary>", str(env.canary))
    env.apply([Symlink("s", target), Hardlink("h", "s"), File("later", b"made after")])
    assert os.readlink(env.root / "h") == target
    assert stat.S_ISLNK(os.lstat(env.root / "h").st_mode)
    assert os.lstat(env.root / "h").st_ino == os.lstat(env.root / "s").st_ino
    assert os.stat(env.canary / "victim.txt").st_nlink == 1


def test_T14_hardlink_symlink_chmod(env):
    """T14 (HardlinkSymlinkChmod): a 0400 host file reached via links stays 0400."""
    perm400 = str(env.canary / "perm400")
    env.apply([Symlink(".hardlink", perm400), Hardlink("hardlink", ".hardlink")])
    env.apply([File("hardlink", b"", mode=0o777)])
    env.apply([Hardlink("again", ".hardlink"), Dir("again", mode=0o777)])
    assert stat.S_IMODE(os.stat(perm400).st_mode) == 0o400
    assert env.tree() == {".hardlink": ("->", perm400), "hardlink": b"", "again": "dir"}


# -- T15 --------------------------------------------------------------------------------


def test_T15_hardlink_to_target_not_yet_extracted_refused(env):
    """T15: a hard link to a target that comes later -> InvalidLayer naming it."""
    env.refuse([Hardlink("h", "t"), File("t", b"t")], "does not exist", names=["h"])
    assert env.tree() == {}


def test_T15_hardlink_to_lower_layer_target(env):
    """T15: a hard link to a lower layer's file links that file (same inode)."""
    env.apply([File("lower", b"low")])
    env.apply([Hardlink("upper", "lower")])
    assert os.stat(env.root / "upper").st_ino == os.stat(env.root / "lower").st_ino


def test_T15_hardlink_to_directory_refused(env):
    """T15: a hard link to a directory -> InvalidLayer naming the entry."""
    env.refuse([Dir("d"), Hardlink("h", "d")], "is a directory", names=["h"])


def test_T15_relative_link_name_not_resolved_against_cwd(env, monkeypatch):
    """T15: hard link targets resolve in the root, never in the process CWD."""
    monkeypatch.chdir(env.canary)
    env.refuse([raw_hardlink("h", "victim.txt")], "does not exist", names=["h"])
    env.refuse([raw_hardlink("h", "./victim.txt")], "does not exist", names=["h"])
    env.apply([File("victim.txt", b"mine"), raw_hardlink("h", "victim.txt")])
    assert os.stat(env.root / "h").st_ino == os.stat(env.root / "victim.txt").st_ino
    assert os.stat(env.canary / "victim.txt").st_nlink == 1


# ========================================================================================
# Whiteouts
# ========================================================================================


@pytest.mark.parametrize("layer", ["first", "second"])
@pytest.mark.parametrize("name", [".wh.", ".wh..", ".wh...", "etc/.wh..", "etc/.wh..."])
def test_T16_invalid_whiteout_names_refused(env, name, layer):
    """T16: `.wh.`, `.wh..`, `.wh...` (also under etc/) -> InvalidLayer, any layer."""
    if layer == "second":
        env.apply([Dir("etc"), File("etc/keep", b"k"), File("keep", b"k")])
    env.refuse([raw_file(name, b"")], "invalid whiteout name", names=[name])
    if layer == "second":
        assert env.tree() == {"etc": "dir", "etc/keep": b"k", "keep": b"k"}


# -- T17 --------------------------------------------------------------------------------


def test_T17_whiteout_of_symlink_removes_the_link(env):
    """T17: `.wh.<link>` removes the link, not its target."""
    env.apply(
        [
            Dir("etc"),
            File("etc/passwd", b"p"),
            Symlink("localetc", "/etc"),
            Symlink("hostlink", str(env.canary)),
            Symlink("filelink", "etc/passwd"),
        ]
    )
    env.apply([Whiteout("localetc"), Whiteout("hostlink"), Whiteout("filelink")])
    assert env.tree() == {"etc": "dir", "etc/passwd": b"p"}


def test_T17_whiteout_under_symlinked_parent(env):
    """T17: whiteout via an in-root link hides there; via a host link: no-op."""
    env.apply(
        [
            Dir("realdir"),
            File("realdir/f", b"f"),
            File("realdir/g", b"g"),
            Symlink("link", "realdir"),
            Symlink("hostlink", str(env.canary)),
            Symlink("hostrel", "../canary"),
        ]
    )
    env.apply(
        [
            Whiteout("link/f"),
            Whiteout("hostlink/victim.txt"),
            Whiteout("hostrel/sub"),
            Opaque("hostlink/sub"),
        ]
    )
    tree = env.tree()
    assert "realdir/f" not in tree and tree["realdir/g"] == b"g"
    assert tree["hostlink"] == ("->", str(env.canary))


def test_T17_whiteout_under_dead_symlink_parent(env):
    """T17: a whiteout under a dangling link is a no-op and creates nothing."""
    env.apply([Symlink("dead", "nowhere"), Symlink("deadabs", "/nowhere/at/all")])
    env.apply([Whiteout("dead/x"), Whiteout("deadabs/y")])
    assert env.tree() == {"dead": ("->", "nowhere"), "deadabs": ("->", "/nowhere/at/all")}


# -- T18 --------------------------------------------------------------------------------


@pytest.mark.parametrize("marker_first", [True, False], ids=["opq-first", "opq-last"])
def test_T18_opaque_before_and_after_siblings(env, marker_first):
    """T18: an opaque marker before or after siblings hides only lower content."""
    env.apply([Dir("d"), File("d/lower", b"l"), Dir("d/sub"), File("d/sub/lower2", b"l2")])
    same = [File("d/new", b"n"), Dir("d/sub2"), File("d/sub2/x", b"x")]
    env.apply([Opaque("d"), *same] if marker_first else [*same, Opaque("d")])
    assert env.tree() == {"d": "dir", "d/new": b"n", "d/sub2": "dir", "d/sub2/x": b"x"}


def test_T18_whiteout_prefix_on_a_directory_name_is_a_normal_path(env):
    """T18: `.wh.etc/somefile` is an ordinary file in a dir named `.wh.etc`."""
    env.apply([Dir("etc"), File("etc/keep", b"k"), File(".wh.etc/somefile", b"1")])
    env.apply([File(".wh.etc/other", b"2")])
    assert env.tree() == {
        "etc": "dir",
        "etc/keep": b"k",
        ".wh.etc": "dir",
        ".wh.etc/somefile": b"1",
        ".wh.etc/other": b"2",
    }


# -- T19 --------------------------------------------------------------------------------


def test_T19_whiteouts_of_nothing_are_noops(env):
    """T19: whiteouts in the first layer or of missing paths change nothing."""
    env.apply([File("a", b"a"), Whiteout("a"), Whiteout("missing"), Dir("d"), Opaque("d")])
    assert env.tree() == {"a": b"a", "d": "dir"}
    env.apply([Whiteout("missing"), Whiteout("no/such/dir/file"), Opaque("d")])
    assert env.tree() == {"a": b"a", "d": "dir"}
    assert not (env.root / "no").exists()


# ========================================================================================
# Types, metadata, duplicates
# ========================================================================================


SPECIALS = {
    "char": lambda: CharDevice("dev/null", 1, 3),
    "block": lambda: BlockDevice("dev/sda", 8, 0),
    "fifo": lambda: Fifo("run/fifo"),
}


def test_T20_device_nodes_and_fifos_skipped_by_image_policy(env):
    """T20 (image): char/block devices and FIFOs are skipped, never created."""
    stats = env.apply([File("before", b"1"), *(f() for f in SPECIALS.values()), File("z")])
    assert stats.skipped_special == ["dev/null", "dev/sda", "run/fifo"]
    assert env.tree() == {"before": b"1", "z": b""}


@pytest.mark.parametrize("kind", sorted(SPECIALS))
def test_T20_device_nodes_and_fifos_refused_by_artifact_policy(env, kind):
    """T20 (artifact): a device node or FIFO -> InvalidLayer naming it."""
    env.reset(policy=artifact_policy())
    entry = SPECIALS[kind]()
    env.refuse([File("ok", b"ok"), entry], "device nodes and FIFOs", names=[entry.path])
    assert env.tree() == {"ok": b"ok"}


def test_T21_modes_and_owners_normalised(env):
    """T21: setuid/setgid dropped; sticky, world-writable and owners kept as given."""
    env.apply(
        [
            File("suid-root", b"x", mode=0o4755, uid=0, gid=0),
            File("sgid", b"x", mode=0o2755, gid=50),
            File("world", b"x", mode=0o666, uid=1000, gid=1000),
            Dir("sticky", mode=0o1777),
            Dir("sgiddir", mode=0o2775),
        ]
    )
    expect = {
        "suid-root": (0o755, 0, 0),
        "sgid": (0o755, 0, 50),
        "world": (0o666, 1000, 1000),
        "sticky": (0o1777, 0, 0),
        "sgiddir": (0o775, 0, 0),
    }
    for name, (mode, uid, gid) in expect.items():
        st = os.lstat(env.root / name)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid, gid), name


def test_T20_T21_published_volume_is_ro_nosuid_nodev(driver, registry, tmp_path):
    """T20/T21 e2e: no devices, no setuid, volume mounted ro,nosuid,nodev."""
    img = Image(
        [
            Layer(
                [
                    File("bin/suid", b"#!/bin/sh\n", mode=0o4755, uid=0),
                    File("world", b"w", mode=0o666, uid=1000, gid=1000),
                    CharDevice("dev/null", 1, 3),
                    BlockDevice("dev/sda", 8, 0),
                    Fifo("run/fifo"),
                ]
            )
        ]
    )
    push_image(registry, img, "hardening/t20-specials:v1", tmp_path)
    target = target_in(tmp_path)
    driver.publish(target, {"image": f"{registry.host}/hardening/t20-specials:v1"})
    try:
        assert {"ro", "nosuid", "nodev"} <= (mount_options(target) or set())
        assert tree_of(target) == {"bin": "dir", "bin/suid": b"#!/bin/sh\n", "world": b"w"}
        assert stat.S_IMODE(os.stat(target / "bin/suid").st_mode) == 0o755
        st = os.stat(target / "world")
        assert (st.st_uid, st.st_gid) == (1000, 1000)
        with pytest.raises(OSError):
            (target / "world").write_bytes(b"no")
    finally:
        driver.unpublish(target)


# -- T22 --------------------------------------------------------------------------------


T22_IMAGE = {
    "file-file": ([File("a", b"1"), File("a", b"2")], {"a": b"2"}),
    "file-then-dir": ([File("a", b"1"), Dir("a"), File("a/x", b"x")], {"a": "dir", "a/x": b"x"}),
    "dir-then-file": ([Dir("a"), File("a/x", b"x"), File("a", b"2")], {"a": b"2"}),
    "file-then-symlink": ([File("a", b"1"), Symlink("a", "b")], {"a": ("->", "b")}),
    "dir-then-dir": ([Dir("a", mode=0o700), Dir("a", mode=0o750)], {"a": "dir"}),
}


@pytest.mark.parametrize("case", sorted(T22_IMAGE))
def test_T22_duplicates_last_wins_in_image_policy(env, case):
    """T22 (image): duplicate entries for one path -> the last one wins."""
    entries, expected = T22_IMAGE[case]
    env.apply(entries)
    assert env.tree() == expected
    if case == "dir-then-dir":
        assert stat.S_IMODE(os.lstat(env.root / "a").st_mode) == 0o750


@pytest.mark.parametrize(
    "case",
    [
        "file-file",
        "symlink-then-file",
        pytest.param("file-then-dir"),
        pytest.param("dir-then-file"),
    ],
)
def test_T22_duplicates_refused_in_artifact_policy(env, case):
    """T22 (artifact): two entries for one path in a layer -> InvalidLayer "duplicate"."""
    entries = {
        "file-file": [File("a", b"1"), File("a", b"2")],
        "symlink-then-file": [Symlink("a", "b"), File("a", b"2")],
        "file-then-dir": [File("a", b"1"), Dir("a")],
        "dir-then-file": [Dir("a"), File("a/x", b"x"), File("a", b"2")],
    }[case]
    env.reset(policy=artifact_policy())
    env.refuse(entries, "duplicate path", names=["a"])


@pytest.mark.parametrize(
    "case",
    [
        "same-file",
        pytest.param("file-over-dir"),
        pytest.param("dir-over-file"),
    ],
)
def test_T22_artifact_layers_sharing_claims_refuse_the_same_path(env, case):
    """T22 (artifact): two layers, one shared `claimed`, same path -> second refused."""
    claimed: dict[str, str] = {}
    lock = threading.Lock()
    first, second, survivor = {
        "same-file": ([File("m", b"1")], [File("m", b"2")], "m"),
        "file-over-dir": ([File("m/w", b"1")], [File("m", b"2")], "m/w"),
        "dir-over-file": ([File("m", b"1")], [Dir("m"), File("m/w", b"2")], "m"),
    }[case]
    LayerApplier(env.fd, policy=artifact_policy(claimed, lock)).apply(
        io.BytesIO(build_tar(first)), "layer 1/2 (sha256:aaa)"
    )
    with pytest.raises(InvalidLayer, match="duplicate path") as info_:
        LayerApplier(env.fd, policy=artifact_policy(claimed, lock)).apply(
            io.BytesIO(build_tar(second)), "layer 2/2 (sha256:bbb)"
        )
    assert "layer 2/2 (sha256:bbb)" in str(info_.value)
    assert env.tree()[survivor] == b"1"


# -- T23 --------------------------------------------------------------------------------


def test_T23_gnu_long_names_and_links(env):
    """T23: GNU long-name and long-link records give the full names."""
    long_dir = "d" * 150
    long_name = f"{long_dir}/" + "f" * 140
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = info(long_name)
        ti.size = 4
        tf.addfile(ti, io.BytesIO(b"long"))
        tf.addfile(info("s" * 120, tarfile.SYMTYPE, linkname="/" + long_name, mode=0o777))
        tf.addfile(info("h" * 120, tarfile.LNKTYPE, linkname=long_name))
    assert b"././@LongLink" in buf.getvalue()
    env.apply(buf.getvalue())
    assert env.tree() == {
        long_dir: "dir",
        long_name: b"long",
        "s" * 120: ("->", "/" + long_name),
        "h" * 120: b"long",
    }


def test_T23_old_regular_and_contiguous_typeflags_are_files(env):
    """T23: `TypeRegA` (NUL) and contiguous (`7`) members are regular files."""
    data = header("rega", size=1, typeflag=b"\0") + pad(b"1")
    data += header("cont", size=1, typeflag=b"7") + pad(b"2") + END
    env.apply(data)
    assert env.tree() == {"rega": b"1", "cont": b"2"}


@pytest.mark.parametrize("typeflag", [b"Z", b"V", b"M", b"N", b"s", b"9"])
def test_T23_unknown_typeflags_refused(env, typeflag):
    """T23: an unknown typeflag -> InvalidLayer naming the entry and its type."""
    data = header("ok", size=1) + pad(b"1") + header("weird", typeflag=typeflag, size=1)
    env.refuse(data + pad(b"p") + END, "unsupported tar entry type", names=["weird"])


def test_T23_pax_global_header_is_ignored(env):
    """T23: a PAX global header is ignored (as containerd): entries keep their names."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"path": "glob"}
    ) as tf:
        for name in ("f1", "f2"):
            ti = info(name)
            ti.size = 1
            tf.addfile(ti, io.BytesIO(name[-1:].encode()))
    env.apply(buf.getvalue())
    assert env.tree() == {"f1": b"1", "f2": b"2"}


def test_T23_pax_global_header_comment_only(env):
    """T23: a harmless PAX global header (git archive's comment) changes nothing."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "abc123"}
    ) as tf:
        ti = info("f")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"1"))
    env.apply(buf.getvalue())
    assert env.tree() == {"f": b"1"}


def test_T23_ustar_gnu_conflict(env):
    """T23: a GNU header whose atime/ctime fill the ustar prefix keeps its plain name."""
    gnu = header(
        "name.txt",
        size=1,
        magic=GNU_MAGIC,
        fields={345: b"14000000000\x00", 357: b"14000000001\x00"},
    )
    env.apply(gnu + pad(b"1") + END)
    assert env.tree() == {"name.txt": b"1"}


# -- T24 --------------------------------------------------------------------------------


def test_T24_xattrs_are_never_applied(env):
    """T24: PAX xattrs (security.capability, trusted.*, user.*) are never set on disk."""
    cap = "\x01\x00\x00\x02\xff\xff\xff\xff" + "\x00" * 12
    env.apply(
        [
            File(
                "cap",
                b"x",
                xattrs={"security.capability": cap, "user.x": "v", "trusted.t": "t"},
            ),
            File("big", b"x", xattrs={"user.big": "v" * 65536}),
            Dir("d"),
        ]
    )
    ti = info("s", tarfile.SYMTYPE, linkname="cap", mode=0o777)
    ti.pax_headers = {"SCHILY.xattr.user.l": "l", "SCHILY.xattr.security.selinux": "x"}
    env.apply([Raw(ti)])
    for name in ("cap", "big", "d", "s"):
        assert os.listxattr(env.root / name, follow_symlinks=False) == [], name


# ========================================================================================
# Size / resource DoS
# ========================================================================================


T25_CASES = {
    # name -> (tar bytes, expected message)
    "truncated-in-data": (
        lambda: header("f", size=2048) + b"x" * 700,
        "truncated|malformed",
    ),
    "declared-larger-than-data": (
        lambda: header("f", size=4096) + pad(b"short") + END,
        "truncated|malformed",
    ),
    "declared-smaller-than-data": (
        lambda: header("f", size=10) + b"A" * 2048 + END,
        "malformed|corrupt",
    ),
    "truncated-header": (
        lambda: header("ok", size=1) + pad(b"1") + header("f", size=1)[:300],
        "malformed|corrupt|truncated",
    ),
    "negative-size-base256": (
        lambda: header("f", fields={124: base256(-1)}) + pad(b"x") + END,
        "'f'",
    ),
    "negative-size-min": (
        lambda: header("f", fields={124: b"\xff" + b"\x00" * 11}) + pad(b"x") + END,
        "'f'",
    ),
    "huge-size-base256": (
        lambda: header("f", fields={124: base256((1 << 88) - 1)}) + pad(b"x") + END,
        "more than",
    ),
    "negative-pax-size": (
        lambda: header("././@PaxHeader", typeflag=b"x", fields={124: base256(-512)}) + END,
        "PAX header",
    ),
    "negative-gnu-longname-size": (
        lambda: (
            header("././@LongLink", typeflag=b"L", magic=GNU_MAGIC, fields={124: base256(-1)}) + END
        ),
        "GNU long name",
    ),
}


@pytest.mark.parametrize("case", sorted(T25_CASES))
def test_T25_size_lies_are_clean_errors(env, case):
    """T25: size != data, truncation, negative/huge base-256 sizes -> InvalidLayer, no hang."""
    build, match = T25_CASES[case]
    env.reset(limits=Limits(max_bytes=64 * MIB))
    layer_named = not case.startswith("negative-pax") and not case.startswith("negative-gnu")
    bounded(lambda: env.refuse(build(), match, layer_named=layer_named), seconds=10)


def test_T25_negative_size_cannot_refund_the_budget(env):
    """T25: a refused negative-size entry does not lower the budget parallel layers share."""
    budget = Budget(Limits(max_bytes=32 * MIB))
    negative = header("neg", fields={124: base256(-(1 << 40))}) + END
    with pytest.raises(InvalidLayer):
        LayerApplier(env.fd, budget=Budget(Limits(), parent=budget)).apply(
            io.BytesIO(negative), "layer 1/2"
        )
    big = ChunkSource(
        itertools.chain([header("big", size=64 * MIB)], itertools.repeat(bytes(MIB), 64), [END])
    )
    with pytest.raises(InvalidLayer, match="more than 33554432 bytes"):
        LayerApplier(env.fd, budget=Budget(Limits(), parent=budget)).apply(big, "layer 2/2")


# -- T26 --------------------------------------------------------------------------------


def gnu_sparse_header(name: str, realsize: int, payload: int) -> bytes:
    """An old-GNU sparse member ('S'): one data region of `payload` bytes at the end of a
    file of `realsize` bytes; numeric fields in base-256 as GNU tar writes huge values."""
    return header(
        name,
        size=payload,
        typeflag=b"S",
        magic=GNU_MAGIC,
        fields={
            386: base256(realsize - payload),  # sparse[0].offset
            398: base256(payload),  # sparse[0].numbytes
            482: b"\x00",  # isextended
            483: base256(realsize),  # realsize
        },
    )


def pax_sparse_member(name: str, realsize: int, payload: int) -> bytes:
    """A PAX 1.0 sparse member (GNU.sparse.major=1): the map precedes the data."""
    sparse_map = pad(b"1\n%d\n%d\n" % (realsize - payload, payload))
    ti = info("GNUSparseFile.0/" + name)
    ti.size = len(sparse_map) + payload
    ti.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(realsize),
    }
    return ti.tobuf(tarfile.PAX_FORMAT) + sparse_map + pad(b"D" * payload)


@pytest.mark.parametrize("kind", ["old-gnu", "pax-1.0"])
def test_T26_sparse_member_with_huge_real_size_refused_by_budget(tmpfs_env, kind):
    """T26: a 4 TiB GNU sparse member with a tiny payload -> refused by the byte budget."""
    tb = 4 << 40
    if kind == "old-gnu":
        member = gnu_sparse_header("sparse", tb, 512) + pad(b"D" * 512)
    else:
        member = pax_sparse_member("sparse", tb, 512)
    tmpfs_env.reset(limits=Limits(max_bytes=64 * MIB))
    msg = bounded(
        lambda: tmpfs_env.refuse(member + END, "more than 67108864 bytes", names=["sparse"]), 10
    )
    assert "--max-image-bytes" in msg
    assert tmpfs_env.tree() == {}


def test_T26_small_sparse_member_applies(tmpfs_env):
    """T26: a sparse member within budget unpacks to its real size, holes as zeros."""
    member = gnu_sparse_header("sparse", MIB, 512) + pad(b"D" * 512)
    tmpfs_env.reset(limits=Limits(max_bytes=2 * MIB))
    tmpfs_env.apply(member + END)
    assert tmpfs_env.tree() == {"sparse": bytes(MIB - 512) + b"D" * 512}


# -- T27 --------------------------------------------------------------------------------


def tar_period(size: int, name: str = "zeros") -> bytes:
    """One tar member of `size` zero bytes (size a multiple of 512)."""
    return header(name, size=size) + bytes(size)


def gzip_bomb(kind: str, total: int) -> tuple[bytes, bytes, int]:
    """(first member, repeated member, repeat count) of a multi-member gzip bomb whose
    tar expands to `total` bytes. "one-file": one member declaring `total` bytes, then
    gzip members of 64 MiB zeros. "many-files": members of 4 MiB each, one per gzip member."""
    if kind == "one-file":
        chunk = 64 * MIB
        first = gzip.compress(header("zeros", fields={124: base256(total)}), mtime=0)
        return first, gzip.compress(bytes(chunk), 9, mtime=0), total // chunk
    period = 4 * MIB
    body = gzip.compress(tar_period(period), 9, mtime=0)
    return body, body, total // period - 1


def zstd_bomb(total: int) -> tuple[bytes, int]:
    """One zstd frame of a 4 MiB tar member of zeros, and how often to repeat it."""
    period = 4 * MIB
    frame = zstandard.ZstdCompressor(level=3).compress(tar_period(period))
    return frame, total // period


@pytest.mark.parametrize("kind", ["gzip-one-file", "gzip-many-files", "zstd-many-files"])
def test_T27_decompression_bombs_stop_at_the_budget(tmpfs_env, kind):
    """T27: gzip/zstd bombs -> InvalidLayer at 32 MiB, fast, little input read, low memory."""
    total = 16 * GIB if kind.startswith("gzip") else 64 * GIB  # zstd packs zeros tighter
    if kind.startswith("gzip"):
        first, member, count = gzip_bomb(kind.removeprefix("gzip-"), total)
        compressed = len(first) + len(member) * count
        source = ChunkSource(
            itertools.chain([first], itertools.repeat(member, count)), max_read=64 * 1024
        )
        stream: Any = GzipReader(source, WHAT)
    else:
        frame, count = zstd_bomb(total)
        compressed = len(frame) * count
        source = ChunkSource(itertools.repeat(frame, count), max_read=64 * 1024)
        stream = ZstdReader(source, WHAT)
    assert compressed < 64 * MIB  # what an attacker ships for 16-64 GiB
    tmpfs_env.reset(limits=Limits(max_bytes=32 * MIB))
    with Measured() as m:
        bounded(lambda: tmpfs_env.refuse(stream, "more than 33554432 bytes"), seconds=30)
    assert m.seconds < 15
    assert m.peak < 256 * MIB, m.peak
    assert source.consumed < compressed // 8, (source.consumed, compressed)
    written = sum(len(v) for v in tmpfs_env.tree().values() if isinstance(v, bytes))
    assert written <= 32 * MIB


@pytest.mark.parametrize("window_log", [28, 31])
def test_T27_zstd_window_above_limit_refused(env, window_log):
    """T27: a zstd frame whose window exceeds MAX_ZSTD_WINDOW -> InvalidLayer."""
    assert 1 << window_log > MAX_ZSTD_WINDOW
    # Frame header: magic, descriptor (no single segment, no checksum, no size),
    # window descriptor (exponent = log - 10, mantissa 0), then one raw last block.
    frame = b"\x28\xb5\x2f\xfd" + b"\x00" + bytes([(window_log - 10) << 3])
    frame += (1 | (0 << 1) | (512 << 3)).to_bytes(3, "little") + b"\0" * 512
    with Measured() as m:
        bounded(lambda: env.refuse(ZstdReader(io.BytesIO(frame), WHAT), "zstd"), 10)
    assert m.peak < 64 * MIB
    assert env.tree() == {}


@pytest.fixture(scope="module")
def budget_driver(make_module_driver):
    return make_module_driver("--max-image-bytes", "33554432")


def test_T27_gzip_bomb_end_to_end(budget_driver, registry, tmp_path):
    """T27 e2e: 1 GiB gzip bomb, --max-image-bytes 32 MiB -> INVALID_ARGUMENT, store clean."""
    period = tar_period(8 * MIB)
    count = 128  # 1 GiB of tar
    member = gzip.compress(period, 9, mtime=0)
    h = hashlib.sha256()
    for _ in range(count):
        h.update(period)
    layer = prebuilt_layer(member * count, "sha256:" + h.hexdigest())
    img = Image([layer])
    push_image(registry, img, "hardening/t27-bomb:v1", tmp_path)
    target = target_in(tmp_path)
    start = time.monotonic()
    err = rpc_error(
        budget_driver.publish, target, {"image": f"{registry.host}/hardening/t27-bomb:v1"}
    )
    assert time.monotonic() - start < 30
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "more than 33554432 bytes" in err.details() and "--max-image-bytes" in err.details()
    assert layer.digest in err.details()
    assert not target.exists() and mount_options(target) is None
    assert_nothing_kept(budget_driver, img.manifest_digest, [layer.digest])


def test_T27_zeros_after_end_of_archive_count_against_the_budget(budget_driver, registry, tmp_path):
    """T27 e2e: 256 MiB of zeros after the tar's end -> refused by the 32 MiB budget."""
    head = build_tar([File("small", b"s")])
    zeros = 64 * MIB
    h = hashlib.sha256(head)
    for _ in range(4):
        h.update(bytes(zeros))
    blob = gzip.compress(head, mtime=0) + gzip.compress(bytes(zeros), 9, mtime=0) * 4
    img = Image([prebuilt_layer(blob, "sha256:" + h.hexdigest())])
    push_image(registry, img, "hardening/t27-trailing:v1", tmp_path)
    target = target_in(tmp_path)
    try:
        err = rpc_error(
            budget_driver.publish, target, {"image": f"{registry.host}/hardening/t27-trailing:v1"}
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        # refused by the budget, or first by the cap on padding after the marker
        assert "33554432" in err.details() or "end-of-archive" in err.details()
    finally:
        if mount_options(target) is not None:
            budget_driver.unpublish(target)


# -- T28 --------------------------------------------------------------------------------


T28_TAR_ENTRIES = [Dir("d"), File("d/a", os.urandom(3000)), File("b", b"b" * 100_000)]


def apply_and_drain(env: Env, reader: Any) -> None:
    """What the puller does with a layer stream: apply the tar, then read the rest of the
    decompressed stream (to its end, where the DiffID is checked)."""
    env.apply(reader, what=WHAT)
    while reader.read(MIB):
        pass


def tree_from_entries(entries: list) -> dict[str, object]:
    return {e.path: e.data if isinstance(e, File) else "dir" for e in entries}


def skippable(n: int, payload: bytes) -> bytes:
    """A zstd skippable frame (magic 0x184D2A5n)."""
    return (0x184D2A50 + n).to_bytes(4, "little") + len(payload).to_bytes(4, "little") + payload


def test_T28_multi_member_gzip_applies(env):
    """T28: a multi-member gzip layer (as eStargz writes) applies exactly."""
    tar = build_tar(T28_TAR_ENTRIES)
    cuts = [0, 700, 1500, 5000, len(tar)]
    blob = b"".join(gzip.compress(tar[a:b], mtime=0) for a, b in itertools.pairwise(cuts))
    blob += gzip.compress(b"", mtime=0)  # an empty member at the end is fine too
    apply_and_drain(env, GzipReader(io.BytesIO(blob), WHAT))
    assert env.tree() == tree_from_entries(T28_TAR_ENTRIES)


@pytest.mark.parametrize("garbage", [b"\0" * 8, b"garbage!", b"\x1f", b"PK\x03\x04"])
def test_T28_gzip_trailing_garbage_refused(env, garbage):
    """T28: non-gzip bytes after the last member -> InvalidLayer naming the layer."""
    blob = gzip.compress(build_tar([File("f", b"f")]), mtime=0) + garbage
    with pytest.raises(InvalidLayer, match="trailing garbage after gzip member") as info_:
        apply_and_drain(env, GzipReader(io.BytesIO(blob), WHAT))
    assert WHAT in str(info_.value)


def test_T28_zstd_skippable_frames_applies(env):
    """T28: zstd skippable frames before, between and after data frames are skipped."""
    tar = build_tar(T28_TAR_ENTRIES)
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    blob = (
        skippable(0, b"toc" * 100)
        + cctx.compress(tar[:2048])
        + skippable(15, b"")
        + cctx.compress(tar[2048:])
        + skippable(7, os.urandom(5000))
    )
    apply_and_drain(env, ZstdReader(io.BytesIO(blob), WHAT))
    assert env.tree() == tree_from_entries(T28_TAR_ENTRIES)


@pytest.mark.parametrize("garbage", [b"\0" * 8, b"garbage!", b"\x28\xb5\x2f"])
def test_T28_zstd_trailing_garbage_refused(env, garbage):
    """T28: non-zstd bytes after the last frame -> InvalidLayer naming the layer."""
    blob = zstandard.ZstdCompressor().compress(build_tar([File("f", b"f")])) + garbage
    with pytest.raises(InvalidLayer, match="zstd") as info_:
        apply_and_drain(env, ZstdReader(io.BytesIO(blob), WHAT))
    assert WHAT in str(info_.value)


@pytest.mark.parametrize("case", ["gzip-garbage", "zstd-garbage", "zstd-skippable"])
def test_T28_framing_end_to_end(driver, registry, tmp_path, case):
    """T28 e2e: trailing garbage -> INVALID_ARGUMENT, store clean; skippable frames publish."""
    tar = build_tar(T28_TAR_ENTRIES)
    cctx = zstandard.ZstdCompressor(level=3)
    if case == "gzip-garbage":
        blob, media_type = gzip.compress(tar, mtime=0) + b"garbage!", MEDIA_TYPE_LAYER_GZIP
    else:
        frames = cctx.compress(tar[:4096]) + skippable(3, b"meta") + cctx.compress(tar[4096:])
        tail = b"garbage!" if case == "zstd-garbage" else skippable(9, b"toc")
        blob, media_type = frames + tail, MEDIA_TYPE_LAYER_ZSTD
    layer = prebuilt_layer(blob, sha256_digest(tar), media_type)
    img = Image([layer])
    ref = f"{registry.host}/hardening/t28-{case}:v1"
    push_image(registry, img, f"hardening/t28-{case}:v1", tmp_path)
    if case == "zstd-skippable":
        assert publish_tree(driver, tmp_path, ref) == tree_from_entries(T28_TAR_ENTRIES)
        return
    target = target_in(tmp_path)
    err = rpc_error(driver.publish, target, {"image": ref})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert layer.digest in err.details()
    assert ("trailing garbage" if case == "gzip-garbage" else "not a zstd frame") in err.details()
    assert not target.exists()
    assert_nothing_kept(driver, img.manifest_digest, [layer.digest])


# -- T29 --------------------------------------------------------------------------------


def million_entries(count: int) -> Iterator[bytes]:
    """Headers of `count` empty files in one directory, produced lazily in batches."""
    template = bytearray(header("d/f0000000"))
    batch = bytearray()
    for i in range(count):
        h = bytearray(template)
        h[0:10] = b"d/f%07d" % i
        h[148:156] = b" " * 8
        h[148:156] = b"%06o\x00 " % sum(h)
        batch += h
        if len(batch) >= 256 * 512:
            yield bytes(batch)
            batch.clear()
    yield bytes(batch) + END


@pytest.mark.slow
def test_T29_million_entry_layer_stops_at_the_entry_budget(tmpfs_env):
    """T29: a lazy million-entry layer stops at max_entries=20000, fast, bounded memory."""
    source = ChunkSource(million_entries(1_000_000))
    tmpfs_env.reset(limits=Limits(max_entries=20_000))
    with Measured() as m:
        msg = bounded(lambda: tmpfs_env.refuse(source, "more than 20000 entries"), seconds=30)
    # The directory d, implied by the names, is an entry too (it takes an inode).
    assert "'d/f0019999'" in msg
    assert m.seconds < 10, m.seconds
    assert m.peak < 64 * MIB, m.peak
    assert source.consumed < 20_001 * 512 + 4 * MIB
    assert len(os.listdir(tmpfs_env.root / "d")) == 19_999


@pytest.mark.parametrize("typeflag", [b"x", b"L", b"K"])
def test_T29_oversized_extension_header_refused_without_reading_it(env, typeflag):
    """T29: a >1 MiB PAX / GNU long-name record -> refused before its payload is read."""
    size = GIB
    magic = USTAR_MAGIC if typeflag == b"x" else GNU_MAGIC
    first = header("././@PaxHeader", typeflag=typeflag, magic=magic, fields={124: base256(size)})
    assert len(first) == 512
    source = ChunkSource(itertools.chain([first], itertools.repeat(b"9" * MIB, size // MIB)))
    with Measured() as m:
        msg = bounded(
            lambda: env.refuse(source, "exceeds the 1048576-byte limit", layer_named=False),
            seconds=10,
        )
    assert str(size) in msg
    assert source.consumed <= 2 * MIB + 512
    assert m.peak < 32 * MIB
    assert env.tree() == {}


def test_T29_oversized_extension_header_error_names_the_layer(env):
    """T29: the refusal of an oversized PAX header names its layer."""
    first = header("././@PaxHeader", typeflag=b"x", fields={124: base256(GIB)})
    env.refuse(first + END, "exceeds", layer_named=True)


def test_T29_large_pax_record_under_the_cap_applies(env):
    """T29: a 900 KiB PAX record set, under the 1 MiB cap, applies."""
    ti = info("f")
    ti.size = 1
    ti.pax_headers = {"comment": "c" * (900 * 1024)}
    env.apply([Raw(ti, b"1")])
    assert env.tree() == {"f": b"1"}
    assert MAX_EXTENSION_HEADER_BYTES == MIB


@pytest.mark.parametrize("typeflag", [b"x", b"L"])
def test_T29_chain_of_extension_headers_is_a_clean_error(env, typeflag):
    """T29: 2000 consecutive PAX / GNU long-name headers -> InvalidLayer, not a crash."""
    record = b"12 comment=\n" if typeflag == b"x" else b"name\0"
    magic = USTAR_MAGIC if typeflag == b"x" else GNU_MAGIC
    ext = header("././@PaxHeader", size=len(record), typeflag=typeflag, magic=magic)
    data = (ext + pad(record)) * 2000 + header("f", size=1) + pad(b"1") + END
    bounded(lambda: env.refuse(data, "."), seconds=10)


# ========================================================================================
# Integrity / lifecycle (end to end)
# ========================================================================================


def two_layer_image(tag: str) -> tuple[Image, dict[str, object]]:
    l1 = [
        Dir("etc"),
        File("etc/os-release", b"ID=hardening\n"),
        File(f"{tag}-1", os.urandom(40_000)),
    ]
    l2 = [File("models/w.bin", os.urandom(300_000)), File("models/cfg.json", b"{}")]
    img = Image([Layer(l1, compression="gzip"), Layer(l2, compression="gzip")])
    expected = {
        "etc": "dir",
        "etc/os-release": b"ID=hardening\n",
        f"{tag}-1": l1[2].data,
        "models": "dir",
        "models/w.bin": l2[0].data,
        "models/cfg.json": b"{}",
    }
    return img, expected


@pytest.mark.parametrize(
    "case", ["corrupt-blob", "wrong-diff-id", "size-short", "size-long", "corrupt-first-layer"]
)
def test_T30_integrity_failures_publish_nothing_and_do_not_poison(driver, registry, tmp_path, case):
    """T30 e2e: bad digest/DiffID/size -> DATA_LOSS naming it; nothing kept; good image ok."""
    repo = f"hardening/t30-{case}"
    img, expected = two_layer_image(case)
    good_ref = f"{registry.host}/{repo}:good"
    push_image(registry, img, f"{repo}:good", tmp_path)
    index = 0 if case == "corrupt-first-layer" else 1
    bad_layer = img.layers[index]
    bad_ref, bad_digest = f"{registry.host}/{repo}:bad", img.manifest_digest
    names = bad_layer.digest
    blob_file, good_bytes = registry.blob_path(bad_layer.digest), None
    if case.startswith("corrupt"):
        bad_ref = good_ref
        good_bytes = blob_file.read_bytes()
        broken = bytearray(good_bytes)
        broken[len(broken) // 2] ^= 0xFF
        blob_file.write_bytes(bytes(broken))
    elif case == "wrong-diff-id":
        diff_ids = [layer.diff_id for layer in img.layers]
        diff_ids[index] = "sha256:" + "0" * 64
        bad = Image(img.layers, config_extra={"rootfs": {"type": "layers", "diff_ids": diff_ids}})
        push_image(registry, bad, f"{repo}:bad", tmp_path)
        bad_digest = bad.manifest_digest
        names = diff_ids[index]
    else:
        doc = json.loads(canonical_json(img.manifest))
        doc["layers"][index]["size"] += -100 if case == "size-short" else 100
        bad_digest = put_manifest(registry, repo, "bad", doc)
    target = target_in(tmp_path)
    try:
        err = rpc_error(driver.publish, target, {"image": bad_ref})
    finally:
        if good_bytes is not None:
            blob_file.write_bytes(good_bytes)
    assert err.code() in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INVALID_ARGUMENT), (
        err.code(),
        err.details(),
    )
    assert names in err.details(), err.details()
    assert not target.exists() and mount_options(target) is None
    assert_nothing_kept(driver, bad_digest, [layer.digest for layer in img.layers])
    assert publish_tree(driver, tmp_path, good_ref) == expected


# -- T31 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crash_image(registry, tmp_path_factory) -> tuple[str, Image, dict[str, object]]:
    img, expected = two_layer_image("crash")
    push_image(registry, img, "hardening/t31-crash:v1", tmp_path_factory.mktemp("t31"))
    return f"{registry.host}/hardening/t31-crash:v1", img, expected


@pytest.mark.parametrize("point", faults.POINTS)
@pytest.mark.slow
def test_T31_crash_at_every_stage_leaves_no_half_tree(crash_image, tmp_path, monkeypatch, point):
    """T31 e2e: crash at each point -> after restart no half tree; then publish is exact."""
    ref, img, expected = crash_image
    monkeypatch.setenv("CSI_OCI_CRASH_AT", point)
    d = Driver(tmp_path / "drv")
    try:
        target = target_in(tmp_path)
        err = rpc_error(d.publish, target, {"image": ref})
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert d.proc is not None and d.proc.wait(timeout=10) == 137, "the crash point was hit"
        d.kill()
        monkeypatch.delenv("CSI_OCI_CRASH_AT")
        images = d.state_dir / "images" / "sha256"
        d.start()
        assert list((d.state_dir / "staging").iterdir()) == []
        assert list(images.iterdir()) == []
        assert not list((d.state_dir / "blobs" / "sha256").glob("*.partial"))
        assert not target.exists() and mount_options(target) is None
        d.publish(target, {"image": ref})
        try:
            assert tree_of(target) == expected
        finally:
            d.unpublish(target)
        assert [p.name for p in images.iterdir()] == [img.manifest_digest.split(":")[1]]
    finally:
        d.stop()


# -- T32 --------------------------------------------------------------------------------


@pytest.mark.slow
def test_T32_staging_is_private_while_a_pull_runs(registry, tmp_path):
    """T32 e2e: a running pull's staging tree is under 0700 dirs, invisible in images/."""
    layers = [Layer([File(f"part-{i}", os.urandom(6 * MIB))], compression="gzip") for i in range(3)]
    img = Image(layers)
    push_image(registry, img, "hardening/t32-staging:v1", tmp_path)
    ref = f"{registry.host}/hardening/t32-staging:v1"
    d = Driver(tmp_path / "drv", extra_args=["--publish-wait", "0"])
    try:
        target = target_in(tmp_path)
        staging = d.state_dir / "staging"
        assert stat.S_IMODE(os.stat(staging).st_mode) == 0o700
        err = rpc_error(d.publish, target, {"image": ref})
        assert err.code() == grpc.StatusCode.ABORTED, err.details()
        seen: list[tuple[int, int, int, bool]] = []

        images = d.state_dir / "images" / "sha256"

        def look() -> bool:
            # images/ first: if the staging tree still exists afterwards, it had not
            # been committed when images/ was listed.
            committed = any(images.iterdir())
            for entry in staging.iterdir():
                try:
                    st, top = os.stat(entry), os.stat(staging)
                except FileNotFoundError:
                    continue
                mode, top_mode = stat.S_IMODE(st.st_mode), stat.S_IMODE(top.st_mode)
                seen.append((top_mode, mode, st.st_uid, committed))
                return True
            return False

        assert wait_for(look, timeout=20, interval=0.002), "saw the pull's staging tree"
        top_mode, mode, uid, committed = seen[0]
        assert (top_mode, mode, uid, committed) == (0o700, 0o700, 0, False)
        for _ in range(600):
            try:
                d.publish(target, {"image": ref})
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.ABORTED, exc.details()
                time.sleep(0.05)
        try:
            assert sorted(os.listdir(target)) == ["part-0", "part-1", "part-2"]
        finally:
            d.unpublish(target)
        assert list(staging.iterdir()) == []
    finally:
        d.stop()


FAKE_TOOLS = (
    "gzip",
    "gunzip",
    "zcat",
    "pigz",
    "unpigz",
    "zstd",
    "unzstd",
    "zstdcat",
    "pzstd",
    "xz",
    "unxz",
)


@pytest.mark.slow
def test_T32_no_external_decompressor(registry, tmp_path, monkeypatch):
    """T32 e2e: fake gzip/pigz/zstd/xz first in PATH are never run; layers still unpack."""
    fake = tmp_path / "fake-bin"
    fake.mkdir()
    markers = tmp_path / "markers"
    markers.mkdir()
    for tool in FAKE_TOOLS:
        script = fake / tool
        script.write_text(f'#!/bin/sh\ntouch "{markers}/{tool}"\nexit 1\n')
        script.chmod(0o755)
    entries = [Dir("m"), File("m/w", os.urandom(50_000)), File("m/c", b"c" * 10_000)]
    gz = Image([Layer(entries, compression="gzip", members=2)])
    zs = Image([Layer(entries, compression="zstd", members=2)])
    push_image(registry, gz, "hardening/t32-gzip:v1", tmp_path)
    push_image(registry, zs, "hardening/t32-zstd:v1", tmp_path)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    d = Driver(tmp_path / "drv")
    monkeypatch.undo()
    try:
        want = {"m": "dir", "m/w": entries[1].data, "m/c": entries[2].data}
        for repo in ("t32-gzip", "t32-zstd"):
            assert publish_tree(d, tmp_path, f"{registry.host}/hardening/{repo}:v1") == want
    finally:
        d.stop()
    assert list(markers.iterdir()) == []
