"""A pipeline stage: a thread reads a stream ahead of its consumer.

A pull is a chain of CPU-heavy stages (receive, sha256, inflate, sha256 of
the diff, tar parse, write). In one thread they run one after another on one
core. hashlib, zlib/isal, zstandard and os.write release the GIL on large
buffers, so putting a ReadAhead between two stages lets the stage before it
(say, receiving and hashing the blob) run on one core while the stage after
it (inflating, or parsing and writing the tar) runs on the other.

Chunks are handed over as they come (bytes, bytearray or memoryview), never
copied. The consumer reads views of them; `read` may return less than asked.
An exception in the producer (a digest mismatch found at the end of the blob,
a broken connection) is raised to the consumer at the point in the stream
where it happened, after every chunk before it.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from csi_oci.streams import CHUNK, Readable

_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class ReadAhead:
    """Read `source` in a thread, at most `depth` chunks ahead."""

    def __init__(
        self, source: Readable, name: str, *, chunk: int = 4 * CHUNK, depth: int = 4
    ) -> None:
        self._source = source
        self._chunk = chunk
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._current = memoryview(b"")
        self._done = False
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._source.read(self._chunk)
                if not data:
                    self._put(_END)
                    return
                self._put(data)
        except BaseException as exc:
            self._put(_Failure(exc))

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def read(self, n: int = -1, /) -> memoryview | bytes:
        """Up to `n` bytes (a view, valid as long as the caller keeps it)."""
        if not self._current:
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
        if n is None or n < 0 or n >= len(self._current):
            out, self._current = self._current, memoryview(b"")
            return out
        out = self._current[:n]
        self._current = self._current[n:]
        return out

    def close(self) -> None:
        """Stop the producer (it finishes the read it is in; closing the
        network stream underneath, as callers do, ends that too)."""
        self._stop.set()
        self._done = True
        self._current = memoryview(b"")
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
