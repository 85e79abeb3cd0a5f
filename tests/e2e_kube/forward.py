"""A TCP forwarder that exposes a loopback test registry to pods, optionally throttled.

The test registries (tests/support/registry.py) listen on 127.0.0.1, which a
pod on the bridge network cannot reach.  ``Forwarder(node_ip, upstream_port)``
listens on the node's address and copies bytes both ways.  ``rate`` (bytes per
second) limits what flows back to the client, shared by all connections, so a
driver that splits a blob into parallel range requests is throttled just the
same: that is how the "pull longer than kubelet's 2 minutes" scenario gets a
slow registry without a slow machine.
"""

from __future__ import annotations

import socket
import threading
import time

CHUNK = 16 * 1024


class _Bucket:
    """A token bucket of ``rate`` bytes per second shared by all connections."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + n / self.rate
        if start > now:
            time.sleep(start - now)


class Forwarder:
    def __init__(self, bind_ip: str, upstream_port: int, rate: float | None = None) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._bucket = _Bucket(rate) if rate else None
        self._listener = socket.create_server((bind_ip, 0))
        self.port = int(self._listener.getsockname()[1])
        self.host = f"{bind_ip}:{self.port}"
        self._stopped = False
        self._refusing = False
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def refuse(self, refusing: bool = True) -> None:
        """Cut every open connection and refuse new ones (a registry gone), or serve again."""
        with self._lock:
            self._refusing = refusing
            cut = list(self._open) if refusing else []
        for sock in cut:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            refusing = self._refusing
        if refusing:
            client.close()
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._open.update((client, upstream))
        threading.Thread(target=self._copy, args=(client, upstream, None), daemon=True).start()
        self._copy(upstream, client, self._bucket)

    def _copy(self, src: socket.socket, dst: socket.socket, bucket: _Bucket | None) -> None:
        try:
            while data := src.recv(CHUNK):
                if bucket is not None:
                    bucket.take(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # Half-close so the other direction can finish, then drop both.
            for sock in (dst, src):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._open.difference_update((src, dst))
            src.close()
            dst.close()

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
