"""Streaming verification: bytes pass through while they are counted and hashed.

`VerifyingReader` raises IntegrityError as soon as a blob grows past its
declared size and at its end when the digest or size differ: nothing
downstream keeps bytes of a blob that did not verify. `Readable` and
`ReadableInto` are the small protocols every pipeline stage speaks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Protocol, cast

from csi_oci.errors import IntegrityError

CHUNK = 1024 * 1024


# What a stage of a pipeline hands on: bytes, or a view of a recycled buffer
# (csi_oci.readahead), valid until the next read.
Chunk = bytes | memoryview


class Readable(Protocol):
    def read(self, n: int = -1, /) -> Chunk: ...


class ReadableInto(Readable, Protocol):
    """A source that can also fill the caller's buffer (no copy)."""

    def readinto(self, buf: memoryview, /) -> int: ...


WRONG_BYTES_HINT = (
    "the registry or a proxy served wrong bytes, nothing was kept: re-push the image, "
    "or fix the registry or cache that serves it"
)
# Said only once the compressed blob matched its own digest: the registry served
# exactly what the manifest pins, so the image itself is inconsistent.
DIFF_ID_HINT = (
    "the layer blob matched its digest, so the registry served what the manifest pins, "
    "but the image's config (rootfs.diff_ids) and this layer disagree: the image was "
    "built wrong (skopeo 1.9's zstd:chunked writer drops the tar's record padding and "
    "produces exactly this). Nothing was kept: rebuild or convert the image with a "
    "current tool, or pin one that is consistent"
)


class VerifyingReader:
    """Pass bytes through while hashing and counting them.

    Raises IntegrityError as soon as more than `size` bytes arrive, and at
    EOF when the count or the digest differ from what was pinned.
    `on_bytes` reports progress (bytes since the last call).
    """

    def __init__(
        self,
        source: Readable,
        digest: str,
        size: int | None,
        what: str,
        on_bytes: Callable[[int], None] | None = None,
        *,
        hasher: hashlib._Hash | None = None,
        offset: int = 0,
        mismatch_hint: str = WRONG_BYTES_HINT,
    ) -> None:
        algo, _, self._expected_hex = digest.partition(":")
        self._source = source
        # The raw-file path gives a source that also has readinto (ResumableStream).
        self._into = cast(ReadableInto, source)
        self._digest = digest
        self._mismatch_hint = mismatch_hint
        self.mismatched = False
        self._size = size
        self._what = what
        self._on_bytes = on_bytes
        self._hash = hasher if hasher is not None else hashlib.new(algo)
        self.count = offset
        self.verified = False

    def read(self, n: int = -1, /) -> Chunk:
        if self.verified:
            return b""
        data = self._source.read(CHUNK if n is None or n < 0 else n)
        if not data:
            self._finish()
            return b""
        self.count += len(data)
        if self._size is not None and self.count > self._size:
            raise IntegrityError(
                f"{self._what}: received more than the {self._size} bytes its descriptor declares"
            )
        self._hash.update(data)
        if self._on_bytes is not None:
            self._on_bytes(len(data))
        return data

    def readinto(self, buf: memoryview) -> int:
        """Like read, into the caller's buffer (the raw-file path: no copies).

        The source must offer `readinto` (see transfer.ResumableStream).
        """
        if self.verified:
            return 0
        n = self._into.readinto(buf)
        if not n:
            self._finish()
            return 0
        self.count += n
        if self._size is not None and self.count > self._size:
            raise IntegrityError(
                f"{self._what}: received more than the {self._size} bytes its descriptor declares"
            )
        self._hash.update(buf[:n])
        if self._on_bytes is not None:
            self._on_bytes(n)
        return n

    def _finish(self) -> None:
        if self._size is not None and self.count != self._size:
            raise IntegrityError(
                f"{self._what}: got {self.count} bytes, descriptor declares {self._size} "
                "(truncated or wrong blob): re-push the image, or fix the registry or cache "
                "that serves it"
            )
        got = self._hash.hexdigest()
        if got != self._expected_hex:
            self.mismatched = True
            raise IntegrityError(
                f"{self._what}: digest mismatch: expected {self._digest}, "
                f"got {self._digest.partition(':')[0]}:{got}; {self._mismatch_hint}"
            )
        self.verified = True

    def drain(self, limit: int | None = None) -> int:
        """Read to EOF (verifying); returns how many bytes were left over.

        With `limit`, stops early once more than that many bytes were read
        (the caller refuses the stream; nothing is verified then).
        """
        left = 0
        while True:
            data = self.read(CHUNK)
            if not data:
                return left
            left += len(data)
            if limit is not None and left > limit:
                return left
