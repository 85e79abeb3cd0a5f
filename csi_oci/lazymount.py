"""Lazy image mounts: one FUSE server process per image, shared by its volumes.

pyfuse3 holds one FUSE session per process, and a FUSE mount dies with its
server, so each lazily served image gets its own `python -m csi_oci.lazyfs`
process, started in its own session: stopping or restarting the gRPC
server leaves it (and every volume bound to it) serving. Volumes are bind
mounts of its mount point, like unpacked trees. When the last volume of an
image is unpublished, the mount point is unmounted and the server exits.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from csi_oci import mounts
from csi_oci.credentials import Credentials
from csi_oci.errors import FailedPrecondition, MountError
from csi_oci.lazy import lazy_format
from csi_oci.puller import ResolvedImage
from csi_oci.store import Store

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse")


class LazyMounts:
    def __init__(self, store: Store, registry_config: Path | None) -> None:
        self.store = store
        self.registry_config = registry_config
        self.root = store.root / "lazy"
        # Credentials of running images, kept in memory only (never on disk
        # past the server's start) so a server that died can be restarted.
        self._credentials: dict[str, Credentials | None] = {}

    def mountpoint(self, digest: str) -> Path:
        return self.root / digest.partition(":")[2] / "mnt"

    @property
    def chunk_cache(self) -> Path:
        """Verified pieces, by digest, shared by every lazily served layer."""
        return self.root / "chunks"

    def ensure(
        self, resolved: ResolvedImage, credentials: Credentials | None, prefetch: str = "all"
    ) -> Path:
        """The image's FUSE mount point, starting its server if needed."""
        mnt = self.mountpoint(resolved.digest)
        if mounts.is_mounted(mnt):
            return mnt
        manifest = resolved.manifest
        if manifest is None:
            raise FailedPrecondition(f"{resolved.reference}: manifest needed to serve it lazily")
        layers = []
        for index, desc in enumerate(manifest.layers):
            fmt = lazy_format(desc.media_type, desc.annotations)
            if fmt is None:
                raise FailedPrecondition(
                    f"mode lazy: layer {index + 1} of {resolved.reference} ({desc.digest}, "
                    f"{desc.media_type}) has no eStargz or zstd:chunked TOC digest annotation, "
                    "so it cannot be read lazily and verified; use mode auto or unpack"
                )
            layers.append(
                {
                    "digest": desc.digest,
                    "size": desc.size,
                    "media_type": desc.media_type,
                    "annotations": desc.annotations,
                }
            )
        if not fuse_available():
            raise FailedPrecondition("mode lazy needs /dev/fuse on the node")
        mnt.mkdir(parents=True, exist_ok=True)
        image = {
            "reference": str(resolved.reference),
            "layers": layers,
            "registry_config": str(self.registry_config) if self.registry_config else None,
            "cache_dir": str(self.chunk_cache),
            "prefetch": prefetch,
        }
        (mnt.parent / "image.json").write_text(json.dumps(image))  # to restart it later
        self._credentials[resolved.digest] = credentials
        return self._start(resolved.digest, image, credentials)

    def _start(
        self, digest: str, image: dict[str, object], credentials: Credentials | None
    ) -> Path:
        mnt = self.mountpoint(digest)
        reference = image["reference"]
        spec_path = mnt.parent / "spec.json"
        spec = {
            **image,
            "credentials": (
                {"username": credentials.username, "password": credentials.password}
                if credentials
                else None
            ),
        }
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
        log_path = mnt.parent / "lazyfs.log"
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "csi_oci.lazyfs",
                    str(mnt),
                    "--registry-spec",
                    str(spec_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,  # outlives a restart of the gRPC server
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if mounts.is_mounted(mnt):
                log.info("serving %s lazily at %s (pid %d)", reference, mnt, proc.pid)
                return mnt
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        spec_path.unlink(missing_ok=True)
        tail = log_path.read_text(errors="replace")[-800:] if log_path.exists() else ""
        if proc.poll() is None:
            proc.kill()
        raise MountError(f"the lazy filesystem for {reference} did not start: {tail.strip()}")

    def alive(self, digest: str) -> bool:
        """Mounted and answering (a dead server's mount gives ENOTCONN at once)."""
        mnt = self.mountpoint(digest)
        if not mounts.is_mounted(mnt):
            return False
        try:
            # statfs always reaches the server; stat may be answered from the
            # kernel's attribute cache (timeouts are long: content is immutable).
            os.statvfs(mnt)
            return True
        except OSError:
            return False

    def revive(self, digest: str) -> Path:
        """Restart the server of an image whose server died; the new mount point."""
        mnt = self.mountpoint(digest)
        if mounts.is_mounted(mnt):
            mounts.unmount(mnt)  # the stale mount (ENOTCONN) is detached
        image = json.loads((mnt.parent / "image.json").read_text())
        log.warning("the lazy filesystem of %s died; starting it again", image.get("reference"))
        return self._start(digest, image, self._credentials.get(digest))

    def release(self, digest: str) -> None:
        """Unmount the image's FUSE mount (its server then exits)."""
        mnt = self.mountpoint(digest)
        self._credentials.pop(digest, None)
        if mounts.is_mounted(mnt):
            mounts.unmount(mnt)
            log.info("stopped serving %s lazily", digest)
