"""Pulling an image into the store: resolve -> fetch -> verify -> apply -> commit.

One pull per manifest digest runs at a time (single flight): concurrent
publishes of the same image join the running job. A job runs in its own
thread, so a caller whose CSI call budget runs out can return and join the
same job on its next retry.

Layers download concurrently and are applied in order. The layer the
applier needs next is streamed straight from the registry into the tree
(download, hash, decompress, write in one pass); layers further ahead are
downloaded by worker threads into verified spool files meanwhile, applied
when their turn comes and deleted after the commit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from csi_oci.applier import LayerApplier, Limits
from csi_oci.attributes import Platform, PullPolicy
from csi_oci.credentials import Credentials
from csi_oci.errors import (
    CsiOciError,
    FailedPrecondition,
    IntegrityError,
    InvalidLayer,
    OutOfSpace,
    PullInProgress,
)
from csi_oci.manifest import (
    INDEX_TYPES,
    MAX_CONFIG_BYTES,
    Descriptor,
    ImageManifest,
    layer_compression,
    parse_config,
    parse_index,
    parse_manifest,
    select_platform,
)
from csi_oci.reference import Reference
from csi_oci.registry import RegistryClient
from csi_oci.store import ImageRecord, Store
from csi_oci.streams import CHUNK, Readable, VerifyingReader, decompressor

log = logging.getLogger(__name__)

DOWNLOAD_WORKERS = 3


@dataclass
class Progress:
    """Bytes of layer blobs received, for ABORTED messages and the CLI bar."""

    total: int = 0
    done: int = 0
    phase: str = "resolving"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n

    def describe(self) -> str:
        if self.total <= 0:
            return self.phase
        pct = 100.0 * self.done / self.total
        return f"{self.phase}: {_human(self.done)} of {_human(self.total)} ({pct:.0f}%)"


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


@dataclass
class ResolvedImage:
    """A reference pinned to one platform-specific manifest."""

    reference: Reference
    digest: str  # platform manifest digest: the store key
    manifest: ImageManifest | None  # None when served from the local record
    client: RegistryClient | None


class PullJob:
    """One background pull of one manifest digest."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self.progress = Progress()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.tree: Path | None = None
        self.finished_at = 0.0

    def wait(self, timeout: float | None) -> Path:
        if not self.done.wait(timeout):
            raise PullInProgress(
                f"still pulling {self.digest} ({self.progress.describe()}); "
                "the pull continues in the background, retry to pick it up"
            )
        if self.error is not None:
            raise self.error
        assert self.tree is not None
        return self.tree


class Puller:
    def __init__(self, store: Store, *, limits: Limits | None = None) -> None:
        self.store = store
        self.limits = limits or Limits()
        self._jobs: dict[str, PullJob] = {}
        self._lock = threading.Lock()
        self.downloads = 0  # blobs fetched from a registry (tests assert single flight)

    # -- resolution -------------------------------------------------------------

    def resolve(
        self,
        ref: Reference,
        platform: Platform,
        policy: PullPolicy,
        credentials: Credentials | None,
    ) -> ResolvedImage:
        """Pin `ref` to a platform manifest digest, honouring the pull policy.

        Never and IfNotPresent answer from the node's record of earlier
        resolutions without touching the network when they can.
        """
        key_ref, plat = str(ref), str(platform)
        if policy is not PullPolicy.ALWAYS:
            known = self.store.lookup_ref(key_ref, plat)
            if known is not None:
                return ResolvedImage(ref, known, None, None)
            if policy is PullPolicy.NEVER:
                raise FailedPrecondition(
                    f"image {ref} ({plat}) is not present on this node and pullPolicy is Never"
                )
        client = RegistryClient(ref, credentials)
        top = client.get_manifest(ref.manifest_key)
        fetched = top
        if top.media_type in INDEX_TYPES:
            chosen = select_platform(parse_index(top.data), platform)
            fetched = client.get_manifest(chosen.digest)
            if fetched.media_type in INDEX_TYPES:
                raise IntegrityError(f"index entry {chosen.digest} of {ref} is itself an index")
        manifest = parse_manifest(fetched.data, fetched.media_type)
        log.info("resolved %s (%s) to %s (top-level %s)", ref, plat, fetched.digest, top.digest)
        return ResolvedImage(ref, fetched.digest, manifest, client)

    # -- pulling ------------------------------------------------------------------

    def ensure(self, resolved: ResolvedImage, platform: Platform, wait: float | None) -> Path:
        """The image's tree, pulling it if needed; waits at most `wait` seconds."""
        rec = self.store.image(resolved.digest)
        if rec is not None:
            self.store.remember_ref(str(resolved.reference), str(platform), resolved.digest)
            return self.store.tree(resolved.digest)
        job = self.job_for(resolved, platform)
        return job.wait(wait)

    def job_for(self, resolved: ResolvedImage, platform: Platform) -> PullJob:
        with self._lock:
            job = self._jobs.get(resolved.digest)
            if job is not None and job.done.is_set():
                # A finished job is never reused: after a success the tree is in
                # the store; after a failure the retry must look at the registry
                # again (the blob may have been fixed), not replay the old error.
                job = None
            if job is None:
                if resolved.manifest is None or resolved.client is None:
                    raise FailedPrecondition(f"image {resolved.digest} vanished from the store")
                job = PullJob(resolved.digest)
                self._jobs[resolved.digest] = job
                thread = threading.Thread(
                    target=self._run,
                    args=(job, resolved, platform),
                    name=f"pull-{resolved.digest[7:19]}",
                    daemon=True,
                )
                thread.start()
            return job

    def active_jobs(self) -> list[PullJob]:
        with self._lock:
            return [j for j in self._jobs.values() if not j.done.is_set()]

    def _run(self, job: PullJob, resolved: ResolvedImage, platform: Platform) -> None:
        started = time.monotonic()
        try:
            job.tree = self._pull(job, resolved)
            self.store.remember_ref(str(resolved.reference), str(platform), resolved.digest)
            log.info(
                "pulled %s as %s: %s in %.2fs",
                resolved.reference,
                resolved.digest,
                _human(job.progress.done),
                time.monotonic() - started,
            )
        except BaseException as exc:
            job.error = (
                exc
                if isinstance(exc, CsiOciError | OSError)
                else CsiOciError(f"pull failed: {exc!r}")
            )
            if isinstance(exc, OSError) and exc.errno in (28, 122):
                job.error = OutOfSpace(
                    f"no space left on the state directory while pulling {resolved.reference}"
                )
            log.warning(
                "pull of %s (%s) failed: %s", resolved.reference, resolved.digest, job.error
            )
        finally:
            job.finished_at = time.monotonic()
            job.done.set()

    def _pull(self, job: PullJob, resolved: ResolvedImage) -> Path:
        assert resolved.manifest is not None and resolved.client is not None
        manifest, client = resolved.manifest, resolved.client
        config_bytes = client.get_blob_bytes(
            manifest.config, f"config {manifest.config.digest}", MAX_CONFIG_BYTES
        )
        config = parse_config(config_bytes)
        if len(config.diff_ids) != len(manifest.layers):
            raise IntegrityError(
                f"image {resolved.reference}: config lists {len(config.diff_ids)} diff_ids "
                f"but the manifest has {len(manifest.layers)} layers"
            )
        for layer in manifest.layers:
            layer_compression(layer)  # refuse unknown media types before any download
        job.progress.total = manifest.total_layer_bytes
        job.progress.phase = "pulling"
        staging = self.store.new_staging()
        try:
            unpacked = self._apply_layers(
                job, client, manifest, config.diff_ids, staging / "rootfs"
            )
            record = ImageRecord(
                digest=resolved.digest,
                reference=str(resolved.reference),
                config_digest=manifest.config.digest,
                layers=[layer.digest for layer in manifest.layers],
                compressed_bytes=manifest.total_layer_bytes,
                unpacked_bytes=unpacked,
                pulled_at=time.time(),
            )
            job.progress.phase = "committing"
            tree = self.store.commit(staging, record)
        except BaseException:
            self.store.discard(staging)
            raise
        finally:
            for layer in manifest.layers:
                with contextlib.suppress(OSError):
                    self.store.blob_path(layer.digest).unlink()
        return tree

    def _apply_layers(
        self,
        job: PullJob,
        client: RegistryClient,
        manifest: ImageManifest,
        diff_ids: tuple[str, ...],
        rootfs: Path,
    ) -> int:
        pipeline = _LayerPipeline(self, job, client, manifest.layers)
        root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        applier = LayerApplier(root_fd, self.limits)
        total = 0
        try:
            for index, (layer, diff_id) in enumerate(zip(manifest.layers, diff_ids, strict=True)):
                what = f"layer {index + 1}/{len(manifest.layers)} ({layer.digest})"
                with pipeline.open_layer(index) as (source, verified):
                    total += self._apply_one(applier, layer, diff_id, source, verified, what)
        finally:
            pipeline.close()
            os.close(root_fd)
        return total

    def _apply_one(
        self,
        applier: LayerApplier,
        layer: Descriptor,
        diff_id: str,
        source: Readable,
        verified: bool,
        what: str,
    ) -> int:
        compression = layer_compression(layer)
        blob = source if verified else VerifyingReader(source, layer.digest, layer.size, what)
        if compression == "none":
            if diff_id != layer.digest:
                raise IntegrityError(f"{what}: uncompressed layer but config diff_id is {diff_id}")
            tar_stream: Readable = blob
            diff_reader = None
        else:
            diff_reader = VerifyingReader(
                decompressor(blob, compression, what),
                diff_id,
                None,
                f"{what} (uncompressed, diff_id)",
            )
            tar_stream = diff_reader
        try:
            stats = applier.apply(tar_stream, what)
        except InvalidLayer:
            if isinstance(blob, VerifyingReader) and not blob.verified:
                # Undecodable bytes are most often wrong bytes: finish hashing
                # so the error names the digest mismatch when that is the cause.
                blob.drain()
            raise
        if diff_reader is not None:
            diff_reader.drain()
        if isinstance(blob, VerifyingReader):
            blob.drain()
        if stats.skipped_special:
            log.info("%s: skipped %d device nodes/FIFOs", what, len(stats.skipped_special))
        return stats.bytes


class _LayerPipeline:
    """Hands the applier each layer in order: a live stream or a spooled file."""

    def __init__(
        self, puller: Puller, job: PullJob, client: RegistryClient, layers: tuple[Descriptor, ...]
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
        self._pool = ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS, thread_name_prefix="blob")
        for index, layer in enumerate(layers):
            if puller.store.blob_path(layer.digest).exists():
                self._claimed[index] = True  # spooled by an earlier attempt, verified then
                done: Future[Path] = Future()
                done.set_result(puller.store.blob_path(layer.digest))
                job.progress.add(layer.size)
                self._spooled[index] = done
        for _ in range(min(DOWNLOAD_WORKERS, max(0, len(layers) - 1))):
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
        layer = self._layers[index]
        final = self._puller.store.blob_path(layer.digest)
        fd, tmp = tempfile.mkstemp(prefix=final.name + ".", suffix=".partial", dir=final.parent)
        os.close(fd)
        partial = Path(tmp)
        what = f"layer {index + 1}/{len(self._layers)} ({layer.digest})"
        resp = self._client.open_blob(layer, what)
        self._puller.downloads += 1
        try:
            reader = VerifyingReader(
                resp.raw, layer.digest, layer.size, what, self._job.progress.add
            )
            with open(partial, "wb") as out:
                while chunk := reader.read(CHUNK):
                    if self._stop:
                        raise CsiOciError("pull cancelled")
                    out.write(chunk)
            os.rename(partial, final)
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise
        finally:
            resp.close()
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
        layer = self._layers[index]
        resp = self._client.open_blob(layer, f"layer {layer.digest}")
        self._puller.downloads += 1
        try:
            yield _CountingReader(resp.raw, self._job.progress.add), False
        finally:
            resp.close()


class _CountingReader:
    def __init__(self, source: Readable, on_bytes: Callable[[int], None]) -> None:
        self._source = source
        self._on_bytes = on_bytes

    def read(self, n: int = -1, /) -> bytes:
        data = self._source.read(n)
        self._on_bytes(len(data))
        return data


__all__ = ["IntegrityError", "OutOfSpace", "Progress", "PullJob", "Puller", "ResolvedImage"]
