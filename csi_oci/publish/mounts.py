"""Mount plumbing: read-only bind mounts and the mount table.

"Is it mounted?" is always answered from /proc/self/mountinfo, never from
memory or `os.path.ismount` (which is False for a bind mount within one
filesystem). Mount and unmount are direct system calls through libc, which
lets us bind-mount `/proc/self/fd/N`: exactly the directory that was
resolved inside the image tree, with no second path lookup a symlink could
redirect.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from csi_oci.errors import MountError

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    major_minor: str
    root: str
    mount_point: str
    options: frozenset[str]
    fs_type: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        octal = field[i + 1 : i + 4]
        if field[i] == "\\" and len(octal) == 3 and octal.isdigit():
            out.append(chr(int(octal, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    entries = []
    with open(path) as f:
        for line in f:
            left, sep, right = line.rstrip("\n").partition(" - ")
            if not sep:
                continue
            fields = left.split(" ")
            rfields = right.split(" ")
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    major_minor=fields[2],
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    options=frozenset(fields[5].split(",")),
                    fs_type=rfields[0],
                    source=_unescape(rfields[1]) if len(rfields) > 1 else "",
                )
            )
    return entries


def mounts_at(path: str | Path) -> list[MountEntry]:
    """Mount entries whose mount point is `path` (stacked mounts give several)."""
    target = os.path.normpath(os.path.abspath(path))
    return [m for m in read_mountinfo() if m.mount_point == target]


def is_mounted(path: str | Path) -> bool:
    return bool(mounts_at(path))


def is_answering(path: str | Path) -> bool:
    """Mounted and served: a FUSE mount (or a bind of one) whose server died
    fails statfs at once with ENOTCONN. statfs always reaches the server,
    where stat may be answered from the kernel's attribute cache."""
    if not is_mounted(path):
        return False
    try:
        os.statvfs(path)
        return True
    except OSError:
        return False


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise MountError(f"{what}: {os.strerror(err)}")


def bind_mount_readonly(source_fd: int, target: str | Path) -> None:
    """Bind-mount the directory open at `source_fd` on `target`, ro,nosuid,nodev.

    Two steps because Linux ignores flags other than MS_REC on the initial
    MS_BIND; the remount applies them. A failed remount is rolled back so a
    writable bind is never left behind.
    """
    src = f"/proc/self/fd/{source_fd}".encode()
    dst = os.fsencode(str(target))
    _check(_libc.mount(src, dst, None, MS_BIND, None), f"bind mount onto {target}")
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    if _libc.mount(None, dst, None, flags, None) != 0:
        err = ctypes.get_errno()
        _libc.umount2(dst, MNT_DETACH)
        raise MountError(f"remount read-only of {target}: {os.strerror(err)}")


def unmount(target: str | Path) -> None:
    """Unmount everything stacked on `target`; a busy mount is detached lazily.

    A lazy detach is what kubelet needs: the path must stop being a mount
    point now, and open files in a dying container keep working until closed.
    """
    dst = os.fsencode(str(target))
    for _ in range(16):
        if not is_mounted(target):
            return
        if _libc.umount2(dst, 0) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL and not is_mounted(target):
                return
            if err == errno.EBUSY:
                _check(_libc.umount2(dst, MNT_DETACH), f"detach {target}")
            elif err != errno.EINVAL:
                raise MountError(f"unmount {target}: {os.strerror(err)}")
    if is_mounted(target):
        raise MountError(f"unmount {target}: still mounted after 16 attempts")
