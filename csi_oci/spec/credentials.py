"""Registry credentials from NodePublishVolume secrets.

Accepted shapes (the keys of a Kubernetes Secret, as kubelet passes them):
* `.dockerconfigjson` (type kubernetes.io/dockerconfigjson): `{"auths": {...}}`
* `.dockercfg` (legacy kubernetes.io/dockercfg): the same map without `auths`
* `username` / `password`

Registry keys in docker configs are matched the way kubelet matches them:
scheme and trailing slash stripped, `host[:port]` equal (or a `*.` wildcard
for one label), and an optional path prefix of the repository; the longest
match wins. Nothing in this module ever logs a secret value, and the
Credentials repr hides the password.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from csi_oci.errors import InvalidArgument
from csi_oci.spec.reference import DOCKER_HUB, Reference

log = logging.getLogger(__name__)

DOCKER_HUB_KEYS = ("index.docker.io", "docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<redacted>)"


def _split_key(key: str) -> tuple[str, str]:
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme) :]
    key = key.rstrip("/")
    host, _, path = key.partition("/")
    if host in DOCKER_HUB_KEYS:
        host, path = DOCKER_HUB, "" if path in ("v1", "v2") else path
    return host.lower(), path


def _host_matches(pattern: str, host: str) -> bool:
    if pattern == host:
        return True
    if pattern.startswith("*."):
        p_host, _, p_port = pattern[2:].partition(":")
        h_host, _, h_port = host.partition(":")
        first, _, rest = h_host.partition(".")
        return bool(first) and rest == p_host and p_port == h_port
    return False


def _match_score(key: str, registry: str, repository: str) -> int:
    """-1 when `key` does not apply; else longer (more specific) is higher."""
    host, path = _split_key(key)
    if not _host_matches(host, registry.lower()):
        return -1
    if path and not (repository == path or repository.startswith(path + "/")):
        return -1
    return len(host) + len(path) + (0 if host.startswith("*.") else 1000)


def match_auths(auths: dict[str, object], registry: str, repository: str) -> Credentials | None:
    """The most specific docker-config entry for registry/repository, as kubelet picks."""
    best: tuple[int, str] | None = None
    for key in auths:
        score = _match_score(key, registry, repository)
        if score >= 0 and (best is None or score > best[0]):
            best = (score, key)
    return _entry_credentials(auths[best[1]], best[1]) if best is not None else None


def _entry_credentials(entry: object, key: str) -> Credentials:
    if not isinstance(entry, dict):
        raise InvalidArgument(f"docker config entry for {key!r} is not an object")
    username = entry.get("username") or ""
    password = entry.get("password") or ""
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidArgument(
                f"docker config entry for {key!r} has a malformed 'auth' field"
            ) from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise InvalidArgument(f"docker config entry for {key!r}: 'auth' is not user:password")
    if entry.get("identitytoken") and not password:
        # An OAuth2 refresh token is sent as the password with a fixed user name.
        username, password = "<token>", str(entry["identitytoken"])
    return Credentials(str(username), str(password))


def credentials_from_secrets(secrets: Mapping[str, str], ref: Reference) -> Credentials | None:
    """The credentials for `ref` found in a NodePublish secret map, if any."""
    return credentials_for(secrets, ref.registry, ref.repository, image_registry=ref.registry)


def credentials_for(
    secrets: Mapping[str, str], registry: str, repository: str, *, image_registry: str
) -> Credentials | None:
    """Credentials for a registry host (a mirror's too) from a NodePublish secret.

    Docker-config entries name their hosts. Bare `username`/`password` keys
    name none, so they are for the image's own registry only
    (`image_registry`): never for a mirror, whoever runs it.
    """
    if not secrets:
        return None
    auths: dict[str, object] = {}
    for key in (".dockerconfigjson", ".dockercfg"):
        if key in secrets:
            try:
                doc = json.loads(secrets[key])
            except json.JSONDecodeError:
                raise InvalidArgument(f"secret key {key!r} is not valid JSON") from None
            if not isinstance(doc, dict):
                raise InvalidArgument(f"secret key {key!r} is not a JSON object")
            section = doc.get("auths", {}) if key == ".dockerconfigjson" else doc
            if isinstance(section, dict):
                auths.update(section)
    found = match_auths(auths, registry, repository)
    if found is not None:
        return found
    if (secrets.get("username") or secrets.get("password")) and registry == image_registry:
        return Credentials(secrets.get("username", ""), secrets.get("password", ""))
    return None


# Where kubelet looks for the node's registry credentials, in its order.
NODE_CONFIG_PATHS = (
    "/var/lib/kubelet/config.json",
    "~/.docker/config.json",
    "/.docker/config.json",
    "/var/lib/kubelet/.dockercfg",
    "~/.dockercfg",
)


class NodeCredentials:
    """The node's docker config files (`--docker-config`), re-read when they change.

    Used when a volume's NodePublish secret has nothing for a host. A file
    that cannot be parsed is logged (by path, never content) and skipped.
    """

    def __init__(self, paths: Sequence[str] | None = None) -> None:
        self.paths = [Path(os.path.expanduser(p)) for p in (paths or NODE_CONFIG_PATHS)]
        self._cache: dict[Path, tuple[tuple[int, int], dict[str, object]]] = {}

    def _auths(self, path: Path) -> dict[str, object]:
        try:
            st = path.stat()
        except OSError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            doc = json.loads(path.read_text())
            section = doc.get("auths", {}) if path.name.endswith(".json") else doc
            auths = section if isinstance(section, dict) else {}
        except (OSError, ValueError, AttributeError):
            log.warning("ignoring unreadable docker config %s", path)
            auths = {}
        self._cache[path] = (stamp, auths)
        return auths

    def lookup(self, registry: str, repository: str) -> Credentials | None:
        for path in self.paths:
            try:
                found = match_auths(self._auths(path), registry, repository)
            except InvalidArgument as exc:
                log.warning("docker config %s: %s", path, exc)
                continue
            if found is not None:
                return found
        return None


CredentialLookup = Callable[[str, str], "Credentials | None"]


def lookup_for(
    secrets: Mapping[str, str], node: NodeCredentials | None, image_registry: str
) -> CredentialLookup:
    """(host, repository) -> credentials: the volume's secret first, then the node's.

    `image_registry` is the host the volume's image names: the only one bare
    `username`/`password` secret keys are sent to.
    """

    def lookup(registry: str, repository: str) -> Credentials | None:
        found = credentials_for(secrets, registry, repository, image_registry=image_registry)
        if found is None and node is not None:
            found = node.lookup(registry, repository)
        return found

    return lookup
