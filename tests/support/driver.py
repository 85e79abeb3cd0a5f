"""Run the real `csi-oci serve` as a subprocess and talk CSI to it over its socket.

The driver runs exactly as a DaemonSet would run it (same entry point,
unix socket, state dir on disk), so tests also cover start-up, signal
handling, logging and restarts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from csi_oci.csi.v1 import csi_pb2, csi_pb2_grpc

MOUNT_CAP = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(),
    access_mode=csi_pb2.VolumeCapability.AccessMode(
        mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    ),
)


class Driver:
    """A `csi-oci serve` process with gRPC stubs bound to its socket.

    Used by the tests (tests/conftest.py: ``driver``, ``make_driver``), the
    demo (hack/demo.py) and the benchmark (bench/).  ``metrics_address=None``
    leaves ``--metrics-address`` out (the driver's own default); ``program`` is
    the command that runs csi-oci (default: this interpreter, ``-m
    csi_oci.cli``); ``new_session`` starts it in a session of its own (no
    terminal signals, and it may outlive this process).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        mode: str = "all",
        state_dir: Path | None = None,
        extra_args: list[str] | None = None,
        node_id: str = "test-node",
        metrics_address: str | None = "",
        program: Sequence[str] | None = None,
        new_session: bool = False,
        start_timeout: float = 30,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket = self.workdir / "csi.sock"
        self.state_dir = state_dir or self.workdir / "state"
        self.log_path = self.workdir / "driver.log"
        self.mode = mode
        self.node_id = node_id
        self.extra_args = list(extra_args or [])
        # Off unless asked for: the default port (:9808) would clash between
        # drivers running at once (and with other test runs on the machine).
        self.metrics_address = metrics_address
        self.program = list(program or [sys.executable, "-m", "csi_oci.cli"])
        self.new_session = new_session
        self.start_timeout = start_timeout
        self.cmd: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        self.start()

    def start(self) -> None:
        cmd = [
            *self.program,
            "serve",
            "--state-dir",
            str(self.state_dir),
            "--endpoint",
            f"unix://{self.socket}",
            "--node-id",
            self.node_id,
            "--mode",
            self.mode,
        ]
        if self.metrics_address is not None:
            cmd += ["--metrics-address", self.metrics_address]
        self.cmd = cmd = [*cmd, *self.extra_args]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=self.new_session,
        )
        log.close()
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        ready = grpc.channel_ready_future(self.channel)
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                ready.result(timeout=0.1)
                break
            except grpc.FutureTimeoutError:
                code = self.proc.poll()
                if code is None and time.monotonic() < deadline:
                    continue
            self.kill()
            why = f" (exited with code {code})" if code is not None else ""
            raise RuntimeError(f"driver did not start{why}:\n{self.log_text()[-3000:]}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 25) -> str:
        """The last `lines` lines of the driver's log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait: the clean shutdown path."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill looks like."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self, *, hard: bool = False) -> None:
        if hard:
            self.kill()
        else:
            self.stop()
        self.start()

    # -- CSI calls ----------------------------------------------------------------

    def create_volume(self, name: str, parameters: dict[str, str]) -> csi_pb2.Volume:
        resp = self.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=name, volume_capabilities=[MOUNT_CAP], parameters=parameters
            )
        )
        return resp.volume

    def publish(
        self,
        target: Path,
        attrs: dict[str, str],
        *,
        volume_id: str = "vol-1",
        secrets: dict[str, str] | None = None,
        readonly: bool = False,
        capability: csi_pb2.VolumeCapability = MOUNT_CAP,
        timeout: float = 120,
    ) -> csi_pb2.NodePublishVolumeResponse:
        return self.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume_id,
                target_path=str(target),
                volume_capability=capability,
                readonly=readonly,
                volume_context=attrs,
                secrets=secrets or {},
            ),
            timeout=timeout,
        )

    def unpublish(self, target: Path, *, volume_id: str = "vol-1") -> None:
        self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
        )


def mount_options(path: Path) -> set[str] | None:
    """Per-mount options of the mount at `path`, from /proc/self/mountinfo."""
    target = os.path.normpath(str(path))
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            if fields[4] == target:
                found = set(fields[5].split(","))
    return found


def wait_for(predicate: object, timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False


def settled(count: object, expected: int, timeout: float = 5.0) -> int:
    """`count()` once it reaches `expected` (or after `timeout`): registries log
    a request only after its response is complete, so the last line can lag."""
    wait_for(lambda: count() >= expected, timeout=timeout)  # type: ignore[operator]
    return count()  # type: ignore[operator]


def tree_of(root: Path) -> dict[str, object]:
    """path -> bytes (files), '->target' (symlinks) or 'dir', for exact comparisons."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            if full.is_symlink():
                out[rel] = "->" + os.readlink(full)
            elif full.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = full.read_bytes()
    return out


class LazyServerProcess:
    """`csi-oci lazy-server` on a state dir, as the DaemonSet's second container."""

    def __init__(self, state_dir: Path, runtime_dir: Path, log_path: Path) -> None:
        self.state_dir, self.runtime_dir, self.log_path = state_dir, runtime_dir, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "csi_oci.cli",
                    "lazy-server",
                    "--state-dir",
                    str(self.state_dir),
                    "--runtime-dir",
                    str(self.runtime_dir),
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        socket_path = self.state_dir / "lazy" / "lazy-server.sock"
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log_text()
            time.sleep(0.05)

    def fuse_pids(self) -> list[int]:
        """The live FUSE servers of this state dir (each writes its pid file)."""
        return fuse_pids(self.state_dir)

    def kill_container(self) -> None:
        """SIGKILL the lazy-server and all its FUSE servers: a container restart."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        for pid in self.fuse_pids():
            os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def fuse_log_text(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in (self.state_dir / "lazy").glob("*/lazyfs.log")
        )


def fuse_pids(state_dir: Path) -> list[int]:
    found = []
    for pid_file in (state_dir / "lazy").glob("*/server.pid"):
        pid = int(pid_file.read_text())
        try:
            if b"csi_oci.lazy.fs" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue  # exited
    return found
