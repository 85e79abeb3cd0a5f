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
from collections.abc import Callable
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


def digest_or_none(value: object) -> Digest | None:
    """`value` as a Digest if it is one exactly (see parse_digest), else None.

    The hot path of TOC parsing (one digest per 64 KiB chunk, tens of
    thousands per GiB): checked once by the regex, no __post_init__ re-check
    and no error text built for the common, valid case.
    """
    if isinstance(value, str):
        if len(value) == 71 and _SHA256_DIGEST.fullmatch(value):  # the common case, cheaper
            digest = _new_digest(Digest)
            _set_algorithm(digest, "sha256")
            _set_hex(digest, value[7:])
            return digest
        match = _DIGEST.fullmatch(value)
        if match is not None:
            digest = _new_digest(Digest)
            _set_algorithm(digest, match.group(1) or match.group(3))
            _set_hex(digest, match.group(2) or match.group(4))
            return digest
    return None


# Checked by the regex: build the Digest without __post_init__'s second
# check, through the slots' own setters (the frozen __setattr__ refuses).
_SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_new_digest = object.__new__
_set_algorithm: Callable[[Digest, str], None] = vars(Digest)["algorithm"].__set__
_set_hex: Callable[[Digest, str], None] = vars(Digest)["hex"].__set__


def parse_digest(
    value: object, what: str = "digest", error: type[CsiOciError] = InvalidArgument
) -> Digest:
    """`value` as a Digest, or `error` naming `what` and the value.

    Anything but a `str` of exactly `algo:hex` with an allow-listed algorithm
    and lower-case hex of that algorithm's length is refused: no trailing
    newline, no upper case (another spelling of the same digest would be
    another file), no unknown algorithm (nothing to verify it with).
    """
    digest = digest_or_none(value)
    if digest is not None:
        return digest
    shown = value if isinstance(value, str) else type(value).__name__
    raise error(
        f"invalid {what} {str(shown)[:150]!r}: want sha256:<64 lower-case hex> "
        "or sha512:<128 lower-case hex>"
    )


def validate_digest(value: object, what: str = "digest") -> str:
    """`value` if it is a valid digest string (InvalidArgument otherwise)."""
    return str(parse_digest(value, what))


__all__ = ["Digest", "digest_or_none", "parse_digest", "validate_digest"]
