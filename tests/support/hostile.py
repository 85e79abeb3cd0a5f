"""Hostile lazy layers: real blobs from the reference writers, with a TOC an attacker edited.

A pod author builds the image, so they write the TOC. These helpers take a
blob written by estargz-gen (stargz-snapshotter's writer) or skopeo
(containers/storage's), decode its TOC, let a test edit the JSON, and
re-seal it the way an attacker would: the TOC digest annotation (or the
containers/storage manifest checksum) is recomputed, so the layer still
passes the driver's trust check and the edited fields reach the code under
test. The payload bytes before the TOC are kept as the writer made them.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import zstandard

from .images import sha256_digest
from .lazyfixtures import (
    TOC_DIGEST,
    ZSTD_MANIFEST_CHECKSUM,
    ZSTD_MANIFEST_POSITION,
    LazyBlob,
    decompress,
    parse_manifest_position,
)
from .registry import Registry

TocEdit = Callable[[dict[str, Any]], None]
ESTARGZ_FOOTER = 51


def _estargz_toc_offset(blob: bytes) -> int:
    footer = blob[-ESTARGZ_FOOTER:]
    return int(footer[16:32].decode("ascii"), 16)


def estargz_toc(blob: bytes) -> dict[str, Any]:
    """The TOC JSON of an eStargz blob (51-byte footer)."""
    member = blob[_estargz_toc_offset(blob) : -ESTARGZ_FOOTER]
    raw = zlib.decompressobj(wbits=31).decompress(member)
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        info = tf.next()
        assert info is not None and info.name == "stargz.index.json"
        src = tf.extractfile(info)
        assert src is not None
        return json.loads(src.read())


def _toc_member(toc_json: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc_json)
        tf.addfile(info, io.BytesIO(toc_json))
    return gzip.compress(buf.getvalue(), mtime=0)


def rewrite_estargz_toc(
    lazy: LazyBlob, edit: TocEdit, *, raw_json: bytes | None = None
) -> LazyBlob:
    """The eStargz blob with its TOC edited and re-sealed (new TOC digest annotation).

    `raw_json`, when given, replaces the TOC bytes outright (for malformed or
    oversized TOCs); otherwise `edit` changes the parsed TOC in place.
    """
    blob = lazy.blob
    offset = _estargz_toc_offset(blob)
    if raw_json is None:
        toc = estargz_toc(blob)
        edit(toc)
        raw_json = json.dumps(toc).encode()
    # The footer names the TOC's offset, which does not move: keep it.
    new_blob = blob[:offset] + _toc_member(raw_json) + blob[-ESTARGZ_FOOTER:]
    return _resealed(lazy, new_blob, {TOC_DIGEST: sha256_digest(raw_json)}, raw_json)


def containers_toc(blob: bytes, annotations: dict[str, str]) -> dict[str, Any]:
    offset, length, _, _ = parse_manifest_position(annotations[ZSTD_MANIFEST_POSITION])
    return json.loads(
        zstandard.ZstdDecompressor().decompressobj().decompress(blob[offset : offset + length])
    )


def rewrite_containers_toc(
    lazy: LazyBlob, edit: TocEdit, *, raw_json: bytes | None = None
) -> LazyBlob:
    """A skopeo zstd:chunked blob with its TOC edited; checksum and position re-annotated.

    The TOC frame is a zstd skippable frame (magic 0x184D2A50, 4-byte length)
    whose payload is a zstd frame of the JSON; the driver finds it by the
    `manifest-position` annotation and trusts it by `manifest-checksum`.
    """
    blob, annotations = lazy.blob, lazy.annotations
    offset, length, _, kind = parse_manifest_position(annotations[ZSTD_MANIFEST_POSITION])
    if raw_json is None:
        toc = containers_toc(blob, annotations)
        edit(toc)
        raw_json = json.dumps(toc).encode()
    compressed = zstandard.ZstdCompressor().compress(raw_json)
    frame = b"\x50\x2a\x4d\x18" + len(compressed).to_bytes(4, "little") + compressed
    tail = blob[offset + length :]  # the footer: a fallback only, not read when annotated
    new_blob = blob[: offset - 8] + frame + tail
    new_annotations = {
        ZSTD_MANIFEST_CHECKSUM: sha256_digest(compressed),
        ZSTD_MANIFEST_POSITION: f"{offset}:{len(compressed)}:{len(raw_json)}:{kind}",
    }
    return _resealed(lazy, new_blob, new_annotations, raw_json)


def _resealed(
    lazy: LazyBlob, blob: bytes, annotations: dict[str, str], toc_json: bytes
) -> LazyBlob:
    merged = {**lazy.annotations, **annotations}
    diff_id = sha256_digest(decompress(blob, lazy.media_type))
    return replace(
        lazy,
        blob=blob,
        digest=sha256_digest(blob),
        toc_digest=sha256_digest(toc_json),
        diff_id=diff_id,
        annotations=merged,
        producer=f"{lazy.producer} (TOC edited)",
    )


def toc_entry(toc: dict[str, Any], name: str) -> dict[str, Any]:
    """The first TOC entry for `name` (eStargz names may start with './')."""
    for entry in toc["entries"]:
        if entry.get("name", "").removeprefix("./") == name:
            return entry
    raise KeyError(name)


__all__ = [
    "containers_toc",
    "estargz_toc",
    "image_config",
    "image_manifest",
    "push_manifest",
    "rewrite_containers_toc",
    "rewrite_estargz_toc",
    "toc_entry",
]


# -- manifests that lie -------------------------------------------------------------------------


def push_manifest(
    registry: Registry,
    repo_tag: str,
    manifest: dict[str, Any],
    blobs: list[bytes],
    media_type: str = "application/vnd.oci.image.manifest.v1+json",
) -> str:
    """Upload `blobs` and PUT `manifest` as written, whatever its descriptors claim.

    skopeo and oras check sizes before pushing; an attacker does not, and a
    registry stores a manifest whose descriptor sizes lie (it checks only
    that the blobs exist). Returns the manifest digest.
    """
    from .lazyfixtures import _upload_blob

    repo, _, tag = repo_tag.rpartition(":")
    for data in blobs:
        _upload_blob(registry, repo, data)
    body = json.dumps(manifest).encode()
    resp = registry.request(
        "PUT", f"/v2/{repo}/manifests/{tag}", data=body, headers={"Content-Type": media_type}
    )
    if resp.status_code != 201:
        raise RuntimeError(f"manifest PUT {repo_tag}: {resp.status_code} {resp.text}")
    return sha256_digest(body)


def image_manifest(config: bytes, layers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256_digest(config),
            "size": len(config),
        },
        "layers": layers,
    }


def image_config(diff_ids: list[str]) -> bytes:
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
