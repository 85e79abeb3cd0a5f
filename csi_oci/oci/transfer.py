"""Blob transfer that survives flaky networks, proxies and registries.

`ResumableStream` yields the bytes [start, end) of one blob as one
contiguous stream, whatever happens underneath: a reset connection, a
timeout, a 5xx, a 429 with Retry-After, or a body cut short. It re-requests
from the last byte received (`Range: bytes=N-`), so the running hash in the
VerifyingReader above it simply continues; nothing is downloaded twice. A
server that ignores Range (answers 200) is handled by discarding the prefix
it resends. Failures are retried with capped exponential backoff and jitter;
progress resets the attempt count, and when an endpoint (a mirror) keeps
failing the next one takes over at the same offset.

`ParallelRangeStream` fetches a large blob as several ranges at once
(`--blob-parallelism`) and hands them out in order, so hashing stays one
sequential pass; memory is bounded by parallelism x chunk size.
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests
import urllib3.exceptions

from csi_oci.errors import AuthError, CsiOciError, IntegrityError, NotFound, RegistryError

log = logging.getLogger(__name__)


class TransientError(RegistryError):
    """Worth retrying: a connection problem, a timeout, 408/429/5xx."""

    reason = "registry_unreachable"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unreachable(TransientError):
    """Nobody answers at all (connection refused, name does not resolve).

    A mirror in that state is skipped at once for the rest of the pull;
    only the registry itself is waited for with backoff.
    """


class RangeIgnored(RegistryError):
    """The server answered a ranged request with the whole blob."""


# Errors raised while reading a response body that mean "the connection broke".
BODY_ERRORS: tuple[type[BaseException], ...] = (
    http.client.IncompleteRead,
    http.client.HTTPException,
    urllib3.exceptions.HTTPError,
    requests.exceptions.RequestException,
    socket.timeout,
    ConnectionError,
    OSError,
)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    base_delay: float = 0.25
    max_delay: float = 10.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_retry_after))
        capped = min(self.max_delay, self.base_delay * 2.0 ** max(0, attempt - 1))
        return capped * random.uniform(0.5, 1.0)  # full jitter would allow 0: keep half


# opener(start, end_exclusive_or_None) -> a response whose status was checked:
# it raises TransientError / NotFound / AuthError / RegistryError itself.
Opener = Callable[[int, int | None], requests.Response]


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError, OverflowError, IndexError):
            return None  # a date we cannot read (or in the year 10000) says nothing


def body_of(resp: requests.Response) -> Any:
    """The body as a file object with `readinto`, without extra copies.

    urllib3's `read(n)` goes through http.client's `read(n)`, which fills a
    fresh bytearray and then copies it to bytes; for multi-GiB blobs read in
    parallel that is two avoidable copies per chunk. http.client's own
    `readinto` reads the socket straight into the caller's buffer (and still
    honours Content-Length and chunked encoding). urllib3 keeps it as `_fp`;
    when that is not there, urllib3's own file object is used.
    """
    inner = getattr(resp.raw, "_fp", None)
    return inner if inner is not None and hasattr(inner, "readinto") else resp.raw


class ResumableStream:
    """Bytes [start, end) of a blob, from a list of endpoints, resumed after failures."""

    def __init__(
        self,
        openers: list[tuple[str, Opener]],
        end: int,
        what: str,
        policy: RetryPolicy,
        *,
        start: int = 0,
        require_range: bool = False,
        on_wire: Callable[[int], None] | None = None,
    ) -> None:
        if not openers:
            raise RegistryError(f"{what}: no endpoint to fetch from")
        self._openers = openers
        self._ep = 0
        self.end = end
        self.pos = start
        self._what = what
        self._policy = policy
        self._require_range = require_range
        self._on_wire = on_wire
        self._resp: requests.Response | None = None
        self._body: Any = None
        self._attempts = 0
        self._progress = False
        self.transferred = 0  # bytes that crossed the network, discarded ones included
        self.retries = 0
        self.endpoints_used: set[str] = set()

    # -- file protocol ------------------------------------------------------------

    def readinto(self, buf: memoryview | bytearray) -> int:
        """Fill `buf` (short only at the end of the range), resuming as needed.

        Filling whole buffers matters: one socket read returns ~64 KiB, and
        callers hash and write per call.
        """
        view = memoryview(buf)
        want = min(len(view), self.end - self.pos)
        if want <= 0:
            self.close()
            return 0
        total = 0
        while total < want:
            at = total

            def fill(body: Any, at: int = at) -> int:
                got: int = body.readinto(view[at:want])
                return got

            total += self._receive(fill)
        return total

    def read(self, n: int = -1, /) -> bytes:
        """Up to `n` bytes (4 MiB at most), resuming as needed.

        http.client's `read(n)` fills a new, uninitialised bytes object
        straight from the socket; `readinto` a fresh bytearray would first
        zero it, which on multi-GiB blobs costs a visible share of a core.
        """
        want = min(self.end - self.pos if n is None or n < 0 else n, 1 << 22, self.end - self.pos)
        if want <= 0:
            self.close()
            return b""
        data: bytes = self._receive(lambda body: body.read(want))
        return data

    def _receive(self, op: Callable[[Any], Any]) -> Any:
        """One successful `op` on the response body (bytes or a count), after as
        many reconnects and resumes as the retry policy allows."""
        while True:
            self._ensure_open()
            try:
                got = op(self._body)
            except BODY_ERRORS as exc:
                self._broken(TransientError(f"connection broke: {_short(exc)}"))
                continue
            if not got:
                self._broken(TransientError("connection closed before the end of the blob"))
                continue
            n = got if isinstance(got, int) else len(got)
            self.pos += n
            self._count(n)
            self._progress = True
            return got

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
        self._resp = None
        self._body = None

    # -- internals -------------------------------------------------------------------

    def _count(self, n: int) -> None:
        self.transferred += n
        if self._on_wire is not None:
            self._on_wire(n)

    def _ensure_open(self) -> None:
        while self._body is None:
            name, opener = self._openers[self._ep]
            try:
                resp = opener(self.pos, self.end)
            except Unreachable as exc:
                if self._ep + 1 < len(self._openers):
                    log.info("%s: %s (%s); trying the next endpoint", self._what, name, exc)
                    self._next_endpoint()
                    continue
                self._failed(exc)
                continue
            except TransientError as exc:
                self._failed(exc)
                continue
            except (NotFound, AuthError, RegistryError) as exc:
                if self._ep + 1 < len(self._openers):
                    log.info("%s: %s failed (%s); trying the next endpoint", self._what, name, exc)
                    self._next_endpoint()
                    continue
                raise
            self.endpoints_used.add(name)
            self._resp, self._body = resp, body_of(resp)
            if resp.status_code == 200 and self.pos > 0:
                if self._require_range:
                    self.close()
                    raise RangeIgnored(f"{self._what}: {name} ignores Range requests")
                self._skip_prefix()
            elif resp.status_code == 206:
                self._check_content_range(resp)

    def _skip_prefix(self) -> None:
        """The server sent the whole blob again: drop what we already have."""
        log.info("%s: server ignored Range; discarding the first %d bytes", self._what, self.pos)
        scratch = bytearray(1 << 20)
        left = self.pos
        while left:
            try:
                n = self._body.readinto(memoryview(scratch)[: min(left, len(scratch))])
            except BODY_ERRORS as exc:
                self._broken(TransientError(f"connection broke: {_short(exc)}"))
                return
            if not n:
                self._broken(TransientError("connection closed while skipping a resent prefix"))
                return
            left -= n
            self._count(n)

    def _check_content_range(self, resp: requests.Response) -> None:
        value = resp.headers.get("Content-Range", "")
        try:
            first = int(value.split()[1].split("-")[0])
        except (IndexError, ValueError):
            first = self.pos  # absent or odd: trust the status, the hash will tell
        if first != self.pos:
            self.close()
            raise IntegrityError(
                f"{self._what}: asked for bytes from {self.pos}, got a range starting at {first}"
            )

    def _broken(self, exc: TransientError) -> None:
        self.close()
        self._failed(exc)

    def _failed(self, exc: TransientError) -> None:
        if self._progress:
            self._attempts = 0  # progress since the last failure: a fresh budget
            self._progress = False
        self._attempts += 1
        self.retries += 1
        if self._attempts >= self._policy.max_attempts:
            if self._ep + 1 < len(self._openers):
                log.warning(
                    "%s: %s failed %d times (%s); trying the next endpoint",
                    self._what,
                    self._openers[self._ep][0],
                    self._attempts,
                    exc,
                )
                self._next_endpoint()
                return
            raise RegistryError(
                f"{self._what}: giving up after {self._attempts} attempts at byte {self.pos} "
                f"of {self.end}: {exc}"
            )
        delay = self._policy.delay(self._attempts, exc.retry_after)
        log.info(
            "%s: %s; retrying from byte %d in %.2fs (attempt %d of %d)",
            self._what,
            exc,
            self.pos,
            delay,
            self._attempts + 1,
            self._policy.max_attempts,
        )
        time.sleep(delay)

    def _next_endpoint(self) -> None:
        self.close()
        self._ep += 1
        self._attempts = 0
        self._progress = False


class ParallelRangeStream:
    """A large blob fetched as ranges in parallel, read back in order."""

    def __init__(
        self,
        open_range: Callable[[int, int], ResumableStream],
        size: int,
        chunk: int,
        parallelism: int,
    ) -> None:
        self._open_range = open_range
        self._chunks = [(s, min(s + chunk, size)) for s in range(0, size, chunk)]
        self._pool = ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="range")
        self._parallelism = parallelism
        self._futures: dict[int, Future[bytearray]] = {}
        self._scheduled = 0
        self._next = 0
        self._current = memoryview(b"")
        self._stop = threading.Event()
        self.transferred = 0
        self._lock = threading.Lock()
        self._schedule()

    def _fetch(self, index: int) -> bytearray:
        start, end = self._chunks[index]
        stream = self._open_range(start, end)
        buf = bytearray(end - start)
        view = memoryview(buf)
        filled = 0
        try:
            while filled < len(buf):
                if self._stop.is_set():
                    raise CsiOciError("transfer cancelled")
                n = stream.readinto(view[filled:])
                if not n:
                    raise RegistryError(f"range {start}-{end} ended early")
                filled += n
        finally:
            stream.close()
            with self._lock:
                self.transferred += stream.transferred
        return buf

    def _schedule(self) -> None:
        while self._scheduled < len(self._chunks) and len(self._futures) < self._parallelism:
            self._futures[self._scheduled] = self._pool.submit(self._fetch, self._scheduled)
            self._scheduled += 1

    def readinto(self, buf: memoryview | bytearray) -> int:
        if not self._current:
            if self._next >= len(self._chunks):
                self.close()
                return 0
            fut = self._futures.pop(self._next)
            self._next += 1
            self._schedule()
            self._current = memoryview(fut.result())
        n = min(len(buf), len(self._current))
        memoryview(buf)[:n] = self._current[:n]
        self._current = self._current[n:]
        return n

    def read(self, n: int = -1, /) -> memoryview | bytes:
        """Up to `n` bytes as a view of a range's buffer: no copy."""
        if not self._current:
            if self._next >= len(self._chunks):
                self.close()
                return b""
            fut = self._futures.pop(self._next)
            self._next += 1
            self._schedule()
            self._current = memoryview(fut.result())
        n = len(self._current) if n is None or n < 0 else min(n, len(self._current))
        out = self._current[:n]
        self._current = self._current[n:]
        return out

    def close(self) -> None:
        self._stop.set()
        for fut in self._futures.values():
            fut.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:200]
