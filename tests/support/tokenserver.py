"""A small Docker registry token server (the "Bearer realm" flow) for tests.

The flow, as CNCF distribution 2.8 implements its ``auth: token`` access
controller:

1. the registry answers an unauthenticated request with ``401`` and
   ``WWW-Authenticate: Bearer realm="<realm>",service="<service>",scope="..."``;
2. the client asks ``GET <realm>?service=<service>&scope=repository:<name>:pull``
   (HTTP Basic credentials, or none for anonymous access);
3. the token server answers ``{"token": JWT, "access_token": JWT, ...}``;
4. the client repeats the registry request with ``Authorization: Bearer <JWT>``.

What distribution 2.8 (``registry/auth/token``) checks in the JWT:

* header ``alg`` (``RS256`` here) and a way to find the key: of ``x5c``,
  ``jwk`` and ``kid`` it uses the first present.  With ``x5c`` the first
  certificate of the chain (base64 DER, standard alphabet) must verify
  against the ``rootcertbundle`` pool; a self-signed certificate that is
  itself in the bundle verifies.  ``kid`` would have to be the libtrust key
  id (a base32 SHA-256 fingerprint of the public key), which is more work;
  ``x5c`` is what this server sends.
* claims ``iss`` == the configured issuer, ``aud`` == the configured
  service (a plain string in 2.8), ``exp``/``nbf`` within a 60 s leeway,
  and ``access`` = ``[{"type", "name", "actions"}]`` covering what the
  request needs (``pull`` for GET/HEAD, ``push`` for uploads).
  ``sub``, ``iat`` and ``jti`` are sent as a real issuer would.

The key and its self-signed certificate are made with the ``openssl`` CLI and
tokens are signed with ``openssl dgst -sha256 -sign`` (RSASSA-PKCS1-v1_5 with
SHA-256, which is exactly JWS ``RS256``), so no Python crypto package is
needed.
"""

from __future__ import annotations

import base64
import binascii
import json
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

DEFAULT_SERVICE = "csi-oci-test-registry"
DEFAULT_ISSUER = "csi-oci-test-token-issuer"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_b64url(obj: object) -> str:
    return _b64url(json.dumps(obj, separators=(",", ":"), sort_keys=True).encode())


@dataclass
class TokenRequest:
    """One request the token server answered (kept for assertions in tests)."""

    user: str | None
    service: str | None
    scopes: list[str]
    status: int
    granted: list[dict[str, object]] = field(default_factory=list)


class TokenServer:
    """Threaded HTTP token server on 127.0.0.1 issuing RS256 JWTs.

    ``users`` maps user name to password; ``username``/``password`` is the
    common single-user shortcut.  Authenticated users get every action they
    ask for; anonymous clients get ``401`` unless ``allow_anonymous``, and then
    only the actions in ``anonymous_actions``.  Tokens expire after
    ``expires_in`` seconds (``exp = now + expires_in``); distribution adds a
    60 s leeway when checking.
    """

    def __init__(
        self,
        *,
        username: str = "alice",
        password: str = "wonderland",
        users: dict[str, str] | None = None,
        allow_anonymous: bool = False,
        anonymous_actions: tuple[str, ...] = ("pull",),
        expires_in: int = 300,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        workdir: Path | None = None,
    ) -> None:
        self.users: dict[str, str] = dict(users) if users is not None else {username: password}
        self.allow_anonymous = allow_anonymous
        self.anonymous_actions = anonymous_actions
        self.expires_in = expires_in
        self.service = service
        self.issuer = issuer
        self.tokens_issued = 0
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="csi-oci-tokenserver-")
            workdir = Path(self._tmp.name)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.key_path = self.workdir / "token-key.pem"
        self.cert_path = self.workdir / "token-cert.pem"
        self._make_key()
        self._x5c = self._cert_der_b64()

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.realm = f"{self.url}/token"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="token-server", daemon=True
        )
        self._thread.start()

    # -- key material ------------------------------------------------------

    def _make_key(self) -> None:
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                "-keyout", str(self.key_path), "-out", str(self.cert_path),
                "-days", "30", "-subj", "/CN=csi-oci test token issuer",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip

    def _cert_der_b64(self) -> str:
        # The PEM body is the base64 (standard alphabet) DER, which is the x5c form.
        lines = self.cert_path.read_text().strip().splitlines()
        body = "".join(line for line in lines if not line.startswith("-----"))
        binascii.a2b_base64(body)  # sanity check
        return body

    # -- tokens ------------------------------------------------------------

    def sign(self, claims: dict[str, object], header: dict[str, object] | None = None) -> str:
        """Sign arbitrary claims (tests can forge odd tokens with this)."""
        hdr: dict[str, object] = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        if header:
            hdr.update(header)
        signing_input = f"{_json_b64url(hdr)}.{_json_b64url(claims)}"
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key_path)],
            input=signing_input.encode("ascii"),
            check=True,
            capture_output=True,
        ).stdout
        return f"{signing_input}.{_b64url(sig)}"

    def make_token(
        self,
        subject: str,
        access: list[dict[str, object]],
        *,
        expires_in: int | None = None,
        service: str | None = None,
    ) -> str:
        now = int(time.time())
        ttl = self.expires_in if expires_in is None else expires_in
        claims: dict[str, object] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": service or self.service,
            "exp": now + ttl,
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        return self.sign(claims)

    def _grant(self, user: str | None, scopes: list[str]) -> list[dict[str, object]]:
        granted: list[dict[str, object]] = []
        for scope in scopes:
            # "repository:name:pull,push"; names may hold ':' only in a host:port
            # prefix, so split the type off the front and the actions off the back.
            typ, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if not typ or not name:
                continue
            wanted = [a for a in actions.split(",") if a]
            if user is None:
                wanted = [a for a in wanted if a in self.anonymous_actions]
            granted.append({"type": typ, "name": name, "actions": wanted})
        return granted

    def _issue(self, user: str | None, service: str | None, scopes: list[str]) -> dict[str, object]:
        access = self._grant(user, scopes)
        token = self.make_token(user or "", access, service=service or self.service)
        with self._lock:
            self.tokens_issued += 1
            self.requests.append(TokenRequest(user, service, scopes, 200, access))
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _record_refusal(self, user: str | None, service: str | None, scopes: list[str]) -> None:
        with self._lock:
            self.requests.append(TokenRequest(user, service, scopes, 401))

    def check_credentials(self, user: str, password: str) -> bool:
        return user in self.users and self.users[user] == password

    # -- lifecycle ---------------------------------------------------------

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> TokenServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler_for(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep pytest output clean

        def _send_json(self, status: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="csi-oci test token server"')
            self.end_headers()
            self.wfile.write(data)

        def _basic_user(self) -> tuple[str | None, bool]:
            """(user, ok): user None = anonymous; ok False = bad credentials."""
            header = self.headers.get("Authorization", "")
            if not header:
                return None, True
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "basic":
                return None, False
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None, False
            return user, server.check_credentials(user, password)

        def _answer(
            self, user: str | None, ok: bool, service: str | None, scopes: list[str]
        ) -> None:
            if not ok or (user is None and not server.allow_anonymous):
                server._record_refusal(user, service, scopes)
                self._send_json(401, {"errors": [{"code": "UNAUTHORIZED"}]})
                return
            if service is not None and service != server.service:
                server._record_refusal(user, service, scopes)
                self._send_json(400, {"errors": [{"code": "UNSUPPORTED_SERVICE"}]})
                return
            self._send_json(200, server._issue(user, service, scopes))

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if parts.path != "/token":
                self._send_json(404, {"errors": [{"code": "NOT_FOUND"}]})
                return
            query = parse_qs(parts.query)
            scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
            user, ok = self._basic_user()
            self._answer(user, ok, (query.get("service") or [None])[0], scopes)

        def do_POST(self) -> None:
            # OAuth2 password grant (what some clients use to get refresh tokens).
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode())
            if parts.path != "/token":
                self._send_json(404, {"errors": [{"code": "NOT_FOUND"}]})
                return
            scopes = [s for value in form.get("scope", []) for s in value.split(" ") if s]
            service = (form.get("service") or [None])[0]
            if (form.get("grant_type") or [""])[0] == "password":
                user = (form.get("username") or [""])[0]
                ok = server.check_credentials(user, (form.get("password") or [""])[0])
                self._answer(user, ok, service, scopes)
            else:
                user, ok = self._basic_user()
                self._answer(user, ok, service, scopes)

    return Handler
