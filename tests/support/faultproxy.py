"""A fault-injecting reverse proxy in front of a test registry.

``FaultProxy(upstream_url)`` listens on 127.0.0.1 (a free port) and forwards
every request (method, path, query, headers including ``Authorization``,
body) to the upstream registry, streaming the answer back.  ``Range`` is
forwarded, so 206 answers pass through.  Hop-by-hop headers are dropped, a
``Location`` pointing at the upstream is rewritten to point at the proxy, and
every answer carries ``Connection: close`` (no keep-alive: one request per
connection, which keeps "the connection was cut" unambiguous).

Faults are *scenarios* (built by the functions below, e.g. ``cut(times=2)``)
set at construction or at any time with ``proxy.set_scenario(...)``; several
can be active at once.  Unless stated otherwise a scenario applies to blob
GETs (``/v2/<name>/blobs/<digest>``) and counts per blob digest: ``times=N``
means "the first N matching requests for each blob", ``times=None`` means
"every one".  Body faults (cut, truncate, corrupt, stall_body) only count
answers that carry a body (2xx with a ``Content-Length`` large enough), so a
``401`` of a token-auth round trip does not use them up; offsets are relative
to the body actually sent (for a 206, the range).

The proxy records every request (``proxy.requests``: method, path, Range,
whether ``Authorization`` was present, status, body bytes sent, faults
applied) and counts body bytes per blob (``proxy.bytes_sent(digest)``).

``RecordingBlobServer`` is a second plain HTTP server standing in for a blob
storage backend a registry redirects to (S3 and the like): it serves blob
GET/HEAD by fetching them from the upstream registry and records the headers
it received, so a test can assert that a client did not forward its
``Authorization`` across the redirect.

Only the standard library (``http.server``, ``http.client``) is used.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import requests

if TYPE_CHECKING:
    from .registry import Registry

BLOB_PATH = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>[A-Za-z0-9_+.-]+:[A-Za-z0-9=_-]+)$")
MANIFEST_PATH = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)$")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
CHUNK = 64 * 1024

_ERROR_CODES = {429: "TOOMANYREQUESTS", 503: "UNAVAILABLE", 401: "UNAUTHORIZED", 404: "NOT_FOUND"}


def classify(path: str) -> tuple[str, str | None]:
    """``("blob", digest)``, ``("manifest", reference)`` or ``("other", None)``."""
    m = BLOB_PATH.match(path)
    if m:
        return "blob", m.group("digest")
    m = MANIFEST_PATH.match(path)
    if m:
        return "manifest", m.group("reference")
    return "other", None


# -- records -------------------------------------------------------------------


@dataclass
class ProxyRequest:
    """One request the proxy received, and what it did with it."""

    method: str
    path: str
    query: str
    kind: str  # "blob", "manifest" or "other"
    key: str | None  # blob digest / manifest reference
    range: str | None  # the client's Range header
    authorization: bool  # an Authorization header was present
    status: int | None = None  # status sent to the client (None: nothing sent)
    body_bytes: int = 0  # body bytes sent to the client
    complete: bool = False  # the whole body was sent
    faults: list[str] = field(default_factory=list)  # scenarios that acted on it


# -- scenarios -----------------------------------------------------------------


@dataclass
class _Context:
    method: str
    path: str
    query: str
    kind: str
    key: str | None
    range: str | None
    forward_range: bool = True
    first_byte_delay: float = 0.0


@dataclass
class _Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""


@dataclass
class _BodyPlan:
    close_at: int | None = None
    corrupt_at: set[int] = field(default_factory=set)
    stalls: list[tuple[int, float]] = field(default_factory=list)

    def close(self, offset: int) -> None:
        self.close_at = offset if self.close_at is None else min(self.close_at, offset)


class Scenario:
    """Base class: matching, per-key counting and the two hooks.

    ``before`` runs before the request is forwarded and may answer it
    itself; ``on_response`` runs when the upstream answered and may plan
    body faults.  Both return whether the scenario acted (recorded in
    ``ProxyRequest.faults``).
    """

    name: ClassVar[str] = "scenario"
    kinds: tuple[str, ...] = ("blob",)
    methods: tuple[str, ...] = ("GET",)

    def __init__(self, times: int | None) -> None:
        if times is not None and times < 0:
            raise ValueError("times must be >= 0 or None")
        self.times = times
        self._counts: dict[str | None, int] = {}
        self._lock = threading.Lock()

    def matches(self, ctx: _Context) -> bool:
        return ctx.kind in self.kinds and ctx.method in self.methods

    def _count_key(self, ctx: _Context) -> str | None:
        return ctx.key

    def _claim(self, ctx: _Context) -> int | None:
        """The 0-based ordinal of this application, or None when used up."""
        key = self._count_key(ctx)
        with self._lock:
            n = self._counts.get(key, 0)
            if self.times is not None and n >= self.times:
                return None
            self._counts[key] = n + 1
            return n

    def applied(self, key: str | None = None) -> int:
        """How often the scenario acted (for ``key``, or in total)."""
        with self._lock:
            if key is None:
                return sum(self._counts.values())
            return self._counts.get(key, 0)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()

    def before(self, ctx: _Context) -> tuple[bool, _Reply | None]:
        return False, None

    def on_response(self, ctx: _Context, status: int, length: int | None, plan: _BodyPlan) -> bool:
        return False

    def __repr__(self) -> str:
        attrs = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{self.name}({attrs})"


def _has_body(status: int, length: int | None) -> bool:
    return 200 <= status < 300 and length is not None and length > 0


class Cut(Scenario):
    name = "cut"

    def __init__(self, times: int | None = 1, seed: int = 0) -> None:
        super().__init__(times)
        self.seed = seed

    def on_response(self, ctx: _Context, status: int, length: int | None, plan: _BodyPlan) -> bool:
        if not _has_body(status, length):
            return False
        assert length is not None
        n = self._claim(ctx)
        if n is None:
            return False
        rng = random.Random(f"cut/{self.seed}/{ctx.key}/{n}")
        plan.close(rng.randrange(1, length) if length > 1 else 0)
        return True

    def offset(self, digest: str, length: int, ordinal: int = 0) -> int:
        """Where the ``ordinal``-th answer for ``digest`` (``length`` bytes) is cut."""
        rng = random.Random(f"cut/{self.seed}/{digest}/{ordinal}")
        return rng.randrange(1, length) if length > 1 else 0


class Status(Scenario):
    name = "status"
    methods = ("GET", "HEAD")

    def __init__(
        self,
        code: int,
        times: int | None = 1,
        retry_after: float | None = None,
        *,
        kinds: tuple[str, ...] = ("blob",),
        per_key: bool = True,
    ) -> None:
        super().__init__(times)
        self.code = code
        self.retry_after = retry_after
        self.kinds = kinds
        self.per_key = per_key

    def _count_key(self, ctx: _Context) -> str | None:
        return ctx.key if self.per_key else "*"

    def before(self, ctx: _Context) -> tuple[bool, _Reply | None]:
        if self._claim(ctx) is None:
            return False, None
        error = {
            "code": _ERROR_CODES.get(self.code, "UNKNOWN"),
            "message": f"fault injected by FaultProxy ({self.code})",
            "detail": None,
        }
        headers = [("Content-Type", "application/json; charset=utf-8")]
        if self.retry_after is not None:
            ra = self.retry_after
            headers.append(("Retry-After", str(int(ra)) if float(ra).is_integer() else str(ra)))
        return True, _Reply(self.code, headers, json.dumps({"errors": [error]}).encode())


class StallFirstByte(Scenario):
    name = "stall_first_byte"

    def __init__(self, seconds: float, times: int | None = None) -> None:
        super().__init__(times)
        self.seconds = seconds

    def before(self, ctx: _Context) -> tuple[bool, _Reply | None]:
        if self._claim(ctx) is None:
            return False, None
        ctx.first_byte_delay += self.seconds
        return True, None


class StallBody(Scenario):
    name = "stall_body"

    def __init__(self, seconds: float, after_bytes: int, times: int | None = None) -> None:
        super().__init__(times)
        self.seconds = seconds
        self.after_bytes = after_bytes

    def on_response(self, ctx: _Context, status: int, length: int | None, plan: _BodyPlan) -> bool:
        if not _has_body(status, length) or self.after_bytes >= (length or 0):
            return False
        if self._claim(ctx) is None:
            return False
        plan.stalls.append((self.after_bytes, self.seconds))
        return True


class Redirect(Scenario):
    name = "redirect"

    def __init__(self, target_url: str, times: int | None = None, code: int = 307) -> None:
        super().__init__(times)
        self.target_url = target_url.rstrip("/")
        self.code = code

    def before(self, ctx: _Context) -> tuple[bool, _Reply | None]:
        if self._claim(ctx) is None:
            return False, None
        location = self.target_url + ctx.path + (f"?{ctx.query}" if ctx.query else "")
        return True, _Reply(self.code, [("Location", location)])


class Corrupt(Scenario):
    name = "corrupt"

    def __init__(self, offset: int | None = None, times: int | None = None) -> None:
        super().__init__(times)
        self.offset = offset

    def on_response(self, ctx: _Context, status: int, length: int | None, plan: _BodyPlan) -> bool:
        if not _has_body(status, length):
            return False
        assert length is not None
        offset = length // 2 if self.offset is None else self.offset
        if offset >= length or self._claim(ctx) is None:
            return False
        plan.corrupt_at.add(offset)
        return True


class Truncate(Scenario):
    name = "truncate"

    def __init__(self, keep: int, times: int | None = None) -> None:
        super().__init__(times)
        self.keep = keep

    def on_response(self, ctx: _Context, status: int, length: int | None, plan: _BodyPlan) -> bool:
        if not _has_body(status, length) or self.keep >= (length or 0):
            return False
        if self._claim(ctx) is None:
            return False
        plan.close(self.keep)
        return True


class IgnoreRange(Scenario):
    name = "ignore_range"

    def before(self, ctx: _Context) -> tuple[bool, _Reply | None]:
        if ctx.range is None or self._claim(ctx) is None:
            return False, None
        ctx.forward_range = False
        return True, None


def cut(times: int | None = 1, seed: int = 0) -> Cut:
    """Close the connection at a seeded random offset inside the body.

    Headers (with the full ``Content-Length``) are sent, then ``offset``
    bytes, ``1 <= offset < length``, then the proxy closes (FIN).  The
    offset depends only on ``(seed, digest, ordinal)``; ``Cut.offset`` tells
    it.  The first ``times`` body-carrying answers per blob are cut.
    """
    return Cut(times, seed)


def status(code: int, times: int | None = 1, retry_after: float | None = None) -> Status:
    """Answer the first ``times`` GET/HEAD requests per blob with ``code``.

    The body is a distribution-style JSON error; ``Retry-After`` (seconds) is
    added when ``retry_after`` is given.  The upstream is not contacted.
    """
    return Status(code, times, retry_after)


def manifest_status(code: int, times: int | None = 1, retry_after: float | None = None) -> Status:
    """``status`` for manifest GET/HEAD requests, counted per reference (tag or digest)."""
    return Status(code, times, retry_after, kinds=("manifest",))


def stall_first_byte(seconds: float, times: int | None = None) -> StallFirstByte:
    """Wait ``seconds`` before sending the response headers (a spooling proxy)."""
    return StallFirstByte(seconds, times)


def stall_body(seconds: float, after_bytes: int, times: int | None = None) -> StallBody:
    """Send ``after_bytes`` bytes of the body, pause ``seconds``, then send the rest."""
    return StallBody(seconds, after_bytes, times)


def redirect(target_url: str, times: int | None = None, code: int = 307) -> Redirect:
    """Answer blob GETs with ``code`` and ``Location: <target_url><path>[?query]``."""
    return Redirect(target_url, times, code)


def corrupt(offset: int | None = None, times: int | None = None) -> Corrupt:
    """Flip (XOR 0xFF) the body byte at ``offset`` (default: the middle one)."""
    return Corrupt(offset, times)


def truncate(keep: int, times: int | None = None) -> Truncate:
    """Send only ``keep`` body bytes (``Content-Length`` stays the full size), then close."""
    return Truncate(keep, times)


def ignore_range(times: int | None = None) -> IgnoreRange:
    """Drop the client's ``Range``: ranged blob GETs get 200 and the full body."""
    return IgnoreRange(times)


# -- servers -------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-answer are part of the game; stay quiet.
        pass


class _ServerBase:
    _thread_name = "test-http"

    def _serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._stopping = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._httpd.owner = self  # type: ignore[attr-defined]
        self.port = int(self._httpd.server_address[1])
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name=self._thread_name, daemon=True
        )
        self._thread.start()

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Aborted(Exception):
    """The connection to the client is gone (or was cut on purpose)."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "csi-oci-test"

    def log_message(self, format: str, *args: object) -> None:
        pass

    @property
    def owner(self) -> Any:
        return self.server.owner  # type: ignore[attr-defined]

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        if length is not None:
            return self.rfile.read(int(length))
        return None

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except OSError as exc:
            raise _Aborted from exc

    def _abort(self) -> None:
        """Close the connection now: FIN after whatever was sent."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _send_head(self, code: int, reason: str | None, headers: Iterable[tuple[str, str]]) -> None:
        self.send_response_only(code, reason)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.close_connection = True
        try:
            self.end_headers()
        except OSError as exc:
            raise _Aborted from exc


class FaultProxy(_ServerBase):
    """Reverse proxy to ``upstream_url`` on 127.0.0.1 with injectable faults.

    ``scenario`` is a scenario, several, or None; see ``set_scenario``.
    ``upstream_ssl_context`` is used for an https upstream (default: the
    system defaults, which will not trust a test CA).  ``url``, ``host``
    (``127.0.0.1:PORT``) and ``port`` locate the proxy.
    """

    _thread_name = "fault-proxy"

    def __init__(
        self,
        upstream_url: str,
        scenario: Scenario | Iterable[Scenario] | None = None,
        *,
        upstream_ssl_context: ssl.SSLContext | None = None,
        timeout: float = 60.0,
    ) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"bad upstream URL {upstream_url!r}")
        self.upstream_url = f"{parts.scheme}://{parts.netloc}"
        self._upstream_scheme = parts.scheme
        self._upstream_netloc = parts.netloc
        self._upstream_host = parts.hostname
        self._upstream_port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl_context = upstream_ssl_context
        self.timeout = timeout
        self._lock = threading.Lock()
        self._requests: list[ProxyRequest] = []
        self._bytes: dict[str, int] = {}
        self._scenarios: tuple[Scenario, ...] = ()
        self.set_scenario(scenario)
        self._serve(_proxy_handler())

    # -- configuration ---------------------------------------------------------

    def set_scenario(self, *scenarios: Scenario | Iterable[Scenario] | None) -> None:
        """Replace the active scenarios (none: pass everything through).

        ``set_scenario(cut())``, ``set_scenario(cut(), manifest_status(503))``
        and ``set_scenario([...])`` all work.  Each scenario's counters are
        reset.  Requests already in flight keep the scenarios they started with.
        """
        flat: list[Scenario] = []
        for item in scenarios:
            if item is None:
                continue
            if isinstance(item, Scenario):
                flat.append(item)
            else:
                flat.extend(item)
        for s in flat:
            s.reset()
        with self._lock:
            self._scenarios = tuple(flat)

    def clear_scenario(self) -> None:
        self.set_scenario()

    @property
    def scenarios(self) -> tuple[Scenario, ...]:
        return self._scenarios

    # -- statistics ------------------------------------------------------------

    @property
    def requests(self) -> list[ProxyRequest]:
        """A snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def blob_requests(self, digest: str, method: str | None = "GET") -> list[ProxyRequest]:
        return [
            r
            for r in self.requests
            if r.kind == "blob" and r.key == digest and (method is None or r.method == method)
        ]

    def request_count(self, key: str, method: str | None = None) -> int:
        """Requests for a blob digest or manifest reference (optionally one method)."""
        return sum(
            1 for r in self.requests if r.key == key and (method is None or r.method == method)
        )

    def bytes_sent(self, digest: str) -> int:
        """Body bytes of ``digest`` sent to clients so far (all requests, cut ones too)."""
        with self._lock:
            return self._bytes.get(digest, 0)

    def total_bytes_sent(self) -> int:
        with self._lock:
            return sum(self._bytes.values())

    def reset_stats(self) -> None:
        """Forget recorded requests and byte counts (scenario counters stay)."""
        with self._lock:
            self._requests.clear()
            self._bytes.clear()

    def _record(self, rec: ProxyRequest) -> None:
        with self._lock:
            self._requests.append(rec)

    def _count_bytes(self, rec: ProxyRequest, n: int) -> None:
        with self._lock:
            rec.body_bytes += n
            if rec.kind == "blob" and rec.key:
                self._bytes[rec.key] = self._bytes.get(rec.key, 0) + n

    # -- upstream --------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        if self._upstream_scheme == "https":
            return http.client.HTTPSConnection(
                self._upstream_host,
                self._upstream_port,
                timeout=self.timeout,
                context=self._ssl_context,
            )
        return http.client.HTTPConnection(
            self._upstream_host, self._upstream_port, timeout=self.timeout
        )

    def _rewrite_location(self, value: str) -> str:
        if value.startswith(self.upstream_url):
            return self.url + value[len(self.upstream_url) :]
        return value

    def __repr__(self) -> str:
        return f"<FaultProxy {self.url} -> {self.upstream_url} {list(self._scenarios)}>"


def _proxy_handler() -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        def _handle(self) -> None:
            proxy: FaultProxy = self.owner
            parts = urlsplit(self.path)
            kind, key = classify(parts.path)
            rec = ProxyRequest(
                method=self.command,
                path=parts.path,
                query=parts.query,
                kind=kind,
                key=key,
                range=self.headers.get("Range"),
                authorization="Authorization" in self.headers,
            )
            proxy._record(rec)
            try:
                self._proxy(proxy, rec)
            except _Aborted:
                self.close_connection = True

        def _proxy(self, proxy: FaultProxy, rec: ProxyRequest) -> None:
            body = self._read_body()
            ctx = _Context(rec.method, rec.path, rec.query, rec.kind, rec.key, rec.range)
            scenarios = [s for s in proxy.scenarios if s.matches(ctx)]
            for s in scenarios:
                acted, reply = s.before(ctx)
                if acted:
                    rec.faults.append(s.name)
                if reply is not None:
                    self._reply(rec, reply)
                    return

            conn = proxy._connect()
            try:
                try:
                    resp = self._forward(conn, ctx, body)
                except (OSError, http.client.HTTPException) as exc:
                    msg = f"upstream {proxy.upstream_url}: {exc}".encode()
                    self._reply(rec, _Reply(502, [("Content-Type", "text/plain")], msg))
                    return
                length: int | None = None
                if rec.method != "HEAD" and resp.status not in (204, 304):
                    cl = resp.getheader("Content-Length")
                    length = int(cl) if cl is not None and cl.isdigit() else None
                plan = _BodyPlan()
                for s in scenarios:
                    if s.on_response(ctx, resp.status, length, plan):
                        rec.faults.append(s.name)
                headers = []
                for name, value in resp.getheaders():
                    lname = name.lower()
                    if lname in HOP_BY_HOP:
                        continue
                    if lname == "location":
                        value = proxy._rewrite_location(value)
                    headers.append((name, value))
                proxy._sleep(ctx.first_byte_delay)
                rec.status = resp.status
                if rec.method == "HEAD" or resp.status in (204, 304):
                    rec.complete = True
                self._send_head(resp.status, resp.reason, headers)
                if not rec.complete:
                    self._stream(proxy, rec, resp, plan, length)
            finally:
                conn.close()

        def _forward(
            self, conn: http.client.HTTPConnection, ctx: _Context, body: bytes | None
        ) -> http.client.HTTPResponse:
            proxy: FaultProxy = self.owner
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", proxy._upstream_netloc)
            for name, value in self.headers.items():
                lname = name.lower()
                if lname in HOP_BY_HOP or lname in ("host", "content-length"):
                    continue
                if lname == "range" and not ctx.forward_range:
                    continue
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            return conn.getresponse()

        def _reply(self, rec: ProxyRequest, reply: _Reply) -> None:
            headers = [*reply.headers, ("Content-Length", str(len(reply.body)))]
            rec.status = reply.status
            rec.complete = True
            self._send_head(reply.status, None, headers)
            if rec.method != "HEAD" and reply.body:
                self._write(reply.body)

        def _stream(
            self,
            proxy: FaultProxy,
            rec: ProxyRequest,
            resp: http.client.HTTPResponse,
            plan: _BodyPlan,
            length: int | None,
        ) -> None:
            # Statistics are updated before each write, so they are final by
            # the time the client has seen the bytes (they count bytes handed
            # to the socket).
            pos = 0
            stalls = sorted(plan.stalls)
            while True:
                while stalls and stalls[0][0] <= pos:
                    proxy._sleep(stalls.pop(0)[1])
                if plan.close_at is not None and pos >= plan.close_at:
                    self._abort()
                    return
                limit = CHUNK
                for event in [plan.close_at, *(s[0] for s in stalls)]:
                    if event is not None:
                        limit = min(limit, event - pos)
                try:
                    chunk = resp.read(limit)
                except (OSError, http.client.HTTPException):
                    self._abort()  # upstream broke: pass the breakage on
                    return
                if not chunk:
                    rec.complete = True
                    return
                for offset in plan.corrupt_at:
                    if pos <= offset < pos + len(chunk):
                        i = offset - pos
                        chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
                proxy._count_bytes(rec, len(chunk))
                pos += len(chunk)
                if pos == length:
                    rec.complete = True
                self._write(chunk)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    return Handler


# -- redirect target -----------------------------------------------------------


@dataclass
class ServedRequest:
    """A request the RecordingBlobServer received."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # as received (names as the client spelled them)

    def header(self, name: str) -> str | None:
        for k, v in self.headers.items():
            if k.lower() == name.lower():
                return v
        return None


class RecordingBlobServer(_ServerBase):
    """Plain HTTP "blob storage" that serves the upstream registry's blobs.

    GET/HEAD ``<path>`` is answered by fetching ``<upstream><path>?<query>``
    (``Range`` is passed on; nothing else the client sent is): anonymously
    when ``upstream`` is a URL, with the registry's own credentials and TLS
    settings when it is a ``Registry``.  Every request's headers are kept in
    ``requests``; ``authorization_seen`` tells whether any carried
    ``Authorization``.  Use it as a ``redirect`` target.
    """

    _thread_name = "recording-blob-server"

    def __init__(self, upstream: str | Registry, *, timeout: float = 60.0) -> None:
        self.upstream = upstream
        self.timeout = timeout
        self._lock = threading.Lock()
        self._requests: list[ServedRequest] = []
        self._serve(_recording_handler())

    @property
    def requests(self) -> list[ServedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def authorization_seen(self) -> bool:
        return any(r.header("Authorization") is not None for r in self.requests)

    def _record(self, rec: ServedRequest) -> None:
        with self._lock:
            self._requests.append(rec)

    def _fetch(self, method: str, path: str, headers: dict[str, str]) -> requests.Response:
        if isinstance(self.upstream, str):
            return requests.request(
                method,
                self.upstream.rstrip("/") + path,
                headers=headers,
                stream=True,
                timeout=self.timeout,
            )
        return self.upstream.request(
            method, path, headers=headers, stream=True, timeout=self.timeout
        )

    def __repr__(self) -> str:
        return f"<RecordingBlobServer {self.url} -> {self.upstream}>"


_PASS_BACK = (
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Accept-Ranges",
    "Docker-Content-Digest",
    "ETag",
)


def _recording_handler() -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        def _handle(self) -> None:
            server: RecordingBlobServer = self.owner
            parts = urlsplit(self.path)
            server._record(
                ServedRequest(self.command, parts.path, parts.query, dict(self.headers.items()))
            )
            fwd = {"Range": self.headers["Range"]} if "Range" in self.headers else {}
            try:
                resp = server._fetch(self.command, self.path, fwd)
            except requests.RequestException as exc:
                msg = str(exc).encode()
                headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(msg)))]
                try:
                    self._send_head(502, None, headers)
                    self._write(msg)
                except _Aborted:
                    pass
                return
            with resp:
                headers = [(h, resp.headers[h]) for h in _PASS_BACK if h in resp.headers]
                try:
                    self._send_head(resp.status_code, resp.reason, headers)
                    if self.command == "HEAD":
                        return
                    while True:
                        chunk = resp.raw.read(CHUNK, decode_content=False)
                        if not chunk:
                            break
                        self._write(chunk)
                except _Aborted:
                    pass
                except Exception:  # upstream broke mid-body
                    self._abort()

        do_GET = do_HEAD = _handle

    return Handler


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate()`` until true or ``timeout``; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return bool(predicate())
        time.sleep(interval)
