"""Small state files: written atomically, read defensively, flushed with syncfs."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    """Flush the filesystem holding `path` (one call instead of fsync per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any, *, durable: bool = True) -> None:
    """Write JSON so readers see the old file or the new one, never half.

    `durable=False` skips the fsync, for records whose meaning ends with
    the boot (volume records: a power loss takes the mounts too) or that
    are rebuilt when lost (tag resolutions). On a busy pull that fsync is
    a journal commit waiting behind the writeback of gigabytes just
    written: 0.1-0.7 s per record at 4 GiB (hack/bench). A record torn by
    a power loss reads as unreadable and is ignored (`read_json`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable state file %s: %s", path, exc)
        return None
