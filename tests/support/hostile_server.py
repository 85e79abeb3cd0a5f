"""A registry run by the attacker: answers each request as a test scripts it.

The driver talks to whatever host a pod names, so tests need a registry (and
token realm, mirror, redirect target) that lies on purpose: bodies that
inflate to gigabytes, redirects to places it must not go, challenges naming a
token service elsewhere. ``HostileServer(handler)`` serves HTTP (or HTTPS with
``tls=(cert, key)``) on loopback; ``handler(request)`` returns a ``Reply``, and
every request is recorded (method, path, headers) for the test to inspect.

Bombs are built without compressing gigabytes: a deflate block of zeros
written with a full flush does not depend on what came before, so one such
block is repeated to make a gzip member of any size (with the right CRC and
length), in a second or two.
"""

from __future__ import annotations

import ssl
import struct
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | Iterable[bytes] = b""  # an iterable is sent with chunked encoding


Handler = Callable[[Request], Reply]


class HostileServer:
    def __init__(
        self,
        handler: Handler,
        *,
        tls: tuple[Path, Path] | None = None,
        bind: str = "127.0.0.1",
    ) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                request = Request(self.command, self.path, {k: v for k, v in self.headers.items()})
                outer.requests.append(request)
                reply = outer.handler(request)
                self.send_response(reply.status)
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                if isinstance(reply.body, bytes | bytearray):
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(reply.body)
                    return
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for chunk in reply.body:
                        if chunk:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the driver stopped reading: what a cap is for

            do_GET = do_HEAD = do_POST = do_PUT = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((bind, 0), _Handler)
        self._server.daemon_threads = True
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            scheme = "https"
        self.port = self._server.server_address[1]
        self.host = f"{bind}:{self.port}"
        self.url = f"{scheme}://{self.host}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@lru_cache(maxsize=4)
def gzip_bomb(inflated: int) -> bytes:
    """A valid gzip member of `inflated` zero bytes (a multiple of 1 MiB), about 1/1000 the size."""
    block = 1 << 20
    assert inflated % block == 0
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = comp.compress(bytes(block)) + comp.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    zeros = bytes(block)
    for _ in range(inflated // block):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    final = b"\x03\x00"  # an empty final fixed-Huffman block
    trailer = struct.pack("<II", crc, inflated & 0xFFFFFFFF)
    return header + piece * (inflated // block) + final + trailer


def registry_ping(request: Request) -> Reply | None:
    """`/v2/` answered as an anonymous registry does (None for other paths)."""
    if request.path.rstrip("/") == "/v2":
        return Reply(200, {"Docker-Distribution-API-Version": "registry/2.0"})
    return None


__all__ = ["HostileServer", "Reply", "Request", "gzip_bomb", "registry_ping"]
