"""Image layers in order: fetch | inflate | tar stages, spooled ahead when it helps.

Each compressed layer runs as three stages on their own threads (receive and
hash, inflate and diff_id, tar parse and write), handing recycled buffers down
the line (csi_oci.stream.readahead). Layers after the first are downloaded
ahead into the blob store while earlier ones are applied.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import cast

from csi_oci.errors import (
    IntegrityError,
    InvalidLayer,
    PullCancelled,
)
from csi_oci.faults import crash_point
from csi_oci.oci.packaging import Kind, LayerPlan
from csi_oci.oci.registry import RegistryClient
from csi_oci.pull.jobs import PullJob
from csi_oci.storage.store import Store
from csi_oci.stream.inflate import Compression, decompressor
from csi_oci.stream.readahead import ReadAhead
from csi_oci.stream.verify import (
    CHUNK,
    DIFF_ID_HINT,
    Chunk,
    Readable,
    ReadableInto,
    VerifyingReader,
)
from csi_oci.unpack.applier import LayerApplier, Policy
from csi_oci.unpack.budget import Budget

log = logging.getLogger(__name__)


# Streams in flight: one more than cores (hashing and writing release the GIL);
# on 2 cores 3 measured best, 4+ only contended.
DOWNLOAD_WORKERS = max(3, min(8, (os.cpu_count() or 2) + 1))


# Layers up to this size are downloaded ahead of their turn into a verified
# spool file, hiding a request's latency per layer (images of many small
# layers); bigger ones stream when their turn comes, through parallel ranges,
# without a second pass over their bytes.
SPOOL_AHEAD_MAX = 64 << 20


MAX_TRAILING_BYTES = 16 << 20  # padding after a tar end marker (records are 10 KiB)


FREE_PADDING = 2 * 10240  # a tar record (blocking factor 20) and the second zero block


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
    diff: VerifyingReader | None = None
    # zstandard's reader holds on to its input: only tar and gzip input recycles.
    stages = [ReadAhead(blob, "layer-fetch", recycle=lp.compression != Compression.ZSTD)]
    if lp.compression == Compression.NONE:
        if lp.diff_id is not None and lp.diff_id != lp.desc.digest:
            raise IntegrityError(f"{what}: uncompressed layer but its diff_id is {lp.diff_id}")
    else:
        stream = decompressor(stages[0], lp.compression, what)
        if lp.diff_id is not None:
            diff = VerifyingReader(
                stream,
                lp.diff_id,
                None,
                f"{what} (uncompressed, diff_id)",
                mismatch_hint=DIFF_ID_HINT,
            )
            stream = diff
        # zstd inflates into our buffers (readinto); gzip makes new ones.
        stages.append(
            ReadAhead(stream, "layer-inflate", recycle=lp.compression == Compression.ZSTD)
        )
    tar_stream = stages[-1]
    stats = None
    try:
        try:
            stats = applier.apply(tar_stream, what)
            trailing = 0 if len(stages) == 1 else _drain(tar_stream, MAX_TRAILING_BYTES)
        except IntegrityError:
            if diff is not None and diff.mismatched and not verified:
                # Before blaming the image, prove the blob: a wrong blob is the
                # registry's fault and says so (finish raises that mismatch).
                stages[0].finish()
            raise
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


class _LayerPipeline:
    """Hands the image applier each layer in order: a live stream or a spooled file."""

    def __init__(
        self, store: Store, job: PullJob, client: RegistryClient, layers: tuple[LayerPlan, ...]
    ) -> None:
        self._store = store
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
            path = store.blob_path(lp.desc.digest)
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
        final = self._store.blob_path(desc.digest)
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
            self._store.commit_blob(partial, desc.digest, flush=False)
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


def apply_image_layers(
    store: Store,
    job: PullJob,
    client: RegistryClient,
    layers: tuple[LayerPlan, ...],
    rootfs: Path,
    budget: Budget,
    select: Callable[[str], bool] | None,
) -> None:
    pipeline = _LayerPipeline(store, job, client, layers)
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
