"""Unit tests of csi_oci/readahead.py: a pipeline stage on its own thread."""

from __future__ import annotations

import io
import os
import threading
import time

import pytest

from csi_oci.stream.readahead import ReadAhead

DATA = os.urandom(3 * 65536 + 1234)


class IntoSource:
    """A `readinto` source of DATA that counts reads and may fail at an offset."""

    def __init__(self, data: bytes = DATA, fail_at: int | None = None) -> None:
        self._buf = io.BytesIO(data)
        self._fail_at = fail_at
        self.reads = 0

    def readinto(self, buf: memoryview) -> int:
        self.reads += 1
        if self._fail_at is not None and self._buf.tell() >= self._fail_at:
            raise ValueError(f"broken at {self._buf.tell()}")
        return self._buf.readinto(buf)


def drain(reader: ReadAhead, n: int = -1) -> bytes:
    out = bytearray()
    while chunk := reader.read(n):
        out += chunk  # copies: a recycled view is only valid until the next read
    return bytes(out)


@pytest.mark.parametrize("n", [-1, 1000, 65536, 100_000])
def test_recycled_buffers_pass_every_byte_in_order(n: int) -> None:
    with ReadAhead(IntoSource(), "t", chunk=65536, recycle=True) as reader:
        assert drain(reader, n) == DATA
        assert reader.read() == b""


@pytest.mark.parametrize("n", [-1, 777])
def test_plain_read_source_passes_every_byte_in_order(n: int) -> None:
    with ReadAhead(io.BytesIO(DATA), "t", chunk=4096) as reader:
        assert drain(reader, n) == DATA


def test_recycled_producer_runs_at_most_the_pool_ahead() -> None:
    """The pool bounds memory: an idle consumer stops the thread after depth + 2 reads."""
    source = IntoSource(os.urandom(64 * 4096))
    reader = ReadAhead(source, "t", chunk=4096, depth=3, recycle=True)
    try:
        time.sleep(0.5)
        assert source.reads <= 3 + 2
        assert len(drain(reader)) == 64 * 4096
    finally:
        reader.close()


def test_failure_reaches_the_consumer_after_the_chunks_before_it() -> None:
    source = IntoSource(fail_at=2 * 65536)
    with ReadAhead(source, "t", chunk=65536, recycle=True) as reader:
        assert bytes(reader.read()) == DATA[:65536]
        assert bytes(reader.read()) == DATA[65536 : 2 * 65536]
        with pytest.raises(ValueError, match="broken at 131072"):
            reader.read()
        assert reader.read() == b""


def test_close_with_a_full_pool_ends_the_thread_promptly() -> None:
    source = IntoSource(os.urandom(64 * 4096))
    reader = ReadAhead(source, "stage-under-test", chunk=4096, depth=2, recycle=True)
    time.sleep(0.2)  # every buffer filled; the thread waits for one back
    started = time.monotonic()
    reader.close()
    assert time.monotonic() - started < 1.0
    assert not [t for t in threading.enumerate() if t.name == "stage-under-test"]
    assert reader.read() == b""


class StallingSource:
    """A `read` source that blocks until released: a registry that went quiet."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def read(self, n: int) -> bytes:
        self.release.wait(10)
        return b""


def keep_reading(reader: ReadAhead, seen: list[int]) -> threading.Thread:
    """A second stage's thread, consuming `reader` the way an inflater does."""

    def run() -> None:
        while chunk := reader.read():
            seen.append(len(chunk))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("recycle", [True, False])
def test_finish_while_another_stage_reads_ends_both(recycle: bool) -> None:
    """The hang CI caught: an undecodable layer's fetch stage was drained from
    the pull thread while the inflate thread still read it, and whichever lost
    the end marker waited forever. `finish` never competes for the queue."""
    for _ in range(50):
        source = IntoSource(os.urandom(64 * 4096)) if recycle else io.BytesIO(DATA)
        reader = ReadAhead(source, "t", chunk=4096, depth=2, recycle=recycle)
        seen: list[int] = []
        consumer = keep_reading(reader, seen)
        reader.finish()
        consumer.join(timeout=2)
        assert not consumer.is_alive(), "the other reader was left waiting"
        reader.close()


def test_finish_reads_the_rest_and_raises_what_the_source_raised() -> None:
    source = IntoSource(fail_at=2 * 65536)
    reader = ReadAhead(source, "t", chunk=65536, depth=1, recycle=True)
    assert bytes(reader.read()) == DATA[:65536]  # the consumer stops here
    with pytest.raises(ValueError, match="broken at 131072"):
        reader.finish()
    assert reader.read() == b""
    reader.close()


def test_finish_reads_the_source_to_its_end() -> None:
    source = IntoSource(os.urandom(64 * 4096))
    reader = ReadAhead(source, "t", chunk=4096, depth=2, recycle=True)
    reader.read(10)
    reader.finish()  # no error: every byte was read
    assert source.reads == 64 + 1  # each chunk, and the empty read at the end
    reader.close()


def test_close_wakes_a_reader_waiting_on_a_stalled_source() -> None:
    source = StallingSource()
    reader = ReadAhead(source, "t", chunk=4096)
    seen: list[int] = []
    consumer = keep_reading(reader, seen)
    time.sleep(0.1)  # the consumer now waits for a chunk that is not coming
    reader.close()
    consumer.join(timeout=1)
    assert not consumer.is_alive()
    source.release.set()
