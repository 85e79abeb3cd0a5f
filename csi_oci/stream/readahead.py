"""A pipeline stage: a thread reads a stream ahead of its consumer.

A pull is a chain of CPU-heavy stages (receive, sha256, inflate, sha256 of
the diff, tar parse, write). In one thread they run one after another on one
core. hashlib, zlib/isal, zstandard and os.write release the GIL on large
buffers, so putting a ReadAhead between two stages lets the stage before it
(say, receiving and hashing the blob) run on one core while the stage after
it (inflating, or parsing and writing the tar) runs on the other.

Chunks are handed over as they come (bytes, bytearray or memoryview), never
copied. The consumer reads views of them; `read` may return less than asked.

With `recycle`, the thread fills a small pool of buffers with `readinto`
and reuses each once the consumer has moved past it. A new 4 MiB object per
read costs the kernel a page fault and a zeroed page for every 4 KiB of it:
on a multi-GiB pull that was most of the system time. Only for consumers
that are done with a view when they call `read` again (os.write, the gzip
inflater); zstandard's reader keeps its input buffer across calls, so its
input must not be recycled.
An exception in the producer (a digest mismatch found at the end of the blob,
a broken connection) is raised to the consumer at the point in the stream
where it happened, after every chunk before it.

A stage has one consumer. When the consumer gives up early but still needs
the source read to its end (to learn whether the blob's digest held), it
calls `finish`: the thread reads the rest itself and drops it. Draining the
stage from a second thread instead raced with the first consumer for the
end-of-stream marker, and the loser waited forever.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import threading
from typing import Any, cast

from csi_oci.stream.verify import Readable, ReadableInto

# Small on purpose: a chunk is received, hashed and written (or inflated)
# while it is still in the core's cache. With 4 MiB chunks every stage read
# its bytes from memory again, and the kernel's copy into the page cache
# alone took three times the CPU (measured with perf on a 1 GiB pull).
PIPE_CHUNK = 256 << 10

_END = object()
_PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)


def name_native_thread(name: str) -> None:
    """Give the calling thread its name in the kernel too (15 bytes).

    Python only names threads for itself; with this, `top -H`, `perf` and
    /proc/<pid>/task show which stage of a pull is busy.
    """
    _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class ReadAhead:
    """Read `source` in a thread, at most `depth` chunks ahead."""

    def __init__(
        self,
        source: Readable,
        name: str,
        *,
        chunk: int = PIPE_CHUNK,
        depth: int = 4,
        recycle: bool = False,
    ) -> None:
        self._source = source
        self._chunk = chunk
        self._stop = threading.Event()
        self._discard = threading.Event()
        self._error: BaseException | None = None
        self._current = memoryview(b"")
        self._done = False
        # Recycled buffers: `depth` queued, one being filled, one being read.
        self._free: queue.SimpleQueue[bytearray] | None = None
        self._held: bytearray | None = None
        self._queue: queue.Queue[Any] | queue.SimpleQueue[Any]
        if recycle:
            self._free = queue.SimpleQueue()
            for _ in range(depth + 2):
                self._free.put(bytearray(chunk))
            # The pool already bounds how far ahead the thread runs, so the
            # hand-over needs no bound: SimpleQueue is C, where Queue's
            # Python conditions cost ~10 us a chunk, a chunk per 256 KiB.
            self._queue = queue.SimpleQueue()
        else:
            self._queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        name_native_thread(self._thread.name)
        try:
            while not self._stop.is_set():
                item = self._next_chunk()
                if item is None:
                    self._discard_rest()
                    return
                if not item:
                    self._put(_END)
                    return
                self._put(item)
        except BaseException as exc:
            self._error = exc
            self._put(_Failure(exc))

    def _halted(self) -> bool:
        return self._stop.is_set() or self._discard.is_set()

    def _next_chunk(self) -> memoryview | bytes | None:
        """The next chunk, empty at the end, None once told to stop or discard."""
        if self._free is None:
            return None if self._halted() else self._source.read(self._chunk)
        while not self._halted():
            try:
                buf = self._free.get(timeout=0.2)
            except queue.Empty:
                continue
            n = cast(ReadableInto, self._source).readinto(memoryview(buf))
            return memoryview(buf)[:n]
        return None

    def _discard_rest(self) -> None:
        """After `finish`: read the source to its end into one scratch buffer."""
        scratch = memoryview(bytearray(self._chunk))
        readinto = getattr(self._source, "readinto", None)
        while not self._stop.is_set():
            n = readinto(scratch) if readinto else len(self._source.read(self._chunk))
            if not n:
                return

    def _put(self, item: object) -> None:
        if isinstance(self._queue, queue.SimpleQueue):
            self._queue.put(item)
            return
        while not self._halted():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def read(self, n: int = -1, /) -> memoryview | bytes:
        """Up to `n` bytes (a view, valid as long as the caller keeps it)."""
        if not self._current:
            self._release()
            if self._done:
                return b""
            item = self._queue.get()
            if item is _END:
                self._done = True
                return b""
            if isinstance(item, _Failure):
                self._done = True
                raise item.exc
            self._current = memoryview(item).cast("B")
            if self._free is not None:
                self._held = item.obj
        if n is None or n < 0 or n >= len(self._current):
            out, self._current = self._current, memoryview(b"")
            return out
        out = self._current[:n]
        self._current = self._current[n:]
        return out

    def _release(self) -> None:
        """The consumer moved past the held buffer: the thread may refill it."""
        if self._held is not None and self._free is not None:
            self._free.put(self._held)
        self._held = None

    def finish(self) -> None:
        """Have the thread read the rest of the source and drop it; raise what
        the source raised, if anything (a digest mismatch found at the end).

        For a consumer that stopped early (an undecodable layer) and wants to
        know whether the bytes were wrong. Blocks until the source ends: a
        stalled registry ends it with the stream's own timeouts.
        """
        self._discard.set()
        self._thread.join()
        self._done = True
        self._wake_reader()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the producer without waiting long for it.

        It may be blocked reading a stalled registry; the caller closes the
        network stream right after this, which ends that read. Nothing reads
        what the thread does after this point.
        """
        self._stop.set()
        self._done = True
        self._current = memoryview(b"")
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._wake_reader()
        self._thread.join(timeout=0.5)

    def _wake_reader(self) -> None:
        """A stage after this one may sit in `read` waiting for a chunk that
        will never come: an end marker lets its thread finish."""
        if isinstance(self._queue, queue.SimpleQueue):
            self._queue.put(_END)
        else:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_END)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
