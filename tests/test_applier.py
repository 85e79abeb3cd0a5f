"""Unit tests of csi_oci/applier.py: layer application onto a root directory.

Every layer is applied into ``tmp_path/root``, which sits beside
``tmp_path/canary`` (a directory with files the applier must never touch).
The ``env`` fixture checks after every test that the canary is byte-for-byte
unchanged, that nothing new appeared beside ``root`` and that the host's
/etc was not written to.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from csi_oci.errors import InvalidLayer
from csi_oci.unpack.applier import ApplyStats, LayerApplier
from csi_oci.unpack.budget import Limits
from csi_oci.unpack.paths import MAX_SYMLINK_HOPS, open_in_root, resolve_dir, split_member_name
from tests.support.images import (
    CharDevice,
    Dir,
    Fifo,
    File,
    Hardlink,
    Opaque,
    Raw,
    Symlink,
    Whiteout,
    build_tar,
)

EVIL = "csi-oci-applier-test-evil"  # never exists on the host


def snapshot(path: Path) -> dict[str, tuple]:
    """Everything under `path`: type, content / target, mode, owner, mtime."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, path)
            meta = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ino)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(full), meta)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("f", Path(full).read_bytes(), meta)
            else:
                out[rel] = ("d", None, meta)
    return out


def tree(path: Path) -> dict[str, object]:
    """Simple view of a tree: file -> bytes, dir -> "dir", symlink -> ("->", target)."""
    out: dict[str, object] = {}
    for rel, (kind, value, _meta) in snapshot(path).items():
        out[rel] = value if kind == "f" else ("->", value) if kind == "l" else "dir"
    return out


class Env:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.root.mkdir()
        self.canary = base / "canary"
        (self.canary / "sub").mkdir(parents=True)
        (self.canary / "victim.txt").write_bytes(b"precious data\n")
        (self.canary / "sub" / "deep.txt").write_bytes(b"\x00\x01binary\xff")
        os.symlink("victim.txt", self.canary / "link")
        self.canary_before = snapshot(self.canary)
        self.root_ino = os.lstat(self.root).st_ino
        self.etc_before = sorted(os.listdir("/etc"))
        self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        self.applier = LayerApplier(self.fd)

    def apply(self, entries: list | bytes, what: str = "layer") -> ApplyStats:
        data = entries if isinstance(entries, bytes) else build_tar(entries)
        return self.applier.apply(io.BytesIO(data), what)

    def tree(self) -> dict[str, object]:
        return tree(self.root)

    def assert_contained(self) -> None:
        assert snapshot(self.canary) == self.canary_before
        assert sorted(os.listdir(self.base)) == ["canary", "root"]
        st = os.lstat(self.root)
        assert stat.S_ISDIR(st.st_mode) and st.st_ino == self.root_ino
        assert not os.path.lexists(f"/etc/{EVIL}")
        assert not os.path.lexists(f"/{EVIL}")
        assert sorted(os.listdir("/etc")) == self.etc_before


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    os.close(e.fd)
    e.assert_contained()


def info(name: str, type_: bytes = tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    """A raw TarInfo (names are kept verbatim, unlike the support builders)."""
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = kw.pop("mode", 0o644)
    ti.mtime = kw.pop("mtime", 1_700_000_000)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def raw_file(name: str, data: bytes = b"x", **kw) -> Raw:
    return Raw(info(name, **kw), data)


def raw_symlink(name: str, target: str) -> Raw:
    return Raw(info(name, tarfile.SYMTYPE, linkname=target, mode=0o777))


def raw_hardlink(name: str, target: str) -> Raw:
    return Raw(info(name, tarfile.LNKTYPE, linkname=target))


def proc_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


# -- split_member_name ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("a/b/c", ["a", "b", "c"]),
        ("./a//b/", ["a", "b"]),
        ("/etc/passwd", ["etc", "passwd"]),
        ("//./etc/./x", ["etc", "x"]),
        (".", []),
        ("/", []),
        ("./", []),
        ("", []),
        ("a..b/..c/d..", ["a..b", "..c", "d.."]),
        (".wh..wh..opq", [".wh..wh..opq"]),
    ],
)
def test_split_member_name_cleans(name, parts):
    assert split_member_name(name) == parts


@pytest.mark.parametrize("name", ["..", "../victim/x", "a/../../x", "./../x", "a/b/..", "/../x"])
def test_split_member_name_refuses_dotdot(name):
    with pytest.raises(InvalidLayer, match=r"'\.\.' in a path is not allowed") as exc:
        split_member_name(name, "mylayer: entry")
    assert "mylayer: entry" in str(exc.value)
    assert repr(name) in str(exc.value)


def test_split_member_name_limits():
    assert len(split_member_name("a" * 255)) == 1
    with pytest.raises(InvalidLayer, match="longer than 255 bytes"):
        split_member_name("a" * 256)
    # 255 bytes counted as UTF-8, not characters: 128 two-byte chars = 256 bytes.
    with pytest.raises(InvalidLayer, match="longer than 255 bytes"):
        split_member_name("é" * 128)
    assert len(split_member_name("/".join(["d"] * 256))) == 256
    with pytest.raises(InvalidLayer, match="deeper than 256"):
        split_member_name("/".join(["d"] * 257))
    with pytest.raises(InvalidLayer, match="longer than 4096"):
        split_member_name("/".join(["a" * 200] * 21))
    with pytest.raises(InvalidLayer, match="NUL"):
        split_member_name("a\0b")


# -- resolve_dir / open_in_root ------------------------------------------------------


def test_resolve_dir_create_and_lookup(env):
    assert resolve_dir(env.fd, ["a", "b"], create=False) is None
    fd = resolve_dir(env.fd, ["a", "b"], create=True)
    try:
        assert proc_path(fd) == str(env.root / "a" / "b")
    finally:
        os.close(fd)
    assert stat.S_IMODE(os.stat(env.root / "a").st_mode) == 0o755
    fd = resolve_dir(env.fd, [], create=False)
    try:
        assert proc_path(fd) == str(env.root)
        assert fd != env.fd  # a new descriptor the caller may close
    finally:
        os.close(fd)


def test_resolve_dir_symlinks_stay_in_root(env):
    (env.root / "real").mkdir()
    os.symlink("/", env.root / "abs")
    os.symlink("../../../..", env.root / "up")
    os.symlink("/real", env.root / "toreal")
    os.symlink("realfile", env.root / "tofile")
    (env.root / "realfile").write_bytes(b"")
    for parts, want in [
        (["abs"], env.root),
        (["up"], env.root),
        (["up", "real"], env.root / "real"),
        (["abs", "up", "abs", "toreal"], env.root / "real"),
    ]:
        fd = resolve_dir(env.fd, parts, create=False)
        try:
            assert proc_path(fd) == str(want), parts
        finally:
            os.close(fd)
    with pytest.raises(InvalidLayer, match="not a directory"):
        resolve_dir(env.fd, ["tofile"], create=False)
    with pytest.raises(InvalidLayer, match="not a directory"):
        resolve_dir(env.fd, ["realfile", "x"], create=True)


def test_open_in_root_through_absolute_symlink(env):
    env.apply(
        [
            Dir("real"),
            Dir("real/data"),
            File("real/data/weights.bin", b"w"),
            Symlink("data", "/real/data"),
            Symlink("up", "../../.."),
            Symlink("hostetc", "/etc"),
            Symlink("loop", "/loop"),  # resolves to itself in-root
            Symlink("hostcanary", "../canary"),
        ]
    )
    fd = open_in_root(env.fd, "data")
    assert fd is not None
    try:
        assert proc_path(fd) == str(env.root / "real" / "data")
        assert os.listdir(f"/proc/self/fd/{fd}") == ["weights.bin"]
        # An O_PATH descriptor: it cannot be read from.
        assert os.fstat(fd).st_ino == os.stat(env.root / "real" / "data").st_ino
    finally:
        os.close(fd)
    for path, want in [
        ("up", env.root),
        ("/up/up/real", env.root / "real"),
        ("/", env.root),
        ("", env.root),
        ("./data/", env.root / "real" / "data"),
    ]:
        fd = open_in_root(env.fd, path)
        assert fd is not None, path
        try:
            assert proc_path(fd) == str(want), path
        finally:
            os.close(fd)
    assert open_in_root(env.fd, "missing") is None
    assert open_in_root(env.fd, "data/missing") is None
    assert open_in_root(env.fd, "hostetc") is None  # /etc of the image, which has none
    with pytest.raises(InvalidLayer, match="too many levels"):
        open_in_root(env.fd, "loop")
    assert open_in_root(env.fd, "hostcanary") is None  # root/canary, not the real one
    with pytest.raises(InvalidLayer, match=r"subPath '\.\./canary'"):
        open_in_root(env.fd, "../canary")
    with pytest.raises(InvalidLayer, match="not a directory"):
        open_in_root(env.fd, "real/data/weights.bin")
    assert env.tree().keys() == {
        "real",
        "real/data",
        "real/data/weights.bin",
        "data",
        "up",
        "hostetc",
        "loop",
        "hostcanary",
    }


# -- basic application --------------------------------------------------------------


def test_basic_tree_and_stats(env):
    big = os.urandom(3 * 1024 * 1024 + 17)  # several read chunks
    stats = env.apply(
        [
            Dir("usr"),
            Dir("usr/bin"),
            File("usr/bin/tool", b"#!/bin/sh\n", mode=0o755),
            File("data.bin", big),
            File("empty"),
            Symlink("bin", "usr/bin"),
            Hardlink("usr/bin/tool2", "usr/bin/tool"),
        ]
    )
    assert stats.entries == 7
    assert stats.bytes == len(big) + len(b"#!/bin/sh\n")
    assert stats.skipped_special == []
    assert env.tree() == {
        "usr": "dir",
        "usr/bin": "dir",
        "usr/bin/tool": b"#!/bin/sh\n",
        "usr/bin/tool2": b"#!/bin/sh\n",
        "data.bin": big,
        "empty": b"",
        "bin": ("->", "usr/bin"),
    }
    assert os.stat(env.root / "usr/bin/tool").st_ino == os.stat(env.root / "usr/bin/tool2").st_ino
    assert os.stat(env.root / "usr/bin/tool").st_nlink == 2


def test_missing_parents_are_created(env):
    env.apply([File("a/b/c/file", b"deep")])
    assert env.tree() == {"a": "dir", "a/b": "dir", "a/b/c": "dir", "a/b/c/file": b"deep"}
    for d in ("a", "a/b", "a/b/c"):
        assert stat.S_IMODE(os.stat(env.root / d).st_mode) == 0o755


def test_metadata_applied(env):
    env.apply(
        [
            Dir("d", mode=0o750, uid=1234, gid=5678, mtime=1_000_000_000),
            File("d/f", b"data", mode=0o640, uid=4321, gid=8765, mtime=1_100_000_000),
            File("d/ro", b"data", mode=0o400, mtime=1_200_000_000),
            Symlink("d/link", "f", uid=11, gid=22, mtime=1_300_000_000),
            Dir("sticky", mode=0o1777),
        ]
    )
    st = os.lstat(env.root / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 1234, 5678)
    assert st.st_mtime == 1_000_000_000  # set after the children were written
    st = os.lstat(env.root / "d/f")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 4321, 8765)
    assert st.st_mtime == 1_100_000_000
    st = os.lstat(env.root / "d/ro")
    assert stat.S_IMODE(st.st_mode) == 0o400 and st.st_mtime == 1_200_000_000
    st = os.lstat(env.root / "d/link")
    assert (st.st_uid, st.st_gid, st.st_mtime) == (11, 22, 1_300_000_000)
    assert stat.S_IMODE(os.stat(env.root / "sticky").st_mode) == 0o1777


def test_setuid_setgid_stripped(env):
    env.apply(
        [
            File("suid", b"x", mode=0o4755, uid=0),
            File("sgid", b"x", mode=0o2755, gid=50),
            File("both", b"x", mode=0o6777, uid=1000, gid=1000),
            Dir("sgiddir", mode=0o2775),
            Dir("all", mode=0o7777),
        ]
    )
    expect = {"suid": 0o755, "sgid": 0o755, "both": 0o777, "sgiddir": 0o775, "all": 0o1777}
    for name, mode in expect.items():
        st = os.lstat(env.root / name)
        assert st.st_mode & 0o6000 == 0, name
        assert stat.S_IMODE(st.st_mode) == mode, name
    assert (os.stat(env.root / "both").st_uid, os.stat(env.root / "both").st_gid) == (1000, 1000)


def test_device_nodes_and_fifos_never_created(env):
    stats = env.apply(
        [
            File("before", b"1"),
            CharDevice("dev/null", 1, 3),
            CharDevice("dev/mem", 1, 1),
            Raw(info("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0)),
            Fifo("run/fifo"),
            File("after", b"2"),
        ]
    )
    assert stats.skipped_special == ["dev/null", "dev/mem", "dev/sda", "run/fifo"]
    assert stats.entries == 6
    assert env.tree() == {"before": b"1", "after": b"2"}


# -- names: .., absolute, the root itself -------------------------------------------


@pytest.mark.parametrize("name", ["../victim/x", "a/../../x", "./../x", "../canary/victim.txt"])
def test_dotdot_names_refused(env, name):
    with pytest.raises(InvalidLayer) as exc:
        env.apply([File("ok", b"ok"), raw_file(name, b"evil")], what="layer sha256:abc")
    msg = str(exc.value)
    assert "layer sha256:abc" in msg and repr(name) in msg and "'..'" in msg
    env.assert_contained()
    assert not (env.base / "victim").exists()


@pytest.mark.parametrize("kind", ["dir", "symlink", "hardlink"])
def test_dotdot_names_refused_for_every_type(env, kind):
    entry = {
        "dir": Raw(info("../victim", tarfile.DIRTYPE, mode=0o755)),
        "symlink": raw_symlink("../victim", "/"),
        "hardlink": raw_hardlink("../victim", "f"),
    }[kind]
    with pytest.raises(InvalidLayer, match=r"'\.\./victim'"):
        env.apply([File("f", b"f"), entry])
    env.assert_contained()


def test_absolute_names_land_inside_root(env):
    env.apply(
        [
            raw_file("/etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
            raw_file(f"/etc/{EVIL}", b"evil"),
            raw_file(f"/{EVIL}", b"evil"),
            Raw(info("//usr//lib/", tarfile.DIRTYPE, mode=0o755)),
        ]
    )
    assert env.tree() == {
        "etc": "dir",
        "etc/passwd": b"root:x:0:0::/root:/bin/sh\n",
        f"etc/{EVIL}": b"evil",
        EVIL: b"evil",
        "usr": "dir",
        "usr/lib": "dir",
    }
    env.assert_contained()


@pytest.mark.parametrize("name", [".", "/", "./", "//", "./."])
def test_names_that_clean_to_root_never_replace_it(env, name):
    os.chmod(env.root, 0o711)
    (env.root / "keep").write_bytes(b"keep")
    before = os.lstat(env.root)
    env.apply(
        [
            Raw(info(name, tarfile.DIRTYPE, mode=0o777, uid=999, gid=999, mtime=1)),
            raw_file(name, b"replace the root by a file"),
            raw_symlink(name, "/etc"),
            raw_hardlink(name, "keep"),
            File("after", b"a"),
        ]
    )
    after = os.lstat(env.root)
    assert stat.S_ISDIR(after.st_mode)
    assert after.st_ino == before.st_ino
    assert (after.st_mode, after.st_uid, after.st_gid) == (
        before.st_mode,
        before.st_uid,
        before.st_gid,
    )
    assert env.tree() == {"keep": b"keep", "after": b"a"}
    env.assert_contained()


# -- symlinks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "lands"),
    [
        ("/", EVIL),
        ("../../..", EVIL),
        ("../../../../../../../../../..", EVIL),
        ("/etc", f"etc/{EVIL}"),
        ("../canary", f"canary/{EVIL}"),
        ("/../../canary/", f"canary/{EVIL}"),
        ("<abs canary>", f"<abs canary>/{EVIL}"),
    ],
)
def test_symlink_then_file_through_it_lands_inside_root(env, target, lands):
    # "<abs canary>": the host's absolute path of the real canary directory.
    target = target.replace("<abs canary>", str(env.canary))
    lands = lands.replace("<abs canary>", str(env.canary).lstrip("/"))
    env.apply([Symlink("x", target), File(f"x/{EVIL}", b"evil")])
    tree = env.tree()
    assert tree["x"] == ("->", target)
    assert tree[lands] == b"evil"
    env.assert_contained()


def test_symlink_then_dir_and_hardlink_through_it(env):
    env.apply(
        [
            File("etc/passwd", b"image passwd"),
            Symlink("x", "../.."),
            Dir(f"x/{EVIL}-dir"),
            Hardlink(f"x/{EVIL}-link", "x/etc/passwd"),
            Symlink(f"x/{EVIL}-sym", "/etc/shadow"),
        ]
    )
    tree = env.tree()
    assert tree[f"{EVIL}-dir"] == "dir"
    assert tree[f"{EVIL}-link"] == b"image passwd"
    assert tree[f"{EVIL}-sym"] == ("->", "/etc/shadow")
    assert os.stat(env.root / f"{EVIL}-link").st_ino == os.stat(env.root / "etc/passwd").st_ino
    env.assert_contained()


def test_chained_symlinks_resolve_in_root(env):
    env.apply(
        [
            Dir("real"),
            Symlink("a", "b/c"),  # relative, through another link
            Symlink("b", "/hop"),  # absolute
            Dir("hop"),
            Symlink("hop/c", "../../../real"),  # relative escaping, clamped at root
            Symlink("abs", "/a"),
            File("a/one", b"1"),
            File("abs/two", b"2"),
            File("b/c/three", b"3"),
        ]
    )
    tree = env.tree()
    assert tree["real/one"] == b"1"
    assert tree["real/two"] == b"2"
    assert tree["real/three"] == b"3"
    env.assert_contained()


@pytest.mark.parametrize(
    "links",
    [
        [("a", "a")],
        [("a", "b"), ("b", "a")],
        [("a", "/b/"), ("b", "./c"), ("c", "../a")],
        [("a", "a/a/a/a")],
    ],
)
def test_symlink_loops_are_a_clean_error(env, links):
    entries = [Symlink(name, target) for name, target in links]
    with pytest.raises(InvalidLayer, match="too many levels of symbolic links"):
        env.apply([*entries, File("a/x", b"x")])
    env.assert_contained()


def test_symlink_chain_of_exactly_the_hop_limit_works(env):
    n = MAX_SYMLINK_HOPS
    entries = [Dir("end")] + [Symlink(f"l{i}", f"l{i + 1}") for i in range(n - 1)]
    entries.append(Symlink(f"l{n - 1}", "end"))
    env.apply([*entries, File("l0/f", b"f")])
    assert env.tree()["end/f"] == b"f"
    entries.insert(1, Symlink("lm1", "l0"))
    with pytest.raises(InvalidLayer, match="too many levels"):
        env.apply([*entries, File("lm1/g", b"g")])


def test_symlink_replaces_directory(env):
    env.apply([Dir("d"), File("d/f", b"old"), Dir("d/sub"), File("d/sub/g", b"old")])
    env.apply([Symlink("d", "/elsewhere")])
    assert env.tree() == {"d": ("->", "/elsewhere")}
    # And within one layer, with the parent cached in between.
    env.apply([Dir("e"), File("e/f", b"1"), Symlink("e", "d"), File("e2", b"2")])
    assert env.tree() == {"d": ("->", "/elsewhere"), "e": ("->", "d"), "e2": b"2"}


def test_directory_replaces_symlink(env):
    (env.root / "target").mkdir()
    (env.root / "target" / "t").write_bytes(b"t")
    env.apply([Symlink("d", "target")])
    env.apply([Dir("d", mode=0o700), File("d/f", b"new")])
    tree = env.tree()
    assert tree["d"] == "dir"
    assert tree["d/f"] == b"new"
    assert tree["target/t"] == b"t" and "target/f" not in tree
    assert stat.S_IMODE(os.lstat(env.root / "d").st_mode) == 0o700


def test_symlink_to_directory_kept_when_entry_goes_through_it(env):
    # /lib -> usr/lib, as in merged-/usr images: later files land in usr/lib.
    env.apply([Dir("usr"), Dir("usr/lib"), Symlink("lib", "usr/lib")])
    env.apply([File("lib/libc.so", b"elf")])
    assert env.tree() == {
        "usr": "dir",
        "usr/lib": "dir",
        "usr/lib/libc.so": b"elf",
        "lib": ("->", "usr/lib"),
    }


def test_cross_layer_symlink_plant(env):
    env.apply([Symlink("x", "/")], what="layer 1")
    env.apply(
        [File(f"x/etc/{EVIL}", b"evil"), File("x/canary/victim.txt", b"pwned")], what="layer 2"
    )
    tree = env.tree()
    assert tree["x"] == ("->", "/")
    assert tree[f"etc/{EVIL}"] == b"evil"
    assert tree["canary/victim.txt"] == b"pwned"
    env.assert_contained()


def test_cross_layer_relative_plant_and_whiteout_through_link(env):
    env.apply([Symlink("x", "../canary"), Symlink("y", "../../..")])
    env.apply([Whiteout("x/victim.txt"), Whiteout("y/canary/sub"), Opaque("x")])
    env.apply([Opaque("y/canary")])
    assert env.tree() == {"x": ("->", "../canary"), "y": ("->", "../../.."), "canary": "dir"}
    env.assert_contained()


def test_symlink_target_stored_verbatim(env):
    odd = "../../" + "a" * 300 + "/./b//"
    env.apply([Symlink("odd", odd), Symlink("dangling", "/nonexistent/path")])
    assert os.readlink(env.root / "odd") == odd
    assert os.readlink(env.root / "dangling") == "/nonexistent/path"


# -- hard links -----------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    ["../victim/x", "../canary/victim.txt", "a/../../canary/victim.txt", "./../x"],
)
def test_hardlink_with_dotdot_target_refused(env, target):
    with pytest.raises(InvalidLayer) as exc:
        env.apply([File("a/f", b"f"), raw_hardlink("h", target)])
    assert "'h'" in str(exc.value) and "link target" in str(exc.value)
    env.assert_contained()
    assert not os.path.lexists(env.root / "h")


def test_hardlink_absolute_target_resolves_inside_root(env):
    with pytest.raises(InvalidLayer, match=r"'/etc/passwd' does not exist") as exc:
        env.apply([raw_hardlink("h", "/etc/passwd")])
    assert "'h'" in str(exc.value)
    env.assert_contained()
    env.apply([File("etc/passwd", b"image"), raw_hardlink("h2", "/etc/passwd")])
    assert os.stat(env.root / "h2").st_ino == os.stat(env.root / "etc/passwd").st_ino


def test_hardlink_through_symlinked_parent_resolves_in_root(env):
    env.apply([Symlink("up", "../.."), Symlink("hostetc", "/etc")])
    with pytest.raises(InvalidLayer, match="does not exist"):
        env.apply([Hardlink("h", "up/canary/victim.txt")])
    with pytest.raises(InvalidLayer, match="does not exist"):
        env.apply([Hardlink("h", "hostetc/passwd")])
    env.assert_contained()
    env.apply([Dir("canary"), File("canary/victim.txt", b"image copy")])
    env.apply([Hardlink("h", "up/canary/victim.txt")])
    assert (env.root / "h").read_bytes() == b"image copy"
    assert os.stat(env.root / "h").st_ino == os.stat(env.root / "canary/victim.txt").st_ino
    env.assert_contained()


def test_hardlink_to_symlink_links_the_symlink_itself(env):
    env.apply([Symlink("s", f"/etc/{EVIL}"), Hardlink("h", "s")])
    assert os.readlink(env.root / "h") == f"/etc/{EVIL}"
    assert os.lstat(env.root / "h").st_ino == os.lstat(env.root / "s").st_ino
    env.assert_contained()


def test_hardlink_to_directory_refused(env):
    with pytest.raises(InvalidLayer, match="is a directory"):
        env.apply([Dir("d"), File("d/f", b"f"), Hardlink("h", "d")])
    with pytest.raises(InvalidLayer, match="hard link to the root"):
        env.apply([raw_hardlink("h", "/")])
    assert not os.path.lexists(env.root / "h")


def test_hardlink_to_missing_target_refused(env):
    with pytest.raises(InvalidLayer, match="'nope' does not exist"):
        env.apply([raw_hardlink("h", "nope")])
    with pytest.raises(InvalidLayer, match="'no/pe' does not exist"):
        env.apply([raw_hardlink("h", "no/pe")])


def test_hardlink_to_file_from_earlier_layer(env):
    env.apply([File("lib/big.so", b"shared", mode=0o755)])
    env.apply([Hardlink("lib/alias.so", "lib/big.so")])
    assert os.stat(env.root / "lib/alias.so").st_ino == os.stat(env.root / "lib/big.so").st_ino
    assert (env.root / "lib/alias.so").read_bytes() == b"shared"


def test_hardlink_replaces_existing_entry(env):
    env.apply([File("a", b"a"), Dir("h"), File("h/inner", b"i")])
    env.apply([Hardlink("h", "a")])
    assert env.tree() == {"a": b"a", "h": b"a"}


def test_hardlink_to_itself_keeps_the_file(env):
    env.apply([File("f", b"content")])
    env.apply([Hardlink("f", "f")])
    assert env.tree() == {"f": b"content"}
    env.apply([File("g", b"same layer"), raw_hardlink("./g", "/g")])
    assert env.tree() == {"f": b"content", "g": b"same layer"}


def test_hardlink_over_an_ancestor_of_its_target_is_invalid_layer(env):
    # Replacing `d` removes the target `d/f` before the link is made: a clean
    # InvalidLayer, not a raw FileNotFoundError.
    with pytest.raises(InvalidLayer, match="'d'"):
        env.apply([Dir("d"), File("d/f", b"f"), Hardlink("d", "d/f")])


# -- whiteouts ----------------------------------------------------------------------


def test_whiteout_removes_lower_file_and_directory_tree(env):
    env.apply(
        [
            File("keep", b"k"),
            File("gone", b"g"),
            Dir("tree"),
            Dir("tree/sub"),
            File("tree/sub/f", b"f"),
            Symlink("tree/link", "/"),
            File("d/inner-gone", b"x"),
            File("d/inner-keep", b"y"),
        ]
    )
    stats = env.apply([Whiteout("gone"), Whiteout("tree"), Whiteout("d/inner-gone")])
    assert stats.entries == 3
    assert env.tree() == {"keep": b"k", "d": "dir", "d/inner-keep": b"y"}


def test_whiteout_of_symlink_removes_link_not_target(env):
    env.apply(
        [
            Dir("target"),
            File("target/t", b"t"),
            File("file", b"f"),
            Symlink("dirlink", "target"),
            Symlink("filelink", "/file"),
            Symlink("outside", "../canary"),
        ]
    )
    env.apply([Whiteout("dirlink"), Whiteout("filelink"), Whiteout("outside")])
    assert env.tree() == {"target": "dir", "target/t": b"t", "file": b"f"}
    env.assert_contained()


@pytest.mark.parametrize("name", [".wh..", ".wh...", "d/.wh..", "d/.wh...", ".wh."])
@pytest.mark.parametrize("layer", [1, 2])
def test_invalid_whiteout_names_refused(env, name, layer):
    if layer == 2:
        env.apply([File("d/f", b"f")])
    with pytest.raises(InvalidLayer, match="invalid whiteout name") as exc:
        env.apply([raw_file(name, b"")])
    assert repr(name) in str(exc.value)
    env.assert_contained()


def test_whiteout_in_first_layer_is_a_noop(env):
    stats = env.apply([File("a", b"a"), Whiteout("a"), Whiteout("b"), Opaque("d"), File("c")])
    assert stats.entries == 5
    assert env.tree() == {"a": b"a", "c": b""}


def test_whiteout_of_missing_path_is_a_noop(env):
    env.apply([File("a", b"a")])
    env.apply([Whiteout("missing"), Whiteout("no/such/dir/file")])
    assert env.tree() == {"a": b"a"}


def test_whiteout_does_not_hide_same_layer_entries(env):
    env.apply([File("f", b"lower")])
    env.apply([File("f", b"upper"), Whiteout("f"), File("g", b"g"), Whiteout("g")])
    assert env.tree() == {"f": b"upper", "g": b"g"}


def test_whiteout_then_recreate_in_same_layer(env):
    env.apply([Dir("d"), File("d/old", b"o")])
    env.apply([Whiteout("d"), Dir("d"), File("d/new", b"n")])
    assert env.tree() == {"d": "dir", "d/new": b"n"}


def test_other_aufs_metadata_ignored(env):
    env.apply([File("a", b"a")])
    env.apply([raw_file(".wh..wh.aufs", b""), raw_file("a2/.wh..wh.plnk", b"")])
    assert env.tree() == {"a": b"a"}


def _lower_d(env):
    env.apply(
        [
            Dir("d"),
            File("d/old", b"old"),
            Dir("d/olddir"),
            File("d/olddir/x", b"x"),
            Dir("d/sub"),
            File("d/sub/lower-child", b"lc"),
            Symlink("d/oldlink", "/"),
            File("outside-d", b"stays"),
        ]
    )


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_hides_lower_keeps_same_layer(env, marker_first):
    _lower_d(env)
    same_layer = [Dir("d"), File("d/new", b"new"), Dir("d/newdir"), File("d/newdir/y", b"y")]
    if marker_first:
        layer = [Dir("d"), Opaque("d"), *same_layer[1:]]
    else:
        layer = [*same_layer, Opaque("d")]
    env.apply(layer)
    assert env.tree() == {
        "d": "dir",
        "d/new": b"new",
        "d/newdir": "dir",
        "d/newdir/y": b"y",
        "outside-d": b"stays",
    }


@pytest.mark.parametrize("explicit_subdir_entry", [True, False])
def test_opaque_after_nested_same_layer_subdir(env, explicit_subdir_entry):
    _lower_d(env)
    layer = [Dir("d")]
    if explicit_subdir_entry:
        layer.append(Dir("d/sub"))
    layer += [File("d/sub/upper-child", b"uc"), Opaque("d")]
    env.apply(layer)
    assert env.tree() == {
        "d": "dir",
        "d/sub": "dir",
        "d/sub/upper-child": b"uc",
        "outside-d": b"stays",
    }


def test_opaque_without_parent_dir_entries(env):
    _lower_d(env)
    env.apply([File("d/new", b"n"), Opaque("d")])
    assert env.tree() == {"d": "dir", "d/new": b"n", "outside-d": b"stays"}


def test_whiteout_of_lower_dir_keeps_same_layer_children(env):
    _lower_d(env)
    env.apply([File("d/sub/upper-child", b"uc"), Whiteout("d/sub")])
    tree = env.tree()
    assert tree["d/sub/upper-child"] == b"uc"
    assert "d/sub/lower-child" not in tree
    assert tree["d/old"] == b"old"


def test_opaque_on_missing_dir_creates_it_and_at_root(env):
    env.apply([File("a", b"a"), Dir("b"), File("b/c", b"c")])
    env.apply([Opaque("newdir"), File("z", b"z"), raw_file(".wh..wh..opq", b"")])
    assert env.tree() == {"newdir": "dir", "z": b"z"}


def test_opaque_applies_to_lower_layers_only_across_three_layers(env):
    env.apply([File("d/l1", b"1")])
    env.apply([File("d/l2", b"2")])
    env.apply([File("d/l3", b"3"), Opaque("d")])
    assert env.tree() == {"d": "dir", "d/l3": b"3"}


# -- duplicates ----------------------------------------------------------------


def test_duplicate_file_then_file_last_wins(env):
    env.apply(
        [
            File("f", b"first", mode=0o600, mtime=1_000_000_000),
            File("f", b"second", mode=0o644, mtime=1_500_000_000),
        ]
    )
    st = os.lstat(env.root / "f")
    assert env.tree() == {"f": b"second"}
    assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (0o644, 1_500_000_000)


def test_duplicate_file_then_dir_last_wins(env):
    env.apply([File("x", b"file"), Dir("x", mode=0o711, mtime=1_200_000_000), File("x/in", b"i")])
    assert env.tree() == {"x": "dir", "x/in": b"i"}
    st = os.lstat(env.root / "x")
    assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (0o711, 1_200_000_000)


def test_duplicate_dir_then_file_last_wins(env):
    env.apply(
        [
            Dir("x", mtime=1_000_000_000),
            File("x/in", b"i"),
            File("x", b"file", mtime=1_600_000_000),
        ]
    )
    assert env.tree() == {"x": b"file"}
    assert os.lstat(env.root / "x").st_mtime == 1_600_000_000


def test_duplicate_dir_then_symlink_keeps_symlink_mtime(env):
    env.apply([Dir("x", mtime=1_000_000_000), Symlink("x", "/", mtime=1_600_000_000)])
    assert env.tree() == {"x": ("->", "/")}
    assert os.lstat(env.root / "x").st_mtime == 1_600_000_000


def test_duplicate_dir_then_dir_last_metadata_wins(env):
    env.apply(
        [
            Dir("x", mode=0o700, mtime=1_000_000_000, uid=1),
            File("x/a", b"a"),
            Dir("x", mode=0o755, mtime=1_600_000_000, uid=2),
        ]
    )
    st = os.lstat(env.root / "x")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime) == (0o755, 2, 1_600_000_000)
    assert env.tree() == {"x": "dir", "x/a": b"a"}


def test_dir_entry_over_existing_dir_keeps_content(env):
    env.apply([Dir("d", mode=0o700), File("d/f", b"f")])
    env.apply([Dir("d", mode=0o755, uid=7)])
    assert env.tree() == {"d": "dir", "d/f": b"f"}
    st = os.lstat(env.root / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 7)


# -- tar formats and malformed archives ----------------------------------------------


def test_pax_long_names(env):
    long_dir = "/".join(["component-" + "x" * 60] * 5)
    long_name = f"{long_dir}/{'f' * 200}"
    assert len(long_name) > 100
    target = "t" * 150
    env.apply([File(long_name, b"pax"), Symlink("s", target), Hardlink("h", long_name)])
    assert (env.root / long_name).read_bytes() == b"pax"
    assert os.readlink(env.root / "s") == target
    assert (env.root / "h").read_bytes() == b"pax"


def test_gnu_long_name(env):
    long_name = "gnu/" + "n" * 150 + "/file-" + "m" * 120
    long_link = "l" * 180
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = info(long_name, size=3)
        tf.addfile(ti, io.BytesIO(b"gnu"))
        tf.addfile(info("sym", tarfile.SYMTYPE, linkname=long_link))
    data = buf.getvalue()
    assert b"././@LongLink" in data
    env.apply(data)
    assert (env.root / long_name).read_bytes() == b"gnu"
    assert os.readlink(env.root / "sym") == long_link


def test_ustar_prefix_field_name(env):
    name = "p" * 90 + "/" + "q" * 90
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        tf.addfile(info(name, size=2), io.BytesIO(b"us"))
    env.apply(buf.getvalue())
    assert (env.root / name).read_bytes() == b"us"


def test_component_longer_than_255_bytes_refused(env):
    with pytest.raises(InvalidLayer, match="longer than 255 bytes"):
        env.apply([File("d/" + "n" * 256, b"x")])
    assert env.tree() == {}


def test_depth_over_256_refused(env):
    with pytest.raises(InvalidLayer, match="deeper than 256"):
        env.apply([File("/".join(["d"] * 257) + "/f", b"x")])
    assert env.tree() == {}


def test_depth_of_256_accepted(env):
    name = "/".join(["d"] * 255) + "/f"
    env.apply([File(name, b"deep")])
    assert (env.root / name).read_bytes() == b"deep"


def test_long_symlink_chain_built_by_depth_stays_in_root(env):
    # Each component a symlink back to the root: resolution never leaves it.
    env.apply([Symlink("r", "/")])
    with pytest.raises(InvalidLayer, match="too many levels"):
        env.apply([File("/".join(["r"] * 50) + f"/{EVIL}", b"e")])
    env.apply([File("/".join(["r"] * 40) + f"/{EVIL}", b"e")])
    assert (env.root / EVIL).read_bytes() == b"e"


@pytest.mark.parametrize(
    "cut",
    [
        100,  # inside the first header
        512 + 100,  # inside the first file's data
        512 + 4096,
        512 + 8192 - 1,
        512 + 8192 + 100,  # inside the second header
        512 + 8192 + 512 + 200,  # inside the second file's data block
    ],
)
def test_truncated_tar_raises_invalid_layer(env, cut):
    data = build_tar([File("big", os.urandom(8192)), File("after", b"a" * 300)])
    with pytest.raises(InvalidLayer, match="layer x"):
        env.apply(data[:cut], what="layer x")


def test_tar_cut_on_a_header_boundary_is_accepted(env):
    # Like Go's archive/tar: a stream that ends between members (no
    # end-of-archive blocks) is a complete archive. The DiffID check upstream
    # is what pins the exact bytes.
    data = build_tar([File("big", b"b" * 8192), File("after", b"a")])
    env.apply(data[: 512 + 8192])
    assert env.tree() == {"big": b"b" * 8192}


def test_empty_stream_raises_invalid_layer(env):
    with pytest.raises(InvalidLayer, match="malformed tar"):
        env.apply(b"")


def test_garbage_raises_invalid_layer(env):
    with pytest.raises(InvalidLayer, match="malformed tar"):
        env.apply(b"this is not a tar archive" * 100)


def test_bad_header_checksum_raises_invalid_layer(env):
    data = bytearray(build_tar([File("a", b"a"), File("b", b"b")]))
    data[1024 + 10] ^= 0xFF  # the second header's name field: its checksum no longer matches
    with pytest.raises(InvalidLayer):
        env.apply(bytes(data))


@pytest.mark.parametrize("typeflag", [b"Z", b"V", b"M", b"A"])
def test_unknown_typeflag_refused(env, typeflag):
    with pytest.raises(InvalidLayer, match="unsupported tar entry type") as exc:
        env.apply([File("ok", b"ok"), Raw(info("weird", typeflag), b"payload")])
    assert "'weird'" in str(exc.value)


def test_nul_in_pax_name_refused(env):
    ti = info("placeholder")
    ti.pax_headers = {"path": "a\0b"}
    data = build_tar([Raw(ti, b"x")])
    with pytest.raises(InvalidLayer):
        env.apply(data)
    assert env.tree() == {}


# -- budgets -------------------------------------------------------------------------


def test_limits_max_bytes(env):
    applier = LayerApplier(env.fd, Limits(max_bytes=100))
    applier.apply(io.BytesIO(build_tar([File("a", b"x" * 60)])), "layer 1")
    with pytest.raises(InvalidLayer, match=r"layer 2.*'b'.*more than 100 bytes"):
        applier.apply(io.BytesIO(build_tar([File("b", b"x" * 41)])), "layer 2")
    assert not (env.root / "b").exists()
    LayerApplier(env.fd, Limits(max_bytes=100)).apply(
        io.BytesIO(build_tar([File("c", b"x" * 100)])), "exact"
    )


def test_limits_max_entries(env):
    applier = LayerApplier(env.fd, Limits(max_entries=3))
    applier.apply(io.BytesIO(build_tar([File("a"), File("b")])), "layer 1")
    with pytest.raises(InvalidLayer, match="more than 3 entries"):
        applier.apply(io.BytesIO(build_tar([File("c"), File("d")])), "layer 2")
    assert (env.root / "c").exists() and not (env.root / "d").exists()


def test_limits_count_whiteouts_and_specials(env):
    applier = LayerApplier(env.fd, Limits(max_entries=2))
    with pytest.raises(InvalidLayer, match="more than 2 entries"):
        applier.apply(io.BytesIO(build_tar([Fifo("f"), Whiteout("w"), Dir("d")])), "layer")


def test_symlink_and_dir_sizes_not_charged(env):
    applier = LayerApplier(env.fd, Limits(max_bytes=10))
    ti = info("d", tarfile.DIRTYPE, mode=0o755)
    applier.apply(io.BytesIO(build_tar([Raw(ti), Symlink("s", "x" * 100)])), "layer")
    assert env.tree() == {"d": "dir", "s": ("->", "x" * 100)}


@pytest.mark.parametrize(
    ("linkname", "match"),
    [("", "empty"), ("a\0b", "NUL"), ("x" * 4096, "longer than")],
)
def test_unusable_symlink_target_is_invalid_layer(env, linkname, match):
    ti = info("s", tarfile.SYMTYPE, mode=0o777)
    ti.pax_headers = {"linkpath": linkname}
    with pytest.raises(InvalidLayer, match=match) as exc:
        env.apply([File("ok"), Raw(ti)])
    assert "'s'" in str(exc.value)
    assert not os.path.lexists(env.root / "s")


def test_parent_dir_replaced_after_child_dir_entries(env):
    # The deferred directory times must not trip over `a` no longer being a directory.
    env.apply([Dir("a"), Dir("a/b"), Dir("a/b/c"), File("a", b"now a file", mtime=1_400_000_000)])
    assert env.tree() == {"a": b"now a file"}
    assert os.lstat(env.root / "a").st_mtime == 1_400_000_000
    env.apply([Dir("l"), Dir("l/m"), Symlink("l", "l")])
    assert env.tree() == {"a": b"now a file", "l": ("->", "l")}


def test_parent_cache_not_stale_after_replacing_a_link_it_went_through(env):
    # `l/l` is resolved through `l -> .` (i.e. in the root) and replaces `l`
    # itself by a directory: the next `l/x` must land in that directory.
    env.apply([Symlink("l", "."), Dir("l/l"), File("l/x", b"x")])
    assert env.tree() == {"l": "dir", "l/x": b"x"}
    # `d/d/d` resolves to the root's `d` and replaces the whole `d` tree.
    env.apply([Dir("d"), Symlink("d/d", ".."), Symlink("d/d/d", "/"), File("d/d/f", b"f")])
    assert env.tree() == {"l": "dir", "l/x": b"x", "d": ("->", "/"), "f": b"f"}
