"""In-root path rules: how a name from an image becomes a place under the image root.

Every name an image (or a TOC, or an annotation) gives is split and checked
here before it touches the disk (no `..`, no NUL, bounded length and depth),
and every directory on the way is opened relative to the root's descriptor
with no-follow opens, symlinks resolved inside the root: a hostile name or
link can never reach outside it. Used by the tar applier, the artifact
layouts, subPath resolution and the lazy TOC parsers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable

from csi_oci.errors import InvalidLayer

MAX_SYMLINK_HOPS = 40  # as Linux's MAXSYMLINKS


MAX_NAME_BYTES = 255


MAX_PATH_BYTES = 4096


MAX_DEPTH = 256


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _encoded(name: str, what: str) -> bytes:
    """A name's bytes on disk. Tar names arrive surrogate-escaped (any bytes);
    names from JSON (TOCs, annotations) may hold lone surrogates that are no
    bytes at all (the fuzzer's `"\\ud800"`): refused, not a crash."""
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise InvalidLayer(f"{what} {name[:64]!r}: name is not valid UTF-8") from None


def split_member_name(name: str, what: str = "entry") -> list[str]:
    """Clean a tar member name into path components relative to the root.

    Leading `/` and `./` are dropped (absolute names are rooted at the
    image root, as in every image tool). `..` is refused.
    """
    if "\0" in name:
        raise InvalidLayer(f"{what} {name!r}: name contains a NUL byte")
    if len(_encoded(name, what)) > MAX_PATH_BYTES:
        raise InvalidLayer(f"{what} {name[:64]!r}...: path longer than {MAX_PATH_BYTES} bytes")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise InvalidLayer(f"{what} {name!r}: '..' in a path is not allowed")
        if len(_encoded(part, what)) > MAX_NAME_BYTES:
            raise InvalidLayer(f"{what} {name[:64]!r}: a path component is longer than 255 bytes")
    if len(parts) > MAX_DEPTH:
        raise InvalidLayer(f"{what} {name[:64]!r}...: deeper than {MAX_DEPTH} directories")
    return parts


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def resolve_dir(
    root_fd: int,
    parts: list[str],
    *,
    create: bool,
    on_create: Callable[[], None] | None = None,
) -> int | None:
    """Open the directory at `parts` inside the root, following symlinks in-root.

    Missing directories are created (0755) when `create`, else None is
    returned; `on_create` is called before each one is made (a budget
    charges it, and may refuse it). A component that exists but is not a directory (after
    in-root symlink resolution) is an InvalidLayer error. The caller closes
    the returned descriptor.
    """
    stack = [os.dup(root_fd)]  # fds of the directories from the root down
    todo = list(parts)
    hops = 0
    try:
        while todo:
            name = todo.pop(0)
            if name in ("", "."):
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            cur = stack[-1]
            st = _lstat_at(cur, name)
            if st is None:
                if not create:
                    return None
                if on_create is not None:
                    on_create()
                with contextlib.suppress(FileExistsError):  # a parallel layer made it
                    os.mkdir(name, 0o755, dir_fd=cur)
                st = os.stat(name, dir_fd=cur, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise InvalidLayer(
                        f"too many levels of symbolic links under {'/'.join(parts)!r}"
                    )
                target = os.readlink(name, dir_fd=cur)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                todo = target.split("/") + todo
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise InvalidLayer(f"{'/'.join(parts)!r}: {name!r} on the way is not a directory")
            stack.append(os.open(name, _DIR_FLAGS, dir_fd=cur))
        return stack.pop()
    finally:
        for fd in stack:
            os.close(fd)


def open_in_root(root_fd: int, path: str) -> int | None:
    """O_PATH descriptor of `path` inside the root (all components resolved in-root).

    Used to bind-mount a subPath: mounting `/proc/self/fd/N` mounts exactly
    the directory we resolved, so a symlink in the image cannot redirect the
    mount to a host path. Returns None when the path does not exist.
    """
    parts = split_member_name(path, "subPath")
    fd = resolve_dir(root_fd, parts, create=False)
    if fd is None:
        return None
    try:
        return os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def remove_at(dir_fd: int, name: str) -> bool:
    """Remove `name` (file, link or whole directory) without following links."""
    st = _lstat_at(dir_fd, name)
    if st is None:
        return False
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)
    return True
