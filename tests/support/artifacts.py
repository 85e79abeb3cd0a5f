"""OCI artifacts built to their specs, pushed with the distribution HTTP API.

skopeo 1.9 treats every manifest as an image (it parses the config as an
image config), so artifacts with their own config media types are pushed
here with plain blob uploads and a manifest PUT, as oras does. The
real producers (oras CLI, oras-py, modctl, kit) are exercised in
tests/test_producers.py; these builders let tests shape every detail,
including hostile ones.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Any

from tests.support.registry import Registry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
ORAS_FILE = "application/vnd.oci.image.layer.v1.tar"
TITLE = "org.opencontainers.image.title"
MODELPACK_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODELPACK_FILEPATH = "org.cncf.model.filepath"
MODELPACK_FILE_METADATA = "org.cncf.model.file.metadata+json"
KITOPS_CONFIG = "application/vnd.kitops.modelkit.config.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Blob:
    data: bytes
    media_type: str
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return digest_of(self.data)

    def descriptor(self) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.data),
        }
        if self.annotations:
            desc["annotations"] = dict(self.annotations)
        return desc


@dataclass
class Artifact:
    layers: list[Blob]
    config: Blob
    artifact_type: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def manifest(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.config.descriptor(),
            "layers": [layer.descriptor() for layer in self.layers],
        }
        if self.artifact_type:
            doc["artifactType"] = self.artifact_type
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        return doc

    @property
    def manifest_bytes(self) -> bytes:
        return json.dumps(self.manifest, separators=(",", ":"), sort_keys=True).encode()

    @property
    def digest(self) -> str:
        return digest_of(self.manifest_bytes)


def tar_of(files: dict[str, bytes], *, dirs: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tf.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def oras_files(
    files: dict[str, bytes], artifact_type: str = "application/vnd.example.model"
) -> Artifact:
    """What `oras push ref a b` makes: one layer per file, titled, typed as tar."""
    layers = [Blob(data, ORAS_FILE, {TITLE: name}) for name, data in files.items()]
    return Artifact(layers, Blob(b"{}", OCI_EMPTY), artifact_type)


def oras_dir(title: str, files: dict[str, bytes]) -> Blob:
    """A directory as oras pushes it: tar+gzip of `title/...`, marked for unpacking."""
    data = gzip.compress(tar_of({f"{title}/{k}": v for k, v in files.items()}, dirs=(f"{title}/",)))
    return Blob(
        data,
        "application/vnd.oci.image.layer.v1.tar+gzip",
        {
            TITLE: title,
            "io.deis.oras.content.unpack": "true",
            "io.deis.oras.content.digest": digest_of(data),
        },
    )


def modelpack(files: dict[str, tuple[str, bytes]], *, fmt: str = "raw") -> Artifact:
    """A ModelPack artifact: files maps path -> (kind, data); kind is weight, doc, ...

    fmt: raw (the blob is the file) or tar / tar+gzip (one file per tar layer).
    """
    layers, diff_ids = [], []
    for path, (kind, data) in files.items():
        meta = json.dumps(
            {"name": path, "mode": 420, "uid": 0, "gid": 0, "size": len(data), "typeflag": 48}
        )
        annotations = {MODELPACK_FILEPATH: path, MODELPACK_FILE_METADATA: meta, TITLE: path}
        if fmt == "raw":
            blob, diff = data, digest_of(data)
        else:
            tar = tar_of({path: data})
            blob, diff = (gzip.compress(tar) if fmt == "tar+gzip" else tar), digest_of(tar)
        layers.append(Blob(blob, f"application/vnd.cncf.model.{kind}.v1.{fmt}", annotations))
        diff_ids.append(diff)
    config = {
        "descriptor": {"name": "tiny", "version": "v1"},
        "config": {"format": "safetensors"},
        "modelfs": {"type": "layers", "diffIds": diff_ids},
    }
    return Artifact(layers, Blob(json.dumps(config).encode(), MODELPACK_CONFIG), MODELPACK_ARTIFACT)


def kitops(parts: dict[str, dict[str, bytes]]) -> Artifact:
    """A ModelKit: parts maps kind (model, code, dataset, docs) -> files; one tar+gzip each."""
    layers = [
        Blob(gzip.compress(tar_of(files)), f"application/vnd.kitops.modelkit.{kind}.v1.tar+gzip")
        for kind, files in parts.items()
    ]
    kitfile = {"manifestVersion": "1.0", "package": {"name": "tiny"}}
    return Artifact(layers, Blob(json.dumps(kitfile).encode(), KITOPS_CONFIG))


def push_artifact(registry: Registry, artifact: Artifact, repo_tag: str) -> str:
    """Upload blobs and the manifest over HTTP; returns host/repo:tag."""
    repo, _, tag = repo_tag.rpartition(":")
    for blob in [artifact.config, *artifact.layers]:
        start = registry.request("POST", f"/v2/{repo}/blobs/uploads/")
        assert start.status_code == 202, start.text
        location = start.headers["Location"]
        sep = "&" if "?" in location else "?"
        path = location.split(registry.host, 1)[-1] if registry.host in location else location
        put = registry.request(
            "PUT",
            f"{path}{sep}digest={blob.digest}",
            data=blob.data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert put.status_code == 201, put.text
    resp = registry.request(
        "PUT",
        f"/v2/{repo}/manifests/{tag}",
        data=artifact.manifest_bytes,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert resp.status_code == 201, resp.text
    return f"{registry.host}/{repo_tag}"
