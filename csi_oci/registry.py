"""Registry client: manifests and blobs over the OCI distribution API.

oras-py does the protocol work it does well: the session, the Docker token
flow (challenge parsing, scoped token requests with basic credentials) and
basic auth. Where it falls short we go around it, on purpose:

* `Registry.do_request` is wrapped in a retry decorator that sleeps 3 to 83 s
  between attempts on *any* exception, authentication failures included, so
  a wrong password or a dead registry would take minutes to report and blow
  kubelet's 2-minute call budget. We call the undecorated function
  (`__wrapped__`) and keep retry policy in our hands.
* oras-py passes no timeout to requests (a stalled registry hangs forever);
  our session subclass supplies one.
* oras-py picks its auth backend up front; we ping `/v2/` first and choose
  token or basic auth from the registry's challenge.
* oras-py's `download_blob` neither verifies digests nor streams in large
  reads; blobs are returned here as raw streams and verified by
  `streams.VerifyingReader`.

Authorization never leaks across hosts: requests drops the header when a
redirect (e.g. to a presigned blob-storage URL) changes host.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import oras.provider
import requests
from requests.adapters import HTTPAdapter

from csi_oci.credentials import Credentials
from csi_oci.errors import (
    AuthError,
    CsiOciError,
    IntegrityError,
    NotFound,
    RegistryError,
)
from csi_oci.manifest import (
    ACCEPTED_MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    Descriptor,
    detect_media_type,
)
from csi_oci.reference import Reference, is_loopback_host
from csi_oci.streams import CHUNK, VerifyingReader

log = logging.getLogger(__name__)
logging.getLogger("oras").setLevel(logging.CRITICAL)

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
USER_AGENT = "csi-oci/0.1"


class _TimeoutSession(requests.Session):
    """A requests session with a default timeout (oras-py sets none)."""

    def __init__(self, timeout: tuple[float, float]) -> None:
        super().__init__()
        self._timeout = timeout
        self.headers["User-Agent"] = USER_AGENT
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=16)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def request(self, method: str | bytes, url: str | bytes, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs.setdefault("timeout", self._timeout)
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout
        return super().request(method, url, **kwargs)


@dataclass(frozen=True)
class FetchedManifest:
    data: bytes
    media_type: str
    digest: str


def _error_detail(resp: requests.Response) -> str:
    """The registry's own error code/message (distribution-spec error body)."""
    try:
        errors = resp.json().get("errors") or []
        parts = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors]
        return "; ".join(p for p in parts if p)
    except (ValueError, AttributeError):
        return ""


class RegistryClient:
    """Talks to one repository of one registry for the duration of a pull."""

    def __init__(
        self,
        ref: Reference,
        credentials: Credentials | None = None,
        *,
        timeout: tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT),
    ) -> None:
        self.ref = ref
        self._credentials = credentials
        self._timeout = timeout
        self._scheme = "http" if is_loopback_host(ref.api_host) else "https"
        self._base = f"{self._scheme}://{ref.api_host}/v2/{ref.repository}"
        self._oras: oras.provider.Registry | None = None

    # -- connection and auth -------------------------------------------------

    def _client(self) -> oras.provider.Registry:
        if self._oras is None:
            self._oras = self._connect()
        return self._oras

    def _connect(self) -> oras.provider.Registry:
        session = _TimeoutSession(self._timeout)
        ping = self._send(session.get, f"{self._scheme}://{self.ref.api_host}/v2/")
        challenge = ping.headers.get("WWW-Authenticate", "")
        backend = "basic" if challenge.lower().startswith("basic") else "token"
        if ping.status_code == 401 and not challenge:
            raise AuthError(
                f"registry {self.ref.registry} demands authentication but sent no challenge"
            )
        if ping.status_code == 401 and backend == "basic" and self._credentials is None:
            # Basic auth at /v2/ guards everything: nothing is readable anonymously.
            raise self._auth_error(None)
        reg = oras.provider.Registry(
            hostname=self.ref.api_host,
            insecure=self._scheme == "http",
            auth_backend=backend,
        )
        session.cookies.set_policy(reg.session.cookies._policy)  # type: ignore[attr-defined]
        reg.session = session
        reg.auth.session = session
        if self._credentials is not None:
            reg.auth.set_basic_auth(self._credentials.username, self._credentials.password)
            if backend == "basic":
                reg.headers.update(reg.auth.get_auth_header())
        return reg

    def _send(self, fn: Any, *args: Any, **kwargs: Any) -> requests.Response:
        try:
            return fn(*args, **kwargs)
        except requests.exceptions.SSLError as exc:
            raise RegistryError(
                f"TLS error talking to registry {self.ref.registry}: {exc}"
            ) from None
        except requests.exceptions.Timeout:
            raise RegistryError(f"registry {self.ref.registry} timed out") from None
        except requests.exceptions.ConnectionError as exc:
            raise RegistryError(
                f"cannot connect to registry {self.ref.registry}: {_short(exc)}"
            ) from None

    def _get(self, url: str, headers: dict[str, str], *, stream: bool) -> requests.Response:
        reg = self._client()
        all_headers = {**reg.headers, **headers}
        undecorated = oras.provider.Registry.do_request.__wrapped__  # type: ignore[attr-defined]
        try:
            resp = self._send(undecorated, reg, url, "GET", headers=all_headers, stream=stream)
        except ValueError:
            # oras-py's way of saying the token endpoint refused us.
            raise self._auth_error(None) from None
        return resp

    def _auth_error(self, resp: requests.Response | None) -> AuthError:
        who = "with the given credentials" if self._credentials else "anonymously (no credentials)"
        detail = f" ({_error_detail(resp)})" if resp is not None and _error_detail(resp) else ""
        return AuthError(
            f"registry {self.ref.registry} refused access to {self.ref.repository} {who}{detail}; "
            "check the nodePublishSecretRef secret's registry credentials"
        )

    def _check(self, resp: requests.Response, what: str) -> None:
        code = resp.status_code
        if code in (200, 206):
            return
        detail = _error_detail(resp)
        resp.close()
        if code in (401, 403):
            raise self._auth_error(resp)
        if code == 404:
            raise NotFound(
                f"{what} not found in {self.ref.name}" + (f" ({detail})" if detail else "")
            )
        raise RegistryError(
            f"registry {self.ref.registry} answered HTTP {code} for {what}"
            + (f": {detail}" if detail else "")
        )

    # -- API -------------------------------------------------------------------

    def get_manifest(self, key: str) -> FetchedManifest:
        """Fetch a manifest by tag or digest; its digest is computed from the bytes.

        When `key` is a digest the bytes must hash to it. When it is a tag and
        the registry sends Docker-Content-Digest, that must agree too.
        """
        what = f"manifest {key!r}" if key.startswith("sha") else f"tag {key!r}"
        resp = self._get(
            f"{self._base}/manifests/{key}",
            {"Accept": ", ".join(ACCEPTED_MANIFEST_TYPES)},
            stream=True,
        )
        self._check(resp, what)
        try:
            data = _read_capped(resp, MAX_MANIFEST_BYTES, what)
        finally:
            resp.close()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if key.startswith("sha256:") and key != digest:
            raise IntegrityError(f"manifest {key} from {self.ref.registry} hashes to {digest}")
        if key.startswith("sha512:"):
            if "sha512:" + hashlib.sha512(data).hexdigest() != key:
                raise IntegrityError(
                    f"manifest {key} from {self.ref.registry} does not match its digest"
                )
            digest = key
        header_digest = resp.headers.get("Docker-Content-Digest")
        if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
            raise IntegrityError(
                f"{what}: registry says digest {header_digest} but the bytes hash to {digest}"
            )
        media_type = detect_media_type(data, resp.headers.get("Content-Type"))
        return FetchedManifest(data=data, media_type=media_type, digest=digest)

    def get_blob_bytes(self, desc: Descriptor, what: str, max_bytes: int) -> bytes:
        """A small blob (config) fully in memory, verified."""
        if desc.size > max_bytes:
            raise RegistryError(
                f"{what} declares {desc.size} bytes, more than the {max_bytes} allowed"
            )
        resp = self.open_blob(desc, what)
        try:
            reader = VerifyingReader(resp.raw, desc.digest, desc.size, what)
            chunks = []
            while chunk := reader.read(CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            resp.close()

    def open_blob(self, desc: Descriptor, what: str) -> requests.Response:
        """A streaming response for a blob; read `.raw`, verify, then close."""
        resp = self._get(f"{self._base}/blobs/{desc.digest}", {}, stream=True)
        self._check(resp, what)
        resp.raw.decode_content = False
        return resp


def raw_body(resp: requests.Response) -> Any:
    """The response body as a file object with `readinto` and no extra copies.

    urllib3's `read(n)` goes through http.client's `read(n)`, which fills a
    fresh bytearray and then copies it to bytes; for multi-GiB blobs read in
    parallel that is two avoidable copies per chunk. http.client's own
    `readinto` reads the socket straight into the caller's buffer (and still
    honours Content-Length and chunked encoding). urllib3 keeps it as `_fp`;
    when that is not there, its own file object (slower, same bytes) is used.
    """
    inner = getattr(resp.raw, "_fp", None)
    return inner if inner is not None and hasattr(inner, "readinto") else resp.raw


def _read_capped(resp: requests.Response, cap: int, what: str) -> bytes:
    chunks: list[bytes] = []
    total = 0
    for chunk in resp.iter_content(64 * 1024):
        total += len(chunk)
        if total > cap:
            raise RegistryError(f"{what} is larger than {cap} bytes; refusing it")
        chunks.append(chunk)
    return b"".join(chunks)


def _short(exc: BaseException) -> str:
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused"
    if "Name or service not known" in text or "Failed to resolve" in text:
        return "host name does not resolve"
    return text[:200]


__all__ = ["CsiOciError", "FetchedManifest", "RegistryClient"]
