"""OpenSSF model signing (OMS): a `model.sig` Sigstore bundle checked against the tree.

model-signing (github.com/sigstore/model-transparency) signs files, not an
OCI manifest: its DSSE envelope carries an in-toto statement whose predicate
lists every file (or file shard) of the model with its digest, plus how the
signer hashed them (method, hash, shard size, ignored paths, symlinks). So a
model-signing requirement is checked against the tree csi-oci is about to
publish, after unpacking and before the bind mount, and offline.

What is ours and what is model-signing's:

- the bundle and the envelope are parsed and the signature is checked here,
  with the policy's keys and roots (csi_oci.verify.trust). model-signing's
  own verifiers do not fit: the key verifier takes a public key *file* and
  only EC keys, the certificate verifier takes root *files* (or certifi's web
  PKI when given none), checks the chain at the leaf's notBefore (so expired
  leaves pass) and has no notion of an identity; both raise bare
  ValueError/KeyError on a bad bundle. A policy names keys and roots in memory
  and wants identities and one-line reasons;
- the tree is hashed by model-signing's own `hashing.Config`, configured from
  the *signed* predicate, so the files are hashed exactly the way the signer
  hashed them, in parallel (a thread per file or per shard; BLAKE3 threads
  itself). Nothing about hashing is read from the tree or from the pod.

Before hashing, the tree is walked once (without following links) to refuse
links that leave it, special files and oversized trees, and its file list is
compared with the signed one, so an added or missing file is named without
reading gigabytes first.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from csi_oci.verify import bundle
from csi_oci.verify.bundle import Bundle
from csi_oci.verify.policy import Requirement
from csi_oci.verify.trust import (
    RANK_MALFORMED,
    RANK_OTHER_DIGEST,
    SignatureRejected,
    Verified,
)

KIND = "model-signing"
SIGNATURE_NAME = "model.sig"  # where model-signing writes it, and what it ignores by default

MAX_BUNDLE_BYTES = 4 * 1024 * 1024
MAX_RESOURCES = 100_000  # signed files or shards (a 1 TB model in 1 GB shards is 1000)
MAX_TREE_ENTRIES = 200_000  # files, directories and links walked in the tree
MAX_NAME_BYTES = 4096  # PATH_MAX
MAX_COMPONENT_BYTES = 255  # NAME_MAX
MAX_IGNORE_PATHS = 256
MAX_SIGNATURES = 8  # DSSE allows several; model-signing writes one
MAX_SHARD_SIZE = 1 << 40

BUNDLE_MEDIA_PREFIX = "application/vnd.dev.sigstore.bundle"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
# model-signing 0.2's predicate: no serialization parameters, no root digest,
# and signed over a buggy PAE; model-signing has verified it only for migration.
PREDICATE_TYPE_V01 = "https://model_signing/Digests/v0.1"

HashName = Literal["sha256", "blake2", "blake3"]
# The predicate's hash_type (a digest name) -> model-signing's hashing name.
HASH_TYPES: dict[str, HashName] = {
    "sha256": "sha256",
    "blake2b": "blake2",
    "blake2": "blake2",
    "blake3": "blake3",
}
# model-signing's hashing name -> the digest name each resource records, and its length.
DIGEST_NAMES: dict[HashName, str] = {"sha256": "sha256", "blake2": "blake2b", "blake3": "blake3"}
DIGEST_BYTES: dict[HashName, int] = {"sha256": 32, "blake2": 64, "blake3": 32}


@dataclass(frozen=True)
class Serialization:
    """How the signer hashed the tree (the predicate's `serialization`)."""

    method: Literal["files", "shards"]
    hash_name: HashName
    shard_size: int  # 0 for "files"
    allow_symlinks: bool
    ignore_paths: tuple[str, ...]

    @property
    def algorithm(self) -> str:
        """The `algorithm` model-signing records for each resource."""
        name = DIGEST_NAMES[self.hash_name]
        return f"{name}-sharded-{self.shard_size}" if self.method == "shards" else name


@dataclass(frozen=True)
class Statement:
    serialization: Serialization
    resources: dict[str, str]  # "path" or "path:start:end" -> hex digest


# -- the bundle ----------------------------------------------------------------------


def _malformed(text: str) -> SignatureRejected:
    return SignatureRejected(f"model signature: {text}", RANK_MALFORMED)


def _table(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _malformed(f"{what} is missing or not an object")
    return value


def parse_bundle(data: bytes) -> Bundle:
    """A model-signing bundle: a Sigstore bundle (csi_oci.verify.bundle parses it,
    bounded) whose content is a DSSE envelope of an in-toto statement."""
    try:
        parsed = bundle.parse_bundle(data)
    except SignatureRejected as exc:
        raise _malformed(str(exc)) from None
    if parsed.envelope is None:
        raise _malformed("the bundle has no DSSE envelope (not written by model-signing)")
    if parsed.envelope.payload_type != PAYLOAD_TYPE:
        raise _malformed(f"payload type {parsed.envelope.payload_type[:80]!r}, want {PAYLOAD_TYPE}")
    return parsed


# -- what was signed -------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        # Two readers could pick different values for one key.
        raise ValueError("duplicate key in the statement")
    return dict(pairs)


def _relative(name: object, what: str) -> str:
    """A canonical relative POSIX path that stays in the tree."""
    if not isinstance(name, str) or not name:
        raise _malformed(f"{what} is not a path")
    try:
        # A file name that is not UTF-8 is listed surrogate-escaped; any other
        # lone surrogate (JSON's \ud800) names no file.
        encoded = name.encode(errors="surrogateescape")
    except UnicodeEncodeError:
        raise _malformed(f"{what} {_show(name)} is not a file name") from None
    parts = name.split("/")
    if (
        len(encoded) > MAX_NAME_BYTES
        or "\x00" in name
        or any(p in ("", ".", "..") for p in parts)
        or any(len(p.encode(errors="surrogateescape")) > MAX_COMPONENT_BYTES for p in parts)
    ):
        raise _malformed(f"{what} {_show(name)} is not a relative path inside the model")
    return name


def _show(name: str) -> str:
    """A file name for a one-line message: escaped, bounded."""
    text = name if len(name) <= 160 else name[:150] + "..." + name[-7:]
    return ascii(text) if not text.isprintable() or "'" in text else f"'{text}'"


def parse_statement(payload: bytes) -> Statement:
    """The signed in-toto statement: model-signing's v1.0 predicate, checked
    field by field (it is authenticated, but a trusted signer's tool can still
    write nonsense, and the names end up as paths)."""
    try:
        doc = json.loads(payload, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise _malformed(f"the signed statement is not JSON ({str(exc)[:80]})") from None
    doc = _table(doc, "the statement")
    if doc.get("_type") != STATEMENT_TYPE:
        raise _malformed(f"not an in-toto statement (_type {str(doc.get('_type'))[:80]!r})")
    predicate_type = doc.get("predicateType")
    if predicate_type == PREDICATE_TYPE_V01:
        raise _malformed("made by model-signing 0.2 (predicate v0.1); re-sign with 1.0 or later")
    if predicate_type != PREDICATE_TYPE:
        raise _malformed(f"predicate type {str(predicate_type)[:80]!r}, want {PREDICATE_TYPE}")
    predicate = _table(doc.get("predicate"), "the predicate")
    serialization = _serialization(_table(predicate.get("serialization"), "serialization"))
    resources = _resources(predicate.get("resources"), serialization)
    _check_root_digest(doc.get("subject"), predicate["resources"])
    return Statement(serialization, resources)


def _serialization(args: dict[str, Any]) -> Serialization:
    method = args.get("method")
    if method not in ("files", "shards"):
        raise _malformed(f"unknown serialization method {str(method)[:40]!r}")
    hash_name = HASH_TYPES.get(str(args.get("hash_type")))
    if hash_name is None:
        raise _malformed(f"unknown hash type {str(args.get('hash_type'))[:40]!r}")
    shard_size = 0
    if method == "shards":
        raw = args.get("shard_size")
        # model-signing writes the statement through a protobuf Struct, whose
        # numbers are doubles: 1000000000 arrives as 1000000000.0.
        if isinstance(raw, float) and raw.is_integer():
            raw = int(raw)
        if isinstance(raw, bool) or not isinstance(raw, int) or not 0 < raw <= MAX_SHARD_SIZE:
            raise _malformed(f"shard size {str(raw)[:40]!r} is not a positive integer")
        shard_size = raw
        if hash_name == "blake3":
            # model-signing hashes BLAKE3 by whole files, whatever was asked.
            raise _malformed("BLAKE3 shards are not something model-signing writes")
    allow_symlinks = args.get("allow_symlinks")
    if not isinstance(allow_symlinks, bool):
        raise _malformed("serialization.allow_symlinks is not true or false")
    ignore = args.get("ignore_paths", [])
    if not isinstance(ignore, list) or len(ignore) > MAX_IGNORE_PATHS:
        raise _malformed(f"ignore_paths is not a list of at most {MAX_IGNORE_PATHS} paths")
    return Serialization(
        method=method,
        hash_name=hash_name,
        shard_size=shard_size,
        allow_symlinks=allow_symlinks,
        ignore_paths=tuple(_relative(p, "an ignored path") for p in ignore),
    )


def _resources(entries: object, serialization: Serialization) -> dict[str, str]:
    if not isinstance(entries, list) or not entries:
        raise _malformed("the signature lists no files")
    if len(entries) > MAX_RESOURCES:
        raise _malformed(f"the signature lists {len(entries)} resources; at most {MAX_RESOURCES}")
    algorithm = serialization.algorithm
    digest_hex = 2 * DIGEST_BYTES[serialization.hash_name]
    resources: dict[str, str] = {}
    for entry in entries:
        entry = _table(entry, "a resource")
        name = entry.get("name")
        if not isinstance(name, str):
            raise _malformed("a resource has no name")
        if serialization.method == "shards":
            _shard(name, serialization.shard_size)
        else:
            _relative(name, "a signed file")
        if entry.get("algorithm") != algorithm:
            raise _malformed(
                f"resource {_show(name)} is hashed with {str(entry.get('algorithm'))[:40]!r}, "
                f"but the serialization says {algorithm}"
            )
        digest = entry.get("digest")
        if not isinstance(digest, str) or len(digest) != digest_hex or not _is_hex(digest):
            raise _malformed(f"resource {_show(name)} has no {algorithm} digest")
        if name in resources:
            raise _malformed(f"resource {_show(name)} is listed twice")
        resources[name] = digest.lower()
    return resources


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def _shard(name: str, shard_size: int) -> tuple[str, int, int]:
    """ "path:start:end" (the path may hold colons of its own)."""
    path, _, rest = name.rpartition(":")
    path, _, first = path.rpartition(":")
    try:
        start, end = int(first), int(rest)
    except ValueError:
        raise _malformed(f"shard {_show(name)} is not path:start:end") from None
    if not 0 <= start < end or end - start > shard_size or start % shard_size:
        raise _malformed(f"shard {_show(name)} does not fit shards of {shard_size} bytes")
    return _relative(path, "a signed file"), start, end


def _check_root_digest(subjects: object, resources: list[Any]) -> None:
    """The subject's sha256 is over the resources' digests in the listed order
    (model-signing's check too): a statement that disagrees with itself is refused."""
    if not isinstance(subjects, list) or len(subjects) != 1:
        raise _malformed("the statement needs exactly one subject")
    digest = _table(_table(subjects[0], "the subject").get("digest"), "the subject digest")
    root = hashlib.sha256(b"".join(bytes.fromhex(r["digest"]) for r in resources)).hexdigest()
    if str(digest.get("sha256", "")).lower() != root:
        raise _malformed("the subject digest does not match the listed files")


# -- the tree --------------------------------------------------------------------


def _differs(text: str) -> SignatureRejected:
    return SignatureRejected(f"model files differ from the signature: {text}", RANK_OTHER_DIGEST)


def walk(tree: Path, allow_symlinks: bool) -> dict[str, int]:
    """Every file of the tree with its size, as model-signing lists them: regular
    files, and (when the signer allowed links) links to files in the tree.

    Links are never followed out of the tree: not by this walk, and they are
    refused before model-signing, which follows them, gets to hash anything.
    Directories behind links are not entered (model-signing's glob does not
    either).
    """
    root = os.path.realpath(tree)
    files: dict[str, int] = {}
    stack: list[tuple[str, str]] = [("", str(tree))]
    seen = 0
    while stack:
        prefix, directory = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                seen += 1
                if seen > MAX_TREE_ENTRIES:
                    raise _differs(f"more than {MAX_TREE_ENTRIES} files and directories")
                name = prefix + entry.name
                if len(name.encode(errors="surrogateescape")) > MAX_NAME_BYTES:
                    raise _differs(f"path {_show(name)} is longer than {MAX_NAME_BYTES} bytes")
                if entry.is_symlink():
                    size = _link(entry.path, name, root, allow_symlinks)
                    if size is not None:
                        files[name] = size
                elif entry.is_dir(follow_symlinks=False):
                    stack.append((name + "/", entry.path))
                elif entry.is_file(follow_symlinks=False):
                    files[name] = entry.stat(follow_symlinks=False).st_size
                else:
                    raise _differs(f"{_show(name)} is not a regular file or directory")
    return files


def _link(path: str, name: str, root: str, allow_symlinks: bool) -> int | None:
    """A link's file size, None for a link to a directory; refused when it leaves
    the tree, dangles, or the signer did not allow links."""
    target = os.readlink(path)
    resolved = os.path.realpath(path)
    # An absolute target resolves elsewhere in the pod than on the node, so
    # it is refused even when it happens to land in the tree here.
    if os.path.isabs(target) or not (resolved == root or resolved.startswith(root + os.sep)):
        raise _differs(f"{_show(name)} is a link out of the model ({_show(target)}); refused")
    if not allow_symlinks:
        raise _differs(f"{_show(name)} is a link, and the model was signed without links")
    try:
        info = os.stat(resolved)
    except OSError:
        raise _differs(f"{_show(name)} is a dangling link") from None
    if stat.S_ISDIR(info.st_mode):
        return None
    if not stat.S_ISREG(info.st_mode):
        raise _differs(f"{_show(name)} links to something that is not a regular file")
    return info.st_size


def _ignored(name: str, ignore: set[str]) -> bool:
    """model-signing's rule: a path at or under an ignored path (lexically).
    Both sides are canonical, so the name's ancestors are looked up in a set."""
    parts = name.split("/")
    return any("/".join(parts[:i]) in ignore for i in range(1, len(parts) + 1))


def _expected_keys(files: dict[str, int], serialization: Serialization) -> set[str]:
    """The resource names the tree's files would have, from names and sizes alone."""
    if serialization.method == "files":
        return set(files)
    keys: set[str] = set()
    step = serialization.shard_size
    for name, size in files.items():
        # An empty file has no shards, so model-signing's shard method does
        # not record it: it can appear or vanish unnoticed.
        keys.update(f"{name}:{s}:{min(s + step, size)}" for s in range(0, size, step))
    return keys


def _first_difference(found: Iterable[str], signed: Iterable[str], method: str) -> str | None:
    """The message for the first name (in order) that is only on one side."""
    found_set, signed_set = set(found), set(signed)
    only = sorted(found_set ^ signed_set)
    if not only:
        return None
    key = only[0]
    path = _path_of(key, method)
    if method == "shards" and path in {_path_of(k, method) for k in found_set} & {
        _path_of(k, method) for k in signed_set
    }:
        return f"{_show(path)} has a different size than when signed"
    if key in found_set:
        return f"{_show(path)} is not signed (added after signing)"
    return f"{_show(path)} is signed but missing"


def _path_of(key: str, method: str) -> str:
    """The file a resource name is about ("path:start:end" for shards)."""
    return key.rsplit(":", 2)[0] if method == "shards" else key


def hash_tree(tree: Path, serialization: Serialization, ignore: Iterable[str]) -> dict[str, str]:
    """The tree's resources and digests, hashed by model-signing as configured
    by the signed serialization (its parallel path: a thread per file or shard)."""
    # Imported here: model-signing pulls in sigstore and OpenSSL (0.3 s), which
    # a node whose policy has no model-signing rule never needs.
    from model_signing import hashing

    # model-signing's defaults otherwise: threads from concurrent.futures (a
    # file or shard each; 1 GiB hashes in 0.75 s as one file, 0.4 s as eight
    # files or four shards on 2 cores) and 1 MiB reads (8 MiB measured no faster).
    config = hashing.Config()  # type: ignore[no-untyped-call]
    if serialization.method == "shards":
        config.use_shard_serialization(
            hashing_algorithm=serialization.hash_name, shard_size=serialization.shard_size
        )
    else:
        config.use_file_serialization(hashing_algorithm=serialization.hash_name)
    # Exactly the signed ignore list: model-signing's verifier adds the git
    # paths again by default, which would skip files the signer hashed.
    config.set_ignored_paths(paths=list(ignore), ignore_git_paths=False)
    config.set_allow_symlinks(serialization.allow_symlinks)
    try:
        manifest = config.hash(tree)
    except ValueError as exc:  # a link or special file the walk did not see
        raise _differs(str(exc).splitlines()[0][:200]) from None
    found: dict[str, str] = {}
    for resource in manifest.resource_descriptors():
        if resource.digest.algorithm != serialization.algorithm:
            raise _differs(f"{_show(resource.identifier)} was hashed with another algorithm")
        found[resource.identifier] = resource.digest.digest_hex
    return found


def check_tree(
    tree: Path, statement: Statement, signature_name: str, *, partial: bool = False
) -> None:
    """SignatureRejected naming the first file that is added, missing or changed.

    `partial`: the tree is a partial pull (the volume's `include`): signed
    files it left out are not missing, but every file it has must be signed
    and unchanged.
    """
    serialization = statement.serialization
    ignore = list(serialization.ignore_paths)
    signed_paths = {_path_of(k, serialization.method) for k in statement.resources}
    # The bundle shipped in the tree cannot be in its own manifest; it is
    # skipped even when the signer wrote it elsewhere (then it is not in the
    # signed ignore list). A signed file of that name is still checked.
    if signature_name not in signed_paths:
        ignore.append(_relative(signature_name, "the signature's name"))
    ignored = set(ignore)
    files = {
        name: size
        for name, size in walk(tree, serialization.allow_symlinks).items()
        if not _ignored(name, ignored)
    }
    method = serialization.method
    resources = statement.resources
    if partial:
        resources = {k: v for k, v in resources.items() if _path_of(k, method) in files}
    problem = _first_difference(_expected_keys(files, serialization), resources, method)
    if problem:
        raise _differs(problem)
    found = hash_tree(tree, serialization, ignore)
    problem = _first_difference(found, resources, method)
    if problem:
        raise _differs(problem)
    for key in sorted(resources):
        if found[key] != resources[key]:
            raise _differs(f"{_show(_path_of(key, method))} has different content than when signed")


# -- all together ----------------------------------------------------------------


def verify_model_tree(
    tree: Path,
    data: bytes,
    requirement: Requirement,
    *,
    source: str,
    signature_name: str = SIGNATURE_NAME,
    partial: bool = False,
) -> Verified:
    """Whether `data` (a model-signing `model.sig` bundle) is signed by what
    `requirement` trusts and names exactly the files of `tree`.

    The signature is checked before the statement is read and before a byte of
    the tree is hashed; SignatureRejected (with a rank, see trust.py) says why not.
    OSError from reading the tree is left to the caller: it is the node's
    problem, not the signature's.
    """
    parsed = parse_bundle(data)
    assert parsed.envelope is not None
    signer = bundle.authenticate(parsed, requirement, "model signature")
    payload = parsed.envelope.payload
    statement = parse_statement(payload)
    check_tree(tree, statement, signature_name, partial=partial)
    return Verified(
        kind=KIND,
        signer=signer,
        digest="sha256:" + hashlib.sha256(payload).hexdigest(),
        source=source,
    )
