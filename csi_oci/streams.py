"""Streaming readers that verify and decompress layer bytes on the fly.

Each reader is a minimal file-like object with `read(n)`. They chain:
network/file -> VerifyingReader (digest + size of the blob) -> a
decompressor -> VerifyingReader (DiffID of the uncompressed tar) -> tar parser.
No stage buffers a whole blob, and every stage works on large buffers so
hashlib, zlib and zstandard release the GIL while they work.

A VerifyingReader checks the digest only when its source is exhausted, so a
consumer must `drain()` it: the tar parser stops at the end-of-archive
marker, and padding after it still belongs to the hashed bytes.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any, Protocol, cast

import zstandard

from csi_oci.errors import IntegrityError, InvalidLayer
from csi_oci.manifest import Compression

CHUNK = 1024 * 1024
# zstd frames may ask for a window up to 3.75 TiB; the decoder allocates it.
# 128 MiB is what `zstd --long=27` uses, far above what image tools write.
MAX_ZSTD_WINDOW = 1 << 27


# What a stage of a pipeline hands on: bytes, or a view of a recycled buffer
# (csi_oci.readahead), valid until the next read.
Chunk = bytes | memoryview


class Readable(Protocol):
    def read(self, n: int = -1, /) -> Chunk: ...


class ReadableInto(Readable, Protocol):
    """A source that can also fill the caller's buffer (no copy)."""

    def readinto(self, buf: memoryview, /) -> int: ...


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
    ) -> None:
        algo, _, self._expected_hex = digest.partition(":")
        self._source = source
        # The raw-file path gives a source that also has readinto (ResumableStream).
        self._into = cast(ReadableInto, source)
        self._digest = digest
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
            raise IntegrityError(
                f"{self._what}: digest mismatch: expected {self._digest}, "
                f"got {self._digest.partition(':')[0]}:{got}; the registry or a proxy "
                "served wrong bytes, nothing was kept: re-push the image, or fix the registry "
                "or cache that serves it"
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


def _gzip_decoder() -> tuple[Callable[[], Any], Any, str]:
    """The fastest inflate there is here: ISA-L (about 2x zlib on x86-64 with
    AVX2/AVX-512, measured in hack/bench), then zlib-ng, then zlib. All three
    take the same zlib API, so the reader below does not care which."""
    try:
        from isal import isal_zlib

        return lambda: isal_zlib.decompressobj(wbits=31), isal_zlib.error, "isal"
    except ImportError:
        pass
    try:
        from zlib_ng import zlib_ng

        return lambda: zlib_ng.decompressobj(wbits=31), zlib_ng.error, "zlib-ng"
    except ImportError:
        return lambda: zlib.decompressobj(wbits=31), zlib.error, "zlib"


new_inflater, InflateError, GZIP_DECODER = _gzip_decoder()


class GzipReader:
    """Inflate a gzip stream of one or more members (RFC 1952 allows several).

    Bytes after the last member must be another member: trailing garbage is
    refused rather than silently ignored, so two different blobs can never
    unpack to the same tree unnoticed.
    """

    def __init__(self, source: Readable, what: str) -> None:
        self._source = source
        self._what = what
        self._d = new_inflater()
        self._input = b""

    def read(self, n: int = -1, /) -> bytes:
        want = CHUNK if n is None or n < 0 else n
        while True:
            if self._d.eof and not self._next_member():
                return b""
            if self._d.unconsumed_tail:
                data = self._d.unconsumed_tail
            elif self._input:
                data, self._input = self._input, b""
            else:
                data = self._source.read(CHUNK)
                if not data:
                    raise InvalidLayer(f"{self._what}: gzip stream is truncated")
            try:
                out: bytes = self._d.decompress(data, want)
            except InflateError as exc:
                raise InvalidLayer(f"{self._what}: corrupt gzip data: {exc}") from None
            if out:
                return out

    def _next_member(self) -> bool:
        """After a member ends: start the next one, or report a clean end."""
        rest = self._d.unused_data
        while len(rest) < 2:
            more = self._source.read(CHUNK)
            if not more:
                if rest:
                    raise InvalidLayer(f"{self._what}: trailing garbage after gzip member")
                return False
            rest += more
        if not rest.startswith(b"\x1f\x8b"):
            raise InvalidLayer(f"{self._what}: trailing garbage after gzip member")
        self._d = new_inflater()
        self._input = rest
        return True


class _ZstdFrameTracker:
    """Follows zstd frame and block headers (RFC 8878) in the bytes it passes on.

    python-zstandard's stream_reader bounds its output (which bomb safety
    needs) but ends silently when the input stops mid-frame. This tracker
    skips payloads by count and knows, at end of input, whether the stream
    stopped on a frame boundary.
    """

    ZSTD_MAGIC = 0xFD2FB528

    def __init__(self, source: Readable, what: str) -> None:
        self._source = source
        self._what = what
        self._header = bytearray()  # pending header bytes
        self._need = 4  # header bytes wanted in the current state
        self._skip = 0  # payload bytes to pass before the next header
        self._state = "magic"
        self._checksum = False

    def read(self, n: int = -1, /) -> Chunk:
        data = self._source.read(n)
        if not data:
            if self._state != "magic" or self._header or self._skip:
                raise InvalidLayer(f"{self._what}: zstd stream is truncated (ends inside a frame)")
            return data
        self._track(memoryview(data))
        return data

    def _track(self, view: memoryview) -> None:
        while view:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                continue
            take = min(self._need - len(self._header), len(view))
            self._header += view[:take]
            view = view[take:]
            if len(self._header) == self._need:
                self._advance(bytes(self._header))

    def _advance(self, header: bytes) -> None:
        self._header.clear()
        state = self._state
        if state == "magic":
            magic = int.from_bytes(header, "little")
            if magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = "skip_size", 4
            elif magic == self.ZSTD_MAGIC:
                self._state, self._need = "fhd", 1
            else:
                raise InvalidLayer(f"{self._what}: not a zstd frame (bad magic number)")
        elif state == "skip_size":
            self._skip = int.from_bytes(header, "little")
            self._state, self._need = "magic", 4
        elif state == "fhd":
            fhd = header[0]
            single = bool(fhd & 0x20)
            self._checksum = bool(fhd & 0x04)
            fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            rest = (0 if single else 1) + (0, 1, 2, 4)[fhd & 0x03] + fcs
            self._state, self._need = "block", 3
            self._skip = rest
        elif state == "block":
            value = int.from_bytes(header, "little")
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            if kind == 3:
                raise InvalidLayer(f"{self._what}: corrupt zstd data (reserved block type)")
            self._skip = 1 if kind == 1 else size
            if last:
                self._state, self._need = "magic", 4
                self._skip += 4 if self._checksum else 0


class ZstdReader:
    """Decompress a zstd stream of one or more frames (skippable frames allowed)."""

    def __init__(self, source: Readable, what: str) -> None:
        self._what = what
        dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
        tracked = _ZstdFrameTracker(source, what)
        # stream_reader only calls read() on its source (typed as IO[bytes] in its stubs).
        self._reader = dctx.stream_reader(
            cast(IO[bytes], tracked), read_size=CHUNK, read_across_frames=True
        )

    def read(self, n: int = -1, /) -> bytes:
        try:
            return self._reader.read(CHUNK if n is None or n < 0 else n)
        except zstandard.ZstdError as exc:
            raise InvalidLayer(f"{self._what}: corrupt zstd data: {exc}") from None

    def readinto(self, buf: memoryview) -> int:
        try:
            return self._reader.readinto(buf)
        except zstandard.ZstdError as exc:
            raise InvalidLayer(f"{self._what}: corrupt zstd data: {exc}") from None


def decompressor(source: Readable, compression: str, what: str) -> Readable:
    if compression == Compression.GZIP:
        return GzipReader(source, what)
    if compression == Compression.ZSTD:
        return ZstdReader(source, what)
    return source


class TarSource:
    """A forward-only file for `tarfile` (mode "r:") over a stream of chunks.

    tarfile's stream mode ("r|") copies every byte four times on its way to a
    file (its own buffer joins and slices, then the member reader's buffer).
    Here tarfile only parses headers, through `read`/`seek`/`tell` (a
    "seek" forward reads and discards, which is how it skips data it does not
    want), and the applier writes regular files from `take`, which yields the
    source's own chunks: the bytes go from the network (or the inflater) to
    os.write without a copy.
    """

    def __init__(self, source: Readable) -> None:
        self._source = source
        self.pos = 0

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self.pos:
            raise InvalidLayer(f"tar reader cannot seek back (to {pos} from {self.pos})")
        left = pos - self.pos
        while left:
            data = self._source.read(min(left, CHUNK))
            if not data:
                break  # as a file: seeking past the end is allowed, reading finds nothing
            left -= len(data)
            self.pos += len(data)
        return pos

    def read(self, n: int = -1, /) -> bytes:
        """Exactly `n` bytes, or fewer at the end of the stream (as bytes:
        tarfile's header parsing needs bytes methods)."""
        if n is None or n < 0:
            raise InvalidLayer("tar reader: unbounded read")
        parts = []
        left = n
        while left:
            data = self._source.read(left)
            if not data:
                break
            parts.append(data)
            left -= len(data)
        self.pos += n - left
        return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)

    def take(self, n: int) -> Iterator[memoryview | bytes]:
        """The next `n` bytes as the source's chunks (stops early at the end)."""
        left = n
        while left:
            data = self._source.read(min(left, 4 * CHUNK))
            if not data:
                return
            left -= len(data)
            self.pos += len(data)
            yield data
