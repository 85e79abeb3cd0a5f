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
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from csi_oci.errors import (
    FailedPrecondition,
    IntegrityError,
)
from csi_oci.faults import crash_point
from csi_oci.oci.config import ConfigSource
from csi_oci.oci.manifest import (
    MAX_CONFIG_BYTES,
)
from csi_oci.oci.packaging import Kind, plan_for
from csi_oci.oci.registry import CredentialLookup, RegistryClient
from csi_oci.pull.artifact import ArtifactLayers
from csi_oci.pull.jobs import PullJob, PullJobs
from csi_oci.pull.layers import (
    _may_match,
    apply_image_layers,
)
from csi_oci.pull.messages import _as_pull_error
from csi_oci.pull.resolve import ResolvedImage, Resolver
from csi_oci.pull.room import limits_for, room_for
from csi_oci.spec.attributes import Platform, PullPolicy, include_matcher
from csi_oci.spec.reference import Reference
from csi_oci.storage.records import ImageRecord
from csi_oci.storage.store import Store
from csi_oci.telemetry import instruments
from csi_oci.unpack.budget import ENTRY_DISK_BYTES, Budget, Limits

log = logging.getLogger(__name__)


RAW_FILE_MODE = 0o644


RAW_READ_SIZE = 256 << 10  # per read of a raw blob: small enough to stay in the CPU cache


class Puller:
    """Resolve (Resolver), then one background job per tree (PullJobs) that fetches,
    verifies and applies its layers (pull.layers, pull.artifact) and commits it."""

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
        self.resolver = Resolver(store, self.registries)
        # Trees that volumes use (given by the VolumeManager): never evicted.
        self.in_use: Callable[[], set[str]] = set
        self._jobs = PullJobs()

    def resolve(
        self,
        ref: Reference,
        platform: Platform,
        policy: PullPolicy,
        credentials: CredentialLookup | None,
        include: tuple[str, ...] = (),
    ) -> ResolvedImage:
        """Pin `ref` to a platform manifest digest (see Resolver.resolve)."""
        return self.resolver.resolve(ref, platform, policy, credentials, include)

    # -- pulling ------------------------------------------------------------------

    def ensure(self, resolved: ResolvedImage, platform: Platform, wait: float | None) -> Path:
        """The tree, pulling it if needed; waits at most `wait` seconds."""
        if self.store.image(resolved.key) is not None:
            self.store.tags.remember(str(resolved.reference), str(platform), resolved.digest)
            return self.store.tree(resolved.key)
        return self.job_for(resolved, platform).wait(wait)

    def job_for(self, resolved: ResolvedImage, platform: Platform) -> PullJob:
        """The job pulling this tree: the running one, or a new one in its own thread."""
        if resolved.manifest is None or resolved.client is None:
            if self.store.image(resolved.key) is None:
                raise FailedPrecondition(f"image {resolved.key} vanished from the store")

        def start(job: PullJob) -> None:
            if resolved.manifest is None or resolved.client is None:
                raise FailedPrecondition(f"image {resolved.key} vanished from the store")
            threading.Thread(
                target=self._run,
                args=(job, resolved, platform),
                name=f"pull-{resolved.digest[7:19]}",
                daemon=True,
            ).start()

        return self._jobs.join_or_start(
            resolved.key,
            str(resolved.reference),
            finished_is_answer=lambda: self.store.image(resolved.key) is not None,
            start=start,
        )

    def active_jobs(self) -> list[PullJob]:
        return self._jobs.active()

    def _run(self, job: PullJob, resolved: ResolvedImage, platform: Platform) -> None:
        started = time.monotonic()
        outcome = "failed"
        instruments.PULLS_IN_PROGRESS.inc()
        try:
            job.tree, record = self._pull(job, resolved)
            self.store.tags.remember(str(resolved.reference), str(platform), resolved.digest)
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
        disk = room_for(self.store, resolved.reference, layers, self.in_use)
        budget = Budget(limits_for(self.limits, layers), parent=disk)
        staging = self.store.new_staging()
        try:
            rootfs = staging / "rootfs"
            if plan.sequential:
                apply_image_layers(self.store, job, client, layers, rootfs, budget, select)
            else:
                artifact = ArtifactLayers(self.store, job, client)
                artifact.apply(replace(plan, layers=layers), rootfs, budget, select)
            files, nbytes, own, entries = _count_tree(rootfs, self.store.blobs)
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
                entries=entries,
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


def _count_tree(root: Path, blob_store: Path) -> tuple[int, int, int, int]:
    """Regular files, their bytes, and what only this tree holds on disk: bytes of
    files not hard-linked from the blob store (counted there), plus every entry
    (directories, links, files) at ENTRY_DISK_BYTES, as the pull's budget charged
    them. Never follows links."""
    blob_inodes = set()
    for entry in blob_store.iterdir() if blob_store.is_dir() else []:
        with contextlib.suppress(OSError):
            blob_inodes.add(entry.lstat().st_ino)
    files = nbytes = own = 0
    entries = 1  # the root
    seen: set[int] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        entries += len(dirnames) + len(filenames)
        own += (len(dirnames) + len(filenames)) * ENTRY_DISK_BYTES
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                files += 1
                nbytes += st.st_size
                if st.st_ino not in seen and st.st_ino not in blob_inodes:
                    own += st.st_size
                seen.add(st.st_ino)
    return files, nbytes, own, entries
