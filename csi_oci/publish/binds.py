"""Bind mounts of published volumes: an image tree (or a lazy image's FUSE mount),
its subPath resolved inside it, bound read-only at a pod's target path."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from pathlib import Path

from csi_oci.errors import FailedPrecondition, InvalidLayer, NotFound
from csi_oci.publish import mounts
from csi_oci.publish.locks import TargetLocks
from csi_oci.publish.records import STATE_PUBLISHED, VolumeRecords
from csi_oci.spec.attributes import VolumeSpec, parse_volume_attributes
from csi_oci.unpack.paths import open_in_root

log = logging.getLogger(__name__)


def bind_tree(tree: Path, target: str, spec: VolumeSpec, digest: str) -> None:
    """Bind the spec's subPath of `tree` read-only at `target` (resolved in-root)."""
    root_fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        src_fd = _open_sub_path(root_fd, spec, digest)
        try:
            mounts.bind_mount_readonly(src_fd, target)
        finally:
            os.close(src_fd)
    finally:
        os.close(root_fd)


def rebind_lazy(records: VolumeRecords, locks: TargetLocks, digest: str, mnt: Path) -> int:
    """Bind the image's published volumes again after its server restarted.

    A bind of a dead FUSE mount fails every access with ENOTCONN; a
    healthy one (rebound already, or never broken) is left alone.
    Returns how many targets were bound again.
    """
    rebound = 0
    for rec in records.all():
        if rec.tree != f"lazy:{digest}" or rec.state != STATE_PUBLISHED:
            continue
        with locks.hold(rec.target_path):
            current = records.load(rec.target_path)
            if current is None or current.tree != rec.tree:
                continue  # unpublished, or published again, meanwhile
            if mounts.is_answering(rec.target_path):
                continue  # rebound already, or never broken
            # On top of the stale bind, not in its place: a container with
            # mountPropagation HostToContainer holds a slave copy of this
            # mount, which receives a mount stacked on it but is cut off by
            # an unmount. NodeUnpublish unmounts the whole stack.
            bind_tree(mnt, rec.target_path, parse_volume_attributes(rec.spec), digest)
            log.info("bound %s again at %s", rec.volume_id, rec.target_path)
            rebound += 1
    return rebound


def make_target_dir(target: str) -> bool:
    """Create the target directory (CSI: the SP creates it). True if we made it."""
    try:
        os.mkdir(target, 0o750)
        return True
    except FileExistsError:
        if not os.path.isdir(target) or os.path.islink(target):
            raise FailedPrecondition(f"target {target} exists and is not a directory") from None
        return False
    except FileNotFoundError:
        raise FailedPrecondition(
            f"parent directory of target {target} does not exist (the CO must create it)"
        ) from None


def _open_sub_path(root_fd: int, spec: VolumeSpec, digest: str) -> int:
    where = spec.sub_path or "."
    try:
        fd = open_in_root(root_fd, where)
    except InvalidLayer:
        raise NotFound(
            f"subPath {spec.sub_path!r} is not a directory in image {spec.reference}"
        ) from None
    if fd is None:
        raise NotFound(
            f"subPath {spec.sub_path!r} does not exist in image {spec.reference} ({digest}); "
            f"its top level holds: {_top_level(root_fd)}; fix the volume's subPath attribute"
        )
    return fd


def _top_level(root_fd: int, shown: int = 10) -> str:
    """`models/, config.json, ...`: what a subPath could have been."""
    try:
        names = sorted(os.listdir(root_fd))
    except OSError:
        return "(unreadable)"
    marked = []
    for name in names[:shown]:
        with contextlib.suppress(OSError):
            if _is_dir_at(root_fd, name):
                name += "/"
        marked.append(name)
    if len(names) > shown:
        marked.append(f"... ({len(names)} entries)")
    return ", ".join(marked) or "nothing (the image is empty)"


def _is_dir_at(dir_fd: int, name: str) -> bool:
    return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)


def remove_target(target: str) -> None:
    try:
        os.rmdir(target)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        os.unlink(target)
    except OSError as exc:
        if exc.errno == errno.ENOTEMPTY:
            raise FailedPrecondition(
                f"target {target} is not empty after unmount; refusing to delete its contents"
            ) from None
        raise
