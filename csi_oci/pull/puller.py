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
needs it (so different `include` sets share one download)."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from csi_oci.errors import (
    CsiOciError,
    FailedPrecondition,
    IntegrityError,
    InvalidLayer,
    NotFound,
    OutOfSpace,
    PullCancelled,
)
from csi_oci.faults import crash_point
from csi_oci.oci.config import ConfigSource
from csi_oci.oci.manifest import (
    INDEX_TYPES,
    MAX_CONFIG_BYTES,
    parse_index,
    parse_manifest,
    select_platform,
)
from csi_oci.oci.packaging import Kind, LayerPlan, Plan, plan_for
from csi_oci.oci.registry import CredentialLookup, RegistryClient
from csi_oci.pull.jobs import PullJob, human
from csi_oci.pull.layers import (
    DOWNLOAD_WORKERS,
    _apply_tar,
    _CountingReader,
    _LayerPipeline,
    _may_match,
)
from csi_oci.pull.messages import SPACE_ADVICE, _as_pull_error, _most_telling, _space_facts
from csi_oci.pull.resolve import ResolvedImage, _no_platform_message, _not_found
from csi_oci.spec.attributes import Platform, PullPolicy, include_matcher
from csi_oci.spec.reference import Reference
from csi_oci.storage.records import ImageRecord, blob_pin, tree_key
from csi_oci.storage.store import Store
from csi_oci.stream.readahead import ReadAhead
from csi_oci.stream.verify import VerifyingReader
from csi_oci.telemetry import instruments
from csi_oci.unpack.applier import LayerApplier, Policy
from csi_oci.unpack.budget import ENTRY_DISK_BYTES, Budget, DiskBudget, Limits
from csi_oci.unpack.paths import resolve_dir

log = logging.getLogger(__name__)


RAW_FILE_MODE = 0o644


RAW_READ_SIZE = 256 << 10  # per read of a raw blob: small enough to stay in the CPU cache


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
            instruments.count_pull_error(error)
            raise error from None
        except CsiOciError as exc:
            instruments.count_pull_error(exc)
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
            instruments.count_pull_error(exc)
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
        instruments.PULLS_IN_PROGRESS.inc()
        try:
            job.tree, record = self._pull(job, resolved)
            self.store.remember_ref(str(resolved.reference), str(platform), resolved.digest)
            outcome = "succeeded"
            log.info("pulled %s in %.2fs", record.summary(), time.monotonic() - started)
        except BaseException as exc:
            job.error = _as_pull_error(exc, resolved, self.store)
            instruments.count_pull_error(job.error)
            log.warning("pull of %s (%s) failed: %s", resolved.reference, resolved.key, job.error)
        finally:
            instruments.PULLS_IN_PROGRESS.dec()
            instruments.PULLS.labels(outcome).inc()
            instruments.PULL_DURATION.labels(outcome).observe(time.monotonic() - started)
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
            instruments.PULL_BYTES.inc(max(0, client.bytes_on_wire - wire_before))

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
        pipeline = _LayerPipeline(self.store, job, client, layers)
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
