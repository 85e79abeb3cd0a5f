"""Registry client: manifests and blobs over the OCI distribution API,
from a registry and its mirrors.

oras-py does the protocol work it does well: the session, the Docker token
flow (challenge parsing, scoped token requests with basic credentials) and
basic auth. Where it falls short we go around it, on purpose:

* `Registry.do_request` is wrapped in a retry decorator that sleeps 3 to 83 s
  between attempts on *any* exception, authentication failures included, so
  a wrong password or a dead registry would take minutes to report and blow
  kubelet's 2-minute call budget. We call the undecorated function
  (`__wrapped__`); retries, resume and backoff live in `transfer.py`.
* oras-py passes no timeout to requests (a stalled registry hangs forever);
  our session subclass supplies one, and carries each endpoint's TLS
  settings (CA bundle, client certificate) and headers.
* oras-py picks its auth backend up front; we ping `/v2/` first and choose
  token or basic auth from each endpoint's challenge.
* oras-py's token cache has no expiry and, on a 401 with a token in hand,
  retries with the same token; tokens here remember `expires_in`, are shared
  across pulls until they expire, and a 401 mid-pull fetches a fresh one.
* oras-py's `download_blob` neither verifies digests nor streams in large
  reads; blobs are returned here as resumable streams and verified by
  `streams.VerifyingReader`.

Mirrors only ever serve content that is checked against a digest: tags are
resolved at the registry itself unless a mirror is trusted to resolve them.
Authorization never leaks across hosts: requests drops the header when a
redirect (e.g. to a presigned blob-storage URL) changes host.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urljoin, urlsplit

import oras.auth
import oras.provider
import requests

from csi_oci import __version__
from csi_oci.errors import AuthError, CsiOciError, IntegrityError, NotFound, RegistryError
from csi_oci.oci.bodies import (
    ACCEPT_ENCODING,
    MAX_ERROR_BODY_BYTES,
    MAX_TAG_LIST_BYTES,
    MAX_TOKEN_BYTES,
    read_body,
)
from csi_oci.oci.config import Endpoint, RegistryConfig
from csi_oci.oci.egress import EgressPolicy, EgressRefused, GuardedAdapter, check_redirect
from csi_oci.oci.manifest import (
    ACCEPTED_MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    Descriptor,
    detect_media_type,
    parse_index,
    parse_json,
)
from csi_oci.oci.transfer import (
    ParallelRangeStream,
    RangeIgnored,
    ResumableStream,
    RetryPolicy,
    TransientError,
    Unreachable,
    parse_retry_after,
)
from csi_oci.spec.credentials import Credentials
from csi_oci.spec.reference import Reference
from csi_oci.stream.verify import CHUNK, VerifyingReader

log = logging.getLogger(__name__)
logging.getLogger("oras").setLevel(logging.CRITICAL)

CONNECT_TIMEOUT = 10.0
USER_AGENT = f"csi-oci/{__version__}"
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
PARALLEL_MIN_BYTES = 64 << 20  # below this one stream is as fast
RANGE_CHUNK = 16 << 20

CredentialLookup = Callable[[str, str], "Credentials | None"]


class RangeNotSatisfiable(RegistryError):
    """HTTP 416: asked for bytes past the end of the blob."""


class UnexpectedStatus(RegistryError):
    """An HTTP status the call has no meaning for; `status` says which (the referrers
    API's 400 and 405 mean a registry without it)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Session(requests.Session):
    """Default timeout (oras-py sets none), the endpoint's TLS settings and headers."""

    def __init__(
        self, timeout: tuple[float, float], endpoint: Endpoint, egress: EgressPolicy
    ) -> None:
        super().__init__()
        self._timeout = timeout
        self.headers["User-Agent"] = USER_AGENT
        self.headers["Accept-Encoding"] = ACCEPT_ENCODING  # bodies are read bounded, as sent
        self.headers.update(dict(endpoint.headers))
        self.verify = endpoint.verify
        self.cert = endpoint.client_cert
        adapter = GuardedAdapter(egress, pool_connections=4, pool_maxsize=16)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        """Every redirect is checked before it is followed (csi_oci.egress)."""
        target = super().get_redirect_target(resp)
        if target is not None:
            check_redirect(resp.url, urljoin(resp.url, target))
        return target

    # ignore: typeshed spells out every keyword of Session.request; this only
    # fills two of them and passes the rest through.
    def request(self, method: str | bytes, url: str | bytes, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout
        # oras-py passes verify=<its own setting> on every call: ours wins.
        kwargs["verify"] = self.verify
        return super().request(method, url, **kwargs)


class _ExpiringTokenAuth(oras.auth.TokenAuth):
    """oras-py's token flow, with tokens that expire and are shared across pulls."""

    _shared: ClassVar[dict[tuple[str, ...], tuple[str, float]]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    token: str | None  # set by oras-py's TokenAuth

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__()
        self.expiry = 0.0
        self.endpoint = endpoint

    def get_auth_header(self) -> dict[str, str]:
        if self.token and time.monotonic() >= self.expiry:
            self.token = None
        header: dict[str, str] = super().get_auth_header()
        return header

    def forget(self) -> None:
        """Drop the current token everywhere (the registry refused it)."""
        with self._shared_lock:
            for key, (token, _) in list(self._shared.items()):
                if token == self.token:
                    del self._shared[key]
        self.token = None

    def _key(self, h: Any) -> tuple[str, ...]:
        who = hashlib.sha256(str(getattr(self, "_basic_auth", "") or "").encode()).hexdigest()
        return (str(h.realm), str(h.service), str(h.scope), who)

    def request_token(self, h: Any) -> str | None:
        key = self._key(h)
        now = time.monotonic()
        with self._shared_lock:
            cached = self._shared.get(key)
        if cached is not None and cached[1] > now:
            self.expiry = cached[1]
            return cached[0]
        params = {k: v for k, v in (("service", h.service), ("scope", h.scope)) if v}
        headers = {"Accept": "application/json"}
        realm = self._checked_realm(str(h.realm or ""))
        basic = getattr(self, "_basic_auth", None)
        if basic:
            headers["Authorization"] = f"Basic {basic}"
        try:
            resp = self.session.get(realm, params=params, headers=headers, stream=True)
        except requests.RequestException:
            return None
        try:
            if resp.status_code != 200:
                return None
            body = read_body(resp, MAX_TOKEN_BYTES, f"the token response of {_host_of(realm)}")
        except requests.RequestException:
            return None
        finally:
            resp.close()
        try:
            info = parse_json(body, "token response")
        except RegistryError:
            return None
        if not isinstance(info, dict):
            return None
        token = info.get("token") or info.get("access_token")
        if not token:
            return None
        lifetime = _token_lifetime(info.get("expires_in"))
        self.expiry = now + max(1.0, lifetime * 0.9)
        with self._shared_lock:
            self._shared[key] = (token, self.expiry)
        return str(token)

    def _checked_realm(self, realm: str) -> str:
        """The realm URL, if it may be asked for a token with our credentials.

        The registry names its token service, and it may be the attacker's:
        the realm must be http(s), https when the registry is, and it gets
        credentials only on the registry's own host or a host configured
        for it (`realm_hosts`; Docker Hub's auth.docker.io and a few others
        are known). Connections to it pass the egress policy like any other.
        """
        url = realm if "://" in realm else f"{self.prefix}://{realm}"
        name = self.endpoint.describe()
        try:
            parts = urlsplit(url)
            hostname = parts.hostname
        except ValueError:  # e.g. "http://[x/token" (tests/fuzz/regressions/registry)
            hostname = None
        if hostname is None or parts.scheme not in ("http", "https"):
            raise EgressRefused(f"{name} names token service {realm[:100]!r}: not an http(s) URL")
        if self.endpoint.base_url.startswith("https://") and parts.scheme != "https":
            raise EgressRefused(
                f"{name} names a plain-http token service ({parts.netloc}); refusing to send "
                "anything there from an https registry"
            )
        own = urlsplit(self.endpoint.base_url).hostname
        allowed = hostname == own or hostname in self.endpoint.realm_hosts
        if getattr(self, "_basic_auth", None) and not allowed:
            raise AuthError(
                f"{name} names its token service on another host, {hostname}; csi-oci "
                f"sends credentials only to the registry's own host or to a token host listed "
                f'for it (realm_hosts = ["{hostname}"] under [hosts."{self.endpoint.host}"] '
                "in --registry-config)"
            )
        return url

    def request_anonymous_token(self, h: Any, headers: Any = None) -> str | None:
        return self.request_token(h)


@dataclass(frozen=True)
class FetchedManifest:
    data: bytes
    media_type: str
    digest: str
    source: str = ""
    from_mirror: bool = False


def _error_detail(resp: requests.Response) -> str:
    """The registry's own error code/message (distribution-spec error body).

    Read bounded (csi_oci.httpbody) and cut short: it ends up in pod events
    and logs, and the registry that wrote it may be the attacker's.
    """
    try:
        body = read_body(resp, MAX_ERROR_BODY_BYTES, "error body")
        errors = parse_json(body, "error body").get("errors") or []
        parts = [
            f"{_printable(e.get('code', ''))}: {_printable(e.get('message', ''))}".strip(": ")
            for e in errors[:5]
        ]
        return "; ".join(p for p in parts if p)[:500]
    except (ValueError, AttributeError, TypeError, CsiOciError, requests.RequestException):
        return ""  # an error body we cannot read says nothing more


def _token_lifetime(value: object) -> float:
    """`expires_in` in seconds: a sane number, else the Docker token spec's 60."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if 0 < value < 10**7:  # NaN, negatives, 1e400 and the like are not lifetimes
            return float(value)
    return 60.0


def _printable(value: object) -> str:
    """At most 200 printable characters of a server's string (no newlines into logs)."""
    return "".join(c if c.isprintable() else " " for c in str(value)[:200])


class _Connection:
    """One endpoint (a mirror or the registry) for one repository."""

    def __init__(
        self,
        ref: Reference,
        endpoint: Endpoint,
        credentials: Credentials | None,
        timeout: tuple[float, float],
        egress: EgressPolicy,
    ) -> None:
        self.ref = ref
        self.endpoint = endpoint
        self.credentials = credentials
        self._egress = egress
        self.base = f"{endpoint.base_url}/v2/{endpoint.repository(ref.repository)}"
        self._timeout = timeout
        self._oras: oras.provider.Registry | None = None
        self._lock = threading.Lock()
        self.dead = False

    @property
    def name(self) -> str:
        return self.endpoint.describe()

    def _client(self) -> oras.provider.Registry:
        if self.dead and self.endpoint.mirror:
            raise Unreachable(f"{self.name} did not answer earlier in this pull")
        with self._lock:
            if self._oras is None:
                self._oras = self._connect()
            return self._oras

    def _connect(self) -> oras.provider.Registry:
        session = _Session(self._timeout, self.endpoint, self._egress)
        ping = self._send(session.get, f"{self.endpoint.base_url}/v2/")
        ping.close()
        challenge = ping.headers.get("WWW-Authenticate", "")
        backend = "basic" if challenge.lower().startswith("basic") else "token"
        if ping.status_code in TRANSIENT_STATUS:
            raise TransientError(f"{self.name} answered HTTP {ping.status_code}")
        if ping.status_code == 400 and self.endpoint.base_url.startswith("http://"):
            raise RegistryError(_https_hint(self.name, self.endpoint.host))
        if ping.status_code == 401 and not challenge:
            raise AuthError(f"{self.name} demands authentication but sent no challenge")
        if ping.status_code == 401 and backend == "basic" and self.credentials is None:
            # Basic auth at /v2/ guards everything: nothing is readable anonymously.
            raise self._auth_error(None)
        reg = oras.provider.Registry(
            hostname=self.endpoint.host,
            insecure=self.endpoint.base_url.startswith("http://"),
            auth_backend=backend,
        )
        session.cookies.set_policy(reg.session.cookies._policy)
        if backend == "token":
            auth = _ExpiringTokenAuth(self.endpoint)
            auth.prefix = reg.auth.prefix
            reg.auth = auth
        reg.session = session
        reg.auth.session = session
        reg.auth._tls_verify = self.endpoint.verify
        if self.credentials is not None:
            reg.auth.set_basic_auth(self.credentials.username, self.credentials.password)
            if backend == "basic":
                reg.headers.update(reg.auth.get_auth_header())
        return reg

    def _send(self, fn: Any, *args: Any, **kwargs: Any) -> requests.Response:
        try:
            resp: requests.Response = fn(*args, **kwargs)
            return resp
        except requests.exceptions.SSLError as exc:
            raise RegistryError(
                f"TLS error talking to {self.name}: {_short_tls(exc)}; if it uses a private CA "
                "or a client certificate, configure them in --registry-config"
            ) from None
        except (requests.exceptions.Timeout, TimeoutError):
            raise TransientError(f"{self.name} timed out") from None
        except (requests.exceptions.ConnectionError, ConnectionError) as exc:
            reason = _short(exc)
            if reason in ("connection refused", "host name does not resolve"):
                self.dead = True  # skip it for the rest of this pull
                raise Unreachable(f"cannot connect to {self.name}: {reason}") from None
            raise TransientError(f"cannot connect to {self.name}: {reason}") from None

    def get(
        self, path: str, headers: dict[str, str], *, what: str, method: str = "GET"
    ) -> requests.Response:
        """GET (or HEAD) base+path with auth; the response's status is checked."""
        reg = self._client()
        undecorated = oras.provider.Registry.do_request.__wrapped__
        url = f"{self.base}{path}"
        for attempt in (1, 2):
            try:
                resp = self._send(
                    undecorated, reg, url, method, headers={**reg.headers, **headers}, stream=True
                )
            except ValueError:
                # oras-py's way of saying the token endpoint refused us.
                raise self._auth_error(None) from None
            auth = reg.auth
            if resp.status_code == 401 and attempt == 1 and isinstance(auth, _ExpiringTokenAuth):
                if auth.token:
                    resp.close()
                    auth.forget()  # expired or revoked mid-pull: fetch a fresh one
                    continue
            break
        self._check(resp, what)
        return resp

    def _auth_error(self, resp: requests.Response | None) -> AuthError:
        status = f"HTTP {resp.status_code}" if resp is not None else "HTTP 401"
        detail = _error_detail(resp) if resp is not None else ""
        why = f"{status}, {detail}" if detail else status
        host = self.endpoint.host
        if self.credentials is None:
            return AuthError(
                f"{self.name} refused access to image {self.ref} anonymously ({why}): give "
                f"credentials for {host} in a nodePublishSecretRef Secret (type "
                "kubernetes.io/dockerconfigjson) or in the node's --docker-config"
            )
        return AuthError(
            f"{self.name} refused access to image {self.ref} with the given credentials ({why}): "
            f"check the user, password or token for {host} in the volume's nodePublishSecretRef "
            f"or the node's --docker-config, and that it may pull {self.ref.repository}"
        )

    def _check(self, resp: requests.Response, what: str) -> None:
        code = resp.status_code
        if code in (200, 206):
            return
        detail = _error_detail(resp)
        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        resp.close()
        suffix = f" ({detail})" if detail else ""
        if code in (401, 403):
            raise self._auth_error(resp)
        if code == 404:
            raise NotFound(f"{what} not found in {self.ref.name} at {self.name}{suffix}")
        if code in TRANSIENT_STATUS:
            raise TransientError(
                f"{self.name} answered HTTP {code} for {what}{suffix}", retry_after
            )
        if code == 400 and self.endpoint.base_url.startswith("http://"):
            raise UnexpectedStatus(_https_hint(self.name, self.endpoint.host), code)
        if code == 416:
            raise RangeNotSatisfiable(f"{self.name} answered HTTP 416 for {what}")
        raise UnexpectedStatus(f"{self.name} answered HTTP {code} for {what}{suffix}", code)


def _short(exc: BaseException) -> str:
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused"
    if "Name or service not known" in text or "Failed to resolve" in text:
        return "host name does not resolve"
    return text[:200]


def _https_hint(name: str, host: str) -> str:
    return (
        f"{name} answered plain HTTP with 400: it most likely speaks HTTPS. In "
        f'--registry-config set [hosts."{host}"] insecure = false (and ca = "<CA bundle>" '
        "for a private CA)"
    )


def _short_tls(exc: BaseException) -> str:
    """The SSL reason (e.g. CERTIFICATE_VERIFY_FAILED: unable to get local issuer)."""
    import re

    text = str(exc)
    match = re.search(r"\[SSL: ([A-Z0-9_]+)\] ([^(]*)", text)
    if match:
        return f"{match.group(1)}: {match.group(2).strip()}"
    for marker in ("certificate required", "SSLV3_ALERT_BAD_CERTIFICATE", "EOF occurred"):
        if marker in text:
            return marker + " (the server wants a client certificate it accepts)"
    return text[:200]


class RegistryClient:
    """One repository, from its mirrors (in order) and then its registry."""

    def __init__(
        self,
        ref: Reference,
        credentials: Credentials | CredentialLookup | None = None,
        *,
        config: RegistryConfig | None = None,
        use_mirrors: bool = True,
    ) -> None:
        self.ref = ref
        self.config = config or RegistryConfig()
        self.policy = RetryPolicy(max_attempts=self.config.max_attempts)
        timeout = (CONNECT_TIMEOUT, self.config.first_byte_timeout)
        lookup = credentials if callable(credentials) else None
        self.connections = []
        for endpoint in self.config.endpoints(ref.registry, ref.api_host, use_mirrors=use_mirrors):
            if lookup is not None:
                host = ref.registry if not endpoint.mirror else endpoint.host
                creds = lookup(host, endpoint.repository(ref.repository))
            else:
                creds = (
                    credentials
                    if isinstance(credentials, Credentials) and not endpoint.mirror
                    else None
                )
            self.connections.append(_Connection(ref, endpoint, creds, timeout, self.config.egress))
        self.served_by: set[str] = set()
        self.bytes_on_wire = 0
        self._wire_lock = threading.Lock()

    @property
    def uses_mirrors(self) -> bool:
        return any(c.endpoint.mirror for c in self.connections)

    def without_mirrors(self) -> RegistryClient:
        """The same repository from the registry alone (a mirror served bad bytes)."""
        clone = RegistryClient.__new__(RegistryClient)
        clone.__dict__.update(self.__dict__)
        clone.connections = [c for c in self.connections if not c.endpoint.mirror]
        clone.served_by = set()
        return clone

    # -- manifests --------------------------------------------------------------------

    def get_manifest(self, key: str) -> FetchedManifest:
        """Fetch a manifest by tag or digest; its digest is computed from the bytes.

        A digest is checked wherever the bytes come from; a tag is resolved
        only by endpoints trusted to resolve it (the registry, by default).
        """
        by_digest = key.startswith(("sha256:", "sha512:"))
        candidates = [c for c in self.connections if by_digest or c.endpoint.resolve_tags]
        last: Exception | None = None
        for conn in candidates:
            try:
                return self._manifest_from(conn, key, by_digest)
            except (TransientError, NotFound, AuthError, IntegrityError, RegistryError) as exc:
                if conn.endpoint.mirror:
                    log.info(
                        "manifest %s from %s failed (%s); trying the next", key, conn.name, exc
                    )
                last = exc
        assert last is not None
        raise last

    def _manifest_from(self, conn: _Connection, key: str, by_digest: bool) -> FetchedManifest:
        what = f"manifest {key!r}" if by_digest else f"tag {key!r}"
        attempt = 0
        started = time.monotonic()
        while True:
            attempt += 1
            try:
                resp = conn.get(
                    f"/manifests/{key}", {"Accept": ", ".join(ACCEPTED_MANIFEST_TYPES)}, what=what
                )
                try:
                    data = read_body(resp, MAX_MANIFEST_BYTES, f"{what} from {conn.name}")
                except requests.exceptions.RequestException as exc:
                    raise TransientError(
                        f"{what}: the connection to {conn.name} broke while reading it: "
                        f"{_short(exc)}"
                    ) from None
                finally:
                    resp.close()
                break
            except TransientError as exc:
                if attempt >= self.policy.max_attempts:
                    # Say what was tried: a pod event that only says "timed out"
                    # leaves the user guessing whether it was retried at all.
                    raise type(exc)(
                        f"image {self.ref}: {exc} ({attempt} attempts over "
                        f"{time.monotonic() - started:.0f}s); check that {conn.endpoint.host} "
                        "is the right registry and reachable from the node (DNS, firewall, "
                        "proxy), or list a mirror for it in --registry-config",
                        exc.retry_after,
                    ) from None
                if isinstance(exc, Unreachable) and conn.endpoint.mirror:
                    raise  # a mirror nobody answers at: the next endpoint, now
                time.sleep(self.policy.delay(attempt, exc.retry_after))
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if key.startswith("sha256:") and key != digest:
            raise IntegrityError(f"manifest {key} from {conn.name} hashes to {digest}")
        if key.startswith("sha512:"):
            if "sha512:" + hashlib.sha512(data).hexdigest() != key:
                raise IntegrityError(f"manifest {key} from {conn.name} does not match its digest")
            digest = key
        header_digest = resp.headers.get("Docker-Content-Digest")
        if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
            raise IntegrityError(
                f"{what}: {conn.name} says digest {header_digest} but the bytes hash to {digest}"
            )
        media_type = detect_media_type(data, resp.headers.get("Content-Type"))
        self.served_by.add(conn.name)
        return FetchedManifest(
            data=data,
            media_type=media_type,
            digest=digest,
            source=conn.name,
            from_mirror=conn.endpoint.mirror,
        )

    def check_access(self, key: str) -> None:
        """Prove these credentials may read manifest `key` at the registry itself (a HEAD).

        pullPolicy Always promises that the pod's own access is checked, as
        kubelet does for containers; bytes from a mirror (which pulls with
        its own credentials) or from the node's cache prove nothing about it.
        """
        conn = next(c for c in self.connections if not c.endpoint.mirror)
        resp = conn.get(
            f"/manifests/{key}",
            {"Accept": ", ".join(ACCEPTED_MANIFEST_TYPES)},
            what=f"manifest {key!r}",
            method="HEAD",
        )
        resp.close()

    def get_referrers(self, digest: str) -> tuple[list[Descriptor], list[str]] | None:
        """What each endpoint's OCI 1.1 referrers API lists for `digest`, merged.

        None when no endpoint has the API (404/400/405 everywhere): the caller
        then reads the fallback tag. The list is not pinned by any digest, so
        a mirror may drop or add entries; asking every endpoint and merging
        means a mirror cannot hide a signature the registry has, and whatever
        an entry points at is fetched by digest and verified before use. The
        second value names endpoints that failed (for messages).
        """
        merged: dict[str, Descriptor] = {}
        failed: list[str] = []
        supported = False
        for conn in self.connections:
            try:
                resp = conn.get(
                    f"/referrers/{digest}",
                    {"Accept": "application/vnd.oci.image.index.v1+json"},
                    what=f"referrers of {digest}",
                )
            except NotFound:
                continue
            except UnexpectedStatus as exc:
                if exc.status in (400, 405):
                    continue  # no referrers API here
                failed.append(f"{conn.name}: {exc}")
                continue
            except CsiOciError as exc:
                failed.append(f"{conn.name}: {exc}")
                continue
            try:
                body = read_body(resp, MAX_MANIFEST_BYTES, f"referrers of {digest}")
                # Some registries (olareg 0.1) answer "manifests": null for none.
                entries = [] if _null_manifests(body) else parse_index(body)
            except (CsiOciError, requests.RequestException) as exc:
                failed.append(f"{conn.name}: {exc}")
                continue
            finally:
                resp.close()
            supported = True
            for entry in entries:
                merged.setdefault(entry.digest, entry)
        if not supported and not failed:
            return None
        return list(merged.values()), failed

    def list_tags(self, limit: int = 100) -> list[str] | None:
        """Up to `limit` tags of the repository, from the registry itself (not mirrors).

        For error messages only: None when the registry does not let us list
        (tags/list needs its own permission on some registries). A missing
        repository raises NotFound.
        """
        for conn in self.connections:
            if conn.endpoint.mirror:
                continue
            try:
                resp = conn.get(f"/tags/list?n={limit}", {}, what="tag list")
            except NotFound:
                raise
            except CsiOciError:
                return None
            try:
                body = read_body(resp, MAX_TAG_LIST_BYTES, "tag list")
                tags = parse_json(body, "tag list").get("tags")
            except (ValueError, AttributeError, CsiOciError, requests.RequestException):
                return None
            finally:
                resp.close()
            if not isinstance(tags, list):
                return None
            return [_printable(t)[:128] for t in tags][:limit]
        return None

    # -- blobs ------------------------------------------------------------------------------

    def _opener(self, conn: _Connection, desc: Descriptor, what: str) -> Any:
        def open_range(start: int, end: int | None) -> requests.Response:
            headers = {}
            if start > 0 or (end is not None and end < desc.size):
                last = (end if end is not None else desc.size) - 1
                headers["Range"] = f"bytes={start}-{last}"
            try:
                resp = conn.get(f"/blobs/{desc.digest}", headers, what=what)
            except RangeNotSatisfiable:
                raise IntegrityError(
                    f"{what}: the blob ends before byte {start}, but its descriptor declares "
                    f"{desc.size} bytes (truncated or wrong blob)"
                ) from None
            resp.raw.decode_content = False
            self.served_by.add(conn.name)
            return resp

        return open_range

    def _count_wire(self, n: int) -> None:
        with self._wire_lock:
            self.bytes_on_wire += n

    def blob_stream(self, desc: Descriptor, what: str, *, start: int = 0) -> Any:
        """A stream of the blob's bytes (resumable; parallel ranges for big blobs).

        Not verified here: wrap it in a VerifyingReader.
        """
        openers = [(c.name, self._opener(c, desc, what)) for c in self.connections]

        def sequential(begin: int) -> ResumableStream:
            return ResumableStream(
                openers, desc.size, what, self.policy, start=begin, on_wire=self._count_wire
            )

        parallelism = self.config.blob_parallelism
        if parallelism > 1 and desc.size >= PARALLEL_MIN_BYTES and start == 0:

            def ranged(begin: int, end: int) -> ResumableStream:
                return ResumableStream(
                    openers,
                    end,
                    what,
                    self.policy,
                    start=begin,
                    require_range=True,
                    on_wire=self._count_wire,
                )

            return _FallbackParallel(ranged, sequential, desc.size, RANGE_CHUNK, parallelism)
        return sequential(start)

    def fetch_range(self, desc: Descriptor, offset: int, length: int) -> bytes | bytearray:
        """Bytes [offset, offset+length) of a blob (lazy reads; verified by the caller)."""
        if offset < 0 or length < 0 or offset + length > desc.size:
            raise RegistryError(f"range {offset}+{length} is outside blob {desc.digest}")
        openers = [(c.name, self._opener(c, desc, f"blob {desc.digest}")) for c in self.connections]
        stream = ResumableStream(
            openers,
            offset + length,
            f"blob {desc.digest}",
            self.policy,
            start=offset,
            on_wire=self._count_wire,
        )
        try:
            buf = bytearray(length)
            got = stream.readinto(buf) if length else 0
        finally:
            stream.close()
        if got != length:
            raise RegistryError(f"blob {desc.digest}: got {got} of {length} bytes at {offset}")
        return buf  # not bytes(buf): a lazy run is up to 16 MiB, one copy is enough

    def get_blob_bytes(self, desc: Descriptor, what: str, max_bytes: int) -> bytes:
        """A small blob (config) fully in memory, verified."""
        if desc.size > max_bytes:
            raise RegistryError(
                f"{what} declares {desc.size} bytes, more than the {max_bytes} allowed"
            )
        stream = self.blob_stream(desc, what)
        try:
            reader = VerifyingReader(stream, desc.digest, desc.size, what)
            chunks = []
            while chunk := reader.read(CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            stream.close()


class _FallbackParallel:
    """Parallel ranges, falling back to one stream if the server ignores Range."""

    def __init__(
        self,
        ranged: Callable[[int, int], ResumableStream],
        sequential: Callable[[int], ResumableStream],
        size: int,
        chunk: int,
        parallelism: int,
    ) -> None:
        self._parallel: ParallelRangeStream | None = ParallelRangeStream(
            ranged, size, chunk, parallelism
        )
        self._sequential_factory = sequential
        self._fallback: ResumableStream | None = None
        self._pos = 0

    def readinto(self, buf: memoryview | bytearray) -> int:
        n: int = self._from(lambda stream: stream.readinto(buf))
        return n

    def read(self, n: int = -1, /) -> memoryview | bytes:
        """Up to `n` bytes; from the parallel ranges, a view of their buffer (no copy)."""
        data: memoryview | bytes = self._from(lambda stream: stream.read(n))
        return data

    def _from(self, op: Callable[[Any], Any]) -> Any:
        """`op` on the parallel ranges, or on one stream from where they stopped
        once the server turns out to ignore Range."""
        if self._fallback is not None:
            return op(self._fallback)
        assert self._parallel is not None
        try:
            got = op(self._parallel)
        except RangeIgnored:
            log.info("server ignores Range: fetching the rest of the blob as one stream")
            self._parallel.close()
            self._parallel = None
            self._fallback = self._sequential_factory(self._pos)
            return op(self._fallback)
        self._pos += got if isinstance(got, int) else len(got)
        return got

    def close(self) -> None:
        if self._parallel is not None:
            self._parallel.close()
        if self._fallback is not None:
            self._fallback.close()


def _null_manifests(body: bytes) -> bool:
    try:
        doc = parse_json(body, "referrers index")
    except CsiOciError:
        return False
    return isinstance(doc, dict) and doc.get("manifests", []) is None


def _host_of(url: str) -> str:
    return urlsplit(url).netloc or url[:64]
