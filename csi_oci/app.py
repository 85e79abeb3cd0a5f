"""The composition root: the data path's parts, built from the flags.

`build_node_parts` wires store, puller, lazy mounts and volumes for the gRPC
server (csi_oci.csi.server) and for the CLI commands alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from csi_oci.errors import FailedPrecondition
from csi_oci.oci.config import ConfigSource
from csi_oci.publish.lazy_mounts import LazyMounts
from csi_oci.publish.volumes import AUTO_LAZY_DEFAULT, VolumeManager
from csi_oci.pull.puller import Puller
from csi_oci.spec.credentials import NodeCredentials
from csi_oci.storage.store import Store
from csi_oci.unpack.budget import DEFAULT_MAX_IMAGE_ENTRIES, Limits
from csi_oci.verify.policy import PolicySource
from csi_oci.verify.verifier import SignatureCheck


@dataclass
class NodeParts:
    store: Store
    puller: Puller
    volumes: VolumeManager
    node_credentials: NodeCredentials
    registries: ConfigSource


@dataclass(frozen=True)
class NodeSettings:
    """Everything the data path is configured with (flags of serve and the CLI)."""

    state_dir: Path
    publish_wait: float = 90.0
    max_image_bytes: int = 1 << 40
    max_image_entries: int = DEFAULT_MAX_IMAGE_ENTRIES
    registry_config: Path | None = None
    docker_config: tuple[str, ...] = ()
    first_byte_timeout: float | None = None
    blob_parallelism: int | None = None
    cache_max_bytes: int | None = None
    cache_min_free_bytes: int = 0
    runtime_dir: Path | None = None  # tmpfs for lazy images' credentials
    lazy_external: bool = False  # FUSE servers run by `csi-oci lazy-server`
    verify_diff_ids: bool = True
    auto_lazy: frozenset[str] = AUTO_LAZY_DEFAULT  # lazy formats `mode: auto` serves lazily
    policy_config: Path | None = None  # the signature policy (TOML; csi_oci.verify.policy)


def build_node_parts(settings: NodeSettings, *, lock: str = "wait") -> NodeParts:
    """Wire the data path (shared by `serve` and the CLI commands).

    `lock`: "wait" (serve: wait for a previous driver to exit), "try" (CLI
    commands that change state: refuse while a server runs) or "none"
    (read-only inspection: no lock, no recovery).
    """
    overrides: dict[str, object] = {}
    if settings.first_byte_timeout is not None:
        overrides["first_byte_timeout"] = settings.first_byte_timeout
    if settings.blob_parallelism is not None:
        overrides["blob_parallelism"] = settings.blob_parallelism
    registries = ConfigSource(settings.registry_config, overrides=overrides)
    store = Store(
        settings.state_dir,
        max_bytes=settings.cache_max_bytes,
        min_free_bytes=settings.cache_min_free_bytes,
    )
    puller = Puller(
        store,
        limits=Limits(max_bytes=settings.max_image_bytes, max_entries=settings.max_image_entries),
        registries=registries,
        verify_diff_ids=settings.verify_diff_ids,
    )
    lazy = LazyMounts(
        store,
        settings.registry_config,
        runtime_dir=settings.runtime_dir,
        external=settings.lazy_external,
    )
    signatures = SignatureCheck(
        PolicySource(settings.policy_config), store.root / "signatures", registries
    )
    volumes = VolumeManager(
        store,
        puller,
        publish_wait=settings.publish_wait,
        lazy=lazy,
        auto_lazy=settings.auto_lazy,
        signatures=signatures,
    )
    node_credentials = NodeCredentials(list(settings.docker_config) or None)
    parts = NodeParts(store, puller, volumes, node_credentials, registries)
    if lock == "none":
        return parts
    try:
        if lock == "wait":
            try:
                store.lock(wait=False)
            except FailedPrecondition:
                logging.getLogger("csi_oci").info(
                    "waiting for the state dir lock of %s", settings.state_dir
                )
                store.lock(wait=True)
        else:
            store.lock(wait=False)
        store.recover()
        volumes.recover()
    except OSError as exc:
        # Keep serving: Probe reports not-ready and publishes fail with this
        # reason, which is more useful to an operator than a crash loop.
        logging.getLogger("csi_oci").error(
            "state dir %s is not usable: %s", settings.state_dir, exc
        )
    return parts
