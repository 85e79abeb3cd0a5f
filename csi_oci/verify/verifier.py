"""A publish against the signature policy: which rules apply, are they met, what to say.

The CSI node service calls `SignatureCheck.before_pull` with the digest it
resolved (rules over manifests: nothing is pulled for an image the policy
refuses) and `after_pull` with the tree (rules that sign files). Each rule
is met when every one of its requirements is met by at least one signature.

Results are cached per (digest, rule fingerprint) in memory and in
`<state>/signatures/`, so a warm publish reads a file instead of the
registry; the fingerprint covers every key, root and identity the rule
trusts, so editing a rule re-verifies. A tree pulled under no rule, or
another, is verified before it is served under this one: the cache is keyed
by the rule, never by the tree's presence. Only successes are cached: an
image signed after a refusal is accepted on the next try.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from csi_oci.errors import CsiOciError, FailedPrecondition, RegistryError, SignatureDenied
from csi_oci.oci.config import ConfigSource
from csi_oci.oci.manifest import INDEX_TYPES, parse_index, parse_manifest
from csi_oci.oci.packaging import MODELPACK_FILEPATH, TITLE
from csi_oci.oci.registry import CredentialLookup, RegistryClient
from csi_oci.spec.reference import Reference
from csi_oci.storage.atomic import read_json, write_json_atomic
from csi_oci.telemetry import instruments
from csi_oci.verify import bundle, cosign, models, notation
from csi_oci.verify.discover import Candidate, Found, SignatureFinder
from csi_oci.verify.policy import (
    Enforcement,
    Kind,
    PolicySource,
    Requirement,
    Rule,
    SignedDigest,
)
from csi_oci.verify.trust import RANK_MALFORMED, CertTrust, SignatureRejected, Verified

log = logging.getLogger(__name__)

MODEL_SIGNATURE_FILE = "model.sig"


@dataclass(frozen=True)
class Subject:
    """What is about to be mounted."""

    reference: Reference
    digest: str  # the platform manifest
    index_digest: str | None  # the index the reference went through, when known
    key: str  # the tree's store key (digest + include set)
    partial: bool = False  # a partial pull (include): model signing checks what is there


@dataclass(frozen=True)
class RuleResult:
    """One rule's verdict on one image: what the record, the log and the metric show."""

    rule: str
    outcome: str  # "verified", "cached", "warned"
    signers: tuple[Verified, ...]
    message: str = ""  # for "warned": why it would have been refused

    def summary(self) -> str:
        if not self.signers:
            return f"{self.rule}: unverified ({self.message})"
        who = "; ".join(f"{s.kind} {s.signer}" for s in self.signers)
        return f"{self.rule}: {who}"


class ResultCache:
    """Verified (subject, rule fingerprint) pairs: in memory, and on disk across restarts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._memory: dict[str, tuple[Verified, ...]] = {}
        self._lock = threading.Lock()

    def _name(self, subject: str, rule: Rule) -> str:
        return hashlib.sha256(f"{subject}\n{rule.fingerprint}".encode()).hexdigest()

    def get(self, subject: str, rule: Rule) -> tuple[Verified, ...] | None:
        name = self._name(subject, rule)
        with self._lock:
            hit = self._memory.get(name)
        if hit is not None:
            return hit
        data = read_json(self.root / f"{name}.json")
        if not isinstance(data, dict) or data.get("subject") != subject:
            return None
        if data.get("fingerprint") != rule.fingerprint:
            return None
        try:
            signers = tuple(Verified(**s) for s in data["signers"])
        except (KeyError, TypeError):
            return None
        with self._lock:
            self._memory[name] = signers
        return signers

    def put(self, subject: str, rule: Rule, signers: tuple[Verified, ...]) -> None:
        name = self._name(subject, rule)
        write_json_atomic(
            self.root / f"{name}.json",
            {
                "subject": subject,
                "rule": rule.name,
                "fingerprint": rule.fingerprint,
                "signers": [asdict(s) for s in signers],
                "verified_at": time.time(),
            },
            durable=False,  # lost on a power cut: verified again, nothing wrong served
        )
        with self._lock:
            self._memory[name] = signers

    def signers_of(self, subject: str) -> list[dict[str, object]]:
        """Every cached verification of `subject` (for `csi-oci ls`)."""
        out = []
        for path in sorted(self.root.glob("*.json")) if self.root.is_dir() else []:
            data = read_json(path)
            if isinstance(data, dict) and data.get("subject") == subject:
                out.append(data)
        return out


class SignatureCheck:
    """The node's signature policy applied to publishes."""

    def __init__(self, policy: PolicySource, cache_dir: Path, registries: ConfigSource) -> None:
        self.policy = policy
        self.results = ResultCache(cache_dir)
        self.registries = registries

    def rules_for(self, ref: Reference, named: str = "") -> tuple[Rule, ...]:
        """The rules a volume must pass (InvalidArgument for an unknown named rule,
        SignatureDenied when the policy file is broken)."""
        policy = self.policy.current()
        if policy is None:
            if named:
                raise SignatureDenied(
                    f"volume attribute signaturePolicy names rule {named!r}, but this node has "
                    "no signature policy (--policy-config); the image is not published unverified"
                )
            return ()
        return policy.rules_for(ref, named)

    def check(
        self,
        subject: Subject,
        rules: tuple[Rule, ...],
        credentials: CredentialLookup | None,
        *,
        client: RegistryClient | None = None,
        tree: Path | None = None,
    ) -> list[RuleResult]:
        """Check `rules` (those not needing a tree when `tree` is None; those that do
        when it is given). SignatureDenied for the first enforced rule not met."""
        started = time.monotonic()
        results = []
        session = _Session(self, subject, credentials, client)
        try:
            for rule in rules:
                if rule.needs_tree != (tree is not None):
                    continue
                results.append(self._check_rule(session, rule, tree))
        finally:
            if results:
                instruments.SIGNATURE_CHECK_DURATION.observe(time.monotonic() - started)
        return results

    def _check_rule(self, session: _Session, rule: Rule, tree: Path | None) -> RuleResult:
        subject = session.subject
        cache_key = subject.key if rule.needs_tree else subject.digest
        cached = self.results.get(cache_key, rule)
        if cached is not None:
            instruments.SIGNATURE_CHECKS.labels(rule.name, "cached").inc()
            return RuleResult(rule.name, "cached", cached)
        try:
            signers = tuple(session.meet(req, rule, tree) for req in rule.requires)
        except (SignatureDenied, RegistryError) as exc:
            if rule.mode is Enforcement.WARN:
                log.warning("signature rule %s (warn mode) not met; publishing: %s", rule.name, exc)
                instruments.SIGNATURE_CHECKS.labels(rule.name, "warned").inc()
                return RuleResult(rule.name, "warned", (), str(exc))
            outcome = "denied" if isinstance(exc, SignatureDenied) else "unavailable"
            instruments.SIGNATURE_CHECKS.labels(rule.name, outcome).inc()
            raise
        self.results.put(cache_key, rule, signers)
        instruments.SIGNATURE_CHECKS.labels(rule.name, "verified").inc()
        log.info(
            "%s (%s) meets signature rule %s: %s",
            subject.reference,
            subject.digest,
            rule.name,
            "; ".join(f"{s.kind} by {s.signer} ({s.source})" for s in signers),
        )
        return RuleResult(rule.name, "verified", signers)


class _Session:
    """One publish's look at the registry: signatures found once, shared by its rules."""

    def __init__(
        self,
        check: SignatureCheck,
        subject: Subject,
        credentials: CredentialLookup | None,
        client: RegistryClient | None,
    ) -> None:
        self.check = check
        self.subject = subject
        self.credentials = credentials
        self._client = client
        self._found: dict[str, Found] = {}
        self._index_known = subject.index_digest is not None or client is not None

    @property
    def client(self) -> RegistryClient:
        if self._client is None:
            self._client = RegistryClient(
                self.subject.reference, self.credentials, config=self.check.registries.current()
            )
        return self._client

    def index_digest(self) -> str | None:
        """The index the reference names, if it names one listing our manifest.

        A publish answered from the node's records has no manifest at hand:
        ask the registry what the reference names now.
        """
        if self._index_known:
            return self.subject.index_digest
        self._index_known = True
        ref = self.subject.reference
        if ref.manifest_key == self.subject.digest:
            return None
        try:
            top = self.client.get_manifest(ref.manifest_key)
        except CsiOciError as exc:
            log.info("could not read %s to learn its index: %s", ref, exc)
            return None
        if top.media_type in INDEX_TYPES and any(
            d.digest == self.subject.digest for d in parse_index(top.data)
        ):
            self.subject = replace(self.subject, index_digest=top.digest)
            return top.digest
        return None

    def subjects(self, rule: Rule) -> dict[str, str]:
        """The digests a signature may name under `rule`, and what each is."""
        index = self.index_digest() if rule.signed is not SignedDigest.MANIFEST else None
        out: dict[str, str] = {}
        if rule.signed is not SignedDigest.INDEX or index is None:
            out[self.subject.digest] = "manifest"
        if index is not None:
            out[index] = "index"
        return out

    def found(self, digest: str) -> Found:
        if digest not in self._found:
            self._found[digest] = SignatureFinder(self.client).find(digest)
        return self._found[digest]

    def shipped_model_signature(self, tree: Path) -> bytes | None:
        """The artifact's own model.sig: in the tree, or, when a partial pull
        (include) left it out, its raw layer fetched by digest."""
        shipped = tree / MODEL_SIGNATURE_FILE
        if shipped.is_file() and not shipped.is_symlink():
            return _read_bounded(shipped)
        if not self.subject.partial:
            return None
        try:
            fetched = self.client.get_manifest(self.subject.digest)
            manifest = parse_manifest(fetched.data, fetched.media_type)
        except CsiOciError as exc:
            log.info("could not read %s for its model.sig: %s", self.subject.digest, exc)
            return None
        for layer in manifest.layers:
            names = {layer.annotations.get(k) for k in (TITLE, *MODELPACK_FILEPATH)}
            if MODEL_SIGNATURE_FILE in names:
                return self.client.get_blob_bytes(
                    layer, f"{MODEL_SIGNATURE_FILE} {layer.digest}", bundle.MAX_BUNDLE_BYTES
                )
        return None

    def meet(self, req: Requirement, rule: Rule, tree: Path | None) -> Verified:
        """A signature meeting `req`, or SignatureDenied saying what was found instead."""
        subjects = self.subjects(rule)
        rejections: list[SignatureRejected] = []
        looked: list[str] = []
        errors: list[str] = []
        if req.kind is Kind.MODEL_SIGNING:
            assert tree is not None
            looked.append(f"{MODEL_SIGNATURE_FILE} in the artifact")
            data = self.shipped_model_signature(tree)
            if data is not None:
                try:
                    return models.verify_model_tree(
                        tree,
                        data,
                        req,
                        source=f"{MODEL_SIGNATURE_FILE} in the artifact",
                        partial=self.subject.partial,
                    )
                except SignatureRejected as exc:
                    rejections.append(exc)
        for digest in subjects:
            found = self.found(digest)
            looked += [where for where in found.looked if where not in looked]
            errors += found.errors
            for candidate in found.candidates:
                try:
                    verified = _try(candidate, req, subjects, tree, self.subject.partial)
                except SignatureRejected as exc:
                    rejections.append(exc)
                    continue
                if verified is not None:
                    return verified
        if errors and not rejections:
            # Nothing was refused, but not everything could be read: say so as
            # retryable (kubelet retries), not as "unsigned".
            subject = self.subject
            raise RegistryError(
                f"image {subject.reference} ({subject.digest}): the signatures for signature "
                f"rule {rule.name!r} could not all be read ({'; '.join(errors[:2])}); "
                "retrying"
            )
        raise SignatureDenied(self._denial(rule, req, rejections, looked, errors))

    def _denial(
        self,
        rule: Rule,
        req: Requirement,
        rejections: list[SignatureRejected],
        looked: list[str],
        errors: list[str],
    ) -> str:
        subject = self.subject
        head = (
            f"image {subject.reference} ({subject.digest}) refused by signature rule {rule.name!r}"
        )
        if rejections:
            best = max(rejections, key=lambda r: r.rank)
            what = str(best)
            if len(rejections) > 1:
                what += f" (and {len(rejections) - 1} other signature(s) rejected)"
        else:
            what = f"no {req.kind.value} signature found (looked at {', '.join(looked)})"
            if errors:
                what += f"; errors: {'; '.join(errors[:2])}"
        return f"{head}: {what}; wanted a {req.describe()}"


def _read_bounded(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(bundle.MAX_BUNDLE_BYTES + 1)
    if len(data) > bundle.MAX_BUNDLE_BYTES:
        raise SignatureDenied(f"{path.name} is larger than {bundle.MAX_BUNDLE_BYTES} bytes")
    return data


def _try(
    candidate: Candidate,
    req: Requirement,
    subjects: Mapping[str, str],
    tree: Path | None,
    partial: bool,
) -> Verified | None:
    """`candidate` checked against `req`; None if it is not the kind `req` wants."""
    if req.kind is Kind.COSIGN:
        if candidate.kind == "simple-signing":
            return cosign.verify_simple_signing(
                candidate.data, candidate.annotations, req, subjects, source=candidate.source
            )
        if candidate.kind == "bundle" and not bundle.is_model_signing(candidate.data):
            return bundle.verify_image_bundle(
                candidate.data, req, subjects, source=candidate.source
            )
        return None
    if req.kind is Kind.NOTATION:
        if candidate.kind != "notation":
            return None
        return notation.verify_notation(
            candidate.data,
            candidate.media_type,
            _cert_trust(req),
            subjects,
            source=candidate.source,
        )
    if candidate.kind == "bundle" and tree is not None and bundle.is_model_signing(candidate.data):
        return models.verify_model_tree(
            tree, candidate.data, req, source=candidate.source, partial=partial
        )
    return None


def _cert_trust(req: Requirement) -> CertTrust:
    if req.certs is None:
        raise SignatureRejected("the rule gives no roots for Notary Project", RANK_MALFORMED)
    return req.certs


def refuse_lazy(rule: Rule) -> FailedPrecondition:
    """A lazy volume cannot be checked file by file before it is mounted."""
    return FailedPrecondition(
        f"signature rule {rule.name!r} requires a model-signing signature, which is "
        "checked over every file before the volume is published; a lazy volume fetches "
        "files as they are read, so use mode unpack (or auto) for this image"
    )
