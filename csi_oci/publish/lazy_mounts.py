"""Lazy image mounts: one FUSE server process per image, shared by its volumes.

pyfuse3 holds one FUSE session per process, and a FUSE mount dies with its
server, so each lazily served image gets its own `python -m csi_oci.lazy.fs`
process. Volumes are bind mounts of its mount point, like unpacked trees.
When the last volume of an image is unpublished, the mount point is
unmounted and the server exits.

What an image needs to be served is kept as desired state on disk, so
whoever starts the servers can start them again after any crash:

    <state>/lazy/<hex>/image.json    reference, layers, prefetch (no secrets)
    <state>/lazy/<hex>/mnt           the FUSE mount point
    <state>/lazy/<hex>/error         why the last start failed (external mode)
    <runtime>/<store-id>-<hex>.json  registry credentials, 0600, on tmpfs

Credentials live under the runtime directory (`/run/csi-oci`, a tmpfs on
the host), the way kubelet keeps secret volumes: they outlive a container
restart, so a dead server can be restarted with the pod's credentials, but
never reach the node's disk and vanish at reboot (when kubelet publishes
every volume again with fresh secrets).

Who starts the servers:
  * inline (CLI, single-container installs): this process, in a new session
    so stopping the gRPC server leaves them serving;
  * external (the DaemonSet): the `csi-oci lazy-server` process in its own
    container (csi_oci.publish.lazy_server). This process writes the desired state,
    wakes the lazy-server with a datagram, and waits for the mount.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

from csi_oci.errors import CsiOciError, FailedPrecondition, MountError, error_from_record
from csi_oci.lazy.reader import lazy_format
from csi_oci.publish import mounts
from csi_oci.pull.resolve import ResolvedImage
from csi_oci.spec.credentials import Credentials
from csi_oci.storage.atomic import read_json, write_json_atomic
from csi_oci.storage.store import Store

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0
START_ERROR_FILE = "start-error.json"  # written by a FUSE server that cannot start
DEFAULT_RUNTIME_DIR = Path("/run/csi-oci")
WAKE_SOCKET = "lazy-server.sock"


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse")


class LazyMounts:
    def __init__(
        self,
        store: Store,
        registry_config: Path | None,
        *,
        runtime_dir: Path | None = None,
        external: bool = False,
    ) -> None:
        self.store = store
        self.registry_config = registry_config
        self.root = store.root / "lazy"
        self.runtime_dir = runtime_dir or DEFAULT_RUNTIME_DIR
        self.external = external
        # Several drivers (tests, or two state dirs) may share the runtime dir.
        self._store_id = hashlib.sha256(str(store.root.resolve()).encode()).hexdigest()[:12]
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._standby: subprocess.Popen[bytes] | None = None
        self._standby_lock = threading.Lock()
        self._keep_standby = False

    # -- paths -----------------------------------------------------------------

    def server_dir(self, key: str) -> Path:
        """One image's directory: desired state, mount point, stats file, log."""
        return self.root / key.partition(":")[2]

    def mountpoint(self, key: str) -> Path:
        return self.server_dir(key) / "mnt"

    def _credentials_path(self, key: str) -> Path:
        return self.runtime_dir / f"{self._store_id}-{key.partition(':')[2]}.json"

    @property
    def chunk_cache(self) -> Path:
        """Verified pieces, by digest, shared by every lazily served layer."""
        return self.root / "chunks"

    @property
    def wake_socket(self) -> Path:
        return self.root / WAKE_SOCKET

    # -- desired state -----------------------------------------------------------

    def requested(self) -> list[str]:
        """Keys (digest, plus include set) of every image that should be served."""
        if not self.root.is_dir():
            return []
        return sorted(
            f"sha256:{d.name}" for d in self.root.iterdir() if (d / "image.json").is_file()
        )

    def ensure(
        self, resolved: ResolvedImage, credentials: Credentials | None, prefetch: str = "all"
    ) -> Path:
        """The image's FUSE mount point, starting its server if needed."""
        key = resolved.key  # the digest, plus the include set if any: one server each
        if self.alive(key):
            return self.mountpoint(key)
        image = self._image_spec(resolved, prefetch)
        if not fuse_available():
            raise FailedPrecondition("mode lazy needs /dev/fuse on the node")
        self.mountpoint(key).mkdir(parents=True, exist_ok=True)
        self._save_credentials(key, credentials)
        write_json_atomic(self.server_dir(key) / "image.json", image)
        if self.external:
            return self._wait_for_lazy_server(key, str(resolved.reference))
        return self.start(key)

    def _image_spec(self, resolved: ResolvedImage, prefetch: str) -> dict[str, object]:
        manifest = resolved.manifest
        if manifest is None:
            raise FailedPrecondition(f"{resolved.reference}: manifest needed to serve it lazily")
        layers = []
        for index, desc in enumerate(manifest.layers):
            if lazy_format(desc.media_type, desc.annotations) is None:
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
        return {
            "digest": resolved.digest,
            "key": resolved.key,
            "include": list(resolved.include),
            "reference": str(resolved.reference),
            "layers": layers,
            "registry_config": str(self.registry_config) if self.registry_config else None,
            "cache_dir": str(self.chunk_cache),
            "records_dir": str(self.store.root / "volumes"),
            "prefetch": prefetch,
        }

    def _save_credentials(self, key: str, credentials: Credentials | None) -> None:
        path = self._credentials_path(key)
        if credentials is None:
            path.unlink(missing_ok=True)
            return
        self.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.runtime_dir, 0o700)  # also when kubelet made the hostPath 0755
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"username": credentials.username, "password": credentials.password}, f)
        os.rename(tmp, path)

    # -- running servers -----------------------------------------------------------

    def start(self, key: str) -> Path:
        """(Re)start the image's FUSE server from its desired state; the mount point."""
        mnt = self.mountpoint(key)
        image = read_json(self.server_dir(key) / "image.json")
        if image is None:
            raise MountError(f"{key} is not requested to be served lazily")
        old = self._children.pop(key, None)
        if old is not None and old.poll() is None:
            old.kill()
            old.wait()
        if mounts.is_mounted(mnt):
            mounts.unmount(mnt)  # a dead server's mount (ENOTCONN) is detached
        mnt.mkdir(parents=True, exist_ok=True)
        start_error = mnt.parent / START_ERROR_FILE
        start_error.unlink(missing_ok=True)
        log_path = mnt.parent / "lazyfs.log"
        creds = self._credentials_path(key)
        spec = mnt.parent / "image.json"
        credentials = str(creds) if creds.exists() else None
        job = {
            "mountpoint": str(mnt),
            "registry_spec": str(spec),
            "credentials": credentials,
            "log": str(log_path),
            "error_file": str(start_error),
        }
        proc = self._give_to_standby(job)
        if proc is None:
            command = [
                sys.executable,
                "-m",
                "csi_oci.lazy.fs",
                str(mnt),
                "--registry-spec",
                str(spec),
            ]
            if credentials:
                command += ["--credentials", credentials]
            command += ["--error-file", str(start_error)]
            with open_private_log(log_path) as log_file:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    start_new_session=True,  # outlives a restart of whoever started it
                )
        self._children[key] = proc
        if self._keep_standby:
            self.prepare_standby()  # for the next image, while this one starts
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if mounts.is_mounted(mnt):
                log.info("serving %s lazily at %s (pid %d)", image["reference"], mnt, proc.pid)
                return mnt
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        recorded = read_json(start_error)
        if isinstance(recorded, dict) and recorded.get("message"):
            raise error_from_record(
                recorded.get("kind"),
                f"cannot serve {image['reference']} lazily: {recorded['message']}",
            )
        tail = log_path.read_text(errors="replace")[-800:] if log_path.exists() else ""
        raise MountError(
            f"the lazy filesystem for {image['reference']} did not start: {_last_error(tail)}"
        )

    def prepare_standby(self) -> None:
        """Keep one FUSE server process started and loaded, waiting for an image.

        Long-lived parents (the gRPC server, the lazy-server) call this once;
        from then on every start hands its job to the waiting process and a
        new one is prepared. Its stdin is a pipe from this process: when this
        process dies, the standby sees end of input and exits.
        """
        self._keep_standby = True
        if not fuse_available():
            return
        with self._standby_lock:
            if self._standby is not None and self._standby.poll() is None:
                return
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                with open_private_log(self.root / "standby.log") as log_file:
                    self._standby = subprocess.Popen(
                        [sys.executable, "-m", "csi_oci.lazy.fs", "--standby"],
                        stdin=subprocess.PIPE,
                        stdout=log_file,
                        stderr=log_file,
                        start_new_session=True,
                    )
            except OSError as exc:  # lazy starts just cost a process start then
                log.warning("no standby FUSE server: %s", exc)

    def _give_to_standby(self, job: dict[str, str | None]) -> subprocess.Popen[bytes] | None:
        with self._standby_lock:
            proc, self._standby = self._standby, None
        if proc is None or proc.poll() is not None or proc.stdin is None:
            return None
        try:
            proc.stdin.write(json.dumps(job).encode() + b"\n")
            proc.stdin.close()
        except OSError:
            proc.kill()
            return None
        return proc

    def reap(self) -> None:
        """Collect servers that exited (no zombies in a long-lived parent)."""
        for key, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[key]

    def alive(self, key: str) -> bool:
        """Mounted and answering (a dead server's mount gives ENOTCONN at once)."""
        return mounts.is_answering(self.mountpoint(key))

    def revive(self, key: str) -> Path:
        """Restart the server of an image whose server died; the new mount point."""
        image = read_json(self.server_dir(key) / "image.json") or {}
        log.warning("the lazy filesystem of %s died; starting it again", image.get("reference"))
        return self.start(key)

    def release(self, key: str) -> None:
        """Stop serving the image: forget its desired state, unmount (the server exits)."""
        (self.server_dir(key) / "image.json").unlink(missing_ok=True)
        (self.server_dir(key) / "error").unlink(missing_ok=True)
        self._credentials_path(key).unlink(missing_ok=True)
        mnt = self.mountpoint(key)
        server = _server_pid(mnt.parent)
        if mounts.is_mounted(mnt):
            mounts.unmount(mnt)
            log.info("stopped serving %s lazily", key)
        proc = self._children.pop(key, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(RELEASE_WAIT)
        if server is not None:
            # Synchronous: when the last unpublish returns, the server is gone,
            # even if it was started by an earlier driver (not our child) and
            # this driver stops right away.
            _finish(server, RELEASE_WAIT)

    # -- external mode ------------------------------------------------------------

    def record_error(self, key: str, exc: CsiOciError) -> None:
        """The lazy-server's answer to a failed start, for the waiting publish."""
        record = {"kind": type(exc).__name__, "message": str(exc), "at": time.time()}
        write_json_atomic(self.server_dir(key) / "error", record)

    def _wait_for_lazy_server(self, key: str, reference: str) -> Path:
        error_path = self.server_dir(key) / "error"
        error_path.unlink(missing_ok=True)
        deadline = time.monotonic() + START_TIMEOUT
        next_wake = 0.0
        while time.monotonic() < deadline:
            if self.alive(key):
                return self.mountpoint(key)
            error = read_json(error_path)
            if isinstance(error, dict):
                raise error_from_record(error.get("kind"), str(error.get("message")))
            if time.monotonic() >= next_wake:
                self.wake()
                next_wake = time.monotonic() + 0.5
            time.sleep(0.02)
        raise MountError(
            f"the lazy filesystem for {reference} did not start within {START_TIMEOUT:.0f} s: "
            "is the lazy-server container (`csi-oci lazy-server`) running on this node?"
        )

    def wake(self) -> None:
        """Nudge the lazy-server to look at the desired state now."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.sendto(b"wake", str(self.wake_socket))
            except OSError:
                pass  # not (yet) running: it polls when it starts


def open_private_log(path: Path) -> BinaryIO:
    """A log file only root may read (0600): FUSE servers log registry errors."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # also a file an older version made 0644
    return os.fdopen(fd, "ab")


def _last_error(log_tail: str) -> str:
    """The most telling line of a server's log (its last error, else its last line)."""
    lines = [line for line in log_tail.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if " ERROR " in line or "Error" in line:
            return line.strip()
    return lines[-1].strip() if lines else "no output"


RELEASE_WAIT = 5.0  # seconds a FUSE server has to exit after its unmount


def _server_pid(image_dir: Path) -> int | None:
    """The pid of the FUSE server serving from `image_dir`, if it runs here.

    Checked by its command line, so a recycled pid is never signalled; in
    the DaemonSet the lazy-server container's processes are not visible
    from the driver's, and this finds none.
    """
    try:
        pid = int((image_dir / "server.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"csi_oci.lazy.fs" in cmdline else None


def _finish(pid: int, timeout: float) -> None:
    """Wait for an unmounted FUSE server to exit; stop it if it does not."""
    import signal

    deadline = time.monotonic() + timeout
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if not _running(pid):
                return
            time.sleep(0.02)
    log.warning("FUSE server %d did not exit after its unmount", pid)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a child of someone else that has not reaped it yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
