"""Build OCI images in Python and push them to a test registry with skopeo.

Entry builders (``File``, ``Dir``, ``Symlink``, ``Hardlink``, ``Whiteout``,
``Opaque``, ``Fifo``, ``CharDevice``, ``BlockDevice``, ``Raw``) describe tar
members; ``Layer`` makes a (compressed) tar blob of them in order; ``Image``
makes the config and OCI manifest; ``Index`` an OCI image index;
``write_oci_layout`` writes them as an OCI image layout that
``skopeo copy oci:...`` reads; ``push``/``push_image`` copy that to a registry.

skopeo 1.9.3 behaviour, checked against distribution 2.8 (see
tests/test_support.py):

* Without conversion flags skopeo keeps layers byte for byte when they are
  already compressed (gzip, also multi-member; zstd, also multi-frame), so
  their digests are preserved and the manifest/index is pushed verbatim (same
  digest as built here).  tar+zstd media types are passed through as well.
* An *uncompressed* layer (``application/vnd.oci.image.layer.v1.tar``) is
  gzip-compressed by default when the destination is a registry (the
  ``docker://`` transport asks for compression), which changes the layer
  digest, media type and therefore the manifest digest.  ``--preserve-digests``
  stops that: the blob is then pushed as is.  ``push`` passes
  ``--preserve-digests`` whenever no ``format`` conversion is requested, so
  what the registry holds is exactly what was built here.  (Without it the
  result even depends on registry state: when the uncompressed blob already
  exists on the registry, skopeo reuses it instead of compressing.)
* ``--format v2s2`` converts an OCI manifest to a Docker schema 2 manifest
  (``application/vnd.docker.distribution.manifest.v2+json``, config
  ``application/vnd.docker.container.image.v1+json``, layers
  ``application/vnd.docker.image.rootfs.diff.tar.gzip``).  With ``--all`` an
  OCI index becomes a Docker manifest list
  (``application/vnd.docker.distribution.manifest.list.v2+json``).  Docker
  schema 2 has no zstd layer type: skopeo refuses such images, so give v2s2
  images gzip (or uncompressed, which skopeo gzips) layers.
"""

from __future__ import annotations

import atexit
import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import zstandard

from .registry import DEFAULT, Registry, find_tool

DEFAULT_MTIME = 1_700_000_000  # fixed, so builds are reproducible

MEDIA_TYPE_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

Compression = Literal["none", "gzip", "zstd"]
_LAYER_MEDIA_TYPES: dict[str, str] = {
    "none": MEDIA_TYPE_LAYER,
    "gzip": MEDIA_TYPE_LAYER_GZIP,
    "zstd": MEDIA_TYPE_LAYER_ZSTD,
}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _name(path: str) -> str:
    name = path.lstrip("/")
    if not name:
        raise ValueError(f"empty tar member name from {path!r}")
    return name


def _info(
    path: str, type_: bytes, mode: int, uid: int = 0, gid: int = 0, mtime: int = DEFAULT_MTIME
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(_name(path))
    info.type = type_
    info.mode = mode
    info.uid = uid
    info.gid = gid
    info.mtime = mtime
    return info


Member = tuple[tarfile.TarInfo, bytes | None]


# -- entries -----------------------------------------------------------------


@dataclass(frozen=True)
class File:
    path: str
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME
    xattrs: dict[str, str] = field(default_factory=dict)

    def members(self) -> Iterator[Member]:
        info = _info(self.path, tarfile.REGTYPE, self.mode, self.uid, self.gid, self.mtime)
        info.size = len(self.data)
        if self.xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in self.xattrs.items()}
        yield info, self.data


@dataclass(frozen=True)
class Dir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME

    def members(self) -> Iterator[Member]:
        yield _info(self.path, tarfile.DIRTYPE, self.mode, self.uid, self.gid, self.mtime), None


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME

    def members(self) -> Iterator[Member]:
        info = _info(self.path, tarfile.SYMTYPE, 0o777, self.uid, self.gid, self.mtime)
        info.linkname = self.target
        yield info, None


@dataclass(frozen=True)
class Hardlink:
    """A hard link to ``target``, a path of an earlier member (same layer)."""

    path: str
    target: str
    mtime: int = DEFAULT_MTIME

    def members(self) -> Iterator[Member]:
        info = _info(self.path, tarfile.LNKTYPE, 0o644, mtime=self.mtime)
        info.linkname = _name(self.target)
        yield info, None


@dataclass(frozen=True)
class Whiteout:
    """Deletes ``path`` from lower layers: an empty ``<dir>/.wh.<name>`` file."""

    path: str

    def members(self) -> Iterator[Member]:
        parent, _, base = _name(self.path).rstrip("/").rpartition("/")
        name = f"{parent}/.wh.{base}" if parent else f".wh.{base}"
        info = _info(name, tarfile.REGTYPE, 0o644)
        info.size = 0
        yield info, b""


@dataclass(frozen=True)
class Opaque:
    """Hides all lower-layer content of ``dir``: ``<dir>/.wh..wh..opq``."""

    dir: str

    def members(self) -> Iterator[Member]:
        info = _info(f"{_name(self.dir).rstrip('/')}/.wh..wh..opq", tarfile.REGTYPE, 0o644)
        info.size = 0
        yield info, b""


@dataclass(frozen=True)
class Fifo:
    path: str
    mode: int = 0o644

    def members(self) -> Iterator[Member]:
        yield _info(self.path, tarfile.FIFOTYPE, self.mode), None


@dataclass(frozen=True)
class CharDevice:
    path: str
    major: int
    minor: int
    mode: int = 0o666

    def members(self) -> Iterator[Member]:
        info = _info(self.path, tarfile.CHRTYPE, self.mode)
        info.devmajor, info.devminor = self.major, self.minor
        yield info, None


@dataclass(frozen=True)
class BlockDevice:
    path: str
    major: int
    minor: int
    mode: int = 0o660

    def members(self) -> Iterator[Member]:
        info = _info(self.path, tarfile.BLKTYPE, self.mode)
        info.devmajor, info.devminor = self.major, self.minor
        yield info, None


@dataclass(frozen=True)
class Raw:
    """A hand-made ``tarfile.TarInfo`` (with data for regular files) for odd cases.

    A bare ``TarInfo`` in a layer's entries is wrapped in ``Raw`` automatically.
    ``info.size`` is set from ``data`` when data is given.
    """

    info: tarfile.TarInfo
    data: bytes | None = None

    def members(self) -> Iterator[Member]:
        if self.data is not None:
            self.info.size = len(self.data)
        yield self.info, self.data


Entry = File | Dir | Symlink | Hardlink | Whiteout | Opaque | Fifo | CharDevice | BlockDevice | Raw


def build_tar(entries: Iterable[Entry | tarfile.TarInfo]) -> bytes:
    """A PAX-format tar of the entries, in the order given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            item = Raw(entry) if isinstance(entry, tarfile.TarInfo) else entry
            for info, data in item.members():
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _split(data: bytes, parts: int) -> list[bytes]:
    parts = max(1, min(parts, len(data) or 1))
    size = -(-len(data) // parts) if data else 0
    return [data[i * size : (i + 1) * size] for i in range(parts)] if data else [b""]


def compress(data: bytes, compression: Compression, members: int = 1) -> bytes:
    """Compress; ``members > 1`` concatenates several gzip members / zstd frames."""
    if compression == "none":
        if members != 1:
            raise ValueError("members > 1 needs compression")
        return data
    chunks = _split(data, members)
    if compression == "gzip":
        return b"".join(gzip.compress(c, compresslevel=6, mtime=0) for c in chunks)
    if compression == "zstd":
        cctx = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=True)
        return b"".join(cctx.compress(c) for c in chunks)
    raise ValueError(f"unknown compression {compression!r}")


# -- layers, images, indexes ------------------------------------------------


class Layer:
    """One layer blob.

    ``tar_bytes`` is the uncompressed tar (its digest is ``diff_id``), ``blob``
    the compressed bytes (digest ``digest``, size ``size``).  ``media_type``
    overrides the OCI layer type (e.g. for artifact layers).  Use
    ``Layer.from_tar`` for a hand-made (or deliberately broken) tar stream.
    """

    def __init__(
        self,
        entries: Iterable[Entry | tarfile.TarInfo] = (),
        compression: Compression = "gzip",
        members: int = 1,
        *,
        media_type: str | None = None,
        annotations: dict[str, str] | None = None,
        tar_bytes: bytes | None = None,
    ) -> None:
        self.compression = compression
        self.members = members
        self.tar_bytes = tar_bytes if tar_bytes is not None else build_tar(entries)
        self.blob = compress(self.tar_bytes, compression, members)
        self.digest = sha256_digest(self.blob)
        self.diff_id = sha256_digest(self.tar_bytes)
        self.size = len(self.blob)
        self.media_type = media_type or _LAYER_MEDIA_TYPES[compression]
        self.annotations = dict(annotations or {})

    @classmethod
    def from_tar(
        cls, tar_bytes: bytes, compression: Compression = "gzip", members: int = 1, **kw: Any
    ) -> Layer:
        return cls(compression=compression, members=members, tar_bytes=tar_bytes, **kw)

    def descriptor(self) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            desc["annotations"] = self.annotations
        return desc

    def __repr__(self) -> str:
        return f"<Layer {self.media_type} {self.digest[:19]} {self.size}B>"


class Image:
    """Config + OCI image manifest over some layers."""

    def __init__(
        self,
        layers: Sequence[Layer],
        os: str = "linux",
        architecture: str = "amd64",
        variant: str | None = None,
        config_extra: dict[str, Any] | None = None,
        *,
        annotations: dict[str, str] | None = None,
    ) -> None:
        self.layers = list(layers)
        self.os = os
        self.architecture = architecture
        self.variant = variant
        config: dict[str, Any] = {
            "created": "2023-11-14T22:13:20Z",
            "architecture": architecture,
            "os": os,
            "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in self.layers]},
            "history": [{"created_by": "csi-oci tests"} for _ in self.layers],
        }
        if variant:
            config["variant"] = variant
        config.update(config_extra or {})
        self.config = config
        self.config_bytes = canonical_json(config)
        self.config_digest = sha256_digest(self.config_bytes)
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": {
                "mediaType": MEDIA_TYPE_CONFIG,
                "digest": self.config_digest,
                "size": len(self.config_bytes),
            },
            "layers": [layer.descriptor() for layer in self.layers],
        }
        if annotations:
            manifest["annotations"] = dict(annotations)
        self.manifest = manifest
        self.manifest_bytes = canonical_json(manifest)
        self.manifest_digest = sha256_digest(self.manifest_bytes)
        self.media_type = MEDIA_TYPE_MANIFEST

    @property
    def platform(self) -> dict[str, str]:
        platform = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            platform["variant"] = self.variant
        return platform

    def descriptor(self, *, with_platform: bool = False) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "mediaType": MEDIA_TYPE_MANIFEST,
            "digest": self.manifest_digest,
            "size": len(self.manifest_bytes),
        }
        if with_platform:
            desc["platform"] = self.platform
        return desc

    def blobs(self) -> dict[str, bytes]:
        """Every blob of the image (manifest included) by digest."""
        out = {layer.digest: layer.blob for layer in self.layers}
        out[self.config_digest] = self.config_bytes
        out[self.manifest_digest] = self.manifest_bytes
        return out

    def __repr__(self) -> str:
        return f"<Image {'/'.join(self.platform.values())} {self.manifest_digest[:19]}>"


class Index:
    """An OCI image index over several images (each descriptor has ``platform``)."""

    def __init__(
        self, images: Sequence[Image], *, annotations: dict[str, str] | None = None
    ) -> None:
        self.images = list(images)
        index: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": [img.descriptor(with_platform=True) for img in self.images],
        }
        if annotations:
            index["annotations"] = dict(annotations)
        self.index = index
        self.manifest_bytes = canonical_json(index)
        self.manifest_digest = sha256_digest(self.manifest_bytes)
        self.media_type = MEDIA_TYPE_INDEX

    def descriptor(self) -> dict[str, Any]:
        return {
            "mediaType": MEDIA_TYPE_INDEX,
            "digest": self.manifest_digest,
            "size": len(self.manifest_bytes),
        }

    def blobs(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for img in self.images:
            out.update(img.blobs())
        out[self.manifest_digest] = self.manifest_bytes
        return out


ImageLike = Image | Index | Sequence[Image]


def as_top(image_or_images: ImageLike) -> Image | Index:
    """An Image or Index; a sequence of several images becomes an Index."""
    if isinstance(image_or_images, Image | Index):
        return image_or_images
    images = list(image_or_images)
    if len(images) == 1:
        return images[0]
    return Index(images)


# -- OCI layout, skopeo -------------------------------------------------------


def write_oci_layout(path: Path | str, image_or_images: ImageLike, tag: str) -> dict[str, Any]:
    """Write (or add to) an OCI image layout at ``path`` with ``tag`` naming it.

    Several images are written as an OCI image index, the tagged entry.  An
    existing layout keeps its other tags.  Returns the tagged descriptor.
    """
    root = Path(path)
    blobs_dir = root / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    top = as_top(image_or_images)
    for digest, data in top.blobs().items():
        blob = blobs_dir / digest.partition(":")[2]
        if not blob.exists():
            blob.write_bytes(data)
    desc = top.descriptor()
    desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    index_path = root / "index.json"
    manifests: list[dict[str, Any]] = []
    if index_path.exists():
        manifests = [
            m
            for m in json.loads(index_path.read_text()).get("manifests", [])
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag
        ]
    manifests.append(desc)
    index_path.write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}, indent=2))
    return desc


_EMPTY_AUTH_FILE: Path | None = None


def _empty_auth_file() -> Path:
    global _EMPTY_AUTH_FILE
    if _EMPTY_AUTH_FILE is None or not _EMPTY_AUTH_FILE.exists():
        fd, name = tempfile.mkstemp(prefix="csi-oci-skopeo-auth-", suffix=".json")
        os.write(fd, b'{"auths":{}}')
        os.close(fd)
        atexit.register(os.unlink, name)
        _EMPTY_AUTH_FILE = Path(name)
    return _EMPTY_AUTH_FILE


def _skopeo(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    cmd = [find_tool("skopeo"), "--insecure-policy", *args]
    # Keep skopeo away from any auth file of the user running the tests.
    env = dict(os.environ, REGISTRY_AUTH_FILE=str(_empty_auth_file()))
    proc = subprocess.run(cmd, capture_output=True, env=env, stdin=subprocess.DEVNULL, timeout=300)
    if proc.returncode != 0:
        raise SkopeoError(cmd, proc.returncode, proc.stderr.decode(errors="replace"))
    return proc


class SkopeoError(RuntimeError):
    def __init__(self, cmd: list[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(cmd)} exited {returncode}:\n{stderr.strip()}")
        self.cmd = cmd
        self.returncode = returncode
        self.stderr = stderr


def _host(registry: Registry | str) -> str:
    return registry if isinstance(registry, str) else registry.host


def _creds(registry: Registry | str, creds: tuple[str, str] | None) -> tuple[str, str] | None:
    if creds is DEFAULT:
        return None if isinstance(registry, str) else registry.credentials
    return creds


def push(
    registry: Registry | str,
    layout_path: Path | str,
    tag: str,
    dest_ref: str,
    format: Literal["v2s2", "oci"] | None = None,
    all_platforms: bool = True,
    *,
    creds: tuple[str, str] | None = DEFAULT,
    preserve_digests: bool | None = None,
    extra_args: Sequence[str] = (),
) -> None:
    """``skopeo copy oci:<layout>:<tag> docker://<host>/<dest_ref>``.

    ``creds`` defaults to the registry's own test credentials (None: push
    anonymously).  ``preserve_digests`` defaults to "no format conversion
    asked", so uncompressed layers are not gzipped on the way (see module doc).
    """
    args = ["copy", "--dest-tls-verify=false"]
    if all_platforms:
        args.append("--all")
    if format:
        args += ["--format", format]
    if preserve_digests is None:
        preserve_digests = format is None
    if preserve_digests:
        args.append("--preserve-digests")
    user_pass = _creds(registry, creds)
    if user_pass:
        args += ["--dest-creds", f"{user_pass[0]}:{user_pass[1]}"]
    args += [*extra_args, f"oci:{layout_path}:{tag}", f"docker://{_host(registry)}/{dest_ref}"]
    _skopeo(args)


def inspect_raw(
    registry: Registry | str, ref: str, *, creds: tuple[str, str] | None = DEFAULT
) -> bytes:
    """The raw top-level manifest bytes the registry holds for ``ref`` (via skopeo)."""
    args = ["inspect", "--raw", "--tls-verify=false"]
    user_pass = _creds(registry, creds)
    if user_pass:
        args += ["--creds", f"{user_pass[0]}:{user_pass[1]}"]
    return _skopeo([*args, f"docker://{_host(registry)}/{ref}"]).stdout


def registry_digests(registry: Registry, ref: str) -> dict[str, Any]:
    """What the registry holds for ``repo:tag`` / ``repo@digest``: the top-level
    ``digest`` and ``media_type``, and for an index/list the child ``manifests``
    digests, for an image the ``config`` and ``layers`` digests."""
    repo, reference = _split_ref(ref)
    resp = registry.get_manifest(repo, reference)
    resp.raise_for_status()
    body = resp.json()
    out: dict[str, Any] = {
        "digest": sha256_digest(resp.content),
        "media_type": body.get("mediaType") or resp.headers.get("Content-Type"),
    }
    if "manifests" in body:
        out["manifests"] = [m["digest"] for m in body["manifests"]]
    else:
        out["config"] = body["config"]["digest"]
        out["layers"] = [layer["digest"] for layer in body.get("layers", [])]
    return out


def _split_ref(ref: str) -> tuple[str, str]:
    if "@" in ref:
        repo, _, digest = ref.partition("@")
        return repo, digest
    repo, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return repo, tag


def push_image(
    registry: Registry,
    image_or_images: ImageLike,
    repo_tag: str,
    tmp_path: Path,
    **kw: Any,
) -> str:
    """Write a layout under ``tmp_path``, push it to ``repo_tag`` and return the
    digest the registry now holds for the top-level manifest (the sha256 of the
    raw manifest bytes it serves, cross-checked with ``Docker-Content-Digest``).
    ``kw`` goes to ``push``."""
    repo, tag = _split_ref(repo_tag)
    layout = Path(tmp_path) / f"oci-layout-{uuid.uuid4().hex[:12]}"
    write_oci_layout(layout, image_or_images, "push")
    push(registry, layout, "push", f"{repo}:{tag}", **kw)
    resp = registry.get_manifest(repo, tag)
    resp.raise_for_status()
    digest = sha256_digest(resp.content)
    header = resp.headers.get("Docker-Content-Digest")
    if header and header != digest:
        raise AssertionError(f"registry says {header} but served bytes hash to {digest}")
    return digest
