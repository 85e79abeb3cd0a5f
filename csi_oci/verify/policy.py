"""The signature policy: which images must be signed, by whom, and what a miss does.

The cluster operator writes it (chart value `signatures.policy` -> ConfigMap
-> `--policy-config`, TOML); pod authors can only name a stricter rule of it
(volume attribute `signaturePolicy`), never relax one. Example:

    [[rule]]
    name = "models"
    match = ["registry.example.com/models", "ghcr.io/acme"]  # registry[/repository] prefixes
    mode = "enforce"            # refuse the publish (default); "warn": publish, log and count
    signed = "either"           # for an index: "manifest", "index" or "either" may be signed

      [[rule.require]]          # every require of a rule must hold
      type = "cosign"           # cosign | notation | model-signing
      keys = ["keys/release.pub"]               # PEM public keys (paths relative to this file)

      [[rule.require]]
      type = "notation"
      roots = ["roots/acme-ca.pem"]             # PEM CA certificates, each one trusted
      identities = [{ subject = "CN=release,O=Acme" }]

    [[rule]]
    name = "strict"             # no match: only volumes that name it use it
      [[rule.require]]
      type = "cosign"
      roots = ["roots/fulcio.pem"]
      identities = [{ san = "release@acme\\.com", issuer = "https://accounts\\.acme\\.com" }]
      trusted_root = "sigstore/trusted_root.json"  # bundles: check their tlog proofs offline

`roots` are trust anchors: every certificate in those files is trusted as
the top of a chain, so list an intermediate CA too when signers leave it out
of their signatures (cosign's bundles carry the leaf alone).

For an image, the rule whose `match` prefix is longest applies (a prefix
matches whole path segments; "*" matches every image). A volume that names
a rule gets that rule too: both must pass.

The file is read again when it changes (mtime and size are checked before
each publish). A file that cannot be read or parsed fails closed: publishes
are refused with the parse error until it is fixed, or, after a good load,
the last good policy stays in force.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import os
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from csi_oci.errors import InvalidArgument, SignatureDenied
from csi_oci.spec.reference import Reference
from csi_oci.verify.trust import (
    CertTrust,
    IdentityPattern,
    KeyTrust,
    key_fingerprint,
    load_certificates,
    load_public_key,
)

log = logging.getLogger(__name__)

MAX_POLICY_BYTES = 1024 * 1024
MAX_FILE_BYTES = 4 * 1024 * 1024  # a key, a root bundle or a Sigstore trusted root


class Enforcement(enum.StrEnum):
    ENFORCE = "enforce"
    WARN = "warn"


class SignedDigest(enum.StrEnum):
    """For an image index: which digest a signature must name."""

    MANIFEST = "manifest"  # the platform manifest that is mounted
    INDEX = "index"  # the index the reference resolved through
    EITHER = "either"


class Kind(enum.StrEnum):
    COSIGN = "cosign"
    NOTATION = "notation"
    MODEL_SIGNING = "model-signing"


@dataclass(frozen=True)
class Requirement:
    """One signature that must be present: by one of `keys`, or by a certificate
    chaining to one of `certs.roots` with one of its identities."""

    kind: Kind
    keys: KeyTrust | None
    certs: CertTrust | None
    trusted_root: Path | None = None  # a Sigstore trusted_root.json (cosign bundles)
    trusted_root_bytes: bytes = b""

    def describe(self) -> str:
        """ "cosign by key release.pub" / "notation by CN=... under acme-ca.pem"."""
        parts = []
        if self.keys is not None:
            parts.append(f"key {self.keys.describe()}")
        if self.certs is not None:
            parts.append(
                f"certificate under {', '.join(self.certs.names)} with "
                f"{self.certs.describe_identities()}"
            )
        return f"{self.kind.value} signature by {' or '.join(parts)}"


@dataclass(frozen=True)
class Rule:
    name: str
    match: tuple[str, ...]
    mode: Enforcement
    signed: SignedDigest
    requires: tuple[Requirement, ...]
    fingerprint: str  # sha256 of everything the rule trusts: a result is cached under it

    @property
    def needs_tree(self) -> bool:
        """model-signing signs the files, so it is checked against the unpacked tree."""
        return any(r.kind is Kind.MODEL_SIGNING for r in self.requires)


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    source: str

    def by_name(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)

    def rules_for(self, ref: Reference, named: str = "") -> tuple[Rule, ...]:
        """The rules an image must pass: the most specific match, plus the named one."""
        subject = f"{ref.registry}/{ref.repository}"
        best: Rule | None = None
        best_len = -1
        for rule in self.rules:
            for prefix in rule.match:
                length = _prefix_length(prefix, subject)
                if length > best_len:
                    best, best_len = rule, length
        chosen = [best] if best is not None else []
        if named:
            extra = self.by_name(named)
            if extra is None:
                raise InvalidArgument(
                    f"volume attribute signaturePolicy names rule {named!r}, which the node's "
                    f"signature policy ({self.source}) does not have; rules: "
                    f"{', '.join(r.name for r in self.rules) or 'none'}"
                )
            if extra not in chosen:
                chosen.append(extra)
        return tuple(chosen)


def _prefix_length(prefix: str, subject: str) -> int:
    """How specific `prefix` is for `subject` (registry/repository); -1 if it does not apply."""
    if prefix == "*":
        return 0
    if subject == prefix or subject.startswith(prefix + "/"):
        return len(prefix) + 1
    return -1


# -- parsing --------------------------------------------------------------------------


def _read_file(base: Path, name: object, where: str) -> tuple[Path, bytes]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: want a file path")
    path = (base / name) if not os.path.isabs(name) else Path(name)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{where}: {path} is larger than {MAX_FILE_BYTES} bytes")
    return path, data


def _strings(value: object, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}: want a list of strings")
    return list(value)


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(allowed)}")


def _requirement(data: object, base: Path, where: str, digest: Any) -> Requirement:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: want a table")
    _check_keys(data, {"type", "keys", "roots", "identities", "trusted_root"}, where)
    try:
        kind = Kind(data.get("type", ""))
    except ValueError:
        raise ValueError(f"{where}.type: want one of {', '.join(k.value for k in Kind)}") from None
    digest.update(kind.value.encode())
    keys = None
    if "keys" in data:
        loaded = []
        for i, name in enumerate(_strings(data["keys"], f"{where}.keys")):
            path, pem = _read_file(base, name, f"{where}.keys[{i}]")
            key = load_public_key(pem, str(path))
            digest.update(
                key.public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
            loaded.append((f"{path.name} ({key_fingerprint(key)})", key))
        if not loaded:
            raise ValueError(f"{where}.keys: empty")
        if kind is Kind.NOTATION:
            raise ValueError(
                f"{where}: Notary Project signatures are verified by certificate roots, not "
                "keys; give roots and identities"
            )
        keys = KeyTrust(tuple(loaded))
    certs = None
    if "roots" in data:
        roots = []
        names = []
        for i, name in enumerate(_strings(data["roots"], f"{where}.roots")):
            path, pem = _read_file(base, name, f"{where}.roots[{i}]")
            found = load_certificates(pem, str(path))
            if not found:
                raise ValueError(f"{where}.roots[{i}]: {path} has no certificate")
            roots += found
            names.append(path.name)
            for cert in found:
                digest.update(cert.public_bytes(serialization.Encoding.DER))
        identities = tuple(
            IdentityPattern.parse(item, f"{where}.identities[{i}]")
            for i, item in enumerate(data.get("identities", []) or [])
        )
        if not identities:
            raise ValueError(
                f"{where}: roots need identities (subject, san and/or issuer patterns): a CA "
                "signs certificates for many holders"
            )
        digest.update(json.dumps([i.describe() for i in identities]).encode())
        certs = CertTrust(tuple(roots), identities, tuple(names))
    elif "identities" in data:
        raise ValueError(f"{where}.identities: only meaningful with roots")
    trusted_root = None
    trusted_bytes = b""
    if "trusted_root" in data:
        if certs is None:
            raise ValueError(f"{where}.trusted_root: needs roots and identities as well")
        trusted_root, trusted_bytes = _read_file(
            base, data["trusted_root"], f"{where}.trusted_root"
        )
        digest.update(trusted_bytes)
    if keys is None and certs is None:
        raise ValueError(f"{where}: give keys or roots (with identities)")
    return Requirement(kind, keys, certs, trusted_root, trusted_bytes)


def parse_policy(text: str, path: Path) -> Policy:
    """Parse and load (keys, roots) a policy file; ValueError names the bad field."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not valid TOML: {exc}") from None
    _check_keys(data, {"rule"}, "policy")
    rules_data = data.get("rule", [])
    if not isinstance(rules_data, list):
        raise ValueError("rule: want [[rule]] tables")
    base = path.parent
    rules: list[Rule] = []
    for i, item in enumerate(rules_data):
        where = f"rule[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: want a table")
        _check_keys(item, {"name", "match", "mode", "signed", "require"}, where)
        name = item.get("name")
        if not isinstance(name, str) or not name or len(name) > 128:
            raise ValueError(f"{where}.name: want a name (at most 128 characters)")
        where = f"rule {name!r}"
        if any(r.name == name for r in rules):
            raise ValueError(f"{where}: two rules have this name")
        match = tuple(p.rstrip("/") for p in _strings(item.get("match", []), f"{where}.match"))
        try:
            mode = Enforcement(item.get("mode", "enforce"))
            signed = SignedDigest(item.get("signed", "either"))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        digest = hashlib.sha256()
        digest.update(json.dumps([name, signed.value]).encode())
        reqs_data = item.get("require", [])
        if not isinstance(reqs_data, list) or not reqs_data:
            raise ValueError(f"{where}: needs at least one [[rule.require]]")
        requires = tuple(
            _requirement(r, base, f"{where}.require[{j}]", digest) for j, r in enumerate(reqs_data)
        )
        rules.append(Rule(name, match, mode, signed, requires, digest.hexdigest()[:32]))
    return Policy(tuple(rules), str(path))


class PolicySource:
    """The current policy, re-read when its file changes; fails closed."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._policy: Policy | None = None
        self._error: str | None = None
        if path is not None:
            self.reload()

    def reload(self) -> None:
        """Read the file now. A bad file keeps the last good policy (or, before the
        first good one, makes every publish fail with the reason)."""
        if self.path is None:
            return
        with self._lock:
            try:
                st = os.stat(self.path)
                with open(self.path, "rb") as f:
                    raw = f.read(MAX_POLICY_BYTES + 1)
                if len(raw) > MAX_POLICY_BYTES:
                    raise ValueError(f"larger than {MAX_POLICY_BYTES} bytes")
                policy = parse_policy(raw.decode(), self.path)
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                self._error = f"signature policy {self.path} cannot be used: {reason}"
                kept = " (keeping the last good one)" if self._policy is not None else ""
                log.error("%s%s", self._error, kept)
                with contextlib.suppress(OSError):
                    st = os.stat(self.path)
                    self._stamp = (st.st_mtime_ns, st.st_size)
                    return
                self._stamp = None
                return
            self._stamp = (st.st_mtime_ns, st.st_size)
            self._policy = policy
            self._error = None
            log.info(
                "loaded signature policy %s (%d rules: %s)",
                self.path,
                len(policy.rules),
                ", ".join(r.name for r in policy.rules),
            )

    def current(self) -> Policy | None:
        """The policy in force; None when the node has none. Raises SignatureDenied
        when the file never loaded: no image is published unverified by mistake."""
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp or (stamp is None and self._policy is None):
            self.reload()
        if self._policy is None:
            raise SignatureDenied(
                f"{self._error or 'signature policy not loaded'}; fix the policy "
                "(chart value signatures.policy) and the driver reloads it"
            )
        return self._policy
