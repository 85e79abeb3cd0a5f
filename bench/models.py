"""Synthetic models for hack/bench, in every packaging csi-oci publishes, on disk.

The benchmark's models are several GiB, so nothing here holds a blob in
memory: files are written once, tars and compressed blobs are streamed from
them, and blobs are uploaded to the registry by streaming the file
(monolithic PUT). The reference tools write the lazy formats: estargz-gen
(the Go stargz-snapshotter `estargz` module) for eStargz and skopeo for
zstd:chunked, so csi-oci is measured on what producers really ship.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import zstandard
from isal import igzip

REPO = Path(__file__).resolve().parent.parent
ESTARGZ_GEN = REPO / ".cache" / "bin" / "estargz-gen"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {
    "tar": "application/vnd.oci.image.layer.v1.tar",
    "tar+gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "tar+zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
MODELPACK_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
TITLE = "org.opencontainers.image.title"
COPY_BUFFER = 4 << 20

# The packagings measured, in table order. "raw" is a ModelPack artifact with
# one raw layer per file (what modctl and `oras push` produce); the others are
# single-layer OCI images of the same files.
PACKAGINGS = ("raw", "tar", "tar+gzip", "tar+zstd", "estargz", "zstd:chunked")
LAZY_PACKAGINGS = ("estargz", "zstd:chunked")


@dataclass
class BlobFile:
    path: Path
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    def descriptor(self) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            desc["annotations"] = self.annotations
        return desc


@dataclass
class Pushed:
    packaging: str
    ref: str
    blob_bytes: int  # what a full pull downloads (layers)
    digests: list[str]  # the layer blobs (warmed in the registry before each run)


# -- the model ---------------------------------------------------------------------


def low_entropy(n: int) -> bytes:
    """Bytes shaped like bf16 weights: every other byte from a 16-value alphabet.

    Random data does not compress at all (gzip stores it, and inflating a
    stored block is a memcpy), which would flatter every decompressor; real
    weights compress to ~80-90 % because their exponent bytes cluster.
    """
    data = bytearray(os.urandom(n))
    table = bytes(0x38 + (i & 0x0F) for i in range(256))
    data[1::2] = bytes(data[1::2]).translate(table)
    return bytes(data)


def make_model(root: Path, total_bytes: int, shards: int) -> dict[str, str]:
    """Write the model files under `root`; returns {relative path: sha256 hex}.

    Shards alternate random and low-entropy data (in 64 MiB pieces, so the
    generator never holds a whole shard), plus the small JSON files a
    Hugging Face checkpoint carries.
    """
    root.mkdir(parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    meta = {
        "config.json": json.dumps({"architectures": ["BenchModel"], "hidden_size": 4096}),
        "generation_config.json": json.dumps({"temperature": 0.7}),
        "tokenizer.json": json.dumps({"model": {"vocab": {f"t{i}": i for i in range(5000)}}}),
    }
    for name, text in meta.items():
        (root / name).write_text(text)
        digests[name] = hashlib.sha256(text.encode()).hexdigest()
    per = total_bytes // shards
    piece = 64 << 20
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        make = os.urandom if i % 2 == 0 else low_entropy
        h = hashlib.sha256()
        with open(root / name, "wb") as out:
            left = per
            while left:
                data = make(min(piece, left))
                h.update(data)
                out.write(data)
                left -= len(data)
        digests[name] = h.hexdigest()
    return digests


# -- blobs -------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(COPY_BUFFER)
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return "sha256:" + h.hexdigest()


def blob_file(path: Path, media_type: str, annotations: dict[str, str] | None = None) -> BlobFile:
    return BlobFile(path, media_type, file_digest(path), path.stat().st_size, annotations or {})


def write_tar(model: Path, out: Path) -> None:
    """A PAX tar of the model, ending right after its two zero blocks.

    tarfile pads to a 10 KiB record; skopeo's zstd:chunked drops bytes past
    the end marker, so a padded tar would give its layer another diff_id.
    """
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(model)):
            info = tar.gettarinfo(str(model / name), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with open(model / name, "rb") as f:
                tar.addfile(info, f)
        end = tar.offset + 2 * tarfile.BLOCKSIZE
    os.truncate(out, end)


def stream_convert(src: Path, out: Path, open_writer: Callable[[Any], Any]) -> None:
    with open(src, "rb") as f, open(out, "wb") as raw, open_writer(raw) as w:
        shutil.copyfileobj(f, w, COPY_BUFFER)


def gzip_file(src: Path, out: Path) -> None:
    """isal's igzip at level 2: zlib level 6 would take minutes for 4 GiB.

    The level changes the compression ratio, not how fast inflate runs.
    """
    stream_convert(src, out, lambda raw: igzip.IGzipFile(fileobj=raw, mode="wb", compresslevel=2))


def zstd_file(src: Path, out: Path) -> None:
    cctx = zstandard.ZstdCompressor(level=3, threads=-1, write_checksum=True)
    stream_convert(src, out, lambda raw: cctx.stream_writer(raw, closefd=False))


def estargz_file(src: Path, out: Path) -> BlobFile:
    """eStargz by the reference writer; config.json is prioritized (landmark)."""
    proc = subprocess.run(
        [
            str(ESTARGZ_GEN),
            "-in",
            str(src),
            "-out",
            str(out),
            "-format",
            "estargz",
            "-level",
            "6",
            "-prioritized",
            "config.json",
        ],
        capture_output=True,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    info = json.loads(proc.stdout)
    return BlobFile(out, info["mediaType"], info["digest"], info["size"], info["annotations"])


def zstd_chunked_via_skopeo(tar_blob: BlobFile, diff_id: str, work: Path) -> BlobFile:
    """skopeo recompresses an OCI layout holding the tar into zstd:chunked."""
    src = work / "layout-src"
    config = image_config([diff_id])
    write_layout(src, [tar_blob], config)
    dst = work / "layout-dst"
    auth = work / "auth.json"
    auth.write_text('{"auths":{}}')
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "-q",
            "--dest-compress-format",
            "zstd:chunked",
            f"oci:{src}:t",
            f"oci:{dst}:t",
        ],
        check=True,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, REGISTRY_AUTH_FILE=str(auth)),
    )
    index = json.loads((dst / "index.json").read_text())
    manifest = json.loads(layout_blob(dst, index["manifests"][0]["digest"]).read_bytes())
    (layer,) = manifest["layers"]
    path = layout_blob(dst, layer["digest"])
    shutil.rmtree(src)
    return BlobFile(path, layer["mediaType"], layer["digest"], layer["size"], layer["annotations"])


def layout_blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / digest.replace(":", "/")


def write_layout(layout: Path, layers: list[BlobFile], config: bytes) -> None:
    """A one-image OCI layout whose layer blobs are hard links to our files."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    cdigest = "sha256:" + hashlib.sha256(config).hexdigest()
    layout_blob(layout, cdigest).write_bytes(config)
    for layer in layers:
        os.link(layer.path, layout_blob(layout, layer.digest))
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": len(config)},
            "layers": [layer.descriptor() for layer in layers],
        }
    ).encode()
    mdigest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    layout_blob(layout, mdigest).write_bytes(manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": mdigest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "t"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))


def image_config(diff_ids: list[str]) -> bytes:
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()


# -- pushing -----------------------------------------------------------------------


class Pusher:
    """Blob uploads and manifest PUTs over the distribution API, streaming files."""

    def __init__(self, host: str) -> None:
        self.base = f"http://{host}"
        self.host = host
        self.http = requests.Session()

    def blob(self, repo: str, digest: str, body: Any, size: int) -> None:
        head = self.http.head(f"{self.base}/v2/{repo}/blobs/{digest}")
        if head.status_code == 200:
            return
        start = self.http.post(f"{self.base}/v2/{repo}/blobs/uploads/")
        start.raise_for_status()
        location = start.headers["Location"]
        if location.startswith("/"):
            location = self.base + location
        sep = "&" if "?" in location else "?"
        put = self.http.put(
            f"{location}{sep}digest={digest}",
            data=body,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )
        if put.status_code != 201:
            raise RuntimeError(f"blob upload of {digest} failed: {put.status_code} {put.text}")

    def blob_file(self, repo: str, blob: BlobFile) -> None:
        with open(blob.path, "rb") as f:
            self.blob(repo, blob.digest, f, blob.size)

    def manifest(
        self,
        repo: str,
        tag: str,
        config: BlobFile | bytes,
        layers: list[BlobFile],
        config_type: str = OCI_CONFIG,
        artifact_type: str | None = None,
    ) -> str:
        if isinstance(config, bytes):
            cdigest = "sha256:" + hashlib.sha256(config).hexdigest()
            self.blob(repo, cdigest, config, len(config))
            cdesc = {"mediaType": config_type, "digest": cdigest, "size": len(config)}
        else:
            self.blob_file(repo, config)
            cdesc = config.descriptor()
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": cdesc,
            "layers": [layer.descriptor() for layer in layers],
        }
        if artifact_type:
            doc["artifactType"] = artifact_type
        resp = self.http.put(
            f"{self.base}/v2/{repo}/manifests/{tag}",
            data=json.dumps(doc).encode(),
            headers={"Content-Type": OCI_MANIFEST},
        )
        if resp.status_code != 201:
            raise RuntimeError(f"manifest PUT {repo}:{tag} failed: {resp.status_code} {resp.text}")
        return f"{self.host}/{repo}:{tag}"


def push_raw(pusher: Pusher, model: Path) -> Pushed:
    """A ModelPack artifact, one raw layer per file (weights and configs)."""
    layers, diff_ids = [], []
    for name in sorted(os.listdir(model)):
        kind = "weight" if name.endswith(".safetensors") else "weight.config"
        meta = json.dumps(
            {
                "name": name,
                "mode": 420,
                "uid": 0,
                "gid": 0,
                "size": (model / name).stat().st_size,
                "typeflag": 48,
            }
        )
        blob = blob_file(
            model / name,
            f"application/vnd.cncf.model.{kind}.v1.raw",
            {
                "org.cncf.model.filepath": name,
                "org.cncf.model.file.metadata+json": meta,
                TITLE: name,
            },
        )
        pusher.blob_file("bench/raw", blob)
        layers.append(blob)
        diff_ids.append(blob.digest)
    config = json.dumps(
        {
            "descriptor": {"name": "bench", "version": "v1"},
            "config": {"format": "safetensors"},
            "modelfs": {"type": "layers", "diffIds": diff_ids},
        }
    ).encode()
    ref = pusher.manifest(
        "bench/raw", "v1", config, layers, MODELPACK_CONFIG, artifact_type=MODELPACK_ARTIFACT
    )
    return Pushed("raw", ref, sum(b.size for b in layers), [b.digest for b in layers])


def push_image(pusher: Pusher, packaging: str, layer: BlobFile, diff_id: str) -> Pushed:
    repo = "bench/" + packaging.replace("+", "-").replace(":", "-")
    pusher.blob_file(repo, layer)
    ref = pusher.manifest(repo, "v1", image_config([diff_id]), [layer])
    return Pushed(packaging, ref, layer.size, [layer.digest])


def build_and_push(
    host: str, model: Path, work: Path, packagings: tuple[str, ...], say: Callable[[str], None]
) -> dict[str, Pushed]:
    """Push the model in each packaging; intermediate files are removed as it goes."""
    pusher = Pusher(host)
    pushed: dict[str, Pushed] = {}
    work.mkdir(parents=True, exist_ok=True)
    if "raw" in packagings:
        pushed["raw"] = push_raw(pusher, model)
        say("pushed raw (ModelPack, one layer per file)")
    tar_path = work / "model.tar"
    write_tar(model, tar_path)
    tar_blob = blob_file(tar_path, LAYER_TYPES["tar"])
    diff_id = tar_blob.digest
    if "tar" in packagings:
        pushed["tar"] = push_image(pusher, "tar", tar_blob, diff_id)
        say("pushed tar")
    for packaging, convert in (("tar+gzip", gzip_file), ("tar+zstd", zstd_file)):
        if packaging in packagings:
            out = work / f"model.{packaging}"
            convert(tar_path, out)
            pushed[packaging] = push_image(
                pusher, packaging, blob_file(out, LAYER_TYPES[packaging]), diff_id
            )
            out.unlink()
            say(f"pushed {packaging}")
    if "estargz" in packagings:
        out = work / "model.estargz"
        blob = estargz_file(tar_path, out)
        # estargz.Build rewrites the tar (landmark + TOC entries): its own diff_id.
        stargz_diff = "sha256:" + _gunzip_sha256(out)
        pushed["estargz"] = push_image(pusher, "estargz", blob, stargz_diff)
        out.unlink()
        say("pushed estargz (estargz-gen)")
    if "zstd:chunked" in packagings:
        blob = zstd_chunked_via_skopeo(tar_blob, diff_id, work / "skopeo")
        pushed["zstd:chunked"] = push_image(pusher, "zstd:chunked", blob, diff_id)
        shutil.rmtree(work / "skopeo")
        say("pushed zstd:chunked (skopeo)")
    tar_path.unlink()
    return pushed


def _gunzip_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with igzip.open(path, "rb") as f:
        while data := f.read(COPY_BUFFER):
            h.update(data)
    return h.hexdigest()
