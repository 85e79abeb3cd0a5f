"""Unit tests of csi_oci/streams.py: digest-verifying and decompressing readers."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct

import pytest
import zstandard

from csi_oci.errors import IntegrityError, InvalidLayer
from csi_oci.stream.inflate import (
    MAX_ZSTD_WINDOW,
    Compression,
    GzipReader,
    ZstdReader,
    decompressor,
)
from csi_oci.stream.verify import CHUNK, VerifyingReader


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_all(reader, n: int = 65536) -> bytes:
    out = bytearray()
    while True:
        chunk = reader.read(n)
        if not chunk:
            return bytes(out)
        assert len(chunk) <= n
        out += chunk


class TrickleSource:
    """A source that returns at most `step` bytes per read, and counts reads."""

    def __init__(self, data: bytes, step: int) -> None:
        self._buf = io.BytesIO(data)
        self._step = step
        self.reads = 0

    def read(self, n: int = -1, /) -> bytes:
        self.reads += 1
        return self._buf.read(min(self._step, n if n >= 0 else self._step))


PAYLOAD = os.urandom(200_000) + b"compressible " * 50_000


# -- VerifyingReader -------------------------------------------------------------


def test_verifying_reader_passes_bytes_and_verifies():
    progress: list[int] = []
    reader = VerifyingReader(
        io.BytesIO(PAYLOAD), sha256(PAYLOAD), len(PAYLOAD), "blob x", progress.append
    )
    assert read_all(reader, 10_000) == PAYLOAD
    assert reader.verified
    assert reader.count == len(PAYLOAD)
    assert sum(progress) == len(PAYLOAD)
    assert reader.read(10) == b""  # stays at EOF once verified


def test_verifying_reader_without_size():
    reader = VerifyingReader(io.BytesIO(PAYLOAD), sha256(PAYLOAD), None, "blob")
    assert read_all(reader) == PAYLOAD
    assert reader.verified


def test_verifying_reader_read_default_and_negative_sizes():
    data = b"x" * (CHUNK + 10)
    reader = VerifyingReader(io.BytesIO(data), sha256(data), len(data), "blob")
    assert len(reader.read()) == CHUNK
    assert len(reader.read(-1)) == 10
    assert reader.read() == b""
    assert reader.verified


def test_verifying_reader_sha512():
    digest = "sha512:" + hashlib.sha512(PAYLOAD).hexdigest()
    reader = VerifyingReader(io.BytesIO(PAYLOAD), digest, len(PAYLOAD), "blob")
    assert reader.drain() == len(PAYLOAD)
    assert reader.verified


def test_verifying_reader_wrong_digest():
    wrong = sha256(b"something else")
    reader = VerifyingReader(io.BytesIO(PAYLOAD), wrong, len(PAYLOAD), "layer sha256:abc")
    with pytest.raises(IntegrityError) as exc:
        read_all(reader)
    msg = str(exc.value)
    assert "layer sha256:abc" in msg
    assert wrong in msg
    assert sha256(PAYLOAD) in msg
    assert not reader.verified


def test_verifying_reader_more_bytes_than_declared_fails_early():
    source = TrickleSource(PAYLOAD, 1000)
    reader = VerifyingReader(source, sha256(PAYLOAD[:5000]), 5000, "blob y")
    for _ in range(5):
        assert len(reader.read(1000)) == 1000
    with pytest.raises(IntegrityError, match=r"blob y: received more than the 5000 bytes"):
        reader.read(1000)
    assert source.reads == 6  # refused on the first extra chunk, not at EOF
    assert not reader.verified


def test_verifying_reader_more_bytes_even_with_matching_prefix_digest():
    # Extra bytes after a correct prefix are still refused.
    data = b"a" * 100
    reader = VerifyingReader(io.BytesIO(data + b"extra"), sha256(data), 100, "blob")
    with pytest.raises(IntegrityError, match="more than the 100 bytes"):
        read_all(reader, 1000)


def test_verifying_reader_fewer_bytes_fails_at_eof():
    data = PAYLOAD[:1000]
    reader = VerifyingReader(io.BytesIO(data), sha256(PAYLOAD), len(PAYLOAD), "blob z")
    assert reader.read(5000) == data  # no error before EOF
    with pytest.raises(
        IntegrityError, match=rf"blob z: got 1000 bytes, descriptor declares {len(PAYLOAD)}"
    ):
        reader.read(5000)
    assert not reader.verified


def test_verifying_reader_empty_blob():
    reader = VerifyingReader(io.BytesIO(b""), sha256(b""), 0, "empty")
    assert reader.read(10) == b""
    assert reader.verified
    reader = VerifyingReader(io.BytesIO(b""), sha256(b"x"), 0, "empty")
    with pytest.raises(IntegrityError, match="digest mismatch"):
        reader.read(10)


def test_verifying_reader_drain():
    reader = VerifyingReader(io.BytesIO(PAYLOAD), sha256(PAYLOAD), len(PAYLOAD), "blob")
    head = reader.read(1234)
    assert head == PAYLOAD[:1234]
    assert reader.drain() == len(PAYLOAD) - 1234
    assert reader.verified
    assert reader.drain() == 0


def test_verifying_reader_drain_detects_trailing_bytes_and_mismatch():
    reader = VerifyingReader(io.BytesIO(PAYLOAD), sha256(PAYLOAD[:-1]), len(PAYLOAD), "blob")
    reader.read(100)
    with pytest.raises(IntegrityError, match="digest mismatch"):
        reader.drain()


def test_verifying_reader_resumes_with_hasher_and_offset():
    head, tail = PAYLOAD[:7000], PAYLOAD[7000:]
    hasher = hashlib.sha256(head)
    reader = VerifyingReader(
        io.BytesIO(tail), sha256(PAYLOAD), len(PAYLOAD), "blob", hasher=hasher, offset=len(head)
    )
    assert read_all(reader) == tail
    assert reader.verified and reader.count == len(PAYLOAD)


def test_verifying_reader_chains_over_decompressor():
    blob = gzip.compress(PAYLOAD)
    outer = VerifyingReader(io.BytesIO(blob), sha256(blob), len(blob), "blob")
    inner = VerifyingReader(GzipReader(outer, "blob"), sha256(PAYLOAD), None, "diff")
    assert inner.drain() == len(PAYLOAD)
    assert inner.verified
    assert outer.drain() == 0
    assert outer.verified


# -- GzipReader ------------------------------------------------------------------


def test_gzip_single_member():
    assert read_all(GzipReader(io.BytesIO(gzip.compress(PAYLOAD)), "g")) == PAYLOAD


def test_gzip_multi_member():
    parts = [PAYLOAD[:1000], PAYLOAD[1000:150_000], b"", PAYLOAD[150_000:]]
    blob = b"".join(gzip.compress(p, mtime=0) for p in parts)
    assert read_all(GzipReader(io.BytesIO(blob), "g")) == PAYLOAD
    # Members split across tiny source reads (the 2-byte magic straddles reads).
    for step in (1, 2, 3, 7, 4096):
        source = TrickleSource(blob, step)
        assert read_all(GzipReader(source, "g"), 100_000) == PAYLOAD, step


def test_gzip_empty_member():
    assert read_all(GzipReader(io.BytesIO(gzip.compress(b"")), "g")) == b""


@pytest.mark.parametrize(
    "garbage", [b"\x00", b"\x00" * 512, b"garbage", b"\x1f", b"\x1f\x8c", b"PK\x03\x04"]
)
def test_gzip_trailing_garbage_refused(garbage):
    blob = gzip.compress(PAYLOAD) + garbage
    with pytest.raises(InvalidLayer, match="g: trailing garbage after gzip member"):
        read_all(GzipReader(io.BytesIO(blob), "g"))


def test_gzip_garbage_that_looks_like_a_member_is_corrupt():
    blob = gzip.compress(PAYLOAD) + b"\x1f\x8b\x08garbage-garbage"
    with pytest.raises(InvalidLayer, match="gzip"):
        read_all(GzipReader(io.BytesIO(blob), "g"))


@pytest.mark.parametrize("cut", [1, 10, 5000, -8, -1])
def test_gzip_truncated_refused(cut):
    blob = gzip.compress(PAYLOAD)
    with pytest.raises(InvalidLayer, match=r"g: (gzip stream is truncated|corrupt gzip data)"):
        read_all(GzipReader(io.BytesIO(blob[:cut]), "g"))


def test_gzip_empty_input_refused():
    with pytest.raises(InvalidLayer, match="truncated"):
        GzipReader(io.BytesIO(b""), "g").read(10)


def test_gzip_truncated_second_member_refused():
    blob = gzip.compress(b"first") + gzip.compress(PAYLOAD)[:1000]
    with pytest.raises(InvalidLayer, match="truncated"):
        read_all(GzipReader(io.BytesIO(blob), "g"))


def test_gzip_corrupt_refused():
    blob = bytearray(gzip.compress(PAYLOAD))
    blob[len(blob) // 2] ^= 0xFF
    blob[len(blob) // 2 + 1] ^= 0x55
    with pytest.raises(InvalidLayer, match="g: corrupt gzip data"):
        read_all(GzipReader(io.BytesIO(bytes(blob)), "g"))


def test_gzip_bad_crc_refused():
    blob = bytearray(gzip.compress(PAYLOAD))
    blob[-8] ^= 0x01  # CRC32 in the trailer
    with pytest.raises(InvalidLayer, match="corrupt gzip data"):
        read_all(GzipReader(io.BytesIO(bytes(blob)), "g"))


def test_gzip_not_gzip_refused():
    with pytest.raises(InvalidLayer, match="corrupt gzip data"):
        read_all(GzipReader(io.BytesIO(b"plain tar bytes, not gzip" * 20), "g"))


def test_gzip_bomb_output_is_bounded_per_read():
    size = 64 * 1024 * 1024
    blob = gzip.compress(b"\0" * size, 9)
    assert len(blob) < size // 500
    reader = GzipReader(io.BytesIO(blob), "g")
    total = 0
    biggest = 0
    for n in (1, 100, 4096, 65536):
        chunk = reader.read(n)
        assert 0 < len(chunk) <= n
        total += len(chunk)
    while True:
        chunk = reader.read(CHUNK)
        if not chunk:
            break
        biggest = max(biggest, len(chunk))
        total += len(chunk)
    assert biggest <= CHUNK
    assert total == size


def test_gzip_default_read_size_is_chunk():
    reader = GzipReader(io.BytesIO(gzip.compress(b"z" * (3 * CHUNK))), "g")
    assert len(reader.read()) == CHUNK
    assert len(reader.read(-1)) == CHUNK


# -- ZstdReader ------------------------------------------------------------------


def zstd(data: bytes, **kw) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True, **kw).compress(data)


def skippable(payload: bytes, magic_nibble: int = 0) -> bytes:
    return struct.pack("<II", 0x184D2A50 + magic_nibble, len(payload)) + payload


def frame_header(window_log: int) -> bytes:
    """A zstd frame with a window descriptor and one empty last raw block."""
    exponent = window_log - 10
    return (
        struct.pack("<I", 0xFD2FB528)
        + bytes([0x00, exponent << 3])  # no content size, not single-segment
        + b"\x01\x00\x00"  # last block, raw, size 0
    )


def test_zstd_single_frame():
    assert read_all(ZstdReader(io.BytesIO(zstd(PAYLOAD)), "z")) == PAYLOAD


def test_zstd_multi_frame():
    blob = zstd(PAYLOAD[:1000]) + zstd(PAYLOAD[1000:90_000]) + zstd(b"") + zstd(PAYLOAD[90_000:])
    assert read_all(ZstdReader(io.BytesIO(blob), "z")) == PAYLOAD
    assert read_all(ZstdReader(TrickleSource(blob, 5), "z"), 1 << 20) == PAYLOAD


def test_zstd_skippable_frames():
    blob = (
        skippable(b"metadata")
        + zstd(PAYLOAD[:5000])
        + skippable(b"", 0xF)
        + skippable(os.urandom(3000), 7)
        + zstd(PAYLOAD[5000:])
        + skippable(b"trailer")
    )
    assert read_all(ZstdReader(io.BytesIO(blob), "z")) == PAYLOAD


def test_zstd_without_content_size_streamed():
    buf = io.BytesIO()
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    with cctx.stream_writer(buf, closefd=False) as writer:
        for i in range(0, len(PAYLOAD), 7777):
            writer.write(PAYLOAD[i : i + 7777])
    blob = buf.getvalue()
    assert zstandard.get_frame_parameters(blob).content_size == zstandard.CONTENTSIZE_UNKNOWN
    assert read_all(ZstdReader(io.BytesIO(blob), "z")) == PAYLOAD


def test_zstd_corrupt_refused():
    blob = bytearray(zstd(PAYLOAD))
    for i in range(len(blob) // 2, len(blob) // 2 + 16):
        blob[i] ^= 0xA5
    with pytest.raises(InvalidLayer, match="z: corrupt zstd data"):
        read_all(ZstdReader(io.BytesIO(bytes(blob)), "z"))


def test_zstd_bad_checksum_refused():
    blob = bytearray(zstd(PAYLOAD))
    blob[-1] ^= 0xFF
    with pytest.raises(InvalidLayer, match="corrupt zstd data"):
        read_all(ZstdReader(io.BytesIO(bytes(blob)), "z"))


def test_zstd_trailing_garbage_refused():
    with pytest.raises(InvalidLayer, match=r"z: (corrupt zstd data|not a zstd frame)"):
        read_all(ZstdReader(io.BytesIO(zstd(PAYLOAD) + b"garbage!"), "z"))


def test_zstd_not_zstd_refused():
    with pytest.raises(InvalidLayer, match=r"z: (corrupt zstd data|not a zstd frame)"):
        read_all(ZstdReader(io.BytesIO(gzip.compress(PAYLOAD)), "z"))


@pytest.mark.parametrize("cut", [-1, -4, -5, 3, 4, 5, 1000, 100_000])
def test_zstd_truncated_refused(cut):
    blob = zstd(PAYLOAD)
    with pytest.raises(InvalidLayer, match="z: zstd stream is truncated"):
        read_all(ZstdReader(io.BytesIO(blob[:cut]), "z"))


@pytest.mark.parametrize(
    "tail",
    [
        zstd(b"second frame")[:-1],
        zstd(b"second frame")[:6],
        skippable(b"0123456789")[:-3],
        skippable(b"0123456789")[:6],
        b"\x28\xb5",  # half a magic number
    ],
)
def test_zstd_truncated_after_a_complete_frame_refused(tail):
    with pytest.raises(InvalidLayer, match="truncated"):
        read_all(ZstdReader(io.BytesIO(zstd(PAYLOAD) + tail), "z"))


def test_zstd_empty_input_is_empty_output():
    assert read_all(ZstdReader(io.BytesIO(b""), "z")) == b""


def test_zstd_window_above_limit_refused_compressor_made():
    params = zstandard.ZstdCompressionParameters(window_log=28)
    cctx = zstandard.ZstdCompressor(compression_params=params)
    buf = io.BytesIO()
    with cctx.stream_writer(buf, closefd=False) as writer:  # no content size: window kept
        writer.write(PAYLOAD)
    blob = buf.getvalue()
    assert zstandard.get_frame_parameters(blob).window_size == 1 << 28
    assert 1 << 28 > MAX_ZSTD_WINDOW
    with pytest.raises(InvalidLayer, match=r"z: corrupt zstd data:.*memory"):
        read_all(ZstdReader(io.BytesIO(blob), "z"))


@pytest.mark.parametrize("window_log", [28, 31, 41])
def test_zstd_window_above_limit_refused_handcrafted(window_log):
    blob = frame_header(window_log)
    if window_log <= 31:  # above, even the frame-header parser gives up
        assert zstandard.get_frame_parameters(blob).window_size == 1 << window_log
    with pytest.raises(InvalidLayer, match="corrupt zstd data"):
        read_all(ZstdReader(io.BytesIO(blob), "z"))


def test_zstd_window_above_limit_in_a_later_frame_refused():
    blob = zstd(b"first frame is fine") + frame_header(30)
    with pytest.raises(InvalidLayer, match="corrupt zstd data"):
        read_all(ZstdReader(io.BytesIO(blob), "z"))


def test_zstd_window_at_limit_accepted():
    assert MAX_ZSTD_WINDOW == 1 << 27
    assert read_all(ZstdReader(io.BytesIO(frame_header(27)), "z")) == b""
    params = zstandard.ZstdCompressionParameters(window_log=27)
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(
        buf, closefd=False
    ) as writer:
        writer.write(PAYLOAD)
    assert zstandard.get_frame_parameters(buf.getvalue()).window_size == 1 << 27
    assert read_all(ZstdReader(io.BytesIO(buf.getvalue()), "z")) == PAYLOAD


def test_zstd_large_output_in_bounded_reads():
    size = 48 * 1024 * 1024
    blob = zstd(b"\0" * size, level=1)
    reader = ZstdReader(io.BytesIO(blob), "z")
    assert len(reader.read(10)) == 10
    total = 10
    while True:
        chunk = reader.read(CHUNK)
        if not chunk:
            break
        assert len(chunk) <= CHUNK
        total += len(chunk)
    assert total == size


# -- decompressor -------------------------------------------------------------------


def test_decompressor_dispatch():
    raw = io.BytesIO(b"tar")
    assert decompressor(raw, Compression.NONE, "l") is raw
    assert isinstance(decompressor(io.BytesIO(b""), Compression.GZIP, "l"), GzipReader)
    assert isinstance(decompressor(io.BytesIO(b""), Compression.ZSTD, "l"), ZstdReader)
    assert read_all(decompressor(io.BytesIO(gzip.compress(b"g")), "gzip", "l")) == b"g"
    assert read_all(decompressor(io.BytesIO(zstd(b"z")), "zstd", "l")) == b"z"
