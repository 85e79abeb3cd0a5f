"""Decompression stages: multi-member gzip and multi-frame zstd, bounded.

gzip inflates with ISA-L when installed (zlib-ng, then zlib); trailing
garbage after the last member or frame is refused; zstd windows are capped
(MAX_ZSTD_WINDOW), so a frame cannot make the decoder allocate gigabytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import IO, Any, cast

import zstandard

from csi_oci.errors import InvalidLayer
from csi_oci.stream.verify import CHUNK, Chunk, Readable

# zstd frames may ask for a window up to 3.75 TiB; the decoder allocates it.
# 128 MiB is what `zstd --long=27` uses, far above what image tools write.
MAX_ZSTD_WINDOW = 1 << 27


class Compression:
    """How a layer's bytes are compressed (its media type says)."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


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
