"""The adapter between a pipeline stage and tarfile, which wants a file object."""

from __future__ import annotations

from collections.abc import Iterator

from csi_oci.errors import InvalidLayer
from csi_oci.stream.verify import CHUNK, Readable


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
