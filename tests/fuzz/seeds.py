"""Seed corpora, made by the reference tools at run time and cached in .cache/fuzz-seeds.

* lazy layers: ``estargz-gen`` (stargz-snapshotter's ``estargz.Build``) for
  eStargz and stargz zstd:chunked, ``skopeo copy --dest-compress-format
  zstd:chunked`` for containers/storage zstd:chunked (tests/support/lazyfixtures.py);
  the TOC targets get each blob's TOC JSON, and each blob's payload area is
  kept (payloads/<group>/NN.bin) so fuzzed TOCs point at real members;
* layer tars: Python's tarfile via tests/support/images.py, GNU tar (gnu,
  posix/PAX, ustar, v7 formats, sparse files), and the layers oras, kit and
  modctl push;
* manifests, configs, indexes: what skopeo, oras, oras-py, modctl and kit push
  to a loopback docker-registry (OCI and Docker schema 2, lists, artifacts,
  a lazy image), read back over the distribution API;
* registry responses: the error bodies, challenges, token responses, tag
  lists and Content-Range headers of docker-registry and the test token server;
* signatures: what cosign (simple signing, key and certificate; Sigstore
  bundles by ``attest --new-bundle-format`` and ``sign-blob``), notation (JWS
  and COSE) and model-signing (key and certificate) push to a loopback olareg,
  signed with the fuzz target's fixed keys and CA (tests/fuzz/t_signatures.py),
  and the two Sigstore bundles of real instances in tests/data/sigstore.

Everything is regenerated when SEEDS_VERSION changes or with ``--force``
(``python -m tests.fuzz seeds --force``).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zstandard

from . import TARGETS
from .common import SEEDS_ROOT

SEEDS_VERSION = "5"
STAMP = SEEDS_ROOT / "STAMP"


def _noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Seeds:
    """Seed files per target, written to a fresh directory and swapped in at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count: dict[str, int] = {}

    def add(self, target: str, data: bytes, name: str) -> None:
        assert target in TARGETS, target
        folder = self.root / target
        folder.mkdir(parents=True, exist_ok=True)
        n = self.count.get(target, 0)
        self.count[target] = n + 1
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
        (folder / f"{n:03d}-{safe}").write_bytes(data)

    def payload(self, group: str, data: bytes) -> int:
        """Keep a payload area; returns its selector (1-based: 0 means none)."""
        folder = self.root / "payloads" / group
        folder.mkdir(parents=True, exist_ok=True)
        index = len(list(folder.glob("*.bin")))
        (folder / f"{index:02d}.bin").write_bytes(data)
        return index + 1


# -- layer tars -----------------------------------------------------------------------


def layer_tars() -> list[tuple[str, bytes]]:
    """Small layer tars of every entry kind (tests/support builders, PAX format)."""
    from tests.support.images import (
        CharDevice,
        Dir,
        Fifo,
        File,
        Hardlink,
        Opaque,
        Symlink,
        Whiteout,
        build_tar,
    )
    from tests.support.lazyfixtures import make_layer_tar, trim_tar

    basic = make_layer_tar(
        {
            "a.txt": b"hello\n",
            "dir/b.bin": bytes(range(256)) * 24,
            "dir/empty": b"",
            "big.bin": _noise(20 << 10, 1),
        },
        dirs=["dir"],
        symlinks={"link": "a.txt", "dir/up": "../a.txt"},
        hardlinks={"hard": "a.txt"},
    )
    zeros = make_layer_tar({"sparse.bin": bytes(48 << 10) + b"end", "t.txt": b"x" * 100})
    odd = trim_tar(
        build_tar(
            [
                Dir("etc"),
                File("etc/os-release", b"ID=fuzz\n"),
                Whiteout("old"),
                Opaque("etc"),
                File("n" * 120 + ".txt", b"long name"),
                Symlink("abs", "/etc/os-release"),
                File("m.bin", b"m", xattrs={"user.k": "v"}),
                File("exec", b"#!/bin/sh\n", mode=0o4755),
                Dir("keep"),
                File("keep/k.txt", b"kept"),
            ]
        )
    )
    special = trim_tar(
        build_tar(
            [
                Fifo("fifo"),
                CharDevice("null", 1, 3),
                Dir("d"),
                File("d/f.txt", b"in d"),
                Hardlink("d/h", "d/f.txt"),
                Symlink("loop", "."),
                File("loop/x.txt", b"through the loop"),
                Symlink("esc", "/../../etc"),
            ]
        )
    )
    return [("basic", basic), ("zeros", zeros), ("odd", odd), ("special", special)]


def gnu_tar_layers(work: Path) -> list[tuple[str, bytes]]:
    """GNU tar 1.34's formats: gnu (long names, sparse), posix/PAX (sparse 1.0), ustar, v7."""
    src = work / "gnu-src"
    (src / ("deep/" * 20)).mkdir(parents=True)
    (src / ("deep/" * 20) / "file.txt").write_bytes(b"deep file\n")
    (src / ("l" * 140 + ".txt")).write_bytes(b"long name\n")
    with open(src / "sparse.img", "wb") as f:
        f.truncate(256 << 10)
        f.seek(100 << 10)
        f.write(b"data in the middle")
    os.symlink("l" * 140 + ".txt", src / "long-link")
    os.link(src / "sparse.img", src / "hard.img")
    with contextlib.suppress(OSError):
        os.mkfifo(src / "fifo")
    out = []
    for fmt, extra in (
        ("gnu", ["--sparse"]),
        ("posix", ["--sparse"]),  # PAX, GNU sparse 1.0
        ("posix", ["--sparse", "--sparse-version=0.1"]),
        ("posix", ["--sparse", "--sparse-version=0.0"]),
        ("oldgnu", []),
        ("ustar", []),
        ("v7", []),
    ):
        names = sorted(p.name for p in src.iterdir())
        if fmt in ("ustar", "v7"):
            names = [n for n in names if len(n) < 99 and n != "deep"] + ["deep/deep/deep"]
        proc = subprocess.run(
            ["tar", f"--format={fmt}", *extra, "--numeric-owner", "-cf", "-", *names],
            cwd=src,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
        if proc.stdout:
            out.append((f"gnutar-{fmt}{''.join(extra[1:2])}", proc.stdout))
    return out


# -- lazy layers ------------------------------------------------------------------------


def _estargz_offset(blob: bytes) -> int:
    return int(blob[-51:][16:32].decode("ascii"), 16)


def gen_lazy(seeds: Seeds, work: Path, tars: list[tuple[str, bytes]]) -> None:
    from tests.support.lazyfixtures import ZSTD_MANIFEST_POSITION, estargz_blob, skopeo_zstd_chunked

    from .lazy_common import (
        estargz_toc_json,
        estargz_toc_member,
        stargz_zstd_toc_json,
        unzstd,
        zstd_footer,
    )

    def toc_tar(toc: bytes) -> bytes:
        return gzip.decompress(estargz_toc_member(toc))

    lazy_tars = [(n, t) for n, t in tars if n in ("basic", "zeros", "odd")]
    for name, tar_bytes in lazy_tars:
        options: list[dict[str, Any]] = [{"parallelism": 1}]
        if name == "basic":
            options = [
                {"parallelism": 1, "chunk_size": 4096, "prioritized": ["a.txt"]},
                {"parallelism": 1, "level": 1},
            ]
        for opt in options:
            # eStargz
            lazy = estargz_blob(tar_bytes, work, "estargz", **opt)
            blob = lazy.blob
            for flags in (0, 2):
                seeds.add("estargz-blob", bytes([flags]) + blob, f"{name}-estargz-f{flags}")
            toc = estargz_toc_json(blob)
            assert toc is not None, "estargz-gen blob without a readable TOC"
            select = seeds.payload("estargz", blob[: _estargz_offset(blob)])
            for sel, flags in ((select, 0), (select, 2), (0, 0)):
                seeds.add("estargz-toc", bytes([sel, flags]) + toc, f"{name}-toc-s{sel}-f{flags}")
            seeds.add("estargz-toc", bytes([select, 4]) + toc_tar(toc), f"{name}-toc-tar")
            # stargz-snapshotter's zstd:chunked
            lazy = estargz_blob(tar_bytes, work, "zstdchunked", **opt)
            blob = lazy.blob
            for flags in (0, 1, 5, 9):
                seeds.add("zstd-stargz-blob", bytes([flags]) + blob, f"{name}-zstd-f{flags}")
            for flags in (0, 1):  # its checksum annotation too: the other schema's parser
                seeds.add("zstd-containers-blob", bytes([flags]) + blob, f"{name}-stargz-f{flags}")
            located = zstd_footer(blob)
            assert located is not None, "estargz-gen zstdchunked blob without a footer"
            offset, length, _ = located
            toc = stargz_zstd_toc_json(blob[offset : offset + length])
            assert toc is not None
            select = seeds.payload("zstd-stargz", blob[: offset - 8])
            for sel, flags in ((select, 0), (select, 2), (select, 4), (0, 1)):
                seeds.add(
                    "zstd-stargz-toc", bytes([sel, flags]) + toc, f"{name}-toc-s{sel}-f{flags}"
                )
            seeds.add("zstd-stargz-toc", bytes([select, 8]) + toc_tar(toc), f"{name}-toc-tar")
        # containers/storage's zstd:chunked
        lazy = skopeo_zstd_chunked(tar_bytes, work)
        blob = lazy.blob
        for flags in (0, 1, 3, 5):
            seeds.add("zstd-containers-blob", bytes([flags]) + blob, f"{name}-skopeo-f{flags}")
        position = lazy.annotations[ZSTD_MANIFEST_POSITION]
        offset, length = (int(p) for p in position.split(":")[:2])
        toc = unzstd(blob[offset : offset + length])
        assert toc is not None
        select = seeds.payload("zstd-containers", blob[: offset - 8])
        for sel, flags in ((select, 0), (select, 1), (select, 4), (0, 8)):
            seeds.add(
                "zstd-containers-toc", bytes([sel, flags]) + toc, f"{name}-toc-s{sel}-f{flags}"
            )


# -- tars -----------------------------------------------------------------------------


def add_tar(seeds: Seeds, name: str, tar_bytes: bytes, *, variants: bool = True) -> None:
    flag_sets = (0, 4, 16, 32, 3, 2 | 64, 4 | 8 | 32, 128, 128 | 32 | 3) if variants else (0,)
    for flags in flag_sets:
        seeds.add("tar", bytes([flags]) + tar_bytes, f"{name}-f{flags}")


def add_compressed_layer(seeds: Seeds, name: str, blob: bytes, media_type: str) -> None:
    if media_type.endswith(("+gzip", ".gzip")):
        seeds.add("tar", bytes([1]) + blob, f"{name}-gzip")
        seeds.add("tar", bytes([1 | 4]) + blob, f"{name}-gzip-artifact")
        add_tar(seeds, name, gzip.decompress(blob), variants=False)
    elif media_type.endswith("+zstd"):
        seeds.add("tar", bytes([2]) + blob, f"{name}-zstd")
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(blob), read_across_frames=True
        )
        add_tar(seeds, name, reader.read(), variants=False)
    elif media_type.endswith(".tar") or media_type.endswith("+tar"):
        seeds.add("tar", bytes([4]) + blob, f"{name}-tar-artifact")
        seeds.add("tar", bytes([0]) + blob, f"{name}-tar")


def gen_tar(seeds: Seeds, work: Path, tars: list[tuple[str, bytes]]) -> None:
    for name, tar_bytes in tars:
        add_tar(seeds, name, tar_bytes)
        seeds.add("tar", bytes([1]) + gzip.compress(tar_bytes, mtime=0), f"{name}-gz")
        seeds.add("tar", bytes([2]) + zstandard.ZstdCompressor().compress(tar_bytes), f"{name}-zst")
    for name, tar_bytes in gnu_tar_layers(work):
        if len(tar_bytes) <= 64 << 10:
            add_tar(seeds, name, tar_bytes)
        seeds.add("tar", bytes([1]) + gzip.compress(tar_bytes, mtime=0), f"{name}-gz")


# -- registry: manifests, configs, responses ---------------------------------------------------


def _content_type_index(content_type: str | None) -> int:
    from .t_manifest import CONTENT_TYPES

    value = (content_type or "").split(";")[0].strip()
    return CONTENT_TYPES.index(value) if value in CONTENT_TYPES else 0


def _status_byte(status: int) -> int:
    from .t_registry import STATUSES

    return STATUSES.index(status) if status in STATUSES else 0


def _registry_seed(handler: int, status: int, header: str, body: bytes) -> bytes:
    return bytes([handler, _status_byte(status)]) + header.encode("latin-1") + b"\x00" + body


class _RegistrySeeds:
    """Registry seeds, each also as a gzip Content-Encoding body (the harness compresses it)."""

    def __init__(self, seeds: Seeds) -> None:
        self.seeds = seeds

    def add(self, data: bytes, name: str) -> None:
        self.seeds.add("registry", data, name)
        if data[0] & 7 in (0, 1, 2, 3) and b"\x00" in data[2:]:
            self.seeds.add("registry", bytes([data[0] | 0x30]) + data[1:], f"{name}-gz")


class _Harvest:
    """Reads what a pushed reference consists of back from the registry."""

    def __init__(self, seeds: Seeds, registry: Any) -> None:
        self.seeds = seeds
        self.rseeds = _RegistrySeeds(seeds)
        self.registry = registry
        self.layers_seen: set[str] = set()

    def reference(self, label: str, repo: str, ref: str) -> None:
        resp = self.registry.get_manifest(repo, ref)
        resp.raise_for_status()
        body = resp.content
        content_type = resp.headers.get("Content-Type")
        sel = _content_type_index(content_type)
        doc = json.loads(body)
        # handler 3: the manifest as a registry response body
        self.rseeds.add(_registry_seed(3, 200, content_type or "", body), label)
        if "manifests" in doc:
            self.seeds.add("manifest", bytes([sel]) + body, f"{label}-index")
            for child in doc["manifests"][:3]:
                self.reference(f"{label}-child", repo, child["digest"])
            return
        config = self.registry.get_blob(repo, doc["config"]["digest"])
        config.raise_for_status()
        self.seeds.add("manifest", bytes([sel]) + body + b"\x00" + config.content, label)
        self.seeds.add("manifest", bytes([0]) + body, f"{label}-noconfig")
        for index, layer in enumerate(doc.get("layers", [])):
            media_type = layer.get("mediaType", "")
            digest = layer["digest"]
            if digest in self.layers_seen or layer.get("size", 0) > 256 << 10:
                continue
            self.layers_seen.add(digest)
            if "tar" in media_type:
                blob = self.registry.get_blob(repo, digest)
                blob.raise_for_status()
                add_compressed_layer(self.seeds, f"{label}-l{index}", blob.content, media_type)


def gen_remote(seeds: Seeds, work: Path, tars: list[tuple[str, bytes]]) -> None:
    from tests.support.images import File, Image, Index, Layer, Symlink, push_image
    from tests.support.lazyfixtures import estargz_blob, push_lazy_image, skopeo_zstd_chunked
    from tests.support.producers import (
        kit_push,
        modctl_push,
        oras_push_dir,
        oras_push_files,
        oraspy_push_files,
    )
    from tests.support.registry import TEST_PASSWORD, TEST_USER, Registry
    from tests.support.tokenserver import TokenServer

    with contextlib.ExitStack() as stack:
        reg = Registry(work / "registry")
        stack.callback(reg.stop)
        harvest = _Harvest(seeds, reg)
        rseeds = harvest.rseeds

        def img(arch: str, variant: str | None = None, comp: str = "gzip") -> Image:
            layer = Layer([File("etc/os-release", b"ID=fuzz\n"), Symlink("l", "etc")], comp)
            return Image([layer], architecture=arch, variant=variant)

        push_image(reg, img("amd64"), "fuzz/oci:v1", work)
        harvest.reference("skopeo-oci", "fuzz/oci", "v1")
        push_image(reg, img("amd64", comp="zstd"), "fuzz/ocizstd:v1", work)
        harvest.reference("skopeo-oci-zstd", "fuzz/ocizstd", "v1")
        push_image(reg, Index([img("amd64"), img("arm64", "v8")]), "fuzz/index:v1", work)
        harvest.reference("skopeo-index", "fuzz/index", "v1")
        push_image(reg, img("amd64"), "fuzz/docker:v1", work, format="v2s2")
        harvest.reference("skopeo-v2s2", "fuzz/docker", "v1")
        push_image(
            reg, Index([img("amd64"), img("arm", "v7")]), "fuzz/dlist:v1", work, format="v2s2"
        )
        harvest.reference("skopeo-v2s2-list", "fuzz/dlist", "v1")

        files = {"model.bin": _noise(2048, 2), "sub/config.json": b'{"hidden": 8}\n'}
        oras_push_files(reg, "fuzz/oras:v1", work / "oras1", files)
        harvest.reference("oras-files", "fuzz/oras", "v1")
        oras_push_dir(reg, "fuzz/orasdir:v1", work / "oras2", "mydir", files)
        harvest.reference("oras-dir", "fuzz/orasdir", "v1")
        oraspy_push_files(reg, "fuzz/oraspy:v1", work / "oraspy", files, dirs=["sub"])
        harvest.reference("oraspy", "fuzz/oraspy", "v1")
        model = {"config.json": b'{"a": 1}\n', "model.safetensors": _noise(4096, 3)}
        modctl_push(reg, "fuzz/modctl:raw", work / "modctl1", model)
        harvest.reference("modctl-raw", "fuzz/modctl", "raw")
        modctl_push(reg, "fuzz/modctl:tar", work / "modctl2", model, raw=False)
        harvest.reference("modctl-tar", "fuzz/modctl", "tar")
        kit_push(reg, "fuzz/kit:tar", work / "kit1", model)
        harvest.reference("kit-tar", "fuzz/kit", "tar")
        kit_push(reg, "fuzz/kit:zstd", work / "kit2", model, compression="zstd")
        harvest.reference("kit-zstd", "fuzz/kit", "zstd")
        kit_push(reg, "fuzz/kit:raw", work / "kit3", model, layer_format="raw")
        harvest.reference("kit-raw", "fuzz/kit", "raw")
        basic = dict(tars)["basic"]
        lazy = [estargz_blob(basic, work, "estargz"), skopeo_zstd_chunked(basic, work)]
        push_lazy_image(reg, lazy, "fuzz/lazy:v1", work)
        harvest.reference("lazy", "fuzz/lazy", "v1")

        # Registry responses: error bodies, tag lists, ranges.
        for path in (
            "/v2/fuzz/none/manifests/latest",
            "/v2/fuzz/oci/manifests/nosuchtag",
            "/v2/fuzz/oci/blobs/sha256:" + "0" * 64,
            "/v2/fuzz/oci/manifests/sha256:xyz",
            "/v2/fuzz/none/tags/list",
        ):
            resp = reg.request("GET", path)
            rseeds.add(_registry_seed(0, resp.status_code, "", resp.content), path)
        resp = reg.request(
            "PUT",
            "/v2/fuzz/oci/manifests/bad",
            data=b"{}",
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        )
        rseeds.add(_registry_seed(0, resp.status_code, "3", resp.content), "put-bad")
        for repo in ("fuzz/oci", "fuzz/kit"):
            resp = reg.request("GET", f"/v2/{repo}/tags/list")
            rseeds.add(_registry_seed(2, 200, "", resp.content), f"tags-{repo}")
        blob_digest = json.loads(reg.get_manifest("fuzz/oci", "v1").content)["config"]["digest"]
        resp = reg.request(
            "GET", f"/v2/fuzz/oci/blobs/{blob_digest}", headers={"Range": "bytes=0-9"}
        )
        content_range = resp.headers.get("Content-Range", "bytes 0-9/100")
        rseeds.add(_registry_seed(4, 206, content_range, b""), "content-range")
        when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
        for value in ("120", when):
            rseeds.add(_registry_seed(4, 429, value, b""), "retry-after")

        # Auth: an htpasswd registry's 401, a token registry's challenge and tokens.
        basic_reg = Registry(work / "basic", htpasswd=(TEST_USER, TEST_PASSWORD))
        stack.callback(basic_reg.stop)
        resp = basic_reg.request("GET", "/v2/", credentials=None)
        challenge = resp.headers.get("WWW-Authenticate", "")
        rseeds.add(_registry_seed(0, resp.status_code, "", resp.content), "basic-401")
        rseeds.add(_registry_seed(1, 401, challenge, resp.content), "basic-challenge")
        server = TokenServer(username=TEST_USER, password=TEST_PASSWORD, workdir=work / "tokens")
        stack.callback(server.stop)
        token_reg = Registry(work / "token", token_auth=server)
        stack.callback(token_reg.stop)
        import requests

        resp = requests.get(f"{token_reg.url}/v2/fuzz/oci/manifests/v1", timeout=30)
        challenge = resp.headers.get("WWW-Authenticate", "")
        rseeds.add(_registry_seed(0, resp.status_code, "", resp.content), "token-401")
        query = {"service": server.service, "scope": "repository:fuzz/oci:pull"}
        for creds, label in (((TEST_USER, TEST_PASSWORD), "token-ok"), (None, "token-anon")):
            token = requests.get(server.realm, params=query, auth=creds, timeout=30)
            seed = _registry_seed(1, token.status_code, challenge, token.content)
            if creds is not None:
                seed = seed[:1] + bytes([seed[1] | 0x80]) + seed[2:]
            rseeds.add(seed, label)


# -- signatures ----------------------------------------------------------------------------


def _signature_layers(
    registry: Any, repo: str, manifest_digest: str
) -> list[tuple[str, dict[str, str], bytes]]:
    """(media type, annotations, blob) of each layer of a signature manifest."""
    from tests.support.signing import get_blob_bytes, get_json

    manifest = get_json(registry, repo, manifest_digest)
    return [
        (
            layer["mediaType"],
            dict(layer.get("annotations") or {}),
            get_blob_bytes(registry, repo, layer["digest"]),
        )
        for layer in manifest.get("layers", [])
    ]


def _signing_material(work: Path) -> tuple[Any, Any, Any]:
    """The fuzz target's fixed keys and CA as the signing helpers want them: files,
    a KeyPair for the signer key and a TestPKI for the leaf."""
    from cryptography.hazmat.primitives import serialization

    from tests.support.signing import Cert, KeyPair, TestPKI, private_pem, public_pem

    from .t_signatures import ED25519, INTERMEDIATE, KEYS, LEAF, ROOT

    work.mkdir(parents=True, exist_ok=True)

    def pair(name: str, key: Any, key_type: str) -> Any:
        (work / f"{name}.key").write_bytes(private_pem(key))
        (work / f"{name}.pub").write_bytes(public_pem(key))
        return KeyPair(key_type, key, work / f"{name}.key", work / f"{name}.pub")  # type: ignore[arg-type]

    def cert(name: str, certificate: Any, key_type: str) -> Any:
        path = work / f"{name}.pem"
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return Cert(certificate, pair(f"{name}-key", KEYS[name], key_type), path)

    root = cert("root", ROOT, "ecdsa-p384")
    inter = cert("intermediate", INTERMEDIATE, "ecdsa-p384")
    leaf = cert("leaf", LEAF, "ecdsa-p256")
    chain = work / "chain.pem"
    chain.write_bytes(inter.pem + root.pem)
    fullchain = work / "fullchain.pem"
    fullchain.write_bytes(leaf.pem + chain.read_bytes())
    pki = TestPKI(root, inter, leaf, chain, fullchain, root.path, inter.path)
    return pair("signer", KEYS["signer"], "ecdsa-p256"), pair("ed25519", ED25519, "ed25519"), pki


def _patched_leaf(old: bytes, new: bytes) -> bytes:
    """The target's leaf certificate (DER) with one field changed in place."""
    from cryptography.hazmat.primitives import serialization

    from .t_signatures import LEAF

    der = LEAF.public_bytes(serialization.Encoding.DER)
    assert der.count(old) == 1 and len(old) == len(new), old
    return der.replace(old, new)


def signature_regressions() -> list[tuple[str, bytes]]:
    """Inputs for what the fuzzer found in csi_oci/verify (fixed in ba14a70 and
    d548538), written from the findings: each raised the exception named with the
    code before. Seeds, so every fuzz run (tests/test_fuzz.py's too) replays them."""
    import base64

    from cryptography.hazmat.primitives import serialization

    from .t_signatures import INTERMEDIATE

    # cryptography parses these lazily: the leaf loads, a field raises later.
    bad = {
        # InvalidVersion (not a ValueError) from x509.load_*_certificate(s)
        "version-42": _patched_leaf(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x2a"),
        # DuplicateExtension out of CertificateIdentity.of (authorityKeyIdentifier's
        # OID turned into subjectKeyIdentifier's)
        "duplicate-ski": _patched_leaf(bytes.fromhex("0603551d23"), bytes.fromhex("0603551d0e")),
        # ValueError out of CertificateIdentity.of (trust.py, outside CertTrust.check
        # when models.py names the signer): an email SAN that is not IA5
        "san-not-ia5": _patched_leaf(b"signer@example.test", b"signer\xffexample.test"),
        # UnsupportedAlgorithm from public_key() (cosign.py caught ValueError only)
        "unknown-key-type": _patched_leaf(
            bytes.fromhex("2a8648ce3d0201"), bytes.fromhex("2a8648ce3d0209")
        ),
    }

    def pem(der: bytes) -> bytes:
        b64 = base64.encodebytes(der).replace(b"\n", b"")
        lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
        return (
            b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n"
        )

    def sigstore(
        material: dict[str, Any], payload_type: str = "application/vnd.in-toto+json"
    ) -> bytes:
        statement = {
            "_type": "https://in-toto.io/Statement/v1",
            "subject": [{"name": "x", "digest": {"sha256": "1" * 64}}],
            "predicateType": "https://model_signing/signature/v1.0",
            "predicate": {},
        }
        doc = {
            "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
            "verificationMaterial": material,
            "dsseEnvelope": {
                "payload": base64.b64encode(json.dumps(statement).encode()).decode(),
                "payloadType": payload_type,
                "signatures": [{"sig": "AAAA"}],
            },
        }
        return json.dumps(doc).encode()

    payload = json.dumps(
        {
            "critical": {
                "identity": {"docker-reference": "fuzz/signed"},
                "image": {"docker-manifest-digest": "sha256:" + "1" * 64},
                "type": "cosign container image signature",
            },
            "optional": None,
        }
    ).encode()
    cosign_prefix = payload + b"\x00AAAA\x00"
    chain = b"\x00" + pem(INTERMEDIATE.public_bytes(serialization.Encoding.DER))
    out = []
    for label, der in bad.items():
        raw = base64.b64encode(der).decode()
        out += [
            (f"trust-{label}", bytes([8]) + pem(der)),
            (f"cosign-cert-{label}", bytes([1 | 32 | 64]) + cosign_prefix + pem(der) + chain),
            (
                f"bundle-{label}",
                bytes([3 | 32 | 64]) + sigstore({"certificate": {"rawBytes": raw}}),
            ),
            (
                f"model-{label}",
                bytes([7])
                + sigstore({"x509CertificateChain": {"certificates": [{"rawBytes": raw}]}}),
            ),
        ]
    # UnicodeEncodeError: a DSSE payloadType with a lone surrogate (bundle.Envelope.pae)
    out.append(("bundle-payload-type-lone-surrogate", bytes([2]) + sigstore({}, "in-toto\ud800")))
    # UnicodeEncodeError: a signed file named with a lone surrogate (models._relative)
    resources = [{"name": "\ud800", "digest": "0" * 64, "algorithm": "sha256"}]
    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "m", "digest": {"sha256": "0" * 64}}],
        "predicateType": "https://model_signing/signature/v1.0",
        "predicate": {
            "serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": False},
            "resources": resources,
        },
    }
    out.append(("statement-name-lone-surrogate", bytes([6]) + json.dumps(statement).encode()))
    return out


def gen_signatures(seeds: Seeds, work: Path) -> None:
    """Envelopes made by the real tools with the target's keys and CA (t_signatures.py
    explains the selector byte: handler | 16 re-seal | 32 subject | variant << 6)."""
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from tests.support import signing as s

    from .t_signatures import MODEL_FILES

    def add(handler: int, data: bytes, name: str, flags: tuple[int, ...] = (0, 32)) -> None:
        for flag in flags:
            seeds.add("signatures", bytes([handler | flag]) + data, f"{name}-h{handler}-f{flag}")

    def wd(name: str) -> Path:
        (work / name).mkdir(parents=True, exist_ok=True)
        return work / name

    signer, ed_key, pki = _signing_material(work / "keys")
    reg = s.OlaregRegistry(work / "olareg")
    try:
        image = s.push_tiny_image(reg, "fuzz/signed:v1")
        # cosign keeps one signature per signer on an image: another image for the next
        other = s.push_tiny_image(reg, "fuzz/signed:v2", content=b"signed without a chain\n")
        repo = image.repo
        keys = {
            "p256": s.cosign_import_key(signer, work, name="signer"),
            "ed25519": s.cosign_import_key(ed_key, work, name="ed25519"),
        }
        leaf_key = s.cosign_import_key(pki.leaf.key, work, name="leaf")
        # cosign simple signing: by key (P-256, Ed25519), by certificate with its chain
        signed = [(f"cosign-{k}", s.cosign_sign_key(reg, image, wd(k), v)) for k, v in keys.items()]
        signed.append(("cosign-cert", s.cosign_sign_cert(reg, image, wd("cert"), leaf_key, pki)))
        signed.append(
            (
                "cosign-cert-nochain",
                s.cosign_sign_cert(reg, other, wd("nochain"), leaf_key, pki, chain=False),
            )
        )
        seen: set[str] = set()  # cosign adds each signature as a layer of one manifest
        for label, done in signed:
            for media_type, annotations, blob in _signature_layers(reg, repo, done.manifests[0]):
                if media_type != s.COSIGN_SIMPLESIGNING or repr(annotations) in seen:
                    continue
                seen.add(repr(annotations))
                add(0, blob, label, (0,))
                parts = [
                    blob,
                    annotations.get("dev.cosignproject.cosign/signature", "").encode(),
                    annotations.get("dev.sigstore.cosign/certificate", "").encode(),
                    annotations.get("dev.sigstore.cosign/chain", "").encode(),
                ]
                data = b"\x00".join(parts).rstrip(b"\x00")
                variants = (0, 32, 32 | 64, 32 | 128, 32 | 192, 16 | 32 | 64)
                add(1, data, label, variants)
        # Sigstore bundles: attest --new-bundle-format (key, certificate), sign-blob
        made = [
            ("bundle-key", s.cosign_sign_bundle(reg, image, wd("bk"), keys["p256"])),
            ("bundle-cert", s.cosign_sign_bundle(reg, image, wd("bc"), leaf_key, pki)),
            ("bundle-blob", s.cosign_sign_blob_bundle(reg, image, wd("bb"), keys["p256"])),
        ]
        for label, done in made:
            for digest in done.manifests:
                for media_type, _, blob in _signature_layers(reg, repo, digest):
                    if "sigstore.bundle" in media_type:
                        add(2, blob, label, (0,))
                        add(3, blob, label, (0, 32, 32 | 64, 32 | 128, 16 | 32 | 64))
        # Notary Project: JWS and COSE
        config = s.notation_setup(wd("notation"), pki)
        for handler, fmt in ((4, "jws"), (5, "cose")):
            done = s.notation_sign(reg, image, config, signature_format=fmt)  # type: ignore[arg-type]
            for digest in done.manifests:
                for media_type, _, blob in _signature_layers(reg, repo, digest):
                    if media_type in (s.NOTATION_JWS, s.NOTATION_COSE):
                        add(handler, blob, f"notation-{fmt}", (0, 32, 32 | 64, 16 | 32, 32 | 192))
    finally:
        reg.stop()
    # model-signing over the target's tree, by key and by certificate
    tree = work / "model"
    for name, data in MODEL_FILES.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    for label, kwargs in (("key", {"key": signer}), ("cert", {"pki": pki})):
        sig = s.model_sign(tree, work, signature=work / f"model-{label}.sig", **kwargs)
        blob = sig.path.read_bytes()
        add(2, blob, f"model-{label}", (0,))
        add(7, blob, f"model-{label}", (0, 64, 128, 16, 16 | 64))
        add(6, json.dumps(sig.statement).encode(), f"model-{label}", (0,))
        add(6, base64.b64decode(sig.bundle["dsseEnvelope"]["payload"]), f"model-{label}-raw", (0,))
    # Sigstore's public instances (tests/data/sigstore): bundles, and their certificates as PEM
    for path in sorted((Path(__file__).resolve().parents[1] / "data" / "sigstore").glob("*.json")):
        blob = path.read_bytes()
        add(2, blob, path.stem, (0,))
        add(3, blob, path.stem, (0, 32, 64 | 32))
        raw = json.loads(blob)["verificationMaterial"].get("certificate", {}).get("rawBytes")
        if raw:
            cert = x509.load_der_x509_certificate(base64.b64decode(raw))
            add(8, cert.public_bytes(serialization.Encoding.PEM), path.stem, (0, 64))
    for label in ("leaf.pem", "fullchain.pem", "chain.pem"):
        add(8, (work / "keys" / label).read_bytes(), label, (0, 64))
    for label, data in signature_regressions():
        seeds.add("signatures", data, f"regression-{label}")


# -- the cache -----------------------------------------------------------------------------


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    SEEDS_ROOT.parent.mkdir(parents=True, exist_ok=True)
    with open(SEEDS_ROOT.parent / "fuzz-seeds.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def fresh() -> bool:
    if not STAMP.is_file():
        return False
    try:
        stamp = json.loads(STAMP.read_text())
    except ValueError:
        return False
    return stamp.get("version") == SEEDS_VERSION and all(
        (SEEDS_ROOT / t).is_dir() and any((SEEDS_ROOT / t).iterdir()) for t in TARGETS
    )


def ensure(force: bool = False, log: Any = print) -> dict[str, int]:
    """Make the seeds unless the cache is current; returns seeds per target."""
    with _locked():
        if force or not fresh():
            started = time.monotonic()
            log(f"fuzz seeds: generating with the reference tools into {SEEDS_ROOT}")
            with tempfile.TemporaryDirectory(prefix="csi-oci-fuzz-seeds-") as tmp:
                work = Path(tmp)
                new = Seeds(work / "out")
                tars = layer_tars()
                gen_lazy(new, work / "lazy", tars)
                gen_tar(new, work / "tar", tars)
                gen_remote(new, work / "remote", tars)
                gen_signatures(new, work / "signatures")
                missing = [t for t in TARGETS if not new.count.get(t)]
                if missing:
                    raise RuntimeError(f"no seeds made for {', '.join(missing)}")
                (new.root / "STAMP").write_text(
                    json.dumps({"version": SEEDS_VERSION, "made": time.time(), **new.count})
                )
                if SEEDS_ROOT.exists():
                    shutil.rmtree(SEEDS_ROOT)
                shutil.copytree(new.root, SEEDS_ROOT)
            log(f"fuzz seeds: done in {time.monotonic() - started:.0f} s")
        return {t: len(list((SEEDS_ROOT / t).iterdir())) for t in TARGETS}


def seed_dir(target: str) -> Path:
    return SEEDS_ROOT / target


__all__ = ["ensure", "fresh", "seed_dir"]
