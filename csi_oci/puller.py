"""Pulling into the store: resolve -> fetch -> verify -> apply -> commit.

One pull per tree (manifest digest + include set) runs at a time (single
flight): concurrent publishes of the same image join the running job. A job
runs in its own thread, so a caller whose CSI call budget runs out can return
and join the same job on its next retry.

Images: layers download concurrently and are applied in order. The layer the
applier needs next is streamed straight from the registry into the tree
(download, hash, decompress, write in one pass); layers further ahead are
downloaded by worker threads into verified spool files meanwhile, applied
when their turn comes and deleted after the commit.

Artifacts (ORAS, ModelPack, KitOps): layers are independent, so all of them
stream in parallel. A raw layer's file is written once, into the node's
shared blob store while it is hashed, and hard-linked into each tree that
needs it (so different `include` sets share one download).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

from csi_oci import metrics
from csi_oci.applier import (
    ENTRY_DISK_BYTES,
    Budget,
    DiskBudget,
    LayerApplier,
    Limits,
    Policy,
    resolve_dir,
)
from csi_oci.attributes import Platform, PullPolicy, include_matcher
from csi_oci.errors import (
    CsiOciError,
    FailedPrecondition,
    IntegrityError,
    InvalidLayer,
    NotFound,
    OutOfSpace,
    PullCancelled,
    PullInProgress,
    is_out_of_space,
)
from csi_oci.faults import crash_point
from csi_oci.manifest import (
    INDEX_TYPES,
    MAX_CONFIG_BYTES,
    Compression,
    Descriptor,
    ImageManifest,
    parse_index,
    parse_manifest,
    select_platform,
)
from csi_oci.packaging import Kind, LayerPlan, Plan, plan_for
from csi_oci.readahead import ReadAhead
from csi_oci.reference import Reference
from csi_oci.registry import CredentialLookup, RegistryClient
from csi_oci.registry_config import ConfigSource
from csi_oci.store import ImageRecord, Store, blob_pin, tree_key
from csi_oci.streams import (
    CHUNK,
    Chunk,
    Readable,
    ReadableInto,
    VerifyingReader,
    decompressor,
)

log = logging.getLogger(__name__)

# Streams in flight: one more than cores (hashing and writing release the GIL);
# on 2 cores 3 measured best, 4+ only contended.
DOWNLOAD_WORKERS = max(3, min(8, (os.cpu_count() or 2) + 1))
RAW_FILE_MODE = 0o644
RAW_READ_SIZE = 256 << 10  # per read of a raw blob: small enough to stay in the CPU cache
# Layers up to this size are downloaded ahead of their turn into a verified
# spool file, hiding a request's latency per layer (images of many small
# layers); bigger ones stream when their turn comes, through parallel ranges,
# without a second pass over their bytes.
SPOOL_AHEAD_MAX = 64 << 20
MAX_TRAILING_BYTES = 16 << 20  # padding after a tar end marker (records are 10 KiB)
FREE_PADDING = 2 * 10240  # a tar record (blocking factor 20) and the second zero block


@dataclass
class Progress:
    """Bytes of layer blobs received, for ABORTED messages and the CLI bar."""

    total: int = 0
    done: int = 0
    phase: str = "resolving"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _first_byte_at: float | None = field(default=None, repr=False)

    def add(self, n: int) -> None:
        with self._lock:
            if self._first_byte_at is None:
                self._first_byte_at = time.monotonic()
            self.done += n

    def rate(self) -> float | None:
        """Bytes per second since the first byte arrived (None before a second of data)."""
        if self._first_byte_at is None:
            return None
        elapsed = time.monotonic() - self._first_byte_at
        return self.done / elapsed if elapsed >= 1.0 else None

    def status(self) -> str:
        """`3.2/14.0 GiB (23%), 180.0 MiB/s, ETA 61s`, or the phase before bytes flow."""
        if self.total <= 0:
            return self.phase
        pct = 100.0 * self.done / self.total
        text = f"{human(self.done)}/{human(self.total)} ({pct:.0f}%)"
        rate = self.rate()
        if rate:
            eta = max(0, self.total - self.done) / rate
            text += f", {human(int(rate))}/s, ETA {eta:.0f}s"
        elif self.done == 0:
            text += ", waiting for the first bytes"
        return text

    def describe(self) -> str:
        if self.total <= 0:
            return self.phase
        pct = 100.0 * self.done / self.total
        return f"{self.phase}: {human(self.done)} of {human(self.total)} ({pct:.0f}%)"


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


@dataclass
class ResolvedImage:
    """A reference pinned to one platform-specific manifest (and include set)."""

    reference: Reference
    digest: str  # platform manifest digest
    manifest: ImageManifest | None  # None when served from the local record
    client: RegistryClient | None
    include: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return tree_key(self.digest, self.include)


class PullJob:
    """One background pull of one tree."""

    def __init__(self, key: str, reference: str = "") -> None:
        self.key = key
        self.reference = reference or key
        self.progress = Progress()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.tree: Path | None = None

    def wait(self, timeout: float | None) -> Path:
        if not self.done.wait(timeout):
            raise PullInProgress(
                f"pull of {self.reference} in progress: {self.progress.status()} "
                f"({self.key}); it continues in the background and the next retry picks it up"
            )
        if self.error is not None:
            raise self.error
        assert self.tree is not None
        return self.tree


class Puller:
    def __init__(
        self,
        store: Store,
        *,
        limits: Limits | None = None,
        registries: ConfigSource | None = None,
        verify_diff_ids: bool = True,
    ) -> None:
        self.store = store
        self.limits = limits or Limits()
        # Off (--no-verify-diff-ids) skips the sha256 of each compressed
        # layer's uncompressed bytes against the config's diff_ids. The
        # layer's own digest still pins every byte; what is lost is the check
        # that the config describes its layers truly. It costs one more
        # sha256 pass over the unpacked size (hack/bench: about a fifth of a
        # tar+zstd publish on 2 cores).
        self.verify_diff_ids = verify_diff_ids
        self.registries = registries or ConfigSource(None)
        # Trees that volumes use (set by the VolumeManager): never evicted.
        self.in_use: Callable[[], set[str]] = set
        self._jobs: dict[str, PullJob] = {}
        self._lock = threading.Lock()

    # -- resolution -------------------------------------------------------------

    def resolve(
        self,
        ref: Reference,
        platform: Platform,
        policy: PullPolicy,
        credentials: CredentialLookup | None,
        include: tuple[str, ...] = (),
    ) -> ResolvedImage:
        """Pin `ref` to a platform manifest digest, honouring the pull policy.

        Never and IfNotPresent answer from the node's record of earlier
        resolutions without touching the network when the tree is there.
        """
        key_ref, plat = str(ref), str(platform)
        if policy is not PullPolicy.ALWAYS:
            known = self.store.lookup_ref(key_ref, plat)
            if known is not None and self.store.image(tree_key(known, include)) is not None:
                return ResolvedImage(ref, known, None, None, include)
            if policy is PullPolicy.NEVER:
                what = f" with include={','.join(include)}" if include else ""
                raise FailedPrecondition(
                    f"image {ref} ({plat}){what} is not present on this node "
                    "and pullPolicy is Never; use pullPolicy IfNotPresent, or pull it onto "
                    "the node first (csi-oci pull)"
                )
        client = RegistryClient(ref, credentials, config=self.registries.current())
        try:
            top = client.get_manifest(ref.manifest_key)
        except NotFound as exc:
            error = _not_found(ref, client, exc)
            metrics.count_pull_error(error)
            raise error from None
        except CsiOciError as exc:
            metrics.count_pull_error(exc)
            raise
        fetched = top
        try:
            if top.media_type in INDEX_TYPES:
                entries = parse_index(top.data)
                try:
                    chosen = select_platform(entries, platform)
                except NotFound:
                    raise NotFound(_no_platform_message(ref, platform, entries)) from None
                fetched = client.get_manifest(chosen.digest)
                if fetched.media_type in INDEX_TYPES:
                    raise IntegrityError(f"index entry {chosen.digest} of {ref} is itself an index")
            manifest = parse_manifest(fetched.data, fetched.media_type)
            if policy is PullPolicy.ALWAYS and top.from_mirror and fetched.from_mirror:
                # The pod's own access, at the registry: for what the pod asked for (a
                # tag a trusted mirror resolved may name bytes only the mirror has).
                client.check_access(ref.manifest_key)
        except CsiOciError as exc:
            metrics.count_pull_error(exc)
            raise
        log.info("resolved %s (%s) to %s (top-level %s)", ref, plat, fetched.digest, top.digest)
        return ResolvedImage(ref, fetched.digest, manifest, client, include)

    # -- pulling ------------------------------------------------------------------

    def ensure(self, resolved: ResolvedImage, platform: Platform, wait: float | None) -> Path:
        """The tree, pulling it if needed; waits at most `wait` seconds."""
        if self.store.image(resolved.key) is not None:
            self.store.remember_ref(str(resolved.reference), str(platform), resolved.digest)
            return self.store.tree(resolved.key)
        return self.job_for(resolved, platform).wait(wait)

    def job_for(self, resolved: ResolvedImage, platform: Platform) -> PullJob:
        with self._lock:
            job = self._jobs.get(resolved.key)
            if job is not None and job.done.is_set():
                # A success whose tree is still in the store is the answer: the
                # caller looked for the tree just before that job committed it
                # (without this, publishes at once could pull the image twice).
                # A failure is never replayed: the retry must look at the
                # registry again (the blob may have been fixed). An evicted
                # tree is pulled again.
                if job.error is None and self.store.image(resolved.key) is not None:
                    return job
                job = None
            if job is None:
                if resolved.manifest is None or resolved.client is None:
                    raise FailedPrecondition(f"image {resolved.key} vanished from the store")
                job = PullJob(resolved.key, str(resolved.reference))
                self._jobs[resolved.key] = job
                threading.Thread(
                    target=self._run,
                    args=(job, resolved, platform),
                    name=f"pull-{resolved.digest[7:19]}",
                    daemon=True,
                ).start()
            return job

    def active_jobs(self) -> list[PullJob]:
        with self._lock:
            return [j for j in self._jobs.values() if not j.done.is_set()]

    def _run(self, job: PullJob, resolved: ResolvedImage, platform: Platform) -> None:
        started = time.monotonic()
        outcome = "failed"
        metrics.PULLS_IN_PROGRESS.inc()
        try:
            job.tree, record = self._pull(job, resolved)
            self.store.remember_ref(str(resolved.reference), str(platform), resolved.digest)
            outcome = "succeeded"
            log.info("pulled %s in %.2fs", record.summary(), time.monotonic() - started)
        except BaseException as exc:
            job.error = _as_pull_error(exc, resolved, self.store)
            metrics.count_pull_error(job.error)
            log.warning("pull of %s (%s) failed: %s", resolved.reference, resolved.key, job.error)
        finally:
            metrics.PULLS_IN_PROGRESS.dec()
            metrics.PULLS.labels(outcome).inc()
            metrics.PULL_DURATION.labels(outcome).observe(time.monotonic() - started)
            job.done.set()

    def _pull(self, job: PullJob, resolved: ResolvedImage) -> tuple[Path, ImageRecord]:
        assert resolved.client is not None
        try:
            return self._pull_from(job, resolved, resolved.client)
        except IntegrityError as exc:
            mirrors = [name for name in resolved.client.served_by if name.startswith("mirror ")]
            if not mirrors:
                raise
            # Every mirror is untrusted bytes: one served content that does not
            # match its digest. Pull again from the registry itself.
            log.warning(
                "%s: %s served bytes that do not match (%s); using the registry itself",
                resolved.reference,
                ", ".join(sorted(mirrors)),
                exc,
            )
            job.progress.done = 0
            return self._pull_from(job, resolved, resolved.client.without_mirrors())

    def _pull_from(
        self, job: PullJob, resolved: ResolvedImage, client: RegistryClient
    ) -> tuple[Path, ImageRecord]:
        # The client counts what crosses the network (resumed and resent bytes
        # included); the difference is this attempt's share, failed or not.
        wire_before = client.bytes_on_wire
        try:
            return self._pull_attempt(job, resolved, client)
        finally:
            metrics.PULL_BYTES.inc(max(0, client.bytes_on_wire - wire_before))

    def _pull_attempt(
        self, job: PullJob, resolved: ResolvedImage, client: RegistryClient
    ) -> tuple[Path, ImageRecord]:
        assert resolved.manifest is not None
        manifest = resolved.manifest
        config = client.get_blob_bytes(
            manifest.config, f"config {manifest.config.digest}", MAX_CONFIG_BYTES
        )
        plan = plan_for(manifest, config)
        select = include_matcher(resolved.include)
        layers = tuple(lp for lp in plan.layers if _may_match(lp, select))
        if not self.verify_diff_ids:
            layers = tuple(replace(lp, diff_id=None) for lp in layers)
        job.progress.total = sum(lp.desc.size for lp in layers)
        job.progress.phase = "pulling"
        disk = self._make_room(resolved, layers)
        budget = Budget(self._limits_for(layers), parent=disk)
        staging = self.store.new_staging()
        try:
            rootfs = staging / "rootfs"
            if plan.sequential:
                self._apply_image(job, client, layers, rootfs, budget, select)
            else:
                self._apply_artifact(
                    job, client, replace(plan, layers=layers), rootfs, budget, select
                )
            files, nbytes, own = _count_tree(rootfs, self.store.blobs)
            record = ImageRecord(
                digest=resolved.digest,
                reference=str(resolved.reference),
                config_digest=manifest.config.digest,
                layers=[lp.desc.digest for lp in layers],
                compressed_bytes=job.progress.total,
                unpacked_bytes=nbytes,
                pulled_at=time.time(),
                packaging=plan.packaging,
                files=files,
                include=list(resolved.include),
                key=resolved.key,
                own_bytes=own,
            )
            job.progress.phase = "committing"
            crash_point("before-commit")
            tree = self.store.commit(staging, record)
        except BaseException:
            self.store.discard(staging)
            raise
        finally:
            for lp in layers:
                if lp.kind == Kind.IMAGE_TAR:  # spooled ahead; raw blobs are storage
                    with contextlib.suppress(OSError):
                        self.store.blob_path(lp.desc.digest).unlink()
        return tree, record

    def _make_room(self, resolved: ResolvedImage, layers: tuple[LayerPlan, ...]) -> DiskBudget:
        """The cache's room for this pull; unused images are evicted only as bytes land.

        Sizes in a manifest are claims: a pull whose declared sizes can never
        fit is refused before anything is evicted, and otherwise eviction
        waits for bytes that actually arrive (DiskBudget), so a descriptor
        that claims 90% of the cache for a 5-byte blob evicts nothing.
        """
        declared = [lp.declared_bytes for lp in layers]
        store = self.store
        if declared and all(d is not None for d in declared):
            estimate = sum(d or 0 for d in declared)
            best = store.best_room(self.in_use())
            if estimate > best:
                raise OutOfSpace(
                    f"not enough space for image {resolved.reference}: it needs {estimate} "
                    f"bytes ({human(estimate)}) but the node has room for {human(best)} "
                    f"{_space_facts(store)} even with every unused image evicted; "
                    f"{SPACE_ADVICE}",
                    kind=OutOfSpace.CACHE_FULL,
                )

        def make_room(short: int) -> int:
            return store.evict_for(short, self.in_use())

        return DiskBudget(store.room(), make_room)

    def _limits_for(self, layers: tuple[LayerPlan, ...]) -> Limits:
        """The byte budget: what the producer declared when every layer did."""
        declared = [lp.declared_bytes for lp in layers]
        if declared and all(d is not None for d in declared):
            total = sum(d for d in declared if d is not None)
            return replace(self.limits, max_bytes=min(self.limits.max_bytes, total))
        return self.limits

    # -- images: ordered layers ------------------------------------------------------

    def _apply_image(
        self,
        job: PullJob,
        client: RegistryClient,
        layers: tuple[LayerPlan, ...],
        rootfs: Path,
        budget: Budget,
        select: Callable[[str], bool] | None,
    ) -> None:
        pipeline = _LayerPipeline(self, job, client, layers)
        root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        applier = LayerApplier(root_fd, budget=budget, policy=Policy(image=True, select=select))
        try:
            for index, lp in enumerate(layers):
                what = f"layer {index + 1}/{len(layers)} ({lp.desc.digest})"
                with pipeline.open_layer(index) as (source, verified):
                    _apply_tar(applier, lp, source, verified, what)
        finally:
            pipeline.close()
            os.close(root_fd)

    # -- artifacts: independent layers, in parallel -------------------------------------

    def _apply_artifact(
        self,
        job: PullJob,
        client: RegistryClient,
        plan: Plan,
        rootfs: Path,
        budget: Budget,
        select: Callable[[str], bool] | None,
    ) -> None:
        root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        claimed: dict[str, str] = {}
        claim_lock = threading.Lock()
        cancel = threading.Event()

        def one(index: int, lp: LayerPlan) -> None:
            what = f"layer {index + 1}/{len(plan.layers)} ({lp.desc.digest})"
            if cancel.is_set():
                return
            if lp.kind == Kind.RAW_FILE:
                assert lp.path is not None
                with claim_lock:
                    previous = claimed.setdefault(lp.path, what)
                if previous != what:
                    raise InvalidLayer(f"{what}: duplicate path {lp.path!r}, also in {previous}")
                budget.charge(1, 0, f"{what}: {lp.path!r}")
                with self.store.pinned(blob_pin(lp.desc.digest)):  # not evicted before linked
                    blob = self._raw_blob(job, client, lp, what, cancel, budget)
                    _link_into(root_fd, lp.path, blob, what, budget)
                return
            under = tuple(lp.path.split("/")) if lp.path else ()
            layer_budget = budget
            if lp.declared_bytes is not None:
                layer_budget = Budget(Limits(max_bytes=lp.declared_bytes), parent=budget)
            policy = Policy(
                image=False, select=select, under=under, claimed=claimed, claim_lock=claim_lock
            )
            applier = LayerApplier(root_fd, budget=layer_budget, policy=policy)
            stream = client.blob_stream(lp.desc, what)
            try:
                _apply_tar(
                    applier, lp, _CountingReader(stream, job.progress.add, cancel), False, what
                )
            finally:
                stream.close()

        try:
            with ThreadPoolExecutor(
                max_workers=DOWNLOAD_WORKERS, thread_name_prefix="layer"
            ) as pool:
                futures = [pool.submit(one, i, lp) for i, lp in enumerate(plan.layers)]
                errors = []
                for fut in futures:
                    try:
                        fut.result()
                    except BaseException as exc:
                        cancel.set()
                        errors.append(exc)
            if errors:
                raise _most_telling(errors)
        finally:
            os.close(root_fd)

    def _raw_blob(
        self,
        job: PullJob,
        client: RegistryClient,
        lp: LayerPlan,
        what: str,
        cancel: threading.Event,
        budget: Budget,
    ) -> Path:
        """The verified blob in the shared blob store, downloading it if needed.

        The budget is charged as bytes arrive, not for the size the descriptor
        claims before the first byte (finding 3 of issue 14).
        """
        final = self.store.blob_path(lp.desc.digest)
        if final.exists():
            job.progress.add(lp.desc.size)
            return final
        fd, tmp = tempfile.mkstemp(prefix=final.name + ".", suffix=".partial", dir=final.parent)
        try:
            # No posix_fallocate: on ext4 preallocated extents must be converted
            # at writeback, which on a 4 GiB pull cost more than the download
            # (hack/bench); the budget is charged chunk by chunk instead.
            stream = client.blob_stream(lp.desc, what)
            # Receiving and hashing on one thread, writing on this one.
            reader = ReadAhead(
                VerifyingReader(stream, lp.desc.digest, lp.desc.size, what, job.progress.add),
                "raw-fetch",
                chunk=RAW_READ_SIZE,
                recycle=True,
            )
            try:
                while data := reader.read():
                    if cancel.is_set():
                        raise PullCancelled("pull cancelled: another layer failed")
                    budget.charge(0, len(data), f"{what}: {lp.path!r}")
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
            finally:
                stream.close()
                reader.close()
            os.fchmod(fd, RAW_FILE_MODE)
            os.close(fd)
            fd = -1
            self.store.commit_blob(Path(tmp), lp.desc.digest, flush=False)
            crash_point("after-download")
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return final


MAX_TAGS_SHOWN = 8


def _not_found(ref: Reference, client: RegistryClient, exc: NotFound) -> NotFound:
    """What is missing (tag, digest or the whole repository), with what there is instead."""
    where = f"{ref.registry}/{ref.repository}"
    try:
        tags = client.list_tags()
    except NotFound:
        return NotFound(
            f"image {ref} not found: repository {ref.repository} does not exist at "
            f"{ref.registry} (or is private and hidden from these credentials); check the "
            "image name"
        )
    except CsiOciError:
        tags = None
    if ref.digest and ref.manifest_key == ref.digest:
        return NotFound(
            f"image {ref} not found: manifest {ref.digest} is not in {where} (deleted, or "
            "pushed to another repository); check the digest"
        )
    tag = ref.manifest_key
    if tags:
        shown = ", ".join(sorted(tags)[:MAX_TAGS_SHOWN])
        more = f" ({len(tags)}{'+' if len(tags) >= 100 else ''} in all)" if len(tags) > 1 else ""
        if len(tags) > MAX_TAGS_SHOWN:
            shown += ", ..."
        return NotFound(
            f"image {ref} not found: tag {tag} does not exist in {where}; pushed tags: "
            f"{shown}{more}; fix the tag in the volume's image attribute"
        )
    if tags == []:
        return NotFound(
            f"image {ref} not found: repository {where} has no tags; push the image first"
        )
    return NotFound(f"image {ref} not found: tag {tag} does not exist in {where} ({exc})")


def _no_platform_message(ref: Reference, want: Platform, entries: list[Descriptor]) -> str:
    offered = sorted(
        {
            str(d.platform)
            for d in entries
            if d.platform is not None and d.platform.os not in ("unknown", "")
        }
    )
    return (
        f"image {ref} has no variant for platform {want} (this node's unless the volume sets "
        f"platform); available platforms: {', '.join(offered) or 'none'}; set the volume's "
        "platform attribute to one of them or push the image for this platform"
    )


def _may_match(lp: LayerPlan, select: Callable[[str], bool] | None) -> bool:
    """Can this layer hold a wanted file? Only layers known to be one file can say no."""
    if select is None:
        return True
    if lp.kind == Kind.RAW_FILE:
        return lp.path is not None and select(lp.path)
    if lp.kind == Kind.ARTIFACT_TAR and lp.path is not None and lp.declared_bytes is not None:
        return select(lp.path)  # a tar of one regular file at that path
    return True


def _apply_tar(
    applier: LayerApplier, lp: LayerPlan, source: Readable, verified: bool, what: str
) -> None:
    """Verify (digest, diff_id), decompress and apply one tar layer.

    Three stages on their own threads, so they use both cores: receive and
    hash the blob; inflate and hash the diff; parse the tar and write files.
    """
    blob = source if verified else VerifyingReader(source, lp.desc.digest, lp.desc.size, what)
    # zstandard's reader holds on to its input: only tar and gzip input recycles.
    stages = [ReadAhead(blob, "layer-fetch", recycle=lp.compression != Compression.ZSTD)]
    if lp.compression == Compression.NONE:
        if lp.diff_id is not None and lp.diff_id != lp.desc.digest:
            raise IntegrityError(f"{what}: uncompressed layer but its diff_id is {lp.diff_id}")
    else:
        stream = decompressor(stages[0], lp.compression, what)
        if lp.diff_id is not None:
            stream = VerifyingReader(stream, lp.diff_id, None, f"{what} (uncompressed, diff_id)")
        # zstd inflates into our buffers (readinto); gzip makes new ones.
        stages.append(
            ReadAhead(stream, "layer-inflate", recycle=lp.compression == Compression.ZSTD)
        )
    tar_stream = stages[-1]
    stats = None
    try:
        try:
            stats = applier.apply(tar_stream, what)
        except InvalidLayer:
            if not verified:
                # Undecodable bytes are most often wrong bytes: finish hashing so
                # the error names the digest mismatch when that is the cause.
                # The fetch stage reads its own rest: the inflate stage may
                # still be reading from it.
                with contextlib.suppress(InvalidLayer):
                    stages[0].finish()
            raise
        # Bytes after the end-of-archive marker are still hashed (they are part
        # of the digest), but only padding belongs there: cap what inflates,
        # and count it (an uncompressed layer's are bounded by its descriptor).
        # Reading the last stage to its end also ends (and so verifies) the
        # stages before it.
        if len(stages) == 1:
            stages[0].finish()
            return
        trailing = _drain(tar_stream, MAX_TRAILING_BYTES)
        if trailing > MAX_TRAILING_BYTES:
            raise InvalidLayer(
                f"{what}: {trailing} bytes after the tar end-of-archive marker "
                f"(at most {MAX_TRAILING_BYTES} of padding allowed)"
            )
        # Writers pad to a 10 KiB record: that much is free, as it was when
        # tarfile's own read buffer swallowed it.
        applier.charge_bytes(
            max(0, trailing - FREE_PADDING), f"{what}: padding after the end of the archive"
        )
        stages[0].finish()
    finally:
        for stage in reversed(stages):
            stage.close()
        if stats is not None and stats.skipped_special:
            log.info("%s: skipped %d device nodes/FIFOs", what, len(stats.skipped_special))


def _drain(stream: Readable, limit: int | None) -> int:
    """Read to the end; how many bytes that was (stops once past `limit`)."""
    total = 0
    while chunk := stream.read(4 * CHUNK):
        total += len(chunk)
        if limit is not None and total > limit:
            break  # the caller refuses the layer; stop inflating
    return total


def _link_into(root_fd: int, path: str, blob: Path, what: str, budget: Budget) -> None:
    """Hard-link a stored blob at `path` in the tree (in-root resolution)."""
    parts = path.split("/")

    def new_dir() -> None:
        budget.charge(1, 0, f"{what}: directory of {path!r}")

    parent = resolve_dir(root_fd, parts[:-1], create=True, on_create=new_dir)
    assert parent is not None
    try:
        os.link(blob, parts[-1], dst_dir_fd=parent, follow_symlinks=False)
    except FileExistsError:
        raise InvalidLayer(f"{what}: path {path!r} is already taken by another layer") from None
    finally:
        os.close(parent)


def _count_tree(root: Path, blob_store: Path) -> tuple[int, int, int]:
    """Regular files, their bytes, and what only this tree holds on disk: bytes of
    files not hard-linked from the blob store (counted there), plus every entry
    (directories, links, files) at ENTRY_DISK_BYTES, as the pull's budget charged
    them. Never follows links."""
    blob_inodes = set()
    for entry in blob_store.iterdir() if blob_store.is_dir() else []:
        with contextlib.suppress(OSError):
            blob_inodes.add(entry.lstat().st_ino)
    files = nbytes = own = 0
    seen: set[int] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        own += (len(dirnames) + len(filenames)) * ENTRY_DISK_BYTES
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                files += 1
                nbytes += st.st_size
                if st.st_ino not in seen and st.st_ino not in blob_inodes:
                    own += st.st_size
                seen.add(st.st_ino)
    return files, nbytes, own


def _most_telling(errors: list[BaseException]) -> BaseException:
    """Of parallel failures, the root cause rather than a consequent cancellation."""
    real = [e for e in errors if not isinstance(e, PullCancelled)]
    return (real or errors)[0]


SPACE_ADVICE = (
    "raise --cache-max-bytes or free disk space on the node, or publish fewer files "
    "with the include attribute"
)


def _space_facts(store: Store) -> str:
    """The numbers behind a full cache, with the flags that set them."""
    budget = (
        f"cache budget {store.max_bytes} bytes (--cache-max-bytes)"
        if store.max_bytes
        else "no --cache-max-bytes budget"
    )
    try:
        used, free = human(store.usage().total), human(store.free_bytes())
    except OSError:
        used = free = "unknown"
    return (
        f"({budget}, {used} in the cache, {free} free on disk, free-space floor "
        f"{store.min_free_bytes} bytes (--cache-min-free-bytes))"
    )


def _as_pull_error(exc: BaseException, resolved: ResolvedImage, store: Store) -> BaseException:
    """The error a publish reports: names the image, says what to do."""
    ref = str(resolved.reference)
    if is_out_of_space(exc):
        return OutOfSpace(
            f"no space left on the state directory {store.root} while pulling image {ref} "
            f"{_space_facts(store)}; {SPACE_ADVICE}"
        )
    if isinstance(exc, OutOfSpace) and exc.kind == OutOfSpace.CACHE_FULL and ref not in str(exc):
        # The cache budget stopped an image as its bytes landed.
        return OutOfSpace(
            f"not enough space for image {ref}: {exc} {_space_facts(store)}; {SPACE_ADVICE}",
            kind=OutOfSpace.CACHE_FULL,
        )
    if isinstance(exc, InvalidLayer):
        return InvalidLayer(
            f"image {ref} has a layer csi-oci refuses: {exc}; the image is malformed or "
            "unsafe: rebuild it with a standard image builder"
        )
    if isinstance(exc, CsiOciError | OSError):
        if ref in str(exc):
            return exc
        # Same class (so the same gRPC code and metric reason), with the image named.
        try:
            named = type(exc)(f"image {ref}: {exc}")
        except TypeError:  # an exception class with other constructor arguments
            return exc
        return named.with_traceback(exc.__traceback__)
    return CsiOciError(f"pull of image {ref} failed: {exc!r}")


class _LayerPipeline:
    """Hands the image applier each layer in order: a live stream or a spooled file."""

    def __init__(
        self, puller: Puller, job: PullJob, client: RegistryClient, layers: tuple[LayerPlan, ...]
    ) -> None:
        self._puller = puller
        self._job = job
        self._client = client
        self._layers = layers
        self._lock = threading.Lock()
        self._claimed = [False] * len(layers)
        self._spooled: list[Future[Path] | None] = [None] * len(layers)
        self._applying = 0
        self._stop = False
        self._pool = ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS - 1, thread_name_prefix="blob")
        for index, lp in enumerate(layers):
            path = puller.store.blob_path(lp.desc.digest)
            if path.exists():
                self._claimed[index] = True  # spooled by an earlier attempt, verified then
                done: Future[Path] = Future()
                done.set_result(path)
                job.progress.add(lp.desc.size)
                self._spooled[index] = done
        for _ in range(min(DOWNLOAD_WORKERS - 1, max(0, len(layers) - 1))):
            self._pool.submit(self._worker)

    def close(self) -> None:
        with self._lock:
            self._stop = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _claim_ahead(self) -> int | None:
        with self._lock:
            if self._stop:
                return None
            for index in range(self._applying + 1, len(self._layers)):
                if self._layers[index].desc.size > SPOOL_AHEAD_MAX:
                    continue  # streamed in its turn: no second pass over big blobs
                if not self._claimed[index]:
                    self._claimed[index] = True
                    fut: Future[Path] = Future()
                    self._spooled[index] = fut
                    return index
            return None

    def _worker(self) -> None:
        while (index := self._claim_ahead()) is not None:
            fut = self._spooled[index]
            assert fut is not None
            try:
                fut.set_result(self._spool(index))
            except BaseException as exc:
                fut.set_exception(exc)
                return

    def _spool(self, index: int) -> Path:
        desc = self._layers[index].desc
        final = self._puller.store.blob_path(desc.digest)
        fd, tmp = tempfile.mkstemp(prefix=final.name + ".", suffix=".partial", dir=final.parent)
        os.close(fd)
        partial = Path(tmp)
        what = f"layer {index + 1}/{len(self._layers)} ({desc.digest})"
        stream = self._client.blob_stream(desc, what)
        try:
            reader = VerifyingReader(stream, desc.digest, desc.size, what, self._job.progress.add)
            with open(partial, "wb") as out:
                while chunk := reader.read(CHUNK):
                    if self._stop:
                        raise PullCancelled("pull cancelled")
                    out.write(chunk)
            # Reused as verified by a retry: must not survive a reboot half-written.
            self._puller.store.commit_blob(partial, desc.digest, flush=False)
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise
        finally:
            stream.close()
        crash_point("after-download")
        return final

    @contextlib.contextmanager
    def open_layer(self, index: int) -> Iterator[tuple[Readable, bool]]:
        """Yield (reader, already_verified) for layer `index`."""
        with self._lock:
            self._applying = index
            stream_it = not self._claimed[index]
            self._claimed[index] = True
            fut = self._spooled[index]
        spooled = None
        if not stream_it:
            assert fut is not None
            try:
                spooled = open(fut.result(), "rb", buffering=0)
            except FileNotFoundError:
                # Another pull sharing this layer finished and removed the blob
                # between our check and now: fetch it ourselves.
                pass
        if spooled is not None:
            with spooled:
                yield spooled, True
            return
        desc = self._layers[index].desc
        stream = self._client.blob_stream(desc, f"layer {desc.digest}")
        try:
            yield _CountingReader(stream, self._job.progress.add), False
        finally:
            stream.close()


class _CountingReader:
    def __init__(
        self,
        source: Readable,
        on_bytes: Callable[[int], None],
        cancel: threading.Event | None = None,
    ) -> None:
        self._source = source
        self._on_bytes = on_bytes
        self._cancel = cancel

    def read(self, n: int = -1, /) -> Chunk:
        if self._cancel is not None and self._cancel.is_set():
            raise PullCancelled("pull cancelled: another layer failed")
        data = self._source.read(n)
        self._on_bytes(len(data))
        return data

    def readinto(self, buf: memoryview) -> int:
        if self._cancel is not None and self._cancel.is_set():
            raise PullCancelled("pull cancelled: another layer failed")
        n: int = cast(ReadableInto, self._source).readinto(buf)
        self._on_bytes(n)
        return n


__all__ = ["Progress", "PullJob", "Puller", "ResolvedImage"]
