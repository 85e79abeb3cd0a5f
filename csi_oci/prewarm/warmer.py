"""The node's pre-warmer: ImageCaches that select this node, pulled ahead of the pods.

One thread keeps a watch on ImageCaches (csi_oci.prewarm.kube), another
reconciles every second. For each ImageCache whose selector matches this
node's labels (read from its Node every few seconds), the pre-warmer does
what a publish would, through the same parts: resolve (mirrors, the Secrets
named in `pullSecrets`, then the node's docker config), the signature
policy, the puller with its budgets and single flight. The tree is then
pinned (storage.pins) for as long as the ImageCache selects the node, so
eviction leaves it alone; a tree that cannot fit fails with the puller's
"no room" message and evicts nothing that volumes use.

A tag is resolved again every `spec.refresh`; a new digest is pulled while
the old tree stays pinned and served, and the pin moves only when the new
tree is complete. Deleting the ImageCache, or a label change that
deselects the node, unpins (the tree becomes evictable, least recently used
first) and removes this node's entry from its status.

Status: each node writes only its own entry of `status.nodes` by
server-side apply with its own field manager (`csi-oci/<node>`): digest,
phase (Pending, Pulling with bytes and percent, Ready, Failed with the
one-line reason a publish would give), bytes, last update.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from csi_oci.errors import CsiOciError, FailedPrecondition
from csi_oci.prewarm.cache import ImageCacheSpec, WarmMode, parse_image_cache
from csi_oci.publish.volumes import VolumeManager
from csi_oci.pull.jobs import PullJob
from csi_oci.pull.puller import Puller
from csi_oci.pull.resolve import ResolvedImage
from csi_oci.spec.attributes import PullPolicy
from csi_oci.spec.credentials import Credentials, NodeCredentials, credentials_for
from csi_oci.storage.store import Store
from csi_oci.telemetry import instruments
from csi_oci.telemetry.lazystats import read_server_stats
from csi_oci.verify.policy import Rule
from csi_oci.verify.verifier import SignatureCheck, Subject

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
LABELS_SECONDS = 10.0  # how often the node's labels are read again
PROGRESS_SECONDS = 3.0  # status updates while pulling, at most this often
RETRY_FIRST, RETRY_MAX = 15.0, 600.0  # a failed ImageCache is tried again, backing off
OWNER_PREFIX = "imagecache/"

PENDING, PULLING, READY, FAILED = "Pending", "Pulling", "Ready", "Failed"
PHASES = (PENDING, PULLING, READY, FAILED)


class CacheApi(Protocol):
    """What the pre-warmer asks of the API server (csi_oci.prewarm.kube.KubeApi)."""

    def list_caches(self) -> tuple[list[dict[str, Any]], str]: ...
    def watch_caches(self, resource_version: str) -> Any: ...
    def node_labels(self, node: str) -> dict[str, str]: ...
    def secret_data(self, namespace: str, name: str) -> dict[str, str]: ...
    def apply_node_status(self, name: str, manager: str, entries: list[dict[str, Any]]) -> None: ...


@dataclass
class Warm:
    """This node's state for one ImageCache."""

    spec: ImageCacheSpec
    selected: bool = False
    phase: str = PENDING
    message: str = ""
    digest: str = ""  # of the tree that is ready (pinned)
    key: str = ""  # its store key (or lazy server key)
    pending: PullJob | None = None
    pending_resolved: ResolvedImage | None = None
    done_bytes: int = 0
    total_bytes: int = 0
    resolved_at: float = 0.0
    retry_at: float = 0.0
    backoff: float = RETRY_FIRST
    reported: dict[str, Any] | None = None
    reported_at: float = 0.0
    lazy_key: str = ""  # a lazy server this cache holds
    leftover: bool = False  # a status entry or pin from before this driver started
    own_bytes: int = 0  # what the ready tree holds on disk (the pinned-bytes metric)
    generation: int = field(default=0)

    @property
    def owner(self) -> str:
        return OWNER_PREFIX + self.spec.name


class Prewarmer:
    """Reconciles the ImageCaches selecting `node` into pinned trees and status entries."""

    def __init__(
        self,
        node: str,
        namespace: str,
        api: CacheApi,
        store: Store,
        puller: Puller,
        signatures: SignatureCheck | None,
        node_credentials: NodeCredentials | None,
        volumes: VolumeManager,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self.namespace = namespace
        self.api = api
        self.store = store
        self.puller = puller
        self.signatures = signatures
        self.node_credentials = node_credentials
        self.volumes = volumes  # lazy servers: held against release, released when unused
        self.lazy = volumes.lazy
        self.clock = clock
        self.manager = f"csi-oci/{node}"[:128]
        self.warm: dict[str, Warm] = {}
        self.events: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        self.labels: dict[str, str] | None = None
        self._labels_at = -LABELS_SECONDS
        self.synced = threading.Event()  # the first list has been applied

    # -- threads ------------------------------------------------------------------------

    def start(self) -> None:
        threading.Thread(target=self._watch_loop, name="prewarm-watch", daemon=True).start()
        threading.Thread(target=self._run, name="prewarm", daemon=True).start()

    def _watch_loop(self) -> None:
        """List, then watch from the list's version; on any end or error, list again."""
        delay = 1.0
        while True:
            try:
                items, version = self.api.list_caches()
                self.events.put(("SYNC", {"items": items}))
                delay = 1.0
                for kind, obj in self.api.watch_caches(version):
                    self.events.put((kind, obj))
            except Exception as exc:  # the watch must survive the API server's moods
                log.warning("ImageCache watch: %s; listing again in %.0fs", _short(exc), delay)
                time.sleep(delay)
                delay = min(delay * 2, 60.0)

    def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # the pre-warmer must survive anything
                log.exception("pre-warm")
            time.sleep(TICK_SECONDS)

    # -- one reconciliation -------------------------------------------------------------

    def tick(self) -> None:
        self._drain_events()
        now = self.clock()
        if self.labels is None or now - self._labels_at >= LABELS_SECONDS:
            try:
                self.labels = self.api.node_labels(self.node)
                self._labels_at = now
            except Exception as exc:
                log.warning("cannot read node %s's labels: %s", self.node, _short(exc))
                if self.labels is None:
                    return
        for warm in list(self.warm.values()):
            self._reconcile(warm, now)
        self._count()

    def _drain_events(self) -> None:
        while True:
            try:
                kind, obj = self.events.get_nowait()
            except queue.Empty:
                return
            if kind == "SYNC":
                seen = set()
                for item in obj["items"]:
                    name = self._upsert(item)
                    if name:
                        seen.add(name)
                for name in [n for n in self.warm if n not in seen]:
                    self._forget(name)
                # Pins of ImageCaches deleted while the driver was down.
                for owner in self.store.space.held.release_all_but(
                    {OWNER_PREFIX + n for n in seen}, OWNER_PREFIX
                ):
                    log.info("pre-warm: %s is gone; its tree is evictable again", owner)
                self.synced.set()
            elif kind == "DELETED":
                name = str(obj.get("metadata", {}).get("name", ""))
                self._forget(name)
            else:
                self._upsert(obj)

    def _upsert(self, obj: dict[str, Any]) -> str:
        name = str(obj.get("metadata", {}).get("name", ""))
        try:
            spec = parse_image_cache(obj)
        except CsiOciError as exc:
            log.warning("ImageCache %s is not usable: %s", name, exc)
            broken = self.warm.get(name)
            if broken is not None:
                self._fail(broken, str(exc), self.clock())
                self._report(broken, self.clock(), force=True)
            return name
        warm = self.warm.get(name)
        if warm is None:
            warm = self.warm[name] = Warm(spec, generation=spec.generation)
            # Left by an earlier driver on this node: cleaned up if the cache no
            # longer selects it (labels changed while the driver was down).
            warm.leftover = self._has_entry(obj) or bool(
                self.store.space.held.owned().get(warm.owner)
            )
        elif warm.spec != spec:
            if spec.uid != warm.spec.uid:  # deleted and made again under the same name
                self._forget(name)
                self.warm[name] = Warm(spec, generation=spec.generation)
            else:
                warm.spec = spec
                warm.resolved_at = 0.0  # the spec changed: resolve again now
                warm.retry_at = 0.0
                warm.backoff = RETRY_FIRST
        return name

    def _has_entry(self, obj: dict[str, Any]) -> bool:
        status = obj.get("status")
        entries = status.get("nodes") if isinstance(status, dict) else None
        return isinstance(entries, list) and any(
            isinstance(e, dict) and e.get("node") == self.node for e in entries
        )

    def _forget(self, name: str) -> None:
        warm = self.warm.pop(name, None)
        if warm is None:
            return
        self._release(warm)
        log.info("pre-warm: ImageCache %s deleted; %s is evictable again", name, warm.key or "-")

    def _release(self, warm: Warm) -> None:
        self.store.space.held.hold(warm.owner, [])
        if warm.lazy_key:
            self.volumes.hold_lazy(warm.lazy_key, held=False)
        warm.lazy_key = ""

    def _reconcile(self, warm: Warm, now: float) -> None:
        assert self.labels is not None
        selected = warm.spec.selector.matches(self.labels)
        if not selected:
            if warm.selected or warm.leftover:
                log.info("pre-warm: %s no longer selects node %s", warm.spec.name, self.node)
                self._release(warm)
                fresh = Warm(warm.spec, generation=warm.spec.generation)
                self.warm[warm.spec.name] = fresh
                self._remove_status(fresh)
            return
        if not warm.selected:
            warm.selected = True
            log.info(
                "pre-warm: %s selects node %s: %s", warm.spec.name, self.node, warm.spec.reference
            )
        if warm.pending is not None:
            self._follow_pull(warm, now)
        elif warm.lazy_key and warm.phase == PULLING:
            self._follow_lazy(warm, now)
        elif self._due(warm, now):
            self._start(warm, now)
        self._report(warm, now)

    def _due(self, warm: Warm, now: float) -> bool:
        if now < warm.retry_at:
            return False
        if not warm.digest:
            return True
        refresh = warm.spec.refresh
        tag = warm.spec.reference.digest is None
        return tag and refresh is not None and now - warm.resolved_at >= refresh

    # -- pulling ------------------------------------------------------------------------

    def _credentials(self, spec: ImageCacheSpec) -> Callable[[str, str], Credentials | None]:
        """The ImageCache's Secrets (in the driver's namespace only), then the node's."""
        secrets = []
        for name in spec.pull_secrets:
            try:
                secrets.append(self.api.secret_data(self.namespace, name))
            except Exception as exc:
                raise FailedPrecondition(
                    f"pull secret {self.namespace}/{name} of ImageCache {spec.name} cannot be "
                    f"read ({_short(exc)}); pullSecrets name Secrets in the driver's namespace"
                ) from None
        image_registry = spec.reference.registry

        def lookup(registry: str, repository: str) -> Credentials | None:
            for data in secrets:
                found = credentials_for(data, registry, repository, image_registry=image_registry)
                if found is not None:
                    return found
            return (
                self.node_credentials.lookup(registry, repository)
                if self.node_credentials
                else None
            )

        return lookup

    def _start(self, warm: Warm, now: float) -> None:
        spec = warm.spec
        try:
            credentials = self._credentials(spec)
            # A tag is resolved at the registry: pre-warm exists to have the
            # newest bytes before the pods; a digest is fine from the records.
            policy = (
                PullPolicy.ALWAYS if spec.reference.digest is None else PullPolicy.IF_NOT_PRESENT
            )
            if spec.mode is WarmMode.LAZY:
                policy = PullPolicy.ALWAYS  # the lazy server needs the manifest
            resolved = self.puller.resolve(
                spec.reference, spec.platform, policy, credentials, spec.include
            )
            warm.resolved_at = now
            if resolved.digest == warm.digest and warm.phase == READY:
                return  # the tag still names what is warm
            rules = self._rules(spec)
            if rules and self.signatures is not None:
                self.signatures.check(
                    _subject(resolved), rules, credentials, client=resolved.client
                )
            if spec.mode is WarmMode.LAZY:
                if any(r.needs_tree for r in rules):
                    raise FailedPrecondition(
                        f"ImageCache {spec.name}: its signature rule checks every file "
                        "(model signing), which a lazy pre-warm cannot; use mode unpack"
                    )
                self._start_lazy(warm, resolved, credentials, now)
                return
            # Pin the new key before it exists: the tree is protected the
            # moment it is committed; the old tree stays pinned until then.
            keys = [k for k in (warm.key, resolved.key) if k]
            self.store.space.held.hold(warm.owner, keys)
            if self.store.image(resolved.key) is not None:
                self._ready(warm, resolved, now)
                return
            warm.pending = self.puller.job_for(resolved, spec.platform)
            warm.pending_resolved = resolved
            warm.phase = PULLING
            warm.message = f"pulling {resolved.digest}"
            log.info("pre-warm: pulling %s (%s) for %s", spec.reference, resolved.digest, spec.name)
        except CsiOciError as exc:
            self._fail(warm, str(exc), now)

    def _follow_pull(self, warm: Warm, now: float) -> None:
        job = warm.pending
        resolved = warm.pending_resolved
        assert job is not None and resolved is not None
        warm.done_bytes, warm.total_bytes = job.progress.done, job.progress.total
        if not job.done.is_set():
            warm.phase = PULLING
            return
        warm.pending = warm.pending_resolved = None
        if job.error is not None:
            self.store.space.held.hold(warm.owner, [warm.key] if warm.key else [])
            self._fail(warm, str(job.error), now)
            return
        try:
            self._ready(warm, resolved, now)
        except CsiOciError as exc:
            self.store.space.held.hold(warm.owner, [warm.key] if warm.key else [])
            self._fail(warm, str(exc), now)

    def _ready(self, warm: Warm, resolved: ResolvedImage, now: float) -> None:
        """The tree is in the store: rules over files, then pin it alone and report Ready."""
        spec = warm.spec
        tree = self.store.tree(resolved.key)
        rules = self._rules(spec)
        if any(r.needs_tree for r in rules) and self.signatures is not None:
            self.signatures.check(
                _subject(resolved), rules, None, client=resolved.client, tree=tree
            )
        self.store.space.held.hold(warm.owner, [resolved.key])
        # What the tag names, as a publish would record it: a pod under
        # IfNotPresent then publishes without asking the registry.
        self.store.tags.remember(str(resolved.reference), str(spec.platform), resolved.digest)
        record = self.store.image(resolved.key)
        previous = warm.digest
        warm.digest, warm.key = resolved.digest, resolved.key
        warm.phase, warm.message = READY, ""
        warm.done_bytes = warm.total_bytes = record.unpacked_bytes if record else 0
        warm.own_bytes = record.own_bytes if record else 0
        warm.backoff = RETRY_FIRST
        if previous and previous != resolved.digest:
            log.info("pre-warm: %s moved from %s to %s", spec.name, previous, resolved.digest)
        else:
            log.info("pre-warm: %s ready on %s (%s)", spec.name, self.node, resolved.digest)

    def _start_lazy(
        self,
        warm: Warm,
        resolved: ResolvedImage,
        credentials: Callable[[str, str], Credentials | None],
        now: float,
    ) -> None:
        if self.lazy is None:
            raise FailedPrecondition("mode lazy is not available on this node")
        ref = warm.spec.reference
        self.volumes.hold_lazy(resolved.key, held=True)
        self.lazy.ensure(resolved, credentials(ref.registry, ref.repository), "all")
        if warm.lazy_key and warm.lazy_key != resolved.key:
            self.volumes.hold_lazy(warm.lazy_key, held=False)
        warm.lazy_key = resolved.key
        warm.pending_resolved = resolved
        warm.phase = PULLING
        self._follow_lazy(warm, now)

    def _follow_lazy(self, warm: Warm, now: float) -> None:
        """A lazy pre-warm is ready when its FUSE server has every layer byte cached."""
        assert self.lazy is not None
        stats = read_server_stats(self.lazy.server_dir(warm.lazy_key))
        if stats is None:
            return
        done = int(stats.numbers.get("prefetch_done_bytes", 0))
        total = int(stats.numbers.get("prefetch_total_bytes", 0))
        warm.done_bytes, warm.total_bytes = done, total
        if total and done >= total and warm.pending_resolved is not None:
            warm.digest, warm.key = warm.pending_resolved.digest, warm.lazy_key
            warm.pending_resolved = None
            warm.phase, warm.message = READY, ""
            log.info("pre-warm: %s ready lazily on %s (%s)", warm.spec.name, self.node, warm.digest)

    def _rules(self, spec: ImageCacheSpec) -> tuple[Rule, ...]:
        """The signature rules a publish of this image would have to pass."""
        if self.signatures is None:
            return ()
        return self.signatures.rules_for(spec.reference, spec.signature_rule)

    def _fail(self, warm: Warm, message: str, now: float) -> None:
        if warm.digest and warm.phase == READY and warm.message == message:
            return
        warm.phase, warm.message = FAILED, message.replace("\n", " ")[:1024]
        warm.retry_at = now + warm.backoff
        warm.backoff = min(warm.backoff * 2, RETRY_MAX)
        log.warning(
            "pre-warm of %s failed (again in %.0fs): %s",
            warm.spec.name,
            warm.retry_at - now,
            warm.message,
        )

    # -- status -------------------------------------------------------------------------

    def _entry(self, warm: Warm) -> dict[str, Any]:
        percent = (
            100
            if warm.phase == READY
            else (int(100 * warm.done_bytes / warm.total_bytes) if warm.total_bytes else 0)
        )
        entry: dict[str, Any] = {
            "node": self.node,
            "phase": warm.phase,
            "bytes": warm.done_bytes,
            "totalBytes": warm.total_bytes,
            "percent": max(0, min(100, percent)),
            "pinned": bool(warm.key or warm.lazy_key),
        }
        if warm.digest:
            entry["digest"] = warm.digest
        if warm.message:
            entry["message"] = warm.message
        return entry

    def _report(self, warm: Warm, now: float, *, force: bool = False) -> None:
        entry = self._entry(warm)
        changed = entry != warm.reported
        if not force and not changed:
            return
        if (
            not force
            and warm.phase == PULLING
            and warm.reported is not None
            and warm.reported.get("phase") == PULLING
            and now - warm.reported_at < PROGRESS_SECONDS
        ):
            return
        stamped = {**entry, "lastUpdate": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        try:
            self.api.apply_node_status(warm.spec.name, self.manager, [stamped])
        except Exception as exc:
            log.warning(
                "cannot update the status of ImageCache %s: %s", warm.spec.name, _short(exc)
            )
            return
        warm.reported, warm.reported_at = entry, now

    def _remove_status(self, warm: Warm) -> None:
        """Apply an empty list: the entry this node's manager owned goes away."""
        try:
            self.api.apply_node_status(warm.spec.name, self.manager, [])
        except Exception as exc:
            log.warning(
                "cannot update the status of ImageCache %s: %s", warm.spec.name, _short(exc)
            )

    def _count(self) -> None:
        by_phase = dict.fromkeys(PHASES, 0)
        pinned = 0
        for warm in self.warm.values():
            if warm.selected:
                by_phase[warm.phase] += 1
                if warm.phase == READY and not warm.lazy_key:
                    pinned += warm.own_bytes
        for phase, count in by_phase.items():
            instruments.PREWARM_ENTRIES.labels(phase).set(count)
        instruments.PREWARM_PINNED_BYTES.set(pinned)


def _subject(resolved: ResolvedImage) -> Subject:
    return Subject(
        resolved.reference,
        resolved.digest,
        resolved.index_digest,
        resolved.key,
        partial=bool(resolved.include),
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
