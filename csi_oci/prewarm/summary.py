"""The controller's summary of each ImageCache: ready nodes out of selected ones.

Nodes write only their own entry of `status.nodes` (csi_oci.prewarm.warmer);
a count over all nodes needs one writer that sees every Node, so the
controller (one replica leads; a second one writes the same numbers) lists
Nodes and ImageCaches every few seconds and applies `selectedNodes`,
`readyNodes`, `ready` ("2/3", what `kubectl get imagecaches` prints) and
`digest` (the one every ready node has, or "mixed") with its own field
manager. Entries of nodes that no longer exist are not counted.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from csi_oci.errors import CsiOciError
from csi_oci.prewarm.cache import parse_image_cache

log = logging.getLogger(__name__)

SUMMARY_SECONDS = 5.0
MANAGER = "csi-oci-controller"


class SummaryApi(Protocol):
    def list_caches(self) -> tuple[list[dict[str, Any]], str]: ...
    def list_nodes(self) -> dict[str, dict[str, str]]: ...
    def apply_summary(self, name: str, manager: str, summary: dict[str, Any]) -> None: ...


def summarize(cache: dict[str, Any], nodes: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The summary fields of one ImageCache, from the Nodes' labels and its entries."""
    spec = parse_image_cache(cache)
    selected = {name for name, labels in nodes.items() if spec.selector.matches(labels)}
    status = cache.get("status")
    entries = status.get("nodes") if isinstance(status, dict) else None
    ready_digests = set()
    ready = 0
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or entry.get("node") not in selected:
            continue
        if entry.get("phase") == "Ready":
            ready += 1
            ready_digests.add(str(entry.get("digest", "")))
    digest = ready_digests.pop() if len(ready_digests) == 1 else ("mixed" if ready_digests else "")
    return {
        "selectedNodes": len(selected),
        "readyNodes": ready,
        "ready": f"{ready}/{len(selected)}",
        "digest": digest,
    }


class Summarizer:
    """The controller's loop: every few seconds, each ImageCache's summary if it changed."""

    def __init__(self, api: SummaryApi) -> None:
        self.api = api
        self._written: dict[str, dict[str, Any]] = {}

    def start(self) -> None:
        threading.Thread(target=self._run, name="prewarm-summary", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                self.once()
            except Exception as exc:  # the loop must survive the API server's moods
                log.warning("ImageCache summary: %s", str(exc).splitlines()[0][:300])
            time.sleep(SUMMARY_SECONDS)

    def once(self) -> None:
        caches, _ = self.api.list_caches()
        nodes = self.api.list_nodes()
        seen = set()
        for cache in caches:
            name = str(cache.get("metadata", {}).get("name", ""))
            seen.add(name)
            try:
                summary = summarize(cache, nodes)
            except CsiOciError as exc:
                log.warning("ImageCache %s: %s", name, exc)
                continue
            current = cache.get("status")
            if isinstance(current, dict) and all(current.get(k) == v for k, v in summary.items()):
                self._written[name] = summary
                continue
            self.api.apply_summary(name, MANAGER, summary)
            self._written[name] = summary
        for name in [n for n in self._written if n not in seen]:
            del self._written[name]
