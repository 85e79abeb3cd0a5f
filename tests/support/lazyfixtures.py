"""Lazy-pull layer fixtures (eStargz, zstd:chunked) written by the reference tools.

Nothing here encodes either format itself: the blobs come from

* ``.cache/bin/estargz-gen`` (hack/tools/estargz-gen, built by
  hack/install-deps): our small CLI around
  ``github.com/containerd/stargz-snapshotter/estargz`` v0.19.1 ``Build``, for
  eStargz (gzip) and stargz-snapshotter's zstd:chunked dialect (an eStargz TOC
  in a zstd skippable frame + the 40-byte ``GnUlInUx`` footer);
* ``skopeo copy --dest-compress-format zstd:chunked`` (Debian skopeo 1.9.3,
  containers/image 5.23 + containers/storage 1.43): the containers/storage
  dialect, legacy layout (40-byte footer, ``io.containers.zstd-chunked.*``
  annotations, no tar-split).

Helpers: ``make_layer_tar`` (a tar of files/dirs/links), ``estargz_blob``,
``skopeo_zstd_chunked`` (both return a :class:`LazyBlob`) and
``push_lazy_image`` (an OCI image of LazyBlobs pushed over the distribution
HTTP API, so the layer annotations are exactly the ones given).

What the producers do (checked by tests/test_lazyfixtures.py):

* estargz-gen, eStargz: media type ``...tar+gzip``; annotations
  ``containerd.io/snapshot/stargz/toc.digest`` (sha256 of the *uncompressed*
  TOC JSON) and ``io.containers.estargz.uncompressed-size`` (decimal size of
  the decompressed blob), exactly what stargz-snapshotter's
  ``nativeconverter/estargz`` sets.  ``Build`` rewrites the tar: a landmark
  entry is inserted (``.prefetch.landmark`` after the prioritized files, or
  ``.no.prefetch.landmark`` first when none are given), the TOC
  ``stargz.index.json`` is the last tar entry, so ``diff_id`` is *not* the
  digest of the input tar.  Names are kept as in the input tar (``./``
  prefixes stay, directories end in ``/``).  51-byte footer.
* estargz-gen, zstdchunked: media type ``...tar+zstd``; the two annotations
  above plus ``io.containers.zstd-chunked.manifest-checksum`` (sha256 of the
  *compressed* TOC frame payload) and ``...manifest-position``
  (``offset:compressedLen:uncompressedLen:1``), as ``nativeconverter/zstdchunked``
  sets them (taken from the ``zstdchunked.Compressor.Metadata`` map, the same
  map the converter reads).  The TOC is *not* a tar entry here; the tar still
  gets the landmark entry.
* skopeo: media type ``...tar+zstd``; only the ``manifest-checksum`` and
  ``manifest-position`` annotations (no TOC-digest annotation); the TOC JSON is
  the containers/storage schema (``type``, ``name``, ``mode``, ``size``,
  ``modtime``, ``accesstime``, ``changetime``, ``digest``, ``offset``,
  ``endOffset``; empty files have no ``digest``).  The decompressed stream is
  the input tar byte for byte *up to and including the end-of-archive blocks*;
  anything after them (Python's tarfile pads to a 10240-byte record) is
  dropped, so the layer's real diffID differs from the input tar's digest
  unless the tar ends right after its two zero blocks, which is what
  ``make_layer_tar`` produces (skopeo still copies the *source* config, whose
  diff_id is then wrong).  Uncompressed, gzip and zstd sources all come out as
  the same zstd:chunked blob.

``LazyBlob.toc_digest`` is always the sha256 of the uncompressed TOC JSON
(for skopeo blobs computed here from ``manifest-position``, since skopeo does
not annotate it); ``diff_id`` is always the sha256 of the decompressed blob.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import zstandard

from .images import (
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_LAYER_ZSTD,
    MEDIA_TYPE_MANIFEST,
    Dir,
    Entry,
    File,
    Hardlink,
    Image,
    Layer,
    Symlink,
    build_tar,
    canonical_json,
    sha256_digest,
    write_oci_layout,
)
from .registry import Registry, ToolMissingError, find_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
ESTARGZ_GEN = REPO_ROOT / ".cache" / "bin" / "estargz-gen"
ESTARGZ_GEN_HINT = "run hack/install-deps to build .cache/bin/estargz-gen"

TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
ZSTD_MANIFEST_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
ZSTD_MANIFEST_POSITION = "io.containers.zstd-chunked.manifest-position"

TIMEOUT = 120.0

LazyFormat = Literal["estargz", "zstdchunked"]


@dataclass(frozen=True, eq=False)
class LazyBlob:
    """A lazy-format layer blob plus what its layer descriptor carries."""

    blob: bytes
    digest: str
    toc_digest: str  # sha256 of the uncompressed TOC JSON
    diff_id: str  # sha256 of the decompressed blob (what config rootfs.diff_ids needs)
    annotations: dict[str, str]
    media_type: str
    producer: str = ""  # "estargz-gen estargz", "estargz-gen zstdchunked", "skopeo zstd:chunked"
    uncompressed_size: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # raw producer output (estargz-gen JSON)

    @property
    def size(self) -> int:
        return len(self.blob)

    def descriptor(self) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            desc["annotations"] = dict(self.annotations)
        return desc

    def __repr__(self) -> str:
        return f"<LazyBlob {self.producer} {self.digest[:19]} {self.size}B>"


# -- tars -----------------------------------------------------------------------


def tar_end(tar_bytes: bytes) -> int:
    """Offset just past the end-of-archive marker (two zero blocks) of a tar."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tf:
        end = 0
        for member in tf.getmembers():
            end = max(end, member.offset_data + -(-member.size // 512) * 512)
    return end + 1024


def trim_tar(tar_bytes: bytes) -> bytes:
    """The tar without the record padding after its end-of-archive blocks."""
    end = tar_end(tar_bytes)
    if end > len(tar_bytes) or any(tar_bytes[end - 1024 : end]):
        raise ValueError("tar has no end-of-archive marker where expected")
    return tar_bytes[:end]


def make_layer_tar(
    files: Mapping[str, bytes],
    dirs: Iterable[str] = (),
    symlinks: Mapping[str, str] | None = None,
    hardlinks: Mapping[str, str] | None = None,
    *,
    trim: bool = True,
) -> bytes:
    """A PAX tar (support.images.build_tar): dirs, then files, symlinks, hardlinks.

    ``symlinks``/``hardlinks`` map link path -> target (a hardlink target must
    be one of ``files``).  No parent directories are added implicitly.  With
    ``trim`` (default) the tar ends right after its end-of-archive blocks, so
    skopeo's zstd:chunked output decompresses to exactly these bytes.
    """
    entries: list[Entry] = [Dir(d) for d in dirs]
    entries += [File(path, data) for path, data in files.items()]
    entries += [Symlink(path, target) for path, target in (symlinks or {}).items()]
    entries += [Hardlink(path, target) for path, target in (hardlinks or {}).items()]
    tar_bytes = build_tar(entries)
    return trim_tar(tar_bytes) if trim else tar_bytes


def decompress(blob: bytes, media_type: str) -> bytes:
    """Whole-layer decompression: every gzip member / every zstd frame (skippable ones skipped)."""
    if media_type.endswith("+gzip"):
        return gzip.decompress(blob)
    if media_type.endswith("+zstd"):
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(blob), read_across_frames=True
        )
        return reader.read()
    return blob


# -- estargz-gen ----------------------------------------------------------------


def estargz_gen() -> str:
    if not (ESTARGZ_GEN.is_file() and os.access(ESTARGZ_GEN, os.X_OK)):
        raise ToolMissingError(f"{ESTARGZ_GEN} not found; {ESTARGZ_GEN_HINT}")
    return str(ESTARGZ_GEN)


def estargz_blob(
    tar_bytes: bytes,
    workdir: Path | str,
    fmt: LazyFormat = "estargz",
    chunk_size: int | None = None,
    min_chunk_size: int | None = None,
    prioritized: Sequence[str] = (),
    level: int | None = None,
    *,
    parallelism: int | None = None,
) -> LazyBlob:
    """Convert a layer tar with estargz.Build (via estargz-gen).

    ``level`` is the gzip level (library default 9) or the zstd level (default
    3, what stargz-snapshotter's converter uses).  ``parallelism`` pins
    ``estargz.WithParallelism`` (default: GOMAXPROCS, so member boundaries of
    big inputs can differ between machines).  Prioritized files missing from
    the tar are allowed (``info["missedPrioritized"]`` lists them).
    """
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    stem = f"estargz-{fmt}-{uuid.uuid4().hex[:12]}"
    src, out = work / f"{stem}.tar", work / f"{stem}.blob"
    src.write_bytes(tar_bytes)
    cmd = [estargz_gen(), "-in", str(src), "-out", str(out), "-format", fmt]
    if chunk_size is not None:
        cmd += ["-chunk-size", str(chunk_size)]
    if min_chunk_size is not None:
        cmd += ["-min-chunk-size", str(min_chunk_size)]
    if prioritized:
        if any("," in p for p in prioritized):
            raise ValueError("estargz-gen -prioritized cannot take names containing ','")
        cmd += ["-prioritized", ",".join(prioritized)]
    if level is not None:
        cmd += ["-level", str(level)]
    if parallelism is not None:
        cmd += ["-parallelism", str(parallelism)]
    proc = subprocess.run(
        cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr.decode(errors='replace')}"
        )
    info = json.loads(proc.stdout)
    blob = out.read_bytes()
    digest = sha256_digest(blob)
    if digest != info["digest"] or len(blob) != info["size"]:
        raise RuntimeError(f"estargz-gen reported {info['digest']}, file is {digest}")
    return LazyBlob(
        blob=blob,
        digest=digest,
        toc_digest=info["tocDigest"],
        diff_id=info["diffID"],
        annotations=dict(info["annotations"]),
        media_type=info["mediaType"],
        producer=f"estargz-gen {fmt}",
        uncompressed_size=int(info["uncompressedSize"]),
        info=info,
    )


# -- skopeo ---------------------------------------------------------------------


def parse_manifest_position(value: str) -> tuple[int, int, int, int]:
    """``offset:compressedLen:uncompressedLen:manifestType`` as ints."""
    parts = [int(p) for p in value.split(":")]
    if len(parts) != 4:
        raise ValueError(f"bad manifest-position {value!r}")
    return parts[0], parts[1], parts[2], parts[3]


def skopeo_zstd_chunked(
    source: bytes | Mapping[str, bytes] | Sequence[Entry], workdir: Path | str
) -> LazyBlob:
    """Let skopeo 1.9.3 write a zstd:chunked layer.

    ``source`` is a tar (bytes), a ``{path: data}`` dict (``make_layer_tar``)
    or support.images entries (``build_tar``, trimmed).  It becomes the only,
    uncompressed layer of an OCI layout, which ``skopeo copy
    --dest-compress-format zstd:chunked oci:SRC:t oci:DST:t`` recompresses; the
    returned blob, media type and annotations are read from DST.
    """
    if isinstance(source, bytes):
        tar_bytes = source
    elif isinstance(source, Mapping):
        tar_bytes = make_layer_tar(source)
    else:
        tar_bytes = trim_tar(build_tar(source))
    work = Path(workdir)
    stem = f"skopeo-{uuid.uuid4().hex[:12]}"
    src, dst = work / f"{stem}-src", work / f"{stem}-dst"
    write_oci_layout(src, Image([Layer.from_tar(tar_bytes, compression="none")]), "t")
    auth = work / f"{stem}-auth.json"
    auth.write_text('{"auths":{}}')
    cmd = [
        find_tool("skopeo"),
        "--insecure-policy",
        "copy",
        "-q",
        "--dest-compress-format",
        "zstd:chunked",
        f"oci:{src}:t",
        f"oci:{dst}:t",
    ]
    env = dict(os.environ, REGISTRY_AUTH_FILE=str(auth))
    proc = subprocess.run(
        cmd, capture_output=True, env=env, stdin=subprocess.DEVNULL, timeout=TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr.decode(errors='replace')}"
        )

    def read_blob(digest: str) -> bytes:
        return (dst / "blobs" / digest.replace(":", "/")).read_bytes()

    index = json.loads((dst / "index.json").read_text())
    manifest = json.loads(read_blob(index["manifests"][0]["digest"]))
    (layer,) = manifest["layers"]
    blob = read_blob(layer["digest"])
    annotations = dict(layer.get("annotations", {}))
    media_type = layer["mediaType"]
    toc_digest = ""
    if ZSTD_MANIFEST_POSITION in annotations:
        offset, length, _, _ = parse_manifest_position(annotations[ZSTD_MANIFEST_POSITION])
        dctx = zstandard.ZstdDecompressor()
        toc_json = dctx.decompressobj().decompress(blob[offset : offset + length])
        toc_digest = sha256_digest(toc_json)
    tar_out = decompress(blob, media_type)
    config = json.loads(read_blob(manifest["config"]["digest"]))
    return LazyBlob(
        blob=blob,
        digest=sha256_digest(blob),
        toc_digest=toc_digest,
        diff_id=sha256_digest(tar_out),
        annotations=annotations,
        media_type=media_type,
        producer="skopeo zstd:chunked",
        uncompressed_size=len(tar_out),
        info={
            "manifest": manifest,
            "config_diff_ids": config["rootfs"]["diff_ids"],
            "source_diff_id": sha256_digest(tar_bytes),
        },
    )


# -- push -------------------------------------------------------------------------


class PushedLazyImage(NamedTuple):
    reference: str  # host/repo:tag
    digest: str  # manifest digest
    manifest: dict[str, Any]
    config: dict[str, Any]


def push_lazy_image(
    registry: Registry,
    layers: Sequence[LazyBlob],
    repo_tag: str,
    workdir: Path | str,
    *,
    annotations: Mapping[str, str] | None = None,
) -> PushedLazyImage:
    """Push an OCI image of ``layers`` with blob uploads and a manifest PUT.

    Config ``rootfs.diff_ids`` are the blobs' diff_ids; layer descriptors carry
    each blob's media type and annotations unchanged (skopeo would not
    necessarily keep them).  The config and manifest are also written to
    ``workdir`` for inspection.
    """
    repo, _, tag = repo_tag.rpartition(":")
    if not repo or not tag:
        raise ValueError(f"repo_tag must be repo:tag, got {repo_tag!r}")
    config: dict[str, Any] = {
        "created": "2023-11-14T22:13:20Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created_by": f"csi-oci tests: {layer.producer}"} for layer in layers],
    }
    config_bytes = canonical_json(config)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": {
            "mediaType": MEDIA_TYPE_CONFIG,
            "digest": sha256_digest(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [layer.descriptor() for layer in layers],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    manifest_bytes = canonical_json(manifest)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    stem = f"lazy-image-{uuid.uuid4().hex[:12]}"
    (work / f"{stem}-config.json").write_bytes(config_bytes)
    (work / f"{stem}-manifest.json").write_bytes(manifest_bytes)

    for data in [config_bytes, *(layer.blob for layer in layers)]:
        _upload_blob(registry, repo, data)
    resp = registry.request(
        "PUT",
        f"/v2/{repo}/manifests/{tag}",
        data=manifest_bytes,
        headers={"Content-Type": MEDIA_TYPE_MANIFEST},
    )
    if resp.status_code != 201:
        raise RuntimeError(f"manifest PUT {repo}:{tag}: {resp.status_code} {resp.text}")
    digest = sha256_digest(manifest_bytes)
    reported = resp.headers.get("Docker-Content-Digest", digest)
    if reported != digest:
        raise RuntimeError(f"registry stored manifest as {reported}, expected {digest}")
    return PushedLazyImage(f"{registry.host}/{repo}:{tag}", digest, manifest, config)


def _upload_blob(registry: Registry, repo: str, data: bytes) -> None:
    """Monolithic upload: POST an upload session, PUT the bytes with ?digest=."""
    digest = sha256_digest(data)
    start = registry.request("POST", f"/v2/{repo}/blobs/uploads/")
    if start.status_code != 202:
        raise RuntimeError(f"blob upload start {repo}: {start.status_code} {start.text}")
    location = start.headers["Location"]
    if "://" in location:
        location = "/" + location.split("://", 1)[1].split("/", 1)[1]
    sep = "&" if "?" in location else "?"
    put = registry.request(
        "PUT",
        f"{location}{sep}digest={digest}",
        data=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    if put.status_code != 201:
        raise RuntimeError(f"blob PUT {digest}: {put.status_code} {put.text}")


__all__ = [
    "MEDIA_TYPE_LAYER_GZIP",
    "MEDIA_TYPE_LAYER_ZSTD",
    "TOC_DIGEST",
    "UNCOMPRESSED_SIZE",
    "ZSTD_MANIFEST_CHECKSUM",
    "ZSTD_MANIFEST_POSITION",
    "LazyBlob",
    "PushedLazyImage",
    "decompress",
    "estargz_blob",
    "make_layer_tar",
    "parse_manifest_position",
    "push_lazy_image",
    "skopeo_zstd_chunked",
    "tar_end",
    "trim_tar",
]
