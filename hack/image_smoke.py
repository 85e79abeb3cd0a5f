"""Smoke test run INSIDE the built csi-oci image (by hack/build-image).

Starts `csi-oci serve` the way the manifests do (one role per call), talks
CSI to it over its unix socket with the image's own grpc and generated stubs,
stops it with SIGTERM and prints one JSON line: what answered, plus what the
image's Python environment holds (interpreter, distributions and their sizes).
Exits non-zero when anything is off, so the build script fails.

Usage (inside the image): python image_smoke.py node|controller
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from csi_oci.csi.v1 import csi_pb2, csi_pb2_grpc

SOCKET_WAIT_SECONDS = 30.0
STOP_WAIT_SECONDS = 25.0


def _distributions() -> list[dict[str, object]]:
    """Installed distributions with the bytes of the files they own."""
    found = []
    for dist in importlib.metadata.distributions():
        size = 0
        for file in dist.files or []:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                size += path.stat().st_size
        found.append({"name": dist.metadata["Name"], "version": dist.version, "bytes": size})
    return sorted(found, key=lambda d: str(d["name"]).lower())


def _wait_for_socket(path: Path, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + SOCKET_WAIT_SECONDS
    while not path.exists():
        if server.poll() is not None:
            raise SystemExit(f"csi-oci serve exited with {server.returncode} before listening")
        if time.monotonic() > deadline:
            raise SystemExit(f"csi-oci serve did not create {path} in {SOCKET_WAIT_SECONDS} s")
        time.sleep(0.1)


def _free_port() -> int:
    # The image runs on the build machine's network (buildah chroot isolation):
    # a fixed port such as the default :9808 could be taken there.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthz(address: str) -> int:
    with urllib.request.urlopen(f"http://{address}/healthz", timeout=10) as response:
        return response.status


def _talk_csi(endpoint: str, role: str) -> dict[str, object]:
    with grpc.insecure_channel(endpoint) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        identity = csi_pb2_grpc.IdentityStub(channel)
        info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
        probe = identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
        answers: dict[str, object] = {
            "plugin": info.name,
            "vendor_version": info.vendor_version,
            "ready": probe.ready.value if probe.HasField("ready") else None,
        }
        if role == "node":
            node = csi_pb2_grpc.NodeStub(channel)
            answers["node_id"] = node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10).node_id
        else:
            controller = csi_pb2_grpc.ControllerStub(channel)
            caps = controller.ControllerGetCapabilities(
                csi_pb2.ControllerGetCapabilitiesRequest(), timeout=10
            )
            answers["controller_capabilities"] = [
                csi_pb2.ControllerServiceCapability.RPC.Type.Name(c.rpc.type)
                for c in caps.capabilities
            ]
    return answers


def main() -> int:
    role = sys.argv[1] if len(sys.argv) > 1 else "controller"
    if role not in ("node", "controller"):
        raise SystemExit("usage: image_smoke.py node|controller")
    # /tmp of the container: writable for the unprivileged controller user too.
    work = Path(tempfile.mkdtemp(prefix="csi-oci-smoke-"))
    socket_path = work / "csi.sock"
    endpoint = f"unix://{socket_path}"
    metrics_address = f"127.0.0.1:{_free_port()}"
    command = [
        "csi-oci",
        "serve",
        f"--mode={role}",
        f"--endpoint={endpoint}",
        f"--state-dir={work / 'state'}",
        "--node-id=image-smoke",
        f"--metrics-address={metrics_address}",
    ]
    server = subprocess.Popen(command)
    try:
        _wait_for_socket(socket_path, server)
        answers = _talk_csi(endpoint, role)
        answers["healthz_status"] = _healthz(metrics_address)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        exit_code = server.wait(timeout=STOP_WAIT_SECONDS)
    report = {
        "role": role,
        "uid": os.getuid(),
        "command": command,
        "answers": answers,
        "exit_code_after_sigterm": exit_code,
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "distributions": _distributions(),
    }
    print(json.dumps(report))
    ok = answers["plugin"] == "oci.csi.dev" and answers["healthz_status"] == 200 and exit_code == 0
    if role == "node":
        ok = ok and answers["node_id"] == "image-smoke"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
