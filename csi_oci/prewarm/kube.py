"""The node plugin's Kubernetes API calls: ImageCaches, its own Node, its pull Secrets.

The official `kubernetes` client, not kopf: the node needs one watch, two
reads and one status patch, and its status must be written by server-side
apply with a field manager per node (so nodes never overwrite each other's
entry in `status.nodes`, a list keyed by node name); kopf is an operator
framework that wants to own the handlers' status and finalizers, which is
more than a reader of cluster-scoped objects needs.

Only what the chart's RBAC grants is called. The node plugin: imagecaches
get/list/watch, imagecaches/status patch, nodes get (its own), secrets get in
the driver's namespace. The controller: imagecaches list, imagecaches/status
patch, nodes list.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from typing import Any

from csi_oci.prewarm.cache import GROUP, KIND, PLURAL, VERSION

log = logging.getLogger(__name__)

WATCH_SECONDS = 240  # a watch is re-opened this often (the API server ends it anyway)
MAX_SECRET_BYTES = 1024 * 1024


class KubeApi:
    """A thin, typed face on the kubernetes client for the pre-warmer."""

    def __init__(self, kubeconfig: str | None = None) -> None:
        from kubernetes import client, config

        # The client's config and watch modules carry no type hints.
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        else:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        self._custom = client.CustomObjectsApi()
        self._core = client.CoreV1Api()

    def list_caches(self) -> tuple[list[dict[str, Any]], str]:
        """Every ImageCache and the list's resourceVersion (where a watch starts)."""
        out: Any = self._custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        if not isinstance(out, dict):
            raise RuntimeError("the ImageCache list is not an object")
        items = [i for i in out.get("items") or [] if isinstance(i, dict)]
        meta = out.get("metadata")
        version = meta.get("resourceVersion", "") if isinstance(meta, dict) else ""
        return items, str(version)

    def watch_caches(self, resource_version: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(ADDED|MODIFIED|DELETED, object) from `resource_version` on, until the
        watch ends; a 410 Gone (expired version) raises, and the caller lists again."""
        from kubernetes import watch

        stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
            self._custom.list_cluster_custom_object,
            GROUP,
            VERSION,
            PLURAL,
            resource_version=resource_version,
            timeout_seconds=WATCH_SECONDS,
            allow_watch_bookmarks=True,
        )
        for event in stream:
            kind = str(event.get("type", ""))
            obj = event.get("object")
            if kind == "ERROR":
                raise RuntimeError(f"ImageCache watch ended: {obj}")
            if isinstance(obj, dict) and kind in ("ADDED", "MODIFIED", "DELETED"):
                yield kind, obj

    def node_labels(self, node: str) -> dict[str, str]:
        found = self._core.read_node(node)
        meta = found.metadata
        return dict(meta.labels or {}) if meta is not None else {}

    def secret_data(self, namespace: str, name: str) -> dict[str, str]:
        """A Secret's data, decoded (a docker config is text)."""
        found = self._core.read_namespaced_secret(name, namespace)
        out: dict[str, str] = {}
        total = 0
        for key, value in (found.data or {}).items():
            raw = base64.b64decode(value)
            total += len(raw)
            if total > MAX_SECRET_BYTES:
                raise ValueError(f"Secret {namespace}/{name} is larger than {MAX_SECRET_BYTES}")
            out[key] = raw.decode(errors="replace")
        return out

    def list_nodes(self) -> dict[str, dict[str, str]]:
        """Every Node's labels by name (the controller's summary)."""
        out: dict[str, dict[str, str]] = {}
        for node in self._core.list_node().items:
            meta = node.metadata
            if meta is not None and meta.name:
                out[meta.name] = dict(meta.labels or {})
        return out

    def apply_summary(self, name: str, manager: str, summary: dict[str, Any]) -> None:
        """Server-side apply of the controller's summary fields of status."""
        self._apply_status(name, manager, summary)

    def apply_node_status(self, name: str, manager: str, entries: list[dict[str, Any]]) -> None:
        """Server-side apply of this node's entry (or none) in status.nodes.

        With `force`, the node takes over its own entry even if another
        manager (an earlier pod of the same node under another name) wrote
        it; it never touches other nodes' entries: the list is keyed by node.
        """
        self._apply_status(name, manager, {"nodes": entries})

    def _apply_status(self, name: str, manager: str, status: dict[str, Any]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": name},
            "status": status,
        }
        self._custom.patch_cluster_custom_object_status(
            GROUP,
            VERSION,
            PLURAL,
            name,
            body,
            field_manager=manager,
            force=True,
            _content_type="application/apply-patch+yaml",
        )
