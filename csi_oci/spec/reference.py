"""Image references: parsing, normalisation and the registry-host rules.

Grammar follows the distribution reference grammar (the one `docker pull`
accepts): `[registry[:port]/]repo/path[:tag][@algo:hex]`, with Docker Hub
defaults (`docker.io`, `library/`). An optional `oci://` scheme prefix is
accepted because users copy references from tools that print it.

A digest string is validated here, before it is ever used to build a path or
a URL (CVE-2024-3727 was an unvalidated digest used as a path).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from csi_oci.errors import InvalidArgument
from csi_oci.spec.digest import validate_digest as _validate_digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io")

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_HOST_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$"
)


def validate_digest(digest: str) -> str:
    """Return `digest` if it is a well-formed sha256/sha512 digest, else raise.

    The rule lives in csi_oci.digest (one parser for every digest from outside).
    """
    return _validate_digest(digest)


@dataclass(frozen=True)
class Reference:
    """A parsed, normalised image reference."""

    registry: str  # host[:port] as the user wrote it (docker.io for the Hub)
    repository: str  # path within the registry, e.g. library/busybox
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        """Host to contact for the registry API (Docker Hub has a separate one)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        """`registry/repository`, the reference without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def manifest_key(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, validate_digest(digest))


def parse_reference(text: str) -> Reference:
    """Parse `text` into a Reference or raise InvalidArgument naming the problem."""
    raw = text.strip()
    if raw.startswith("oci://"):
        raw = raw[len("oci://") :]
    if not raw:
        raise InvalidArgument("image reference is empty")
    if len(raw) > 1024 or any(c.isspace() for c in raw):
        raise InvalidArgument(
            f"invalid image reference {text!r}: contains whitespace or is too long"
        )

    digest: str | None = None
    if "@" in raw:
        raw, _, digest = raw.partition("@")
        try:
            validate_digest(digest)
        except InvalidArgument as exc:
            raise InvalidArgument(f"invalid image reference {text!r}: {exc}") from None

    registry = DOCKER_HUB
    first, slash, rest = raw.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, raw = first, rest
        if registry in DOCKER_HUB_ALIASES:
            registry = DOCKER_HUB
        if not _HOST_RE.fullmatch(registry):
            raise InvalidArgument(
                f"invalid image reference {text!r}: bad registry host {registry!r}"
            )

    tag: str | None = None
    name, colon, maybe_tag = raw.rpartition(":")
    if colon and "/" not in maybe_tag:
        raw, tag = name, maybe_tag
        if not _TAG_RE.fullmatch(tag):
            raise InvalidArgument(f"invalid image reference {text!r}: bad tag {tag!r}")

    if registry == DOCKER_HUB and "/" not in raw:
        raw = f"library/{raw}"
    if not _REPO_RE.fullmatch(raw):
        raise InvalidArgument(
            f"invalid image reference {text!r}: repository {raw!r} must be lowercase "
            "path components of letters, digits and separators"
        )
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry=registry, repository=raw, tag=tag, digest=digest)


def is_loopback_host(host: str) -> bool:
    """True for localhost / 127.0.0.0/8 / ::1 (with or without port).

    Like Docker, plain HTTP is allowed only for these: anything else must be
    TLS unless an operator opts in.
    """
    if host.startswith("["):
        addr = host[1:].split("]", 1)[0]
    else:
        addr = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False
