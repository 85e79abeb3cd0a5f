"""Content digests: the one rule for every digest that comes from outside.

A digest arrives from a volume attribute, a manifest, an index, a config, a
lazy layer's TOC or a registry header, all written by whoever built the image
or runs the registry. It is used to verify bytes and to name files in the
node's cache, so one malformed value can make a check pass that should fail
(an unknown algorithm has no hash to compare) or name a path outside the
cache (`/var/lib/kubelet/...`, `../`). So every digest is parsed here, once,
where it enters, into a `Digest` that can only hold an allow-listed
algorithm and its exact lower-case hex:

  * `parse_digest` refuses anything else with the field's name in the error;
  * `Digest.file_name` is the only way a digest becomes a file name
    (`sha256-<hex>`: one flat component, no separator, no dot);
  * `Digest.matches` is the only way bytes are checked against one, and an
    unverifiable digest cannot exist, so verification fails closed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from csi_oci.errors import CsiOciError, InvalidArgument

if TYPE_CHECKING:
    from hashlib import _Hash

# OCI image-spec's registered algorithms that we can verify; sha512 is rare but legal.
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")
_DIGEST = re.compile(r"(sha256):([0-9a-f]{64})|(sha512):([0-9a-f]{128})")  # as _HEX_LENGTH


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated `algorithm:hex` digest (construction checks it too)."""

    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        length = _HEX_LENGTH.get(self.algorithm)
        if length is None or len(self.hex) != length or not _HEX.fullmatch(self.hex):
            raise InvalidArgument(
                f"invalid digest {self.algorithm}:{self.hex!r}: "
                "want sha256:<64 lower-case hex> or sha512:<128 lower-case hex>"
            )

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def file_name(self) -> str:
        """The one file name this digest may have in a cache directory."""
        return f"{self.algorithm}-{self.hex}"

    def hasher(self) -> _Hash:
        return hashlib.new(self.algorithm)

    def of(self, data: bytes | bytearray | memoryview) -> str:
        """The hex digest of `data` under this digest's algorithm."""
        return hashlib.new(self.algorithm, data).hexdigest()

    def matches(self, data: bytes | bytearray | memoryview) -> bool:
        return self.of(data) == self.hex


def parse_digest(
    value: object, what: str = "digest", error: type[CsiOciError] = InvalidArgument
) -> Digest:
    """`value` as a Digest, or `error` naming `what` and the value.

    Anything but a `str` of exactly `algo:hex` with an allow-listed algorithm
    and lower-case hex of that algorithm's length is refused: no trailing
    newline, no upper case (another spelling of the same digest would be
    another file), no unknown algorithm (nothing to verify it with).
    """
    if isinstance(value, str):
        match = _DIGEST.fullmatch(value)
        if match is not None:
            # Checked just now: skip __post_init__'s second check (a lazy TOC
            # holds one digest per 64 KiB chunk, tens of thousands per GiB).
            digest = object.__new__(Digest)
            object.__setattr__(digest, "algorithm", match.group(1) or match.group(3))
            object.__setattr__(digest, "hex", match.group(2) or match.group(4))
            return digest
    shown = value if isinstance(value, str) else type(value).__name__
    raise error(
        f"invalid {what} {str(shown)[:150]!r}: want sha256:<64 lower-case hex> "
        "or sha512:<128 lower-case hex>"
    )


def validate_digest(value: object, what: str = "digest") -> str:
    """`value` if it is a valid digest string (InvalidArgument otherwise)."""
    return str(parse_digest(value, what))


__all__ = ["Digest", "parse_digest", "validate_digest"]
