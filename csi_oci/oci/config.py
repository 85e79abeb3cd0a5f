"""Registry configuration: mirrors, TLS and transfer settings per registry host.

The file (`--registry-config`, TOML) is re-read when it changes (its mtime is
checked before each pull) or on SIGHUP. Example:

    # transfer settings (all optional)
    first_byte_timeout = 120   # seconds to wait for response headers (spooling proxies)
    max_attempts = 6           # tries per endpoint for a request or a resumed blob
    blob_parallelism = 4       # ranged requests in flight for one large blob

    [hosts."registry.example.com"]
    ca = "/etc/csi-oci/certs/example-ca.pem"        # trust this CA (PEM bundle)
    client_cert = "/etc/csi-oci/certs/client.pem"   # mutual TLS
    client_key = "/etc/csi-oci/certs/client-key.pem"

      [[hosts."registry.example.com".mirrors]]
      url = "http://127.0.0.1:65001"                # Dragonfly dfdaemon on the node
      headers = { "X-Dragonfly-Registry" = "https://registry.example.com" }

      [[hosts."registry.example.com".mirrors]]
      url = "https://harbor.internal"               # Harbor proxy-cache project
      repository_prefix = "example-proxy"
      ca = "/etc/csi-oci/certs/harbor-ca.pem"

    [hosts."10.0.0.5:5000"]
    insecure = true                                 # plain HTTP, by explicit opt-in

Mirrors are tried in order, then the registry itself. Every byte from any of
them is checked against the digest that was resolved, so a mirror is only
ever trusted to *serve* content; tags are resolved at the registry itself
unless a mirror says `resolve_tags = true`. Loopback registries (localhost,
127.0.0.0/8, ::1) speak plain HTTP unless their host entry sets
`insecure = false` or names a `ca`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from csi_oci.errors import InvalidArgument
from csi_oci.oci.egress import EgressPolicy, parse_networks
from csi_oci.spec.reference import is_loopback_host

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """One place to fetch from: a mirror, or the registry itself."""

    base_url: str  # scheme://host[:port]
    host: str
    repository_prefix: str = ""
    verify: bool | str = True  # False (skipVerify) or a CA bundle path
    client_cert: tuple[str, str] | None = None
    headers: tuple[tuple[str, str], ...] = ()
    mirror: bool = False
    resolve_tags: bool = True
    # Token services on other hosts that may receive this endpoint's credentials.
    realm_hosts: tuple[str, ...] = ()

    def repository(self, repository: str) -> str:
        return f"{self.repository_prefix}/{repository}" if self.repository_prefix else repository

    def describe(self) -> str:
        return f"mirror {self.base_url}" if self.mirror else f"registry {self.host}"


@dataclass(frozen=True)
class HostSettings:
    insecure: bool | None = None
    skip_verify: bool = False
    ca: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    mirrors: tuple[dict[str, Any], ...] = ()
    realm_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class RegistryConfig:
    hosts: dict[str, HostSettings] = field(default_factory=dict)
    first_byte_timeout: float = 120.0
    max_attempts: int = 6
    blob_parallelism: int = 1
    egress: EgressPolicy = field(default_factory=EgressPolicy)

    def endpoints(
        self, registry_host: str, api_host: str, *, use_mirrors: bool = True
    ) -> list[Endpoint]:
        """Mirrors first (in order), then the registry itself."""
        settings = self.hosts.get(registry_host) or self.hosts.get(api_host) or HostSettings()
        out = []
        if use_mirrors:
            for index, mirror in enumerate(settings.mirrors):
                out.append(_mirror_endpoint(registry_host, index, mirror))
        registry = _endpoint(api_host, settings, mirror=False)
        realms = settings.realm_hosts or KNOWN_REALM_HOSTS.get(registry_host, ())
        out.append(replace(registry, realm_hosts=tuple(realms)))
        return out


def _tls(
    settings: HostSettings | dict[str, Any], where: str = "registry config"
) -> tuple[bool | str, tuple[str, str] | None]:
    get = settings.get if isinstance(settings, dict) else lambda k, d=None: getattr(settings, k, d)
    verify: bool | str = True
    if get("skip_verify", False):
        verify = False
    elif get("ca"):
        verify = str(get("ca"))
    cert = None
    if get("client_cert") or get("client_key"):
        if not (get("client_cert") and get("client_key")):
            raise InvalidArgument(f"{where}: client_cert and client_key must be given together")
        cert = (str(get("client_cert")), str(get("client_key")))
    return verify, cert


def _endpoint(host: str, settings: HostSettings, *, mirror: bool) -> Endpoint:
    if settings.insecure is not None:
        plain = settings.insecure
    else:
        plain = is_loopback_host(host) and settings.ca is None
    verify, cert = _tls(settings)
    return Endpoint(
        base_url=f"{'http' if plain else 'https'}://{host}",
        host=host,
        verify=verify,
        client_cert=cert,
        mirror=mirror,
    )


def _mirror_endpoint(registry: str, index: int, raw: dict[str, Any]) -> Endpoint:
    where = f"mirror {index + 1} of {registry}"
    url = str(raw.get("url", "")).rstrip("/")
    if "://" not in url:
        host = url
        plain = raw.get("insecure")
        if plain is None:
            plain = is_loopback_host(host) and not raw.get("ca")
        url = f"{'http' if plain else 'https'}://{host}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidArgument(f"{where}: url {raw.get('url')!r} is not http(s)://host[:port]")
    prefix = str(raw.get("repository_prefix", "")).strip("/")
    if parts.path.strip("/"):
        prefix = "/".join(
            p for p in (parts.path.strip("/").removeprefix("v2").strip("/"), prefix) if p
        )
    verify, cert = _tls(raw, where)
    headers = raw.get("headers") or {}
    if not isinstance(headers, dict):
        raise InvalidArgument(f"{where}: headers must be a table")
    return Endpoint(
        base_url=f"{parts.scheme}://{parts.netloc}",
        host=parts.netloc,
        repository_prefix=prefix,
        verify=verify,
        client_cert=cert,
        headers=tuple(sorted((str(k), str(v)) for k, v in headers.items())),
        mirror=True,
        resolve_tags=bool(raw.get("resolve_tags", False)),
        realm_hosts=_realm_hosts(raw.get("realm_hosts", []), where),
    )


# Registries whose token service lives on another host, as they ship: the
# credentials for them may go there without configuration. Any other
# realm_hosts entry comes from --registry-config.
KNOWN_REALM_HOSTS: dict[str, tuple[str, ...]] = {
    "docker.io": ("auth.docker.io",),
    "registry-1.docker.io": ("auth.docker.io",),
    "nvcr.io": ("authn.nvidia.com",),
    "registry.gitlab.com": ("gitlab.com",),
}


def _realm_hosts(values: object, where: str) -> tuple[str, ...]:
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise InvalidArgument(f"{where}: realm_hosts must be an array of host names")
    return tuple(v.lower() for v in values)


_HOST_KEYS = {
    "insecure",
    "skip_verify",
    "ca",
    "client_cert",
    "client_key",
    "mirrors",
    "realm_hosts",
}
_MIRROR_KEYS = {
    "url",
    "insecure",
    "skip_verify",
    "ca",
    "client_cert",
    "client_key",
    "headers",
    "repository_prefix",
    "resolve_tags",
    "realm_hosts",
}
_TOP_KEYS = {"hosts", "first_byte_timeout", "max_attempts", "blob_parallelism", "egress"}
_EGRESS_KEYS = {"deny", "allow"}


_TYPES: dict[str, tuple[type, ...]] = {
    "insecure": (bool,),
    "skip_verify": (bool,),
    "resolve_tags": (bool,),
    "ca": (str,),
    "client_cert": (str,),
    "client_key": (str,),
    "url": (str,),
    "repository_prefix": (str,),
    "headers": (dict,),
    "mirrors": (list,),
    "realm_hosts": (list,),
    "hosts": (dict,),
    "egress": (dict,),
    "deny": (list,),
    "allow": (list,),
    "first_byte_timeout": (int, float),
    "max_attempts": (int,),
    "blob_parallelism": (int,),
}


def _typed(table: dict[str, Any], where: str) -> None:
    """Refuse values of the wrong type: `skip_verify = "false"` must not mean true."""
    for key, value in table.items():
        want = _TYPES.get(key)
        if want is None:
            continue
        if (isinstance(value, bool) and bool not in want) or not isinstance(value, want):
            names = " or ".join(
                "boolean"
                if t is bool
                else "number"
                if t in (int, float)
                else {"str": "string", "dict": "table", "list": "array"}[t.__name__]
                for t in want
            )
            raise InvalidArgument(f"{where}: {key} must be a {names}, not {value!r}")


def parse_config(text: str, source: str = "registry config") -> RegistryConfig:
    """Parse and validate; unknown keys and mistyped values are errors."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{source}: not valid TOML: {exc}") from None
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise InvalidArgument(f"{source}: unknown keys {sorted(unknown)}")
    _typed(doc, source)
    hosts: dict[str, HostSettings] = {}
    for host, raw in (doc.get("hosts") or {}).items():
        if not isinstance(raw, dict):
            raise InvalidArgument(f"{source}: hosts.{host} must be a table")
        bad = set(raw) - _HOST_KEYS
        if bad:
            raise InvalidArgument(f"{source}: hosts.{host}: unknown keys {sorted(bad)}")
        _typed(raw, f"{source}: hosts.{host}")
        mirrors: list[dict[str, Any]] = []
        for item in raw.get("mirrors") or []:
            entry = {"url": item} if isinstance(item, str) else item
            if not isinstance(entry, dict) or set(entry) - _MIRROR_KEYS:
                raise InvalidArgument(f"{source}: hosts.{host}: bad mirror entry {item!r}")
            _typed(entry, f"{source}: hosts.{host}: mirror {len(mirrors) + 1}")
            mirrors.append(entry)
        settings = HostSettings(
            realm_hosts=_realm_hosts(raw.get("realm_hosts", []), f"{source}: hosts.{host}"),
            insecure=raw.get("insecure"),
            skip_verify=bool(raw.get("skip_verify", False)),
            ca=raw.get("ca"),
            client_cert=raw.get("client_cert"),
            client_key=raw.get("client_key"),
            mirrors=tuple(mirrors),
        )
        _tls(settings, f"{source}: hosts.{host}")  # validate pairs early
        for index, mirror in enumerate(mirrors):
            _mirror_endpoint(host, index, mirror)
        hosts[host] = settings
    cfg = RegistryConfig(
        egress=_egress(doc.get("egress") or {}, f"{source}: egress"),
        hosts=hosts,
        first_byte_timeout=float(doc.get("first_byte_timeout", 120.0)),
        max_attempts=int(doc.get("max_attempts", 6)),
        blob_parallelism=int(doc.get("blob_parallelism", 1)),
    )
    if cfg.first_byte_timeout <= 0 or cfg.max_attempts < 1 or cfg.blob_parallelism < 1:
        raise InvalidArgument(f"{source}: timeouts, attempts and parallelism must be positive")
    return cfg


def _egress(raw: dict[str, Any], where: str) -> EgressPolicy:
    """`[egress]`: `deny` adds to the default deny list, `allow` makes exceptions."""
    bad = set(raw) - _EGRESS_KEYS
    if bad:
        raise InvalidArgument(f"{where}: unknown keys {sorted(bad)}")
    _typed(raw, where)
    try:
        extra = parse_networks(raw.get("deny", []), f"{where}.deny")
        allow = parse_networks(raw.get("allow", []), f"{where}.allow")
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    default = EgressPolicy()
    return EgressPolicy(deny=default.deny + extra, allow=allow)


class ConfigSource:
    """The current configuration, re-read when the file changes or on reload()."""

    def __init__(self, path: Path | None, *, overrides: dict[str, Any] | None = None) -> None:
        self.path = path
        self._overrides = overrides or {}
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._config = self._with_overrides(RegistryConfig())
        if path is not None:
            self.reload()

    def _with_overrides(self, cfg: RegistryConfig) -> RegistryConfig:
        if not self._overrides:
            return cfg
        from dataclasses import replace

        return replace(cfg, **self._overrides)

    def reload(self) -> None:
        """Read the file now; a bad file keeps the previous configuration."""
        if self.path is None:
            return
        with self._lock:
            try:
                st = os.stat(self.path)
                cfg = parse_config(self.path.read_text(), str(self.path))
            except FileNotFoundError:
                log.warning("registry config %s does not exist; using defaults", self.path)
                self._stamp = None
                self._config = self._with_overrides(RegistryConfig())
                return
            except (OSError, InvalidArgument, ValueError, TypeError, AttributeError) as exc:
                log.error(
                    "registry config %s not loaded, keeping the previous one: %s", self.path, exc
                )
                with contextlib.suppress(OSError):
                    st = os.stat(self.path)
                    self._stamp = (st.st_mtime_ns, st.st_size)  # log once per change
                return
            self._stamp = (st.st_mtime_ns, st.st_size)
            self._config = self._with_overrides(cfg)
            log.info("loaded registry config %s (%d hosts)", self.path, len(cfg.hosts))

    def current(self) -> RegistryConfig:
        if self.path is not None:
            try:
                st = os.stat(self.path)
                stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamp = None
            if stamp != self._stamp:
                self.reload()
        return self._config
