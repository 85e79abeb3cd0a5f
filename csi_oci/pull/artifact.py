"""Artifacts (ORAS, ModelPack, KitOps): independent layers, all in parallel.

A raw layer's file is written once, into the node's shared blob store while
it is hashed, and hard-linked into each tree that needs it (so different
`include` sets share one download); tar layers unpack under their title.
Two layers may never claim one path.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from csi_oci.errors import InvalidLayer, PullCancelled
from csi_oci.faults import crash_point
from csi_oci.oci.packaging import Kind, LayerPlan, Plan
from csi_oci.oci.registry import RegistryClient
from csi_oci.pull.jobs import PullJob
from csi_oci.pull.layers import DOWNLOAD_WORKERS, _apply_tar, _CountingReader
from csi_oci.pull.messages import _most_telling
from csi_oci.storage.records import blob_pin
from csi_oci.storage.store import Store
from csi_oci.stream.readahead import ReadAhead
from csi_oci.stream.verify import VerifyingReader
from csi_oci.unpack.applier import LayerApplier, Policy
from csi_oci.unpack.budget import Budget, Limits
from csi_oci.unpack.paths import resolve_dir

RAW_FILE_MODE = 0o644
RAW_READ_SIZE = 256 << 10  # per read of a raw blob: small enough to stay in the CPU cache


class ArtifactLayers:
    """Applies an artifact's layers into one staging root."""

    def __init__(self, store: Store, job: PullJob, client: RegistryClient) -> None:
        self.store = store
        self.job = job
        self.client = client

    def apply(
        self, plan: Plan, rootfs: Path, budget: Budget, select: Callable[[str], bool] | None
    ) -> None:
        job, client = self.job, self.client
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
                with self.store.space.pinned(blob_pin(lp.desc.digest)):  # not evicted before linked
                    blob = self._raw_blob(lp, what, cancel, budget)
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
            self.job.progress.add(lp.desc.size)
            return final
        fd, tmp = tempfile.mkstemp(prefix=final.name + ".", suffix=".partial", dir=final.parent)
        try:
            # No posix_fallocate: on ext4 preallocated extents must be converted
            # at writeback, which on a 4 GiB pull cost more than the download
            # (hack/bench); the budget is charged chunk by chunk instead.
            stream = self.client.blob_stream(lp.desc, what)
            # Receiving and hashing on one thread, writing on this one.
            reader = ReadAhead(
                VerifyingReader(stream, lp.desc.digest, lp.desc.size, what, self.job.progress.add),
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
