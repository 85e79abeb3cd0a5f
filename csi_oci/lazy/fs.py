"""A read-only FUSE filesystem over lazily read layers (pyfuse3).

The tree is the merge of the layers' TOCs, lowest layer first, with OCI
whiteouts and opaque directories applied and the formats' own files
(`stargz.index.json`, landmarks) hidden. File bytes come from
`csi_oci.lazy.LazyReader`, which fetches, decompresses and verifies pieces:
nothing unverified reaches a reader; a piece that fails verification (or
cannot be fetched) makes that read fail with EIO, and the next read tries
again.

Content is immutable, so entries and attributes are cached by the kernel
for a long time and open files keep their page cache. Reads run in worker
threads (decompression and sha256 release the GIL), so concurrent readers
proceed in parallel while the trio event loop keeps serving requests.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from csi_oci.errors import CsiOciError
from csi_oci.lazy.reader import LazyReader
from csi_oci.lazy.toc import HIDDEN_ROOT_NAMES, Entry
from csi_oci.oci.transfer import RetryPolicy
from csi_oci.spec.attributes import include_matcher
from csi_oci.storage.atomic import read_json, write_json_atomic
from csi_oci.telemetry.lazystats import LAZY_STATS_FILE, write_lazy_stats
from csi_oci.telemetry.logs import setup_logging

log = logging.getLogger(__name__)

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
TIMEOUT = 3600.0  # immutable content: the kernel may cache names and attributes long
_TYPE_BITS = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


@dataclass(slots=True)
class Node:
    inode: int
    entry: Entry | None  # None: a directory the TOCs only imply
    reader: LazyReader | None
    children: dict[str, Node] = field(default_factory=dict)
    nlink: int = 1


class LazyTree:
    """The merged tree of several lazy layers (lowest first)."""

    def __init__(
        self, layers: list[LazyReader], include: Callable[[str], bool] | None = None
    ) -> None:
        self._next_inode = pyfuse3.ROOT_INODE
        self.inodes = 1  # what NodeGetVolumeStats reports: set by _count_links
        self.bytes = 0
        self.root = self._new(None, None)
        self.nodes: dict[int, Node] = {self.root.inode: self.root}
        for reader in layers:
            self._apply(reader)
        if include is not None:
            self._keep_only(self.root, "", include)
        self._count_links(self.root)

    def _keep_only(self, node: Node, prefix: str, include: Callable[[str], bool]) -> bool:
        """`include`: keep matching files and the directories leading to them.

        The same rule as an unpacked partial pull (csi_oci.attributes); the
        nodes that go are forgotten, so lookups of them are ENOENT.
        """
        for name, child in list(node.children.items()):
            path = f"{prefix}{name}"
            if self._is_dir(child):
                keep = self._keep_only(child, f"{path}/", include)
            else:
                keep = include(path)
            if not keep:
                del node.children[name]
        return bool(node.children)

    def _new(self, entry: Entry | None, reader: LazyReader | None) -> Node:
        node = Node(self._next_inode, entry, reader)
        self._next_inode += 1
        if hasattr(self, "nodes"):
            self.nodes[node.inode] = node
        return node

    def _dir(self, parts: list[str]) -> Node:
        node = self.root
        for part in parts:
            child = node.children.get(part)
            if child is None or not self._is_dir(child):
                child = self._new(None, None)
                node.children[part] = child
            node = child
        return node

    @staticmethod
    def _is_dir(node: Node) -> bool:
        return node.entry is None or node.entry.type == "dir"

    def _apply(self, reader: LazyReader) -> None:
        entries = [e for e in reader.toc.entries.values() if e.name not in HIDDEN_ROOT_NAMES]
        # Whiteouts hide what lower layers hold: apply them before this layer's entries.
        for entry in entries:
            parts = entry.name.split("/")
            base = parts[-1]
            if base == OPAQUE:
                self._dir(parts[:-1]).children.clear()
            elif base.startswith(WHITEOUT):
                self._dir(parts[:-1]).children.pop(base[len(WHITEOUT) :], None)
        by_name: dict[str, Node] = {}
        for entry in entries:
            parts = entry.name.split("/")
            if parts[-1].startswith(WHITEOUT):
                continue
            parent = self._dir(parts[:-1])
            existing = parent.children.get(parts[-1])
            if entry.type == "hardlink":
                target = by_name.get(entry.link_name)
                if target is None or self._is_dir(target):
                    # A link to something this layer does not hold: skip it. A link
                    # to a directory is never made (tar cannot say it, and in a TOC
                    # it would let a directory contain itself): skip that too.
                    continue
                parent.children[parts[-1]] = target
                continue
            if entry.type == "dir" and existing is not None and self._is_dir(existing):
                existing.entry, existing.reader = entry, reader  # dir over dir: merge
                by_name[entry.name] = existing
                continue
            node = self._new(entry, reader)
            parent.children[parts[-1]] = node
            by_name[entry.name] = node

    def _count_links(self, node: Node) -> None:
        """Each node's link count; each directory is walked once (no recursion,
        and a directory met twice is never entered again, so nothing loops)."""
        seen: dict[int, int] = {}
        walked = {node.inode}
        todo = [node]
        while todo:
            for child in todo.pop().children.values():
                seen[child.inode] = seen.get(child.inode, 0) + 1
                if self._is_dir(child) and child.inode not in walked:
                    walked.add(child.inode)
                    todo.append(child)
        self.inodes = len(seen) + 1  # the root too; a hard link is one inode
        self.bytes = 0
        for inode, count in seen.items():
            child = self.nodes[inode]
            child.nlink = count
            if child.entry is not None and child.entry.type == "reg":
                self.bytes += child.entry.size


@dataclass(frozen=True)
class ServedImage:
    """What a failed read is about, in the words of the operator's records."""

    reference: str = "-"
    key: str = ""  # manifest digest, plus include set if any
    records_dir: str | None = None

    def volumes(self) -> str:
        """The volumes bound to this image (read when needed: they come and go)."""
        if not self.records_dir or not self.key:
            return "-"
        found = []
        for path in sorted(Path(self.records_dir).glob("*.json")):
            record = read_json(path)  # the volume records of csi_oci.volumes
            if isinstance(record, dict) and record.get("tree") == f"lazy:{self.key}":
                found.append(str(record.get("volume_id")))
        return ",".join(found) or "-"


class LazyFS(pyfuse3.Operations):
    def __init__(self, tree: LazyTree, image: ServedImage | None = None) -> None:
        super().__init__()
        self.tree = tree
        self.image = image or ServedImage()

    def _node(self, inode: int) -> Node:
        node = self.tree.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        entry = node.entry
        kind = "dir" if entry is None else entry.type
        perms = 0o755 if entry is None else (entry.mode & 0o7777 or 0o644)
        attrs.st_ino = node.inode
        attrs.st_mode = _TYPE_BITS.get(kind, stat.S_IFREG) | (perms & ~0o6000)
        attrs.st_nlink = node.nlink + (1 if kind == "dir" else 0)
        attrs.st_uid = entry.uid if entry else 0
        attrs.st_gid = entry.gid if entry else 0
        if entry is not None and kind == "symlink":
            size = len(os.fsencode(entry.link_name))
        else:
            size = entry.size if entry is not None and kind == "reg" else 0
        attrs.st_size = size
        attrs.st_blocks = (size + 511) // 512
        attrs.st_blksize = 1 << 20
        if entry is not None and kind in ("char", "block"):
            attrs.st_rdev = os.makedev(entry.dev_major, entry.dev_minor)
        mtime_ns = int((entry.mtime if entry else 0) * 1e9)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = mtime_ns
        attrs.entry_timeout = TIMEOUT
        attrs.attr_timeout = TIMEOUT
        return attrs

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        key = os.fsdecode(name)
        if key == ".":
            return self._attrs(parent)
        child = parent.children.get(key)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(child)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not LazyTree._is_dir(self._node(inode)):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node = self._node(fh)
        names = sorted(node.children)
        for index in range(start_id, len(names)):
            child = node.children[names[index]]
            if not pyfuse3.readdir_reply(
                token, os.fsencode(names[index]), self._attrs(child), index + 1
            ):
                return

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if node.entry is None or node.entry.type != "symlink":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(node.entry.link_name)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.entry is None or node.entry.type != "reg":
            raise pyfuse3.FUSEError(errno.EISDIR if LazyTree._is_dir(node) else errno.EACCES)
        # keep_cache: the bytes never change, so the page cache survives re-opens.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        node = self._node(fh)
        assert node.entry is not None and node.reader is not None
        entry, reader = node.entry, node.reader
        landed = reader.read_landed(entry.name, offset, size)
        if landed is not None:
            # Verified and in the layer file: one pread, here, without the
            # hand-off to a worker thread (a warm re-read is all this path).
            return landed
        try:
            return await trio.to_thread.run_sync(reader.read, entry.name, offset, size)
        except (CsiOciError, OSError) as exc:
            # EIO for this read only: nothing is remembered, the next read
            # of the same bytes asks the registry again.
            log.error(
                "on-demand read failed (EIO): volume %s, image %s, file %s, offset %d, "
                "length %d: %s; the next read will try again",
                self.image.volumes(),
                self.image.reference,
                entry.name,
                offset,
                size,
                exc,
            )
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh: int) -> None:
        return None

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data


READ_AHEAD_KB = 4096
ON_DEMAND_RETRIES = RetryPolicy(max_attempts=3, base_delay=0.2, max_delay=1.0)


def _raise_readahead(mountpoint: str) -> None:
    """Make the kernel send 1 MiB reads instead of 128 KiB ones.

    pyfuse3 cannot pass max_read (libfuse rejects the mismatch), but the
    FUSE connection's backing device takes a larger readahead, and with it
    the kernel asks for up to max_pages (1 MiB) per request: a quarter of
    the requests, and a quarter of the Python work per byte.
    """
    target = os.path.normpath(os.path.abspath(mountpoint))
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split(" ")
                if fields[4] == target:
                    bdi = f"/sys/class/bdi/{fields[2]}/read_ahead_kb"
                    with open(bdi, "w") as knob:
                        knob.write(str(READ_AHEAD_KB))
                    return
    except OSError as exc:  # not fatal: reads just stay at 128 KiB
        log.info("could not raise readahead of %s: %s", mountpoint, exc)


def _steady_malloc() -> None:
    """Keep glibc from hoarding freed range buffers.

    Range buffers of several MiB are allocated and freed on many threads,
    and glibc gives threads arenas of their own that keep what was freed.
    Two arenas bound that: with the bound on on-demand runs, a 4-shard read
    of a 1 GiB model peaked at 139-166 MB (216-230 MB before). A fixed 1 MiB
    mmap threshold cut it to 114-133 MB but made reads 20-60 % slower (every
    fresh buffer faulted in page by page), so it is not set.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError) as exc:  # not glibc: nothing to tune
        log.info("malloc left as it is: %s", exc)


def serve(
    tree: LazyTree,
    mountpoint: str,
    fsname: str = "csi-oci-lazy",
    image: ServedImage | None = None,
) -> None:
    """Mount and serve until unmounted (blocks; run it in its own process)."""
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {f"fsname={fsname}", "ro", "default_permissions", "allow_other"}
    pyfuse3.init(LazyFS(tree, image), mountpoint, options)
    _raise_readahead(mountpoint)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


def _file_fetch(path: str) -> tuple[int, Callable[[int, int], bytes]]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def fetch(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    return os.fstat(fd).st_size, fetch


def main(argv: list[str] | None = None) -> int:
    """`python -m csi_oci.lazy.fs MOUNTPOINT LAYERS.json`: serve local layer blobs.

    LAYERS.json: [{"path": ..., "media_type": ..., "annotations": {...}}, ...],
    lowest layer first. Used by tests and for debugging; the driver serves
    registry-backed layers the same way.
    """
    import argparse

    from csi_oci.lazy.reader import open_toc

    parser = argparse.ArgumentParser(prog="csi-oci-lazyfs")
    parser.add_argument("mountpoint", nargs="?")
    parser.add_argument("layers", nargs="?", help="local layer blobs (JSON list)")
    parser.add_argument("--registry-spec", help="serve an image's layers from its registry")
    parser.add_argument("--credentials", help="registry credentials (JSON, kept on tmpfs)")
    parser.add_argument("--error-file", help="where to say why serving could not start (JSON)")
    parser.add_argument(
        "--standby",
        action="store_true",
        help="load everything, then wait for a job on stdin (one JSON line: mountpoint, "
        "registry_spec, credentials, log); exit at end of input",
    )
    args = parser.parse_args(argv)
    setup_logging("info")  # the driver's format, URLs without query strings
    _steady_malloc()
    if args.standby:
        _preload()
        job = _wait_for_job()
        if job is None:
            return 0  # whoever kept us in standby is gone
        args.mountpoint = job["mountpoint"]
        args.registry_spec = job["registry_spec"]
        args.credentials = job.get("credentials")
        args.error_file = job.get("error_file")
    if args.mountpoint is None:
        parser.error("a mountpoint is needed")
    image = None
    include = None
    with _no_collection():
        if args.registry_spec:
            try:
                readers, prefetch_mode = registry_readers(args.registry_spec, args.credentials)
            except CsiOciError as exc:
                # Say why where the waiting publish looks (csi_oci.publish.lazy_mounts), by class,
                # so the pod's event carries the right status and not a log tail.
                if args.error_file:
                    record_start_error(Path(args.error_file), exc)
                log.error("cannot serve %s: %s", args.registry_spec, exc)
                return 2
            spec = json.loads(open(args.registry_spec).read())
            key = spec.get("key") or spec.get("digest", "")
            image = ServedImage(spec["reference"], key, spec.get("records_dir"))
            include = include_matcher(tuple(spec.get("include") or ()))
            _start_prefetch(readers, prefetch_mode, include)
            # Who serves this image (a standby process's command line does not say).
            (Path(args.mountpoint).parent / "server.pid").write_text(f"{os.getpid()}\n")
        else:
            readers = []
            for spec in json.loads(open(args.layers).read()):
                size, fetch = _file_fetch(spec["path"])
                toc = open_toc(spec["media_type"], spec.get("annotations", {}), size, fetch)
                readers.append(LazyReader(toc, fetch))
        tree = LazyTree(readers, include)
    if image is not None:
        _start_stats(readers, image, tree, Path(args.mountpoint).parent / LAZY_STATS_FILE)
    serve(tree, args.mountpoint, image=image)
    return 0


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """Build the TOCs, piece tables and tree without the cyclic GC, then freeze them.

    A 4 GiB zstd:chunked layer is 92,000 pieces and digests, all built
    before the first byte: the collector's passes over that growing heap
    took a third of the TOC's parse (0.22 -> 0.15 s for 65,000 pieces). The
    tables live as long as the server, so afterwards they are frozen out of
    every later collection, where they would be walked again for nothing.
    """
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.freeze()


def record_start_error(path: Path, exc: CsiOciError) -> None:
    write_json_atomic(path, {"kind": type(exc).__name__, "message": str(exc)})


def _preload() -> None:
    """Import what serving a registry image needs before the job comes.

    These imports (the registry client, requests and urllib3, the formats)
    took about 0.25 s of a warm standby's first byte when they waited for
    the job; a standby pays them while nobody waits.
    """
    import csi_oci.lazy.prefetch
    import csi_oci.lazy.zstdchunked
    import csi_oci.oci.config
    import csi_oci.oci.manifest
    import csi_oci.oci.registry
    import csi_oci.spec.credentials
    import csi_oci.spec.reference  # noqa: F401 - imported for their cost, now


def _wait_for_job() -> dict[str, str] | None:
    """Standby: pay Python's start-up and imports now, not when a pod is waiting.

    A lazy publish then costs a pipe write instead of a process start
    (about a third of a second on a small node). The job names the log the
    server writes from then on.
    """
    import sys

    line = sys.stdin.readline()
    if not line.strip():
        return None
    job: dict[str, str] = json.loads(line)
    if job.get("log"):
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    return job


def _start_prefetch(
    readers: list[LazyReader], mode: str, include: Callable[[str], bool] | None
) -> None:
    import threading

    from csi_oci.lazy.prefetch import prefetch

    for reader in readers:
        threading.Thread(
            target=prefetch,
            args=(reader, mode),
            kwargs={"wanted": include},
            name="prefetch",
            daemon=True,
        ).start()


STATS_SECONDS = 5.0


def _start_stats(readers: list[LazyReader], image: ServedImage, tree: LazyTree, path: Path) -> None:
    """Write this server's totals for the gRPC server's /metrics (csi_oci.telemetry.endpoint)
    and for NodeGetVolumeStats (the tree's size, and whether reads are failing)."""
    import threading
    import time

    def totals() -> dict[str, object]:
        def total(name: str) -> int:
            return sum(int(getattr(r, name)) for r in readers)

        failing = [r for r in readers if r.failing_since]
        return {
            "tree_bytes": tree.bytes,
            "tree_inodes": tree.inodes,
            "failing_since": min((r.failing_since for r in failing), default=0.0),
            "last_error": failing[0].last_error if failing else "",
            "image": image.reference,
            "digest": image.key.split(".", 1)[0],
            "read_bytes": total("read_bytes"),
            "on_demand_fetched_bytes": total("fetched_bytes"),
            "prefetch_fetched_bytes": total("prefetch_fetched_bytes"),
            "cache_hits": total("cache_hits"),
            "cache_misses": total("cache_misses"),
            "fetch_errors": total("fetch_errors"),
            "prefetch_done_bytes": total("prefetch_done_bytes"),
            "prefetch_total_bytes": total("prefetch_total_bytes"),
        }

    def run() -> None:
        while True:
            try:
                write_lazy_stats(path, totals())
            except (OSError, ValueError) as exc:  # metrics must never stop reads
                log.warning("could not write lazy stats to %s: %s", path, exc)
            time.sleep(STATS_SECONDS)

    threading.Thread(target=run, name="lazy-stats", daemon=True).start()


def registry_readers(
    spec_path: str, credentials_path: str | None = None
) -> tuple[list[LazyReader], str]:
    """Readers fetching byte ranges of an image's layers from its registry.

    The credentials file (0600, on tmpfs; see csi_oci.publish.lazy_mounts) is read once
    at start: a restarted server reads it again.
    """
    from csi_oci.lazy.reader import open_toc
    from csi_oci.lazy.toc import TocBudget
    from csi_oci.oci.config import ConfigSource
    from csi_oci.oci.manifest import Descriptor
    from csi_oci.oci.registry import RegistryClient
    from csi_oci.spec.credentials import Credentials
    from csi_oci.spec.reference import parse_reference

    spec = json.loads(Path(spec_path).read_text())
    creds = json.loads(Path(credentials_path).read_text()) if credentials_path else None
    credentials = Credentials(creds["username"], creds["password"]) if creds else None
    config_path = spec.get("registry_config")
    config = ConfigSource(Path(config_path) if config_path else None).current()
    client = RegistryClient(parse_reference(spec["reference"]), credentials, config=config)
    # A reader waits for this read: a few quick retries, then EIO (and the
    # next read tries again), rather than a pull's patient backoff.
    client.policy = ON_DEMAND_RETRIES
    readers = []
    budget = TocBudget()  # the image's layers share one bound on TOC entries and bytes
    for layer in spec["layers"]:
        desc = Descriptor(layer["media_type"], layer["digest"], layer["size"], layer["annotations"])

        def fetch(offset: int, length: int, desc: Descriptor = desc) -> bytes | bytearray:
            return client.fetch_range(desc, offset, length)

        started = time.monotonic()
        toc = open_toc(desc.media_type, desc.annotations, desc.size, fetch, budget)
        parsed = time.monotonic()
        cache_dir = Path(spec["cache_dir"]) if spec.get("cache_dir") else None
        readers.append(LazyReader(toc, fetch, cache_dir=cache_dir))
        log.info(
            "layer %s: %s, %d entries, %d pieces; TOC read in %.3f s, reader ready in %.3f s",
            desc.digest,
            toc.format,
            len(toc.entries),
            len(readers[-1].pieces),
            parsed - started,
            time.monotonic() - parsed,
        )
    return readers, str(spec.get("prefetch", "all"))


if __name__ == "__main__":
    raise SystemExit(main())
