"""Registry responses: error bodies, token responses, tag lists, manifest bodies, headers.

csi_oci/registry.py is being reworked (bodies read bounded by
csi_oci/httpbody.py), so this target is kept small and looks its entry points
up by name: a handler whose function is gone does nothing (and the run's
coverage shows it). Today it calls

  0  registry._Connection._check(resp)   status + error body (registry._error_detail,
                                         httpbody.read_body) + Retry-After
                                         (transfer.parse_retry_after); then
                                         registry._error_detail(resp) directly
  1  registry._ExpiringTokenAuth.authenticate_request(401 + WWW-Authenticate)
     -> oras' challenge parser -> request_token -> the token endpoint's answer
  2  registry.RegistryClient.list_tags()  the tags/list body
  3  httpbody.read_body (or the older registry._read_capped) +
     manifest.detect_media_type          a manifest response
  4  transfer.ResumableStream._check_content_range + transfer.parse_retry_after

Input: a handler byte (low 3 bits, modulo 5: handler; bits 4-5: the body's
Content-Encoding: 0 none, 1 gzip and 2 deflate with the body fuzzed as sent,
3 gzip made by the harness from the body), a status byte (low 7 bits: index
into STATUSES; bit 7: handler 1 has basic credentials set), then a header
value (latin-1, as http.client decodes it), NUL, the body.
"""

from __future__ import annotations

import gzip
import inspect
import time
import types
from typing import Any

import requests

from csi_oci.oci import manifest as manifest_mod
from csi_oci.oci import registry, transfer
from csi_oci.spec.reference import parse_reference

from .common import attempt, response, split

try:
    from csi_oci.oci import bodies as httpbody
except ImportError:  # before the bounded reader existed
    httpbody = None  # type: ignore[assignment]

DICT = [
    b'"errors"',
    b'"code"',
    b'"message"',
    b'"detail"',
    b'"token"',
    b'"access_token"',
    b'"expires_in"',
    b'"issued_at"',
    b'"refresh_token"',
    b'"tags"',
    b'"name"',
    b'"mediaType"',
    b"Bearer ",
    b"Basic ",
    b'realm="',
    b'service="',
    b'scope="',
    b"bytes ",
    b"1e999",
    b"NaN",
    b"Infinity",
    b"-0",
    b"\\ud800",
    b"Wed, 21 Oct 2015 07:28:00 GMT",
    b"\x1f\x8b\x08\x00",
    b"\x78\x9c",
]
NAME = "registry"
MAX_LEN = 8 << 10

STATUSES = (200, 401, 403, 404, 400, 429, 500, 503, 206, 416, 502, 418, 201, 307)
ENCODINGS = (None, "gzip", "deflate", "gzip")
# Loopback, as the seeds' registry and token realm are: a realm on the registry's own host
# may be asked for a token (csi_oci.oci.registry checks that), so the seeds reach the parse.
REFERENCE = "127.0.0.1:5000/fuzz/repo:latest"

_client: Any = None
_encoding: str | None = None


def _no_network(self: Any, request: Any, **kwargs: Any) -> Any:
    raise requests.exceptions.ConnectionError(f"fuzz harness: no network ({request.url})")


_isolated = False


def _isolate() -> None:
    """Every response here is the fuzzer's: a code path that would reach the network
    (or back off and retry) must fail fast, not wait, whatever the code becomes.

    Done on the first input, not at import: the seed generator imports this module
    (for STATUSES) and needs the network to a loopback registry.
    """
    global _isolated
    if not _isolated:
        requests.Session.send = _no_network  # type: ignore[method-assign]
        time.sleep = lambda seconds: None
        _isolated = True


def _response(status: int, body: bytes, headers: dict[str, str] | None = None) -> Any:
    headers = dict(headers or {})
    if _encoding is not None:
        headers["Content-Encoding"] = _encoding
    return response(status, body, headers)


class _Session:
    """What the token flow asks the network, answered with the fuzzed response."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body = status, body

    def get(self, url: str, **kwargs: Any) -> Any:
        return _response(self.status, self.body, {"Content-Type": "application/json"})

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        return self.get(url)


def _connection() -> Any:
    global _client
    if _client is None:
        _client = registry.RegistryClient(parse_reference(REFERENCE))
    return _client.connections[0]


def _new_auth(cls: Any) -> Any:
    """The token auth as _Connection makes it (newer versions take the endpoint)."""
    try:
        wants = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        wants = {}
    return cls(_connection().endpoint) if "endpoint" in wants else cls()


def _check(status: int, header: str, body: bytes) -> None:
    conn = _connection()
    check = getattr(conn, "_check", None)
    if check is not None:
        attempt(check, _response(status, body, {"Retry-After": header}), "manifest 'latest'")
    detail = getattr(registry, "_error_detail", None)
    if detail is not None:
        detail(_response(status, body))


def _token(status: int, header: str, body: bytes, basic: bool) -> None:
    cls = getattr(registry, "_ExpiringTokenAuth", None)
    if cls is None:
        return
    shared = getattr(cls, "_shared", None)
    if isinstance(shared, dict):
        shared.clear()  # a token cached by an earlier input would skip the parse
    auth = _new_auth(cls)
    auth.prefix = "https"
    auth.session = _Session(status, body)
    auth._tls_verify = True
    if basic:
        auth.set_basic_auth("fuzz", "secret")
    challenge = response(401, b"", {"WWW-Authenticate": header})
    auth.authenticate_request(challenge, {}, False)
    auth.get_auth_header()


def _tags(body: bytes) -> None:
    conn = _connection()
    list_tags = getattr(_client, "list_tags", None)
    if list_tags is None:
        return
    conn.get = lambda path, headers, *, what: _response(200, body)
    try:
        list_tags()
    finally:
        del conn.get


def _manifest(header: str, body: bytes) -> None:
    read_body = getattr(httpbody, "read_body", None) or getattr(registry, "_read_capped", None)
    data = body
    if read_body is not None:
        data = read_body(_response(200, body), manifest_mod.MAX_MANIFEST_BYTES, "manifest")
    manifest_mod.detect_media_type(data, header)


def _headers(header: str) -> None:
    transfer.parse_retry_after(header)
    check = getattr(transfer.ResumableStream, "_check_content_range", None)
    if check is not None:
        stream = types.SimpleNamespace(pos=0, _what="blob", close=lambda: None)
        attempt(check, stream, response(206, b"", {"Content-Range": header}))


def target(data: bytes) -> None:
    global _encoding
    _isolate()
    if len(data) < 2:
        return
    handler, encoding = (data[0] & 7) % 5, (data[0] >> 4) & 3
    status_byte = data[1]
    status = STATUSES[(status_byte & 0x7F) % len(STATUSES)]
    raw_header, body = split(data[2:], 2)
    header = raw_header.decode("latin-1")
    _encoding = ENCODINGS[encoding]
    if encoding == 3:
        body = gzip.compress(body, compresslevel=1, mtime=0)
    if handler == 0:
        _check(status, header, body)
    elif handler == 1:
        _token(status, header, body, basic=bool(status_byte & 0x80))
    elif handler == 2:
        _tags(body)
    elif handler == 3:
        _manifest(header, body)
    elif handler == 4:
        _headers(header)
