"""Run a real CNCF distribution registry (``docker-registry serve``) for tests.

Findings for Debian's ``docker-registry`` 2.8.2:

* The config file may be JSON (YAML is a superset of JSON), so no YAML
  package is needed to write it.
* ``auth: htpasswd`` works over plain HTTP: the registry answers ``401`` with
  ``WWW-Authenticate: Basic realm=...`` and accepts Basic credentials without
  TLS (only bcrypt entries are accepted, hence ``htpasswd -B``).
* ``auth: token`` needs ``realm``, ``service``, ``issuer`` and
  ``rootcertbundle``; see ``tokenserver.py`` for what it checks in the JWT.
* ``REGISTRY_*`` environment variables override the config file, so they are
  removed from the child's environment.
* Filesystem storage keeps blob data at
  ``<root>/docker/registry/v2/blobs/<algo>/<first two hex>/<hex>/data`` and
  the registry serves it without re-verifying, so a test can corrupt a blob by
  editing that file.
* TLS is ``http.tls.certificate`` / ``http.tls.key`` (PEM paths); the default
  ``minimumtls`` is tls1.2 and Go negotiates TLS 1.3 with Python's ssl.
  ``http.tls.clientcas`` (a *list* of CA paths) switches Go to
  ``RequireAndVerifyClientCert``: every connection must present a client
  certificate issued by one of those CAs.  TLS 1.3 is negotiated, so the
  client's side of the handshake completes before the server has checked
  anything: Python's ``ssl`` only fails on the first read, with
  ``SSLV3_ALERT_BAD_CERTIFICATE`` when no certificate was sent (Go 1.19 sends
  bad_certificate, not certificate_required) and ``SSLEOFError`` when the
  certificate is from another CA; ``requests`` raises ``SSLError`` for both.
  The log says ``http: TLS handshake error from ...: tls: client didn't
  provide a certificate`` / ``failed to verify client certificate``.
* ``proxy.remoteurl`` makes a pull-through cache (see mirrors.py).  A Go
  process reads extra trusted CAs only from ``SSL_CERT_FILE``/
  ``SSL_CERT_DIR``, hence ``proxy_remote_ca``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
import weakref
from collections import Counter
from pathlib import Path
from typing import IO, Any, Self

import requests
import urllib3

from .tokenserver import TokenServer

TEST_USER = "alice"
TEST_PASSWORD = "wonderland"

INSTALL_HINT = "run hack/install-deps (as root) to install the test dependencies"

MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
ACCEPT_MANIFESTS = ", ".join(MANIFEST_MEDIA_TYPES)


class ToolMissingError(RuntimeError):
    """A command-line tool the test infrastructure needs is not installed."""


class RegistryStartError(RuntimeError):
    """The registry process did not come up."""


def find_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolMissingError(f"{name!r} not found in PATH; {INSTALL_HINT}")
    return path


def missing_tools(*names: str) -> list[str]:
    return [name for name in names if shutil.which(name) is None]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split ``Bearer realm="x",service="y"`` into ``("bearer", {...})``."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


def fetch_bearer_token(
    challenge: dict[str, str],
    credentials: tuple[str, str] | None,
    scope: str | None = None,
) -> requests.Response:
    """Ask the challenge's realm for a token (GET with optional Basic auth)."""
    params: dict[str, str] = {}
    if "service" in challenge:
        params["service"] = challenge["service"]
    if scope or "scope" in challenge:
        params["scope"] = scope or challenge["scope"]
    return requests.get(challenge["realm"], params=params, auth=credentials, timeout=30)


def _stop_process(proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    log.close()


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()
"""Sentinel: "use the registry's own test credentials"."""


class RegistryProcess:
    """What every test registry shares: its process (stopped by a finalizer, also at
    interpreter exit), its temporary directory, and its access log as csi-oci saw it."""

    _finalizer: Any = None
    _proc: subprocess.Popen[bytes] | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    log_path: Path

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def blob_gets(self, repo: str) -> Counter[str]:
        """digest -> GETs of that blob by csi-oci (its User-Agent), from the access log."""
        pattern = re.compile(rf'"GET /v2/{re.escape(repo)}/blobs/(sha256:[0-9a-f]{{64}}) ')
        counts: Counter[str] = Counter()
        for line in self.log_text().splitlines():
            match = pattern.search(line)
            if match and '"csi-oci/' in line:
                counts[match.group(1)] += 1
        return counts

    def stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Registry(RegistryProcess):
    """A ``docker-registry serve`` process on 127.0.0.1 with filesystem storage.

    Starts in the constructor and returns once ``GET /v2/`` answers (200 or
    401).  ``host`` is ``127.0.0.1:PORT``, ``url`` is ``http://host`` (or
    ``https://host`` with ``tls``), ``root`` the storage root.
    ``credentials`` is ``(user, password)`` for an authenticated registry,
    else None.

    TLS: ``tls=(cert_path, key_path)`` serves HTTPS; ``tls_ca`` is the CA
    that issued the certificate (``verify`` for ``request`` and the readiness
    check; without it they do not verify).  ``client_ca`` (a CA certificate
    path) requires client certificates issued by it; ``client_cert=(crt,
    key)`` is what ``request`` (and the readiness check) then presents.
    Without ``client_cert`` the readiness check only waits for the listener.
    ``proxy_remote_ca`` trusts that CA for the ``proxy_remote_url`` upstream
    (``SSL_CERT_FILE`` of the registry process).
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        htpasswd: tuple[str, str] | None = None,
        token_auth: TokenServer | None = None,
        proxy_remote_url: str | None = None,
        proxy_credentials: tuple[str, str] | None = None,
        port: int | None = None,
        startup_timeout: float = 20.0,
        tls: tuple[str | Path, str | Path] | None = None,
        tls_ca: str | Path | None = None,
        client_ca: str | Path | None = None,
        client_cert: tuple[str | Path, str | Path] | None = None,
        proxy_remote_ca: str | Path | None = None,
    ) -> None:
        if htpasswd and token_auth:
            raise ValueError("choose one of htpasswd and token_auth")
        if client_ca is not None and tls is None:
            raise ValueError("client_ca needs tls")
        self.tls = (str(tls[0]), str(tls[1])) if tls else None
        self.tls_ca = str(tls_ca) if tls_ca is not None else None
        self.client_ca = str(client_ca) if client_ca is not None else None
        self.client_cert = (str(client_cert[0]), str(client_cert[1])) if client_cert else None
        self.proxy_remote_ca = str(proxy_remote_ca) if proxy_remote_ca is not None else None
        self.scheme = "https" if tls else "http"
        # what requests' verify= needs for this registry
        self.verify: str | bool = self.tls_ca if self.tls_ca else not tls
        self._binary = find_tool("docker-registry")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="csi-oci-registry-")
            workdir = Path(self._tmp.name)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root = self.workdir / "storage"
        self.root.mkdir(exist_ok=True)
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.htpasswd = htpasswd
        self.token_server = token_auth
        self.proxy_remote_url = proxy_remote_url
        self.credentials: tuple[str, str] | None = None
        if htpasswd:
            self.credentials = htpasswd
        elif token_auth is not None:
            self.credentials = next(iter(token_auth.users.items()))
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

        auth: dict[str, object] = {}
        if htpasswd:
            htpasswd_file = self.workdir / "htpasswd"
            out = subprocess.run(
                [find_tool("htpasswd"), "-Bbn", htpasswd[0], htpasswd[1]],
                check=True,
                capture_output=True,
            ).stdout
            htpasswd_file.write_bytes(out.strip() + b"\n")
            auth = {"htpasswd": {"realm": "csi-oci-test", "path": str(htpasswd_file)}}
        elif token_auth is not None:
            auth = {
                "token": {
                    "realm": token_auth.realm,
                    "service": token_auth.service,
                    "issuer": token_auth.issuer,
                    "rootcertbundle": str(token_auth.cert_path),
                }
            }
        self._auth = auth
        self._proxy: dict[str, str] = {}
        if proxy_remote_url:
            self._proxy = {"remoteurl": proxy_remote_url}
            if proxy_credentials:
                self._proxy["username"], self._proxy["password"] = proxy_credentials

        attempts = 1 if port is not None else 3
        for attempt in range(attempts):
            self.port = port if port is not None else free_port()
            self.host = f"127.0.0.1:{self.port}"
            self.url = f"{self.scheme}://{self.host}"
            try:
                self._start(startup_timeout)
                return
            except RegistryStartError as exc:
                retry = "address already in use" in str(exc) and attempt + 1 < attempts
                if not retry:
                    self.stop()
                    raise

    # -- process -----------------------------------------------------------

    def _config(self) -> dict[str, object]:
        config: dict[str, object] = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text"},
            "storage": {
                "filesystem": {"rootdirectory": str(self.root)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": self.host,
                "secret": secrets.token_hex(16),
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.tls:
            tls: dict[str, object] = {"certificate": self.tls[0], "key": self.tls[1]}
            if self.client_ca:
                tls["clientcas"] = [self.client_ca]
            http = config["http"]
            assert isinstance(http, dict)
            http["tls"] = tls
        if self._auth:
            config["auth"] = self._auth
        if self._proxy:
            config["proxy"] = self._proxy
        return config

    def _start(self, timeout: float) -> None:
        self.config_path.write_text(json.dumps(self._config(), indent=2))
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        if self.proxy_remote_ca:
            env["SSL_CERT_FILE"] = self.proxy_remote_ca
        log = open(self.log_path, "ab")  # closed by _stop_process
        self._log_start = len(self.log_text())
        proc = subprocess.Popen(
            [self._binary, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self._proc = proc
        self._finalizer = weakref.finalize(self, _stop_process, proc, log)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                self._finalizer()
                raise RegistryStartError(
                    f"docker-registry exited with {proc.returncode} on {self.host}:\n"
                    + self.log_tail()
                )
            if self._ready():
                return
            if time.monotonic() > deadline:
                self._finalizer()
                raise RegistryStartError(
                    f"docker-registry did not answer on {self.url}/v2/ within {timeout}s:\n"
                    + self.log_tail()
                )
            time.sleep(0.05)

    def _ready(self) -> bool:
        if self.client_ca and not self.client_cert:
            # No certificate to get past the handshake: wait for the listener.
            if "listening on" not in self.log_text()[self._log_start :]:
                return False
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError:
                return False
            return True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                resp = requests.get(
                    f"{self.url}/v2/", timeout=0.5, verify=self.verify, cert=self.client_cert
                )
        except requests.RequestException:
            return False
        return resp.status_code in (200, 401)

    def blob_bytes_sent(self, repo: str) -> int:
        """Blob bytes this registry sent csi-oci from `repo` (200/206 lines of its
        access log): what a pull or a lazy read really cost on the wire."""
        total = 0
        for line in self.log_text().splitlines():
            if f'"GET /v2/{repo}/blobs/' in line and "csi-oci" in line:
                parts = line.split('"')[2].split()
                if parts and parts[0] in ("200", "206"):
                    total += int(parts[1])
        return total

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __repr__(self) -> str:
        kind = "token" if self.token_server else "htpasswd" if self.htpasswd else "anonymous"
        return f"<Registry {kind} {self.url}>"

    # -- storage layout ----------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Path of a blob's data file in distribution's filesystem layout."""
        algo, _, hexdigest = digest.partition(":")
        if not algo or len(hexdigest) < 2:
            raise ValueError(f"bad digest {digest!r}")
        return self.root / "docker/registry/v2/blobs" / algo / hexdigest[:2] / hexdigest / "data"

    # -- HTTP helpers (auth-aware) -----------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        credentials: tuple[str, str] | None = DEFAULT,
        scope: str | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        """``requests.request`` against ``url + path``, doing the registry auth.

        ``credentials`` defaults to the registry's own (None = anonymous).
        Basic auth is sent up front to an htpasswd registry; a Bearer challenge
        is answered by fetching a token from its realm (``scope`` overrides the
        challenge's scope).  ``verify`` and ``cert`` default to the registry's
        ``verify`` and ``client_cert``.
        """
        creds = self.credentials if credentials is DEFAULT else credentials
        kwargs.setdefault("timeout", 30)
        kwargs.setdefault("verify", self.verify)
        if self.client_cert:
            kwargs.setdefault("cert", self.client_cert)
        hdrs = dict(headers or {})
        url = f"{self.url}{path}"
        basic = creds if self.htpasswd else None
        resp = requests.request(method, url, headers=hdrs, auth=basic, **kwargs)
        if resp.status_code == 401:
            scheme, challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            if scheme == "bearer" and "realm" in challenge:
                token_resp = fetch_bearer_token(challenge, creds, scope)
                if token_resp.status_code == 200:
                    body = token_resp.json()
                    hdrs["Authorization"] = f"Bearer {body.get('token') or body['access_token']}"
                    resp = requests.request(method, url, headers=hdrs, **kwargs)
        return resp

    def get_manifest(
        self, repo: str, reference: str, *, credentials: tuple[str, str] | None = DEFAULT
    ) -> requests.Response:
        return self.request(
            "GET",
            f"/v2/{repo}/manifests/{reference}",
            credentials=credentials,
            headers={"Accept": ACCEPT_MANIFESTS},
        )

    def get_blob(
        self, repo: str, digest: str, *, credentials: tuple[str, str] | None = DEFAULT
    ) -> requests.Response:
        return self.request("GET", f"/v2/{repo}/blobs/{digest}", credentials=credentials)

    def manifest_digest(self, repo: str, reference: str) -> str:
        """The ``Docker-Content-Digest`` the registry reports for a manifest."""
        resp = self.request(
            "HEAD", f"/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT_MANIFESTS}
        )
        resp.raise_for_status()
        return resp.headers["Docker-Content-Digest"]
