"""A throw-away PKI for TLS tests, made with the ``openssl`` CLI.

``make_ca`` makes a self-signed CA; ``issue_server_cert`` and
``issue_client_cert`` issue leaf certificates signed by it.  Keys are ECDSA
P-256 (fast to generate; Go's crypto/tls and OpenSSL both accept them).

The extensions are what strict verifiers want: the CA has
``basicConstraints=critical,CA:TRUE`` and ``keyUsage=keyCertSign,cRLSign``
(Go refuses a CA without ``CA:TRUE``); leaves have ``CA:FALSE``, subject and
authority key identifiers and an ``extendedKeyUsage`` of ``serverAuth`` or
``clientAuth`` (Go checks ``clientAuth`` on client certificates when the
registry verifies them against ``http.tls.clientcas``).  Server certificates
name their hosts only in ``subjectAltName`` (``IP:`` entries for addresses,
``DNS:`` for names): neither Go nor Python looks at the CN any more.
"""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .registry import find_tool

DEFAULT_DAYS = 2


@dataclass(frozen=True)
class CA:
    """A certificate authority: PEM certificate and PEM private key paths."""

    cert_path: Path
    key_path: Path


def _openssl(*args: str | Path) -> None:
    proc = subprocess.run(
        [find_tool("openssl"), *(str(a) for a in args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"openssl {' '.join(str(a) for a in args[:2])} failed ({proc.returncode}):\n"
            + proc.stderr.decode(errors="replace")
        )


def _new_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    path.chmod(0o600)


def _san(hosts: Iterable[str]) -> str:
    entries = []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            entries.append(f"DNS:{host}")
        else:
            entries.append(f"IP:{host}")
    if not entries:
        raise ValueError("a server certificate needs at least one host")
    return ",".join(entries)


def make_ca(directory: str | Path, name: str = "ca", *, days: int = DEFAULT_DAYS) -> CA:
    """Create ``<directory>/<name>.crt`` and ``.key``: a self-signed CA."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _new_key(key)
    _openssl(
        "req", "-x509", "-new", "-key", key, "-out", cert, "-days", str(days),
        "-sha256", "-subj", f"/CN=csi-oci test CA {name} {secrets.token_hex(4)}",
        "-set_serial", f"0x{secrets.token_hex(16)}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip
    return CA(cert, key)


def _issue(
    ca: CA, directory: Path, name: str, cn: str, extensions: list[str], days: int
) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, csr = (directory / f"{name}{ext}" for ext in (".crt", ".key", ".csr"))
    ext_file = directory / f"{name}.ext"
    _new_key(key)
    _openssl("req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={cn}")
    ext_file.write_text(
        "[leaf]\n"
        "basicConstraints=critical,CA:FALSE\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n" + "".join(f"{line}\n" for line in extensions)
    )
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca.cert_path, "-CAkey", ca.key_path,
        "-set_serial", f"0x{secrets.token_hex(16)}", "-days", str(days), "-sha256",
        "-extfile", ext_file, "-extensions", "leaf", "-out", cert,
    )  # fmt: skip
    csr.unlink()
    ext_file.unlink()
    return cert, key


def issue_server_cert(
    ca: CA,
    directory: str | Path,
    hosts: Iterable[str] = ("127.0.0.1", "localhost"),
    *,
    name: str = "server",
    days: int = DEFAULT_DAYS,
) -> tuple[Path, Path]:
    """Issue ``<directory>/<name>.crt``/``.key`` for ``hosts`` (IPs and DNS names).

    Returns ``(cert_path, key_path)``.
    """
    hosts = list(hosts)
    return _issue(
        ca,
        Path(directory),
        name,
        hosts[0] if hosts else "server",
        [
            "keyUsage=critical,digitalSignature",
            "extendedKeyUsage=serverAuth",
            f"subjectAltName={_san(hosts)}",
        ],
        days,
    )


def issue_client_cert(
    ca: CA,
    directory: str | Path,
    cn: str = "csi-oci",
    *,
    name: str = "client",
    days: int = DEFAULT_DAYS,
) -> tuple[Path, Path]:
    """Issue ``<directory>/<name>.crt``/``.key``, a client certificate with CN ``cn``.

    Returns ``(cert_path, key_path)`` (what ``requests``' ``cert=`` takes).
    """
    return _issue(
        ca,
        Path(directory),
        name,
        cn,
        ["keyUsage=critical,digitalSignature", "extendedKeyUsage=clientAuth"],
        days,
    )
