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
from collections.abc import Mapping
from dataclasses import dataclass, field

from csi_oci.errors import InvalidArgument
from csi_oci.reference import DOCKER_HUB, Reference

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


def _match_score(key: str, ref: Reference) -> int:
    """-1 when `key` does not apply to `ref`; else longer (more specific) is higher."""
    host, path = _split_key(key)
    if not _host_matches(host, ref.registry.lower()):
        return -1
    if path and not (ref.repository == path or ref.repository.startswith(path + "/")):
        return -1
    return len(host) + len(path) + (0 if host.startswith("*.") else 1000)


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
    best: tuple[int, str] | None = None
    for key in auths:
        score = _match_score(key, ref)
        if score >= 0 and (best is None or score > best[0]):
            best = (score, key)
    if best is not None:
        return _entry_credentials(auths[best[1]], best[1])
    if secrets.get("username") or secrets.get("password"):
        return Credentials(secrets.get("username", ""), secrets.get("password", ""))
    return None
