"""Bounded reads of the HTTP bodies the driver keeps whole.

Manifests, configs, token responses, error bodies, tag lists and referrer
indexes are read into memory; a registry (or a token realm, or a mirror) may
be run by the pod's author, so each body is capped twice: on the wire, and
after its Content-Encoding is undone. requests' `.content` / `.json()` would
inflate a 2 MiB gzip body to gigabytes before anything could say no (seen:
6.2 GB RSS from a token realm), so bodies are read here from the raw stream
with our own bounded decoder, and nothing else in the driver calls them.

Blobs are not read here: they stream, byte-exact, through
csi_oci.streams.VerifyingReader.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Protocol

from csi_oci.errors import RegistryError, human_bytes
from csi_oci.oci.transfer import BODY_ERRORS, TransientError

MAX_TOKEN_BYTES = 1 << 20  # a registry token response (JWTs are a few KiB)
MAX_ERROR_BODY_BYTES = 64 << 10  # an error body: only its message is shown
MAX_TAG_LIST_BYTES = 1 << 20  # tags/list, only used for error messages
READ_CHUNK = 64 << 10

# What we ask for: bodies as they are. A server may still encode them; the two
# encodings HTTP clients must understand are decoded (bounded), others refused.
ACCEPT_ENCODING = "identity"


class BodyTooLarge(RegistryError):
    """A body went past its cap (on the wire or decoded)."""


class _Raw(Protocol):
    def read(self, amt: int | None = None, decode_content: bool | None = None) -> bytes: ...


class _Response(Protocol):
    @property
    def raw(self) -> _Raw: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


def read_body(resp: _Response, cap: int, what: str) -> bytes:
    """The whole body of `resp`, at most `cap` bytes both as sent and as decoded.

    Raises BodyTooLarge naming `what` and the cap, or RegistryError for an
    encoding we do not decode. `resp` must have been requested with
    `stream=True` (nothing read yet).
    """
    headers = resp.headers
    length = headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > cap:
        raise BodyTooLarge(_too_large(what, cap, f"{int(length)} bytes declared"))
    raw = _read_raw(resp, cap, what)
    encoding = (headers.get("Content-Encoding") or "").strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding in ("gzip", "x-gzip"):
        return _inflate(raw, zlib.MAX_WBITS | 16, cap, what)
    if encoding == "deflate":
        # RFC 9110 says zlib-wrapped; some servers send raw deflate.
        try:
            return _inflate(raw, zlib.MAX_WBITS, cap, what)
        except _Corrupt:
            return _inflate(raw, -zlib.MAX_WBITS, cap, what)
    raise RegistryError(
        f"{what}: the server sent it with Content-Encoding {encoding[:40]!r}, which csi-oci "
        "does not decode (it asks for identity)"
    )


def _read_raw(resp: _Response, cap: int, what: str) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = resp.raw.read(READ_CHUNK, decode_content=False)
        except BODY_ERRORS as exc:
            raise TransientError(f"{what}: the connection broke while reading it: {exc}") from None
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > cap:
            raise BodyTooLarge(_too_large(what, cap, "on the wire"))
        chunks.append(chunk)


class _Corrupt(RegistryError):
    pass


def _inflate(data: bytes, wbits: int, cap: int, what: str) -> bytes:
    decoder = zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(data, cap + 1)
    except zlib.error as exc:
        raise _Corrupt(f"{what}: corrupt compressed body: {exc}") from None
    if len(out) > cap or decoder.unconsumed_tail:
        raise BodyTooLarge(_too_large(what, cap, "once decompressed"))
    return out


def _too_large(what: str, cap: int, how: str) -> str:
    return f"{what} is larger than {human_bytes(cap)} ({how}); refusing it"


__all__ = [
    "ACCEPT_ENCODING",
    "MAX_ERROR_BODY_BYTES",
    "MAX_TAG_LIST_BYTES",
    "MAX_TOKEN_BYTES",
    "BodyTooLarge",
    "read_body",
]
