"""Command line: `csi-oci serve | pull | mount | umount`.

`pull`, `mount` and `umount` run the same store, puller and volume code as
the CSI server, so what works here works under kubelet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from csi_oci import __version__
from csi_oci.app import NodeParts, NodeSettings, build_node_parts
from csi_oci.csi.server import ServeOptions, serve
from csi_oci.errors import CsiOciError
from csi_oci.publish.lazy_server import serve_lazy
from csi_oci.publish.volumes import AUTO_LAZY_DEFAULT, AUTO_LAZY_FAMILIES
from csi_oci.pull.puller import Puller
from csi_oci.spec.attributes import (
    KEY_IMAGE,
    KEY_INCLUDE,
    KEY_MODE,
    KEY_PLATFORM,
    KEY_PULL_POLICY,
    KEY_SUB_PATH,
    parse_volume_attributes,
)
from csi_oci.telemetry.endpoint import DEFAULT_METRICS_ADDRESS
from csi_oci.telemetry.logs import LOG_FORMATS, setup_logging
from csi_oci.unpack.budget import DEFAULT_MAX_IMAGE_ENTRIES, ENTRY_DISK_BYTES

DEFAULT_STATE_DIR = "/var/lib/csi-oci"
DEFAULT_DRIVER_NAME = "oci.csi.dev"
DEFAULT_MAX_IMAGE_BYTES = 1 << 40  # 1 TiB


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csi-oci", description="CSI driver for OCI images and artifacts as volumes"
    )
    p.add_argument("--version", action="version", version=f"csi-oci {__version__}")
    # Options of the data path: accepted before the subcommand and after it
    # (`csi-oci serve --state-dir ...`); after it, SUPPRESS keeps the
    # top-level value unless given there.
    common = argparse.ArgumentParser(add_help=False)
    for flags, kwargs in _global_options():
        p.add_argument(*flags, **kwargs)
        # The subcommand's copy has no default of its own (SUPPRESS), so its
        # help must name the real default in words: %(default)s would crash --help.
        help_text = str(kwargs.get("help", "")).replace("%(default)s", str(kwargs.get("default")))
        common.add_argument(
            *flags, **{**kwargs, "default": argparse.SUPPRESS, "help": help_text or None}
        )
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    s = add("serve", help="run the CSI gRPC server")
    s.add_argument(
        "--endpoint",
        default=os.environ.get("CSI_ENDPOINT", "unix:///csi/csi.sock"),
        help="unix socket (default $CSI_ENDPOINT or %(default)s)",
    )
    s.add_argument("--node-id", default=os.environ.get("NODE_ID") or socket.gethostname())
    s.add_argument("--driver-name", default=DEFAULT_DRIVER_NAME)
    s.add_argument("--mode", choices=["node", "controller", "all"], default="node")
    s.add_argument(
        "--publish-wait",
        type=float,
        default=90.0,
        help="seconds NodePublishVolume waits for a pull before answering ABORTED "
        "with progress (kubelet's call budget is 120 s)",
    )
    s.add_argument(
        "--metrics-address",
        default=os.environ.get("CSI_OCI_METRICS_ADDRESS", DEFAULT_METRICS_ADDRESS),
        help="[host]:port for Prometheus /metrics and the kubelet probe's /healthz "
        "(default %(default)s; empty disables both)",
    )
    s.add_argument(
        "--metrics-image-labels",
        action="store_true",
        help="label the lazy metrics with each image's reference and digest (off: sums "
        "over all images, so scrapers do not learn which images the node serves)",
    )
    s.add_argument(
        "--lazy-server",
        choices=["inline", "external"],
        default=os.environ.get("CSI_OCI_LAZY_SERVER", "inline"),
        help="who runs the FUSE servers of lazy volumes: this process (inline) or a "
        "`csi-oci lazy-server` in its own container (external, as the DaemonSet does)",
    )
    s.add_argument(
        "--prewarm",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("CSI_OCI_PREWARM", "false").lower() in ("1", "true"),
        help="watch ImageCache objects (oci.csi.dev/v1alpha1): the node pulls and pins the "
        "ones selecting it and reports their status; the controller counts ready nodes "
        "(docs/prewarm.md; needs the chart's RBAC)",
    )
    s.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", ""),
        help="the driver's namespace: where an ImageCache's pullSecrets are read "
        "(default $POD_NAMESPACE)",
    )
    s.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig for the Kubernetes API (default: the pod's service account)",
    )
    add(
        "lazy-server",
        help="run the FUSE servers of lazy volumes (the DaemonSet's lazy-server container): "
        "starts them, restarts dead ones and binds their volumes again",
    )

    def add_volume_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--pull-policy", choices=["Always", "IfNotPresent", "Never"])
        sp.add_argument("--platform", help="os/arch[/variant] (default: this node's)")
        sp.add_argument(
            "--include",
            default="",
            help="comma-separated globs: publish only matching files (partial pull)",
        )

    pl = add("pull", help="pull an image into the node store")
    pl.add_argument("image")
    add_volume_flags(pl)

    m = add("mount", help="publish an image read-only at DIR")
    m.add_argument("image")
    m.add_argument("dir", type=Path)
    m.add_argument("--mode", choices=["auto", "unpack", "lazy"], default="auto")
    m.add_argument("--sub-path", default="")
    add_volume_flags(m)

    u = add("umount", help="unpublish what `mount` published at DIR")
    u.add_argument("dir", type=Path)

    add("status", help="images in the node store and the volumes using them (JSON)")
    gc = add("gc", help="evict unused images until the store is within --cache-max-bytes")
    gc.add_argument("--all", action="store_true", help="remove every image no volume uses")
    add("ls", help="one line per tree in the node store: image, digest, packaging, files, bytes")
    return p


def _size(text: str) -> int:
    """Bytes, with an optional binary suffix: 500Gi, 1Ti, 10Mi, or a plain number."""
    units = {"ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}
    raw = text.strip().lower()
    for suffix, factor in units.items():
        if raw.endswith(suffix):
            return int(float(raw[: -len(suffix)]) * factor)
    return int(raw)


def _auto_lazy(text: str) -> frozenset[str]:
    """`estargz,zstd:chunked` -> the lazy format families `mode: auto` serves lazily."""
    wanted = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(wanted - set(AUTO_LAZY_FAMILIES))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown lazy format {', '.join(unknown)}: want a comma-separated subset of "
            f"{', '.join(AUTO_LAZY_FAMILIES)} (or empty: auto always unpacks)"
        )
    return wanted


def _global_options() -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    env = os.environ.get
    return [
        (
            ("--log-format",),
            {
                "default": env("CSI_OCI_LOG_FORMAT", "text"),
                "choices": list(LOG_FORMATS),
                "help": "text lines, or JSON lines (time, level, logger, message, rpc fields)",
            },
        ),
        (
            ("--log-level",),
            {
                "default": env("CSI_OCI_LOG_LEVEL", "info"),
                "choices": ["debug", "info", "warning", "error"],
            },
        ),
        (
            ("--state-dir",),
            {
                "type": Path,
                "default": Path(env("CSI_OCI_STATE_DIR", DEFAULT_STATE_DIR)),
                "help": "node cache and volume records (default %(default)s)",
            },
        ),
        (
            ("--runtime-dir",),
            {
                "type": Path,
                "default": Path(env("CSI_OCI_RUNTIME_DIR", "/run/csi-oci")),
                "help": "tmpfs directory for lazy images' registry credentials, shared with "
                "the lazy-server (default /run/csi-oci)",
            },
        ),
        (
            ("--max-image-bytes",),
            {
                "type": _size,
                "default": DEFAULT_MAX_IMAGE_BYTES,
                "help": "refuse an image that unpacks to more bytes, unless its producer declared "
                "the sizes (then those bound it); guards against decompression bombs",
            },
        ),
        (
            ("--max-image-entries",),
            {
                "type": int,
                "default": DEFAULT_MAX_IMAGE_ENTRIES,
                "help": "refuse an image with more files, directories and links (each is "
                f"also charged {ENTRY_DISK_BYTES} bytes of cache); default "
                f"{DEFAULT_MAX_IMAGE_ENTRIES}",
            },
        ),
        (
            ("--registry-config",),
            {
                "type": Path,
                "default": None,
                "help": "TOML file: per registry host mirrors, TLS (ca, client cert), insecure; "
                "re-read on change and on SIGHUP",
            },
        ),
        (
            ("--docker-config",),
            {
                "action": "append",
                "default": [],
                "help": "node-wide docker config.json with registry credentials (repeatable; "
                "default: kubelet's locations, e.g. /var/lib/kubelet/config.json)",
            },
        ),
        (
            ("--first-byte-timeout",),
            {
                "type": float,
                "default": None,
                "help": "seconds to wait for a registry's response headers (spooling pull-through "
                "caches can take long on a miss; default 120)",
            },
        ),
        (
            ("--blob-parallelism",),
            {
                "type": int,
                "default": None,
                "help": "ranged requests in flight for one large blob (default 1)",
            },
        ),
        (
            ("--verify-diff-ids",),
            {
                "action": argparse.BooleanOptionalAction,
                "default": env("CSI_OCI_VERIFY_DIFF_IDS", "true").lower() not in ("0", "false"),
                "help": "check each compressed layer's uncompressed sha256 against the image "
                "config's diff_ids (default on; off saves a sha256 pass per layer, the "
                "layer digest still pins every byte)",
            },
        ),
        (
            ("--policy-config",),
            {
                "type": Path,
                "default": env("CSI_OCI_POLICY_CONFIG", "") or None,
                "help": "TOML signature policy: which images must be signed, by which keys or "
                "certificate identities (docs/signing.md); re-read on change",
            },
        ),
        (
            ("--auto-lazy",),
            {
                "type": _auto_lazy,
                "default": _auto_lazy(
                    env("CSI_OCI_AUTO_LAZY", ",".join(sorted(AUTO_LAZY_DEFAULT)))
                ),
                "help": "lazy formats that volumes with `mode: auto` are served lazily from "
                "(comma-separated: estargz, zstd:chunked; default estargz: a whole-model read "
                "of zstd:chunked is faster unpacked, see docs/modes-and-cache.md)",
            },
        ),
        (
            ("--cache-max-bytes",),
            {
                "type": _size,
                "default": None,
                "help": "budget of the node's image cache; unused images are evicted LRU first "
                "(e.g. 200Gi; default: no budget)",
            },
        ),
        (
            ("--cache-min-free-bytes",),
            {
                "type": _size,
                "default": 0,
                "help": "free space to leave on the state dir's disk (e.g. 10Gi)",
            },
        ),
    ]


def node_settings(args: argparse.Namespace, publish_wait: float) -> NodeSettings:
    return NodeSettings(
        state_dir=args.state_dir,
        publish_wait=publish_wait,
        max_image_bytes=args.max_image_bytes,
        max_image_entries=args.max_image_entries,
        registry_config=args.registry_config,
        policy_config=args.policy_config,
        docker_config=tuple(args.docker_config),
        first_byte_timeout=args.first_byte_timeout,
        blob_parallelism=args.blob_parallelism,
        cache_max_bytes=args.cache_max_bytes,
        cache_min_free_bytes=args.cache_min_free_bytes,
        runtime_dir=args.runtime_dir,
        lazy_external=getattr(args, "lazy_server", "inline") == "external",
        verify_diff_ids=args.verify_diff_ids,
        auto_lazy=args.auto_lazy,
    )


def _attrs(args: argparse.Namespace) -> dict[str, str]:
    attrs = {KEY_IMAGE: args.image}
    if getattr(args, "pull_policy", None):
        attrs[KEY_PULL_POLICY] = args.pull_policy
    if getattr(args, "platform", None):
        attrs[KEY_PLATFORM] = args.platform
    if getattr(args, "mode", None):
        attrs[KEY_MODE] = args.mode
    if getattr(args, "sub_path", None):
        attrs[KEY_SUB_PATH] = args.sub_path
    if getattr(args, "include", None):
        attrs[KEY_INCLUDE] = args.include
    return attrs


T = TypeVar("T")


class InBackground(Generic[T]):
    """`fn` on a thread of its own, so the main thread can draw progress meanwhile."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._outcome: tuple[T] | BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self._outcome = (self._fn(),)
        except BaseException as exc:
            self._outcome = exc

    def result(self) -> T:
        """What `fn` returned, or what it raised (after the thread ended)."""
        self.thread.join()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome[0]


def _with_progress(puller: Puller, work: threading.Thread) -> None:
    """Run `work`, drawing a progress bar on a terminal while pulls are active."""
    work.start()
    tty = sys.stderr.isatty()
    drawn = False
    while work.is_alive():
        work.join(0.2)
        jobs = puller.active_jobs()
        if tty and jobs:
            prog = jobs[0].progress
            frac = prog.done / prog.total if prog.total else 0.0
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r[{bar:<30}] {prog.describe()}  ")
            sys.stderr.flush()
            drawn = True
    if drawn:
        sys.stderr.write("\n")


def _cli_volume_id(target: Path) -> str:
    return "cli-" + hashlib.sha256(str(target).encode()).hexdigest()[:32]


def _status(parts: NodeParts) -> dict[str, object]:
    refcounts = parts.volumes.records.refcounts()
    images = [
        {
            "digest": rec.digest,
            "reference": rec.reference,
            "unpacked_bytes": rec.unpacked_bytes,
            "compressed_bytes": rec.compressed_bytes,
            "volumes": refcounts.get(rec.digest, 0),
        }
        for rec in parts.store.list_images()
    ]
    volumes = [
        {
            "volume_id": r.volume_id,
            "target_path": r.target_path,
            "image": r.spec.get("image"),
            "digest": r.image_digest,
            "state": r.state,
        }
        for r in parts.volumes.records.all()
    ]
    return {"state_dir": str(parts.store.root), "images": images, "volumes": volumes}


def _run(args: argparse.Namespace) -> int:
    if args.command == "lazy-server":
        return serve_lazy(args.state_dir, args.registry_config, args.runtime_dir)
    if args.command == "serve":
        return serve(
            ServeOptions(
                args.endpoint,
                args.node_id,
                args.driver_name,
                args.mode,
                node_settings(args, args.publish_wait),
                metrics_address=args.metrics_address,
                metrics_image_labels=args.metrics_image_labels,
                prewarm=args.prewarm,
                namespace=args.namespace,
                kubeconfig=args.kubeconfig,
            )
        )
    parts = build_node_parts(
        node_settings(args, float("inf")),
        lock="none" if args.command in ("status", "ls") else "try",
    )
    if args.command == "pull":
        spec = parse_volume_attributes(_attrs(args))

        def do_pull() -> str:
            resolved = parts.puller.resolve(
                spec.reference, spec.platform, spec.pull_policy, None, spec.include
            )
            parts.puller.ensure(resolved, spec.platform, None)
            return resolved.key

        pulling = InBackground(do_pull)
        _with_progress(parts.puller, pulling.thread)
        key = pulling.result()
        record = parts.store.image(key)
        print(record.summary() if record else f"{spec.reference} -> {key}")
        print(parts.store.tree(key))
        return 0
    if args.command == "ls":
        refcounts = parts.volumes.records.refcounts()
        pinned_by: dict[str, list[str]] = {}
        for owner, keys in parts.store.space.held.owned().items():
            for key in keys:
                pinned_by.setdefault(key, []).append(owner)
        for rec in parts.store.list_images():
            key = rec.key or rec.digest
            used = refcounts.get(key, 0)
            pins = f", pinned by {', '.join(sorted(pinned_by[key]))}" if key in pinned_by else ""
            print(f"{rec.summary()}, {used} volume{'s' if used != 1 else ''}{pins}")
        return 0
    if args.command == "mount":
        spec = parse_volume_attributes(_attrs(args))
        target = args.dir.absolute()
        vid = _cli_volume_id(target)
        mounting = InBackground(
            lambda: parts.volumes.publish(vid, str(target), spec, None, wait=None)
        )
        _with_progress(parts.puller, mounting.thread)
        digest = mounting.result().image_digest
        print(f"mounted {spec.reference} ({digest}) read-only at {target}")
        return 0
    if args.command == "gc":
        before = parts.store.space.usage().total
        freed = parts.store.space.gc(parts.volumes.records.in_use(), everything=args.all)
        after = parts.store.space.usage().total
        print(f"freed {freed} bytes; the store holds {after} bytes (was {before})")
        return 0
    if args.command == "status":
        print(json.dumps(_status(parts), indent=1))
        return 0
    if args.command == "umount":
        target = args.dir.absolute()
        parts.volumes.unpublish(_cli_volume_id(target), str(target))
        print(f"unmounted {target}")
        return 0
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        return _run(args)
    except CsiOciError as exc:
        print(f"csi-oci: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
