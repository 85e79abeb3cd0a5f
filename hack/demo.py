#!/usr/bin/env python3
"""csi-oci end-to-end demo: an OCI model image published as a read-only CSI volume.

What it does, all on this machine and in a few seconds:

1. starts a real loopback registry (``docker-registry``) in a temp dir;
2. builds a small sample model image ``demo/tiny-model:v1`` (config.json,
   tokenizer.json, a safetensors weights file of deterministic pseudo-random
   bytes, README.md; one gzip and one zstd layer) and pushes it over the
   registry's HTTP API (monolithic blob uploads, then the manifest);
3. starts ``csi-oci serve --mode all`` on a unix socket;
4. plays the container orchestrator over the CSI gRPC API: GetPluginInfo,
   Probe, CreateVolume, NodePublishVolume (timed), then inspects the mount
   (file tree, sha256 of every file against what was built, mount options,
   a write that must fail), NodeUnpublishVolume and DeleteVolume;
5. stops the driver (SIGTERM) and the registry and removes the temp dir.

Needs root (NodePublishVolume bind-mounts) and what ``hack/install-deps demo``
installs (docker-registry, fuse3, the venv with csi-oci).  Run it with the project's venv::

    .venv/bin/python -m hack.demo [--keep] [--image-size-mib N]

from the repository root (hack/quickstart does): the registry, the image
builders and the driver wrapper are the tests' own (``tests.support``).

Exits 0 on success, 1 with a message saying what failed otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from csi_oci.csi.v1 import csi_pb2
from csi_oci.publish.mounts import mounts_at, read_mountinfo, unmount
from csi_oci.spec.attributes import KEY_IMAGE, KEY_SUB_PATH, node_platform
from tests.support.driver import MOUNT_CAP, Driver
from tests.support.images import (
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_LAYER_ZSTD,
    Dir,
    File,
    Image,
    Layer,
    sha256_digest,
)
from tests.support.registry import ACCEPT_MANIFESTS, Registry, missing_tools

REPO = Path(__file__).resolve().parent.parent
INSTALL_HINT = "run hack/install-deps demo (as root) to install what the demo needs"
REPO_NAME = "demo/tiny-model"
TAG = "v1"
MODEL_DIR = "models/tiny-model"  # where the files live inside the image
SUB_PATH = "models"  # what the volume exposes (so the mount shows tiny-model/)
VOLUME_NAME = "demo-pvc"
NODE_ID = "demo-node"
RPC_TIMEOUT = 60.0
PUBLISH_TIMEOUT = 110.0
SOCKET_TIMEOUT = 30.0

_t0 = time.monotonic()


class DemoError(Exception):
    """A step failed; the message says which and why."""


# -- output ----------------------------------------------------------------------

_COLOR = sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _style(code: str, text: str) -> str:
    return f"\033[{code}m{text}\033[0m" if _COLOR else text


class Steps:
    def __init__(self, total: int) -> None:
        self.total = total
        self.n = 0

    def start(self, title: str) -> None:
        self.n += 1
        print(_style("1", f"[{self.n}/{self.total}] {title}"), flush=True)


def say(text: str = "") -> None:
    for line in text.splitlines() or [""]:
        print(f"      {line}", flush=True)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def short(digest: str, n: int = 12) -> str:
    algo, _, hexd = digest.partition(":")
    return f"{algo}:{hexd[:n]}" if hexd else digest[:n]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the sample model ----------------------------------------------------------------


def pseudo_random(n: int, seed: bytes) -> bytes:
    """n deterministic, incompressible bytes (SHAKE-256 of a seed)."""
    return hashlib.shake_256(seed).digest(n)


def make_safetensors(size_mib: int) -> bytes:
    """A valid-looking safetensors file of about ``size_mib`` MiB.

    Layout: 8-byte little-endian header length, a JSON header (padded with
    spaces to a multiple of 8, as the reference writer does) naming each
    tensor's dtype, shape and byte range, then the tensor data.
    """
    hidden = 256
    rows = size_mib * 1024  # two F16 [rows, hidden] tensors = size_mib MiB
    tensors = [
        ("model.embed_tokens.weight", "F16", [rows, hidden]),
        ("lm_head.weight", "F16", [rows, hidden]),
        ("model.norm.weight", "F32", [hidden]),
    ]
    itemsize = {"F16": 2, "F32": 4}
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "producer": "csi-oci demo"}}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = itemsize[dtype]
        for dim in shape:
            nbytes *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    data = pseudo_random(offset, b"csi-oci demo tiny-model weights")
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


def model_files(size_mib: int) -> dict[str, bytes]:
    """Relative path (inside MODEL_DIR) -> content."""
    config = {
        "architectures": ["TinyForCausalLM"],
        "model_type": "tiny",
        "hidden_size": 256,
        "num_hidden_layers": 0,
        "vocab_size": size_mib * 1024,
        "torch_dtype": "float16",
    }
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", "hello", "world"])}
    tokenizer = {
        "version": "1.0",
        "added_tokens": [{"id": 0, "content": "<pad>", "special": True}],
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
        "pre_tokenizer": {"type": "Whitespace"},
    }
    readme = (
        "# tiny-model\n\n"
        "A sample model image for the csi-oci demo (hack/demo.py).\n\n"
        "The weights are deterministic pseudo-random bytes in safetensors\n"
        "layout; they are not a trained model.  The volume is mounted\n"
        "read-only, so a pod can load the files but never change them.\n"
    )
    return {
        "config.json": (json.dumps(config, indent=2) + "\n").encode(),
        "tokenizer.json": (json.dumps(tokenizer, indent=2) + "\n").encode(),
        "model.safetensors": make_safetensors(size_mib),
        "README.md": readme.encode(),
    }


def build_image(files: dict[str, bytes]) -> Image:
    plat = node_platform()
    small = [name for name in files if name != "model.safetensors"]
    dirs = [Dir("models"), Dir(MODEL_DIR)]
    small_layer = Layer(
        [*dirs, *(File(f"{MODEL_DIR}/{name}", files[name]) for name in small)], "gzip"
    )
    weights_layer = Layer(
        [*dirs, File(f"{MODEL_DIR}/model.safetensors", files["model.safetensors"])], "zstd"
    )
    return Image(
        [small_layer, weights_layer],
        os=plat.os,
        architecture=plat.architecture,
        variant=plat.variant,
        annotations={"org.opencontainers.image.title": "tiny-model (csi-oci demo)"},
    )


# -- pushing over the registry's HTTP API -------------------------------------------


def _path_of(location: str) -> str:
    """A Location header as a path on the registry (it may be an absolute URL)."""
    if "://" in location:
        return "/" + location.split("://", 1)[1].split("/", 1)[1]
    return location


def upload_blob(registry: Registry, repo: str, digest: str, data: bytes) -> None:
    """Monolithic upload: POST an upload session, PUT the bytes with ?digest=."""
    if registry.request("HEAD", f"/v2/{repo}/blobs/{digest}").status_code == 200:
        return  # already there
    start = registry.request("POST", f"/v2/{repo}/blobs/uploads/")
    if start.status_code != 202 or "Location" not in start.headers:
        raise DemoError(f"blob upload to {repo}: POST answered {start.status_code} {start.text}")
    location = _path_of(start.headers["Location"])
    sep = "&" if "?" in location else "?"
    put = registry.request(
        "PUT",
        f"{location}{sep}digest={digest}",
        data=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    if put.status_code != 201:
        raise DemoError(f"blob upload {short(digest)}: PUT answered {put.status_code} {put.text}")


def push_over_http(registry: Registry, image: Image, repo: str, tag: str) -> str:
    """Push the layers and config, then the manifest as ``repo:tag``; return the
    digest of the manifest bytes the registry serves back (checked against its
    ``Docker-Content-Digest``)."""
    for layer in image.layers:
        upload_blob(registry, repo, layer.digest, layer.blob)
    upload_blob(registry, repo, image.config_digest, image.config_bytes)
    put = registry.request(
        "PUT",
        f"/v2/{repo}/manifests/{tag}",
        data=image.manifest_bytes,
        headers={"Content-Type": image.media_type},
    )
    if put.status_code != 201:
        raise DemoError(f"manifest PUT {repo}:{tag} answered {put.status_code} {put.text}")
    got = registry.request(
        "GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT_MANIFESTS}
    )
    if got.status_code != 200:
        raise DemoError(f"manifest GET {repo}:{tag} answered {got.status_code} {got.text}")
    digest = sha256_digest(got.content)
    header = got.headers.get("Docker-Content-Digest")
    if header and header != digest:
        raise DemoError(f"registry says {header} but the manifest it serves hashes to {digest}")
    return digest


# -- processes -------------------------------------------------------------------------


def start_driver(tmp: Path) -> Driver:
    """`csi-oci serve --mode all` on tmp/csi.sock (state tmp/state, log tmp/driver.log)."""
    csi_oci_bin = REPO / ".venv" / "bin" / "csi-oci"
    if not os.access(csi_oci_bin, os.X_OK):
        raise DemoError(f"{csi_oci_bin} not found; {INSTALL_HINT}")
    try:
        return Driver(
            tmp,
            program=[str(csi_oci_bin)],
            node_id=NODE_ID,
            metrics_address=None,  # the driver's default
            new_session=True,  # no terminal signals; --keep lets it outlive us
            start_timeout=SOCKET_TIMEOUT,
        )
    except RuntimeError as exc:
        raise DemoError(str(exc)) from None


def stop_driver(driver: Driver, timeout: float = 15.0) -> int:
    try:
        return driver.stop(timeout)
    except subprocess.TimeoutExpired:
        driver.kill()
        raise DemoError(f"the driver did not stop within {timeout:.0f}s of SIGTERM") from None


def command_lines(cmd: list[str]) -> str:
    """`$ cmd ...` wrapped at option boundaries, repo paths made relative."""
    words = [shlex.quote(w).replace(str(REPO) + "/", "") for w in cmd]
    lines, current = [], "$"
    for i, word in enumerate(words):
        if word.startswith("-") and i > 0 and len(current) > 40:
            lines.append(current + " \\")
            current = "   "
        current += " " + word
    return "\n".join([*lines, current])


# -- CSI calls ----------------------------------------------------------------------------


def call(name: str, fn: Callable[..., Any], request: Any, timeout: float = RPC_TIMEOUT) -> Any:
    """Make one RPC; a gRPC error becomes a DemoError naming the call and status."""
    try:
        return fn(request, timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        raise DemoError(f"{name} failed: {code.name if code else '?'}: {details}") from None


# -- inspecting the mount ------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def render_tree(root: Path, expected: dict[str, bytes]) -> tuple[list[str], list[str]]:
    """ASCII tree lines (size, sha256 and a check mark per file) and a list of problems."""
    lines = [str(root)]
    problems: list[str] = []
    seen: set[str] = set()

    def visit(directory: Path, prefix: str) -> None:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
        for i, entry in enumerate(entries):
            last = i == len(entries) - 1
            branch = "`-- " if last else "|-- "
            rel = Path(entry.path).relative_to(root).as_posix()
            if entry.is_dir(follow_symlinks=False):
                lines.append(f"{prefix}{branch}{entry.name}/")
                visit(Path(entry.path), prefix + ("    " if last else "|   "))
                continue
            seen.add(rel)
            if not entry.is_file(follow_symlinks=False):
                lines.append(f"{prefix}{branch}{entry.name}  (not a regular file)")
                problems.append(f"{rel}: not a regular file")
                continue
            size = entry.stat(follow_symlinks=False).st_size
            digest = file_sha256(Path(entry.path))
            want = expected.get(rel)
            if want is None:
                mark = "UNEXPECTED"
                problems.append(f"{rel}: not in the image that was built")
            elif sha256_hex(want) != digest or len(want) != size:
                mark = "MISMATCH"
                problems.append(
                    f"{rel}: sha256 {digest} size {size}, built {sha256_hex(want)} size {len(want)}"
                )
            else:
                mark = "ok"
            name = f"{prefix}{branch}{entry.name}"
            lines.append(f"{name:<34} {human(size):>9}  sha256:{digest[:16]}  {mark}")

    visit(root, "")
    for rel in sorted(set(expected) - seen):
        problems.append(f"{rel}: missing from the mount")
    return lines, problems


def describe_safetensors(path: Path) -> list[str]:
    """One line per tensor in a safetensors file's header (as a model loader reads it)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100 << 20:
            raise DemoError(f"{path}: implausible safetensors header length {length}")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    lines = []
    for name, tensor in header.items():
        start, end = tensor["data_offsets"]
        lines.append(
            f"{name:<26} {tensor['dtype']:<4} {tensor['shape']!s:<12} {human(end - start)}"
        )
    return lines


def mount_options(target: Path) -> tuple[set[str], str]:
    entries = mounts_at(target)
    if not entries:
        raise DemoError(f"{target} is not a mount point after NodePublishVolume")
    top = entries[-1]  # the last one stacked on the path is what is visible
    return set(top.options), ",".join(sorted(top.options, key=_option_order))


def _option_order(opt: str) -> tuple[int, str]:
    order = ["ro", "rw", "nosuid", "nodev", "noexec"]
    return (order.index(opt) if opt in order else len(order), opt)


def try_write(target: Path) -> str:
    probe = target / "tiny-model" / "written-by-demo.txt"
    try:
        with open(probe, "w") as f:
            f.write("this must not work\n")
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise DemoError(f"writing {probe} failed, but not with EROFS: {exc}") from None
        return f"open({probe.relative_to(target)}, 'w') -> EROFS ({exc.strerror})"
    with contextlib.suppress(OSError):
        probe.unlink()
    raise DemoError(f"writing {probe} succeeded: the volume is not read-only")


def mounts_under(path: Path) -> list[str]:
    base = str(path).rstrip("/") + "/"
    return [m.mount_point for m in read_mountinfo() if m.mount_point.startswith(base)]


# -- the demo ----------------------------------------------------------------------------


@dataclass
class State:
    tmp: Path
    registry: Registry | None = None
    driver: Driver | None = None
    target: Path | None = None
    published: bool = False
    notes: dict[str, str] = field(default_factory=dict)


def run(args: argparse.Namespace, st: State) -> None:
    steps = Steps(9 if not args.keep else 7)
    tmp = st.tmp

    steps.start("start a loopback registry")
    t = time.monotonic()
    st.registry = registry = Registry(tmp / "registry")
    say(f"docker-registry at {registry.url}, up in {time.monotonic() - t:.2f}s")
    say(f"storage {registry.root}")

    steps.start(f"build and push the sample model image {REPO_NAME}:{TAG}")
    t = time.monotonic()
    files = model_files(args.image_size_mib)
    image = build_image(files)
    digest = push_over_http(registry, image, REPO_NAME, TAG)
    if digest != image.manifest_digest:
        raise DemoError(f"registry holds {digest}, built {image.manifest_digest}")
    image_ref = f"{registry.host}/{REPO_NAME}:{TAG}"
    for i, layer in enumerate(image.layers, 1):
        kind = {MEDIA_TYPE_LAYER_GZIP: "tar+gzip", MEDIA_TYPE_LAYER_ZSTD: "tar+zstd"}.get(
            layer.media_type, layer.media_type
        )
        names = "model.safetensors" if i == 2 else "config.json tokenizer.json README.md"
        say(f"layer {i}  {kind}  {human(layer.size):>9}  {short(layer.digest)}  {names}")
    say(f"pushed {image_ref}")
    say(f"       @{digest}  ({time.monotonic() - t:.2f}s)")
    st.notes["image"] = f"{image_ref}@{short(digest, 16)}"

    steps.start("start the driver")
    t = time.monotonic()
    st.driver = driver = start_driver(tmp)
    say(command_lines(driver.cmd))
    assert driver.proc is not None
    say(f"pid {driver.proc.pid}, socket up in {time.monotonic() - t:.2f}s, log {driver.log_path}")

    steps.start("Identity: GetPluginInfo, Probe")
    info = call("GetPluginInfo", driver.identity.GetPluginInfo, csi_pb2.GetPluginInfoRequest())
    ready = False
    deadline = time.monotonic() + 10
    while not ready:
        probe = call("Probe", driver.identity.Probe, csi_pb2.ProbeRequest())
        ready = probe.HasField("ready") and probe.ready.value
        if not ready:
            if time.monotonic() > deadline:
                raise DemoError("Probe: the driver did not report ready within 10s")
            time.sleep(0.1)
    say(f"driver {info.name} {info.vendor_version}, ready={str(ready).lower()}")
    st.notes["driver"] = f"{info.name} {info.vendor_version}"

    steps.start(f"Controller: CreateVolume {VOLUME_NAME}")
    params = {KEY_IMAGE: image_ref, KEY_SUB_PATH: SUB_PATH}
    created = call(
        "CreateVolume",
        driver.controller.CreateVolume,
        csi_pb2.CreateVolumeRequest(
            name=VOLUME_NAME, volume_capabilities=[MOUNT_CAP], parameters=params
        ),
    )
    volume = created.volume
    say(f"volume_id      {volume.volume_id}")
    for key, value in sorted(volume.volume_context.items()):
        say(f"volume_context {key}={value}")

    # kubelet creates the pod's volume directory; the driver creates `mount`.
    st.target = target = tmp / "pods" / "demo-pod" / "volumes" / "model" / "mount"
    target.parent.mkdir(parents=True)
    steps.start("Node: NodePublishVolume")
    say(f"target {target}")
    t = time.monotonic()
    call(
        "NodePublishVolume",
        driver.node.NodePublishVolume,
        csi_pb2.NodePublishVolumeRequest(
            volume_id=volume.volume_id,
            target_path=str(target),
            volume_capability=MOUNT_CAP,
            readonly=True,
            volume_context=volume.volume_context,
        ),
        timeout=PUBLISH_TIMEOUT,
    )
    publish_s = time.monotonic() - t
    st.published = True
    total_blobs = sum(layer.size for layer in image.layers)
    say(f"published in {publish_s:.2f}s (resolve, pull {human(total_blobs)}, unpack, bind mount)")
    st.notes["publish"] = f"{publish_s:.2f}s"

    steps.start("inspect the volume")
    expected = {f"tiny-model/{name}": data for name, data in files.items()}
    lines, problems = render_tree(target, expected)
    say("\n".join(lines))
    if problems:
        raise DemoError("the mounted files differ from the image:\n  " + "\n  ".join(problems))
    say(f"all {len(expected)} files match the sha256 of what was built")
    say("model.safetensors header, read from the mount:")
    for line in describe_safetensors(target / "tiny-model" / "model.safetensors"):
        say("  " + line)
    opts, opts_text = mount_options(target)
    say(f"mount options (/proc/self/mountinfo): {opts_text}")
    missing = {"ro", "nosuid", "nodev"} - opts
    if missing:
        raise DemoError(f"mount options lack {','.join(sorted(missing))}: {opts_text}")
    say("write test: " + try_write(target) + ", as it should")

    if args.keep:
        keep_running(st)
        return

    steps.start("Node: NodeUnpublishVolume; Controller: DeleteVolume")
    call(
        "NodeUnpublishVolume",
        driver.node.NodeUnpublishVolume,
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(target)),
    )
    if mounts_at(target):
        raise DemoError(f"{target} is still mounted after NodeUnpublishVolume")
    st.published = False
    say(f"unmounted; target directory {'still exists' if target.exists() else 'removed'}")
    call(
        "DeleteVolume",
        driver.controller.DeleteVolume,
        csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id),
    )
    say(f"deleted {volume.volume_id}")

    steps.start("stop the driver and the registry")
    t = time.monotonic()
    code = stop_driver(driver)
    if code != 0:
        raise DemoError(f"the driver exited with code {code} after SIGTERM:\n{driver.log_tail()}")
    say(f"driver exited 0 after SIGTERM ({time.monotonic() - t:.2f}s)")
    rpc_lines = [
        line.split(" csi_oci.rpc: ", 1)[1].split(" request=", 1)[0]
        for line in driver.log_path.read_text(errors="replace").splitlines()
        if " csi_oci.rpc: " in line
    ]
    if rpc_lines:
        say("the driver logged:")
        for line in rpc_lines:
            say("  " + line)
    st.driver = None
    registry.stop()
    st.registry = None
    say("registry stopped")


def keep_running(st: State) -> None:
    """--keep: leave everything up, and say how to take it down."""
    assert st.driver is not None and st.registry is not None and st.target is not None
    # Registry stops its process from a weakref finalizer at interpreter exit;
    # detach it so the registry outlives this script.  (Registry is our own
    # test support code; it has no public "leave running" switch.)
    reg_proc = st.registry._proc
    if st.registry._finalizer is not None:
        st.registry._finalizer.detach()
    pids = [str(st.driver.proc.pid)] + ([str(reg_proc.pid)] if reg_proc else [])
    cleanup = st.tmp / "cleanup.sh"
    cleanup.write_text(
        "#!/bin/sh\n"
        "# Undo `python -m hack.demo --keep`.\n"
        f"umount {shlex.quote(str(st.target))} 2>/dev/null || true\n"
        f"kill {' '.join(pids)} 2>/dev/null || true\n"
        "sleep 1\n"
        f"rm -rf {shlex.quote(str(st.tmp))}\n"
    )
    cleanup.chmod(0o755)
    print()
    print(_style("1", "left running (--keep)"))
    say(f"mount     {st.target}")
    say(f"driver    pid {st.driver.proc.pid}, socket {st.driver.socket}, log {st.driver.log_path}")
    say(f"registry  pid {pids[-1]}, {st.registry.url}")
    say("clean up with:")
    say(f"  sh {cleanup}")
    say("(it unmounts the volume, stops the driver and the registry and removes the temp dir)")
    # Nothing left for cleanup() to stop or unmount.
    st.driver = None
    st.registry = None
    st.published = False


def cleanup(st: State, *, keep: bool) -> list[str]:
    """Best-effort teardown after a failure (or the normal end); returns warnings."""
    warnings: list[str] = []
    if st.target is not None and st.published and mounts_at(st.target):
        try:
            unmount(st.target)
        except Exception as exc:
            warnings.append(f"could not unmount {st.target}: {exc}")
    if st.driver is not None:
        try:
            stop_driver(st.driver)
        except Exception as exc:
            warnings.append(str(exc))
    if st.registry is not None:
        st.registry.stop()
    if keep:
        return warnings
    for mount_point in sorted(mounts_under(st.tmp), reverse=True):
        try:
            unmount(mount_point)
        except Exception as exc:
            warnings.append(f"could not unmount {mount_point}: {exc}")
    leftover = mounts_under(st.tmp)
    if leftover:
        warnings.append(f"not removing {st.tmp}: still mounted: {', '.join(leftover)}")
    else:
        shutil.rmtree(st.tmp, ignore_errors=True)
    return warnings


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="csi-oci demo: publish a sample OCI model image as a read-only CSI volume "
        "through the driver's gRPC API (needs root and hack/install-deps demo)."
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave the driver, the registry and the mount running, and print how to clean up",
    )
    p.add_argument(
        "--image-size-mib",
        type=int,
        default=8,
        metavar="N",
        help="size of the sample weights file in MiB (default %(default)s)",
    )
    args = p.parse_args(argv)
    if not 1 <= args.image_size_mib <= 4096:
        p.error("--image-size-mib must be between 1 and 4096")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("demo: error: must run as root (NodePublishVolume bind-mounts)", file=sys.stderr)
        return 1
    missing = missing_tools("docker-registry")
    if missing:
        print(f"demo: error: missing {', '.join(missing)}; {INSTALL_HINT}", file=sys.stderr)
        return 1

    # SIGTERM (a CI timeout, `kill`) tears down like Ctrl-C does, so the driver,
    # the registry (both in their own sessions) and the mount are not leaked.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    st = State(Path(tempfile.mkdtemp(prefix="csi-oci-demo-")))
    print(_style("1", "csi-oci demo: an OCI model image as a read-only CSI volume"))
    say(f"workdir {st.tmp}")
    print(flush=True)
    failure: str | None = None
    try:
        run(args, st)
    except DemoError as exc:
        failure = str(exc)
    except KeyboardInterrupt:
        failure = "interrupted; cleaning up"
    except Exception as exc:
        failure = f"unexpected error: {exc!r}\n{traceback.format_exc().rstrip()}"

    if failure is not None:
        print(file=sys.stderr)
        print(_style("1;31", "demo: FAILED: ") + failure, file=sys.stderr)
        interrupted = failure.startswith("interrupted")
        if not interrupted and st.driver is not None and (tail := st.driver.log_tail()):
            print("--- driver log (last lines) ---", file=sys.stderr)
            print(tail, file=sys.stderr)
        if (
            not interrupted
            and st.driver is None
            and st.registry is not None
            and (tail := st.registry.log_tail(10))
        ):
            print("--- registry log (last lines) ---", file=sys.stderr)
            print(tail, file=sys.stderr)
        sys.stderr.flush()
    # Let the teardown finish (its waits are bounded) even if signalled again.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings = cleanup(st, keep=args.keep and failure is None)
    for warning in warnings:
        print(f"demo: warning: {warning}", file=sys.stderr)
    if failure is not None:
        return 130 if failure.startswith("interrupted") else 1

    print()
    print(_style("1;32", "demo: OK"))
    say(f"image     {st.notes.get('image', '?')}")
    say(f"driver    {st.notes.get('driver', '?')}")
    say(f"publish   {st.notes.get('publish', '?')} (cold cache: pull + unpack + mount)")
    say(f"total     {time.monotonic() - _t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
