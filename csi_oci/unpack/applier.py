"""Apply OCI image layers (tar streams) onto a directory tree, safely.

Why not `tarfile.extractall`: it has no whiteout semantics, checks members
against the filesystem with `realpath` (order-dependent, racy) and has had
several filter bypasses. Here `tarfile` is only the header parser (made
strict: a corrupt header is an error, not an early end of the layer); every
filesystem operation is relative to a directory file descriptor, and every
path is resolved one component at a time inside the root:

* a symlink met while resolving a parent directory is followed *within* the
  root (an absolute target restarts at the root, `..` stops at the root), so
  images with `/lib -> usr/lib` work and `x -> /etc` can never reach the host;
* the final component is never followed: an existing entry there is removed
  and replaced, as the OCI layer spec's "changeset over existing files" says;
* names with `..` components are refused: no legitimate image needs them.

Whiteouts (`.wh.<name>`) and opaque markers (`.wh..wh..opq`) hide entries of
*lower* layers only; entries written earlier in the same layer (and the
directories holding them) survive.
Device nodes and FIFOs are never created (the volume is data, not a root
filesystem), and setuid/setgid bits are dropped; the mount adds nosuid,nodev."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import stat
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from csi_oci.errors import InvalidLayer, OutOfSpace, is_out_of_space
from csi_oci.faults import crash_point
from csi_oci.stream.verify import CHUNK, Readable
from csi_oci.unpack.budget import Budget, Limits
from csi_oci.unpack.paths import (
    _DIR_FLAGS,
    MAX_PATH_BYTES,
    _encoded,
    _lstat_at,
    remove_at,
    resolve_dir,
    split_member_name,
)
from csi_oci.unpack.tarsource import TarSource

log = logging.getLogger(__name__)


WHITEOUT_PREFIX = ".wh."


OPAQUE_MARKER = ".wh..wh..opq"


MAX_EXTENSION_HEADER_BYTES = 1 << 20  # a PAX record set or GNU long name


XGLTYPE = tarfile.XGLTYPE


_IS_ROOT = os.geteuid() == 0


# The private parts of tarfile used below (header errors, `nts`, the `_proc_*`
# hooks) are not in typeshed; they are stable since Python 3.0.
_TARFILE: Any = tarfile


T = TypeVar("T")


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo whose corrupt or cut-off headers are errors.

    Plain `tarfile` treats a bad checksum or a partial header after the first
    member as the end of the archive, silently dropping the rest of the layer.
    A stream that ends cleanly on a header boundary without the end-of-archive
    blocks is still accepted, as Go's archive/tar (containerd, Docker) does.
    """

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Any:
        try:
            obj = super().frombuf(buf, encoding, errors)
        except (_TARFILE.InvalidHeaderError, _TARFILE.TruncatedHeaderError) as exc:
            raise tarfile.ReadError(f"corrupt tar header: {exc}") from None
        if buf[257:265] == tarfile.GNU_MAGIC and obj.type not in tarfile.GNU_TYPES:
            # In GNU headers bytes 345.. hold atime/ctime, not a ustar name
            # prefix; tarfile glues them on. Go and GNU tar use the name alone.
            name = _TARFILE.nts(buf[0:100], encoding, errors)
            obj.name = name.rstrip("/") if obj.isdir() else name
        return obj

    # tarfile reads a PAX record or a GNU long name/link wholly into memory,
    # whatever size its header claims: cap it before that read happens.
    def _proc_pax(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        self._check_extension_size("PAX header")
        if self.type == XGLTYPE:
            # A global header would apply to every later entry (tarfile merges
            # it); containerd and Docker ignore them, so the tree must too.
            hidden: Any = self
            cast(Any, archive).fileobj.read(hidden._block(self.size))
            return self.fromtarfile(archive)
        result: tarfile.TarInfo = cast(Any, super())._proc_pax(archive)
        return result

    def _proc_gnulong(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        self._check_extension_size("GNU long name")
        result: tarfile.TarInfo = cast(Any, super())._proc_gnulong(archive)
        return result

    def _check_extension_size(self, what: str) -> None:
        if self.size > MAX_EXTENSION_HEADER_BYTES or self.size < 0:
            raise InvalidLayer(
                f"{what} of {self.size} bytes exceeds the {MAX_EXTENSION_HEADER_BYTES}-byte limit"
            )


@dataclass(frozen=True)
class Policy:
    """What a layer may contain.

    Image layers follow the OCI layer spec (whiteouts, last entry wins,
    absolute names rooted at the image root, device nodes skipped).
    Artifact layers (ORAS, ModelPack, KitOps) are plain file trees: anything
    else in them is refused, and two entries for one path (in one layer or
    across layers) are an error, not an overwrite.
    """

    image: bool = True
    # Only entries whose path passes are written (partial pulls).
    select: Callable[[str], bool] | None = None
    # Artifact tars that must stay under one path (an ORAS directory's title).
    under: tuple[str, ...] = ()
    # Shared across the layers of one artifact: path -> layer that wrote it.
    claimed: dict[str, str] | None = None
    claim_lock: threading.Lock | None = None


IMAGE_POLICY = Policy()


@dataclass
class ApplyStats:
    entries: int = 0
    bytes: int = 0
    skipped_special: list[str] = field(default_factory=list)


def _open_tar(stream: Readable) -> tarfile.TarFile:
    # ignore: typeshed's overloads of tarfile.open take no custom tarinfo class.
    tf: tarfile.TarFile = tarfile.open(  # type: ignore[call-overload]
        fileobj=TarSource(stream), mode="r:", tarinfo=_StrictTarInfo
    )
    return tf


def _tar_reading(step: Callable[..., T], *args: Any) -> T:
    """One step of tarfile's header parsing, its stray errors made ReadErrors.

    tarfile raises ValueError, OverflowError or UnicodeError for some
    malformed PAX records (GNU sparse maps and sizes that are not numbers,
    found by the fuzzer, tests/fuzz/regressions/tar); they are the archive's
    fault, so they become "malformed tar archive" like any TarError.
    """
    try:
        return step(*args)
    except (ValueError, OverflowError, UnicodeError, IndexError) as exc:
        raise tarfile.ReadError(f"malformed header: {exc}") from None


MAX_ID = (1 << 32) - 2  # uid/gid: 32 bits, and (uid_t)-1 means "leave as is" to chown


MAX_MTIME = 1 << 34  # seconds either side of 1970: year 2514; os.utime takes no more


def _check_numbers(m: tarfile.TarInfo, where: str) -> None:
    """Owner ids and times that chown and utime can take, else the layer is refused.

    A PAX record may say anything (`uid=-1`, `mtime=nan`, `mtime=1e300`): the
    fuzzer's reproducers in tests/fuzz/regressions/tar made os.fchown and
    os.utime raise OverflowError and ValueError before these checks.
    """
    for name, value in (("uid", m.uid), ("gid", m.gid)):
        if not isinstance(value, int) or not 0 <= value <= MAX_ID:
            raise InvalidLayer(f"{where}: {name} {value!r} is out of range")
    mtime = m.mtime
    if not isinstance(mtime, int | float) or not math.isfinite(mtime) or abs(mtime) > MAX_MTIME:
        raise InvalidLayer(f"{where}: modification time {mtime!r} is out of range")


class LayerApplier:
    """Applies layers in order onto one root directory."""

    def __init__(
        self,
        root_fd: int,
        limits: Limits | None = None,
        *,
        budget: Budget | None = None,
        policy: Policy = IMAGE_POLICY,
    ) -> None:
        self._root = root_fd
        self._budget = budget or Budget(limits or Limits())
        self.policy = policy
        self._layers_applied = 0

    def apply(self, stream: Readable, what: str) -> ApplyStats:
        """Apply one uncompressed tar stream; raises InvalidLayer naming the entry."""
        track = self.policy.image and self._layers_applied > 0
        layer = _LayerRun(self, what, track_written=track)
        try:
            layer.run(stream)
        except tarfile.TarError as exc:
            raise InvalidLayer(f"{what}: malformed tar archive: {exc}") from None
        except RecursionError:
            # tarfile recurses once per chained PAX/GNU extension header.
            raise InvalidLayer(f"{what}: too many chained PAX/GNU extension headers") from None
        except InvalidLayer as exc:
            if not str(exc).startswith(what):
                raise InvalidLayer(f"{what}: {exc}") from None
            raise
        except OSError as exc:
            if is_out_of_space(exc):
                raise OutOfSpace(f"{what}: no space left on the state directory's disk") from None
            raise
        finally:
            layer.close()
        self._layers_applied += 1
        return layer.stats

    def _charge(self, entries: int, nbytes: int, what: str) -> None:
        self._budget.charge(entries, nbytes, what)

    def charge_bytes(self, nbytes: int, what: str) -> None:
        """Count bytes that were inflated but not written (e.g. padding)."""
        self._budget.charge(0, nbytes, what, lands=False)

    def charge_new_dir(self, what: str) -> None:
        """A directory the layer implies (a parent no entry named) costs an entry too."""
        self._budget.charge(1, 0, f"{what}: implied directory")


class _LayerRun:
    """State of applying one layer: parent-dir cache, written set, deferred times."""

    def __init__(self, owner: LayerApplier, what: str, *, track_written: bool) -> None:
        self.owner = owner
        self.root = owner._root
        self.what = what
        self.track = track_written
        self.written: set[str] = set()
        # Directories this layer holds without an entry of their own: the
        # parents of its entries (tar writers may omit parent entries).
        self.parents: set[str] = set()
        self.dir_times: dict[tuple[str, ...], float] = {}
        self.seen: set[str] = set()  # artifact entries of this layer (duplicates)
        self.stats = ApplyStats()
        self._cache_key: tuple[str, ...] | None = None
        self._cache_fd: int | None = None

    def close(self) -> None:
        self._drop_cache()

    def _drop_cache(self) -> None:
        if self._cache_fd is not None:
            os.close(self._cache_fd)
        self._cache_key = None
        self._cache_fd = None

    def _parent(self, parts: list[str]) -> int:
        """Parent dir fd of `parts`, cached for runs of files in one directory."""
        key = tuple(parts[:-1])
        if key != self._cache_key:
            self._drop_cache()
            fd = resolve_dir(self.root, list(key), create=True, on_create=self._new_dir)
            assert fd is not None
            self._cache_key, self._cache_fd = key, fd
        assert self._cache_fd is not None
        return self._cache_fd

    def run(self, stream: Readable) -> None:
        with _tar_reading(_open_tar, stream) as tf:
            while (member := _tar_reading(tf.next)) is not None:
                self._apply_member(tf, member)
                # tarfile keeps every header it parsed; a million-entry layer
                # would hold them all. Iteration does not need the list (the
                # attribute is not in typeshed).
                cast(Any, tf).members.clear()
        self._set_dir_times()

    def _apply_member(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        where = f"{self.what}: entry {m.name!r}"
        try:
            self._apply_checked(tf, m, where)
        except InvalidLayer as exc:
            if m.name not in str(exc):  # e.g. from in-root resolution
                raise InvalidLayer(f"{where}: {exc}") from None
            raise

    def _apply_checked(self, tf: tarfile.TarFile, m: tarfile.TarInfo, where: str) -> None:
        if m.size < 0:
            raise InvalidLayer(f"{where}: negative size {m.size}")
        _check_numbers(m, where)
        policy = self.owner.policy
        parts = split_member_name(m.name, f"{self.what}: entry")
        self.owner._charge(1, m.size if m.isreg() else 0, where)
        self.stats.entries += 1
        if self.stats.entries == 2:
            crash_point("mid-extract")
        if not policy.image:
            self._artifact_checks(m, parts, where)
        if not parts:
            return  # the root itself: never replaced, its metadata is ours
        if self.track:
            self._mark_parents(parts)
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, where)
            return
        if policy.select is not None and not m.isdir():
            if not policy.select("/".join(parts)):
                return  # partial pull: not wanted (tarfile skips its data)
        elif policy.select is not None:
            return  # directories appear as parents of selected entries only
        if m.isreg():
            self._file(tf, m, parts)
        elif m.isdir():
            self._dir(m, parts)
        elif m.issym():
            self._symlink(m, parts)
        elif m.islnk():
            self._hardlink(m, parts, where)
        elif m.ischr() or m.isblk() or m.isfifo():
            self.stats.skipped_special.append(m.name)
            log.debug("%s: not creating device node or FIFO", where)
            return
        else:
            raise InvalidLayer(f"{where}: unsupported tar entry type {m.type!r}")
        if self.track:
            self.written.add("/".join(parts))

    def _artifact_checks(self, m: tarfile.TarInfo, parts: list[str], where: str) -> None:
        """An artifact is a plain file tree: refuse what only images may carry."""
        policy = self.owner.policy
        if m.name.startswith("/"):
            raise InvalidLayer(f"{where}: absolute path in an artifact layer")
        if not parts:
            if m.isdir():
                return
            raise InvalidLayer(f"{where}: an artifact entry must not name the root")
        if any(p.startswith(WHITEOUT_PREFIX) for p in parts):
            raise InvalidLayer(f"{where}: whiteout entries are not allowed in an artifact layer")
        if m.ischr() or m.isblk() or m.isfifo():
            raise InvalidLayer(f"{where}: device nodes and FIFOs are not allowed in an artifact")
        if policy.under and tuple(parts[: len(policy.under)]) != policy.under:
            if not (m.isdir() and tuple(parts) == policy.under[: len(parts)]):
                raise InvalidLayer(
                    f"{where}: outside {'/'.join(policy.under)!r}, the path this layer declares"
                )
        if m.isdir() or policy.claimed is None or policy.claim_lock is None:
            return
        path = "/".join(parts)
        with policy.claim_lock:
            previous = policy.claimed.setdefault(path, self.what)
        if previous != self.what or path in self.seen:
            other = "this layer" if previous == self.what else previous
            raise InvalidLayer(f"{where}: duplicate path, already written by {other}")
        self.seen.add(path)

    def _mark_parents(self, parts: list[str]) -> None:
        for depth in range(len(parts) - 1, 0, -1):
            path = "/".join(parts[:depth])
            if path in self.parents:
                return
            self.parents.add(path)

    # -- entry kinds -------------------------------------------------------

    def _prepare(self, parts: list[str], *, keep_dir: bool = False) -> tuple[int, str]:
        """Parent fd and name, with whatever occupies the name removed."""
        parent = self._parent(parts)
        name = parts[-1]
        st = _lstat_at(parent, name)
        if st is not None and not (keep_dir and stat.S_ISDIR(st.st_mode)):
            if not self.owner.policy.image:
                # An artifact is a plain tree: a second entry for a path (or a
                # file where a directory is, or the reverse) is an error.
                raise InvalidLayer(
                    f"{self.what}: entry {'/'.join(parts)!r}: duplicate path "
                    "(already written by this or another layer)"
                )
            remove_at(parent, name)
            if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
                # The cached parent may have been reached through what was
                # removed (`l -> .`, then `l/l`): `parent` stays valid for this
                # entry, but the next one must resolve its parent again.
                self._cache_key = None
        return parent, name

    def _file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, parts: list[str]) -> None:
        parent, name = self._prepare(parts)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=parent)
        try:
            written = 0
            for chunk in self._contents(tf, m):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                written += len(chunk)
            if written != m.size:
                raise InvalidLayer(f"{self.what}: entry {m.name!r} is truncated")
            self.stats.bytes += written
            self._meta_fd(fd, m)
        finally:
            os.close(fd)

    @staticmethod
    def _contents(tf: tarfile.TarFile, m: tarfile.TarInfo) -> Iterator[memoryview | bytes]:
        """A regular file's bytes: straight from the stream (no copy), or
        through tarfile for GNU sparse files, whose holes it fills in."""
        source = tf.fileobj
        if m.sparse is None and isinstance(source, TarSource):
            if source.tell() != m.offset_data:
                raise InvalidLayer(f"entry {m.name!r}: data does not follow its header")
            yield from source.take(m.size)
            return
        src = tf.extractfile(m)
        while src is not None and (chunk := src.read(CHUNK)):
            yield chunk

    def _dir(self, m: tarfile.TarInfo, parts: list[str]) -> None:
        parent, name = self._prepare(parts, keep_dir=True)
        if _lstat_at(parent, name) is None:
            os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        try:
            if _IS_ROOT:
                os.fchown(fd, m.uid, m.gid)
            os.fchmod(fd, m.mode & 0o1777)
        finally:
            os.close(fd)
        self.dir_times[tuple(parts)] = m.mtime  # a later entry for the path wins

    def _symlink(self, m: tarfile.TarInfo, parts: list[str]) -> None:
        where = f"{self.what}: entry {m.name!r}"
        if not m.linkname:
            raise InvalidLayer(f"{where}: symbolic link with an empty target")
        if "\0" in m.linkname:
            raise InvalidLayer(f"{where}: symbolic link target contains a NUL byte")
        if len(_encoded(m.linkname, where)) >= MAX_PATH_BYTES:
            raise InvalidLayer(f"{where}: symbolic link target longer than {MAX_PATH_BYTES} bytes")
        parent, name = self._prepare(parts)
        # The target is stored verbatim: it is only ever followed in-root by us,
        # and by the pod inside its own mount namespace.
        os.symlink(m.linkname, name, dir_fd=parent)
        if _IS_ROOT:
            os.chown(name, m.uid, m.gid, dir_fd=parent, follow_symlinks=False)
        with contextlib.suppress(OSError):
            os.utime(name, (m.mtime, m.mtime), dir_fd=parent, follow_symlinks=False)

    def _hardlink(self, m: tarfile.TarInfo, parts: list[str], where: str) -> None:
        target_parts = split_member_name(m.linkname, f"{where}: link target")
        if not target_parts:
            raise InvalidLayer(f"{where}: hard link to the root directory")
        tparent = resolve_dir(self.root, target_parts[:-1], create=False)
        if tparent is None:
            if self.owner.policy.select is not None:
                raise InvalidLayer(
                    f"{where}: hard link to {m.linkname!r}, which `include` leaves out; "
                    "include it too"
                )
            raise InvalidLayer(f"{where}: hard link target {m.linkname!r} does not exist")
        try:
            tst = _lstat_at(tparent, target_parts[-1])
            if tst is None:
                if self.owner.policy.select is not None:
                    raise InvalidLayer(
                        f"{where}: hard link to {m.linkname!r}, which `include` leaves out; "
                        "include it too"
                    )
                raise InvalidLayer(f"{where}: hard link target {m.linkname!r} does not exist")
            if stat.S_ISDIR(tst.st_mode):
                raise InvalidLayer(f"{where}: hard link target {m.linkname!r} is a directory")
            if target_parts == parts:
                return  # a link to itself: the file is already there
            parent, name = self._prepare(parts)
            try:
                os.link(
                    target_parts[-1],
                    name,
                    src_dir_fd=tparent,
                    dst_dir_fd=parent,
                    follow_symlinks=False,
                )
            except FileNotFoundError:
                # Replacing the entry removed the target (it was inside it).
                raise InvalidLayer(
                    f"{where}: hard link target {m.linkname!r} is removed by this entry"
                ) from None
        finally:
            os.close(tparent)

    def _whiteout(self, parts: list[str], where: str) -> None:
        base = parts[-1]
        self._drop_cache()
        if base == OPAQUE_MARKER:
            self._opaque(parts[:-1])
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other AUFS metadata (.wh..wh.plnk etc.): not content
        hidden = base[len(WHITEOUT_PREFIX) :]
        if hidden in ("", ".", "..") or "/" in hidden:
            raise InvalidLayer(f"{where}: invalid whiteout name")
        if not self.track:
            return  # first layer: nothing lower to hide
        target = "/".join([*parts[:-1], hidden])
        if target in self.written:
            return  # only lower layers are hidden
        parent = resolve_dir(self.root, parts[:-1], create=False)
        if parent is None:
            return
        try:
            st = _lstat_at(parent, hidden)
            if target in self.parents and st is not None and stat.S_ISDIR(st.st_mode):
                # Entries of this layer lie below it: hide only the lower ones.
                sub = os.open(hidden, _DIR_FLAGS, dir_fd=parent)
                try:
                    self._clear_lower(sub, target)
                finally:
                    os.close(sub)
            else:
                remove_at(parent, hidden)
        finally:
            os.close(parent)

    def _new_dir(self) -> None:
        self.owner.charge_new_dir(self.what)

    def _opaque(self, dir_parts: list[str]) -> None:
        if not self.track:
            return
        fd = resolve_dir(self.root, dir_parts, create=True, on_create=self._new_dir)
        assert fd is not None
        try:
            self._clear_lower(fd, "/".join(dir_parts))
        finally:
            os.close(fd)

    def _clear_lower(self, dir_fd: int, prefix: str) -> None:
        """Remove what lower layers put under a directory, keep this layer's."""
        for name in os.listdir(dir_fd):
            path = f"{prefix}/{name}" if prefix else name
            if path not in self.written and path not in self.parents:
                remove_at(dir_fd, name)
                continue
            st = _lstat_at(dir_fd, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    self._clear_lower(sub, path)
                finally:
                    os.close(sub)

    # -- metadata ------------------------------------------------------------

    def _meta_fd(self, fd: int, m: tarfile.TarInfo) -> None:
        if _IS_ROOT:
            os.fchown(fd, m.uid, m.gid)
        # setuid/setgid never survive (chown above would clear them anyway).
        os.fchmod(fd, m.mode & 0o1777)
        os.utime(fd, (m.mtime, m.mtime))

    def _set_dir_times(self) -> None:
        self._drop_cache()
        for parts, mtime in self.dir_times.items():
            try:
                parent = resolve_dir(self.root, list(parts[:-1]), create=False)
            except InvalidLayer:
                continue  # a later entry replaced a parent by a file or a link loop
            if parent is None:
                continue
            try:
                # Only if still a directory: a later entry may have replaced it.
                fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
            except OSError:
                continue
            finally:
                os.close(parent)
            try:
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)
