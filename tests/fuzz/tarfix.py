"""Re-seal tar header checksums, so mutated headers reach the parser behind the check.

tarfile refuses a header whose checksum is wrong, and almost every mutation
of a header breaks it: the fuzzer would mostly test the checksum. An
attacker writes valid checksums, so the harness does too, for the headers it
can find by walking the blocks (each header's size field says where the next
one is).
"""

from __future__ import annotations

BLOCK = 512


def _size(header: bytes) -> int:
    field = header[124:136]
    if field[:1] and field[0] & 0x80:  # base-256 (GNU): big-endian after the marker byte
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return 0


def fix_checksums(data: bytes, max_headers: int = 4096) -> bytes:
    """``data`` with the checksum of every header on the block walk recomputed."""
    out = bytearray(data)
    pos = 0
    fixed = 0
    while pos + BLOCK <= len(out) and fixed < max_headers:
        header = out[pos : pos + BLOCK]
        if not any(header):
            pos += BLOCK
            continue
        header[148:156] = b" " * 8
        out[pos + 148 : pos + 156] = b"%06o\0 " % (sum(header) & 0o777777)
        fixed += 1
        size = _size(bytes(header))
        pos += BLOCK + -(-max(size, 0) // BLOCK) * BLOCK
    return bytes(out)
