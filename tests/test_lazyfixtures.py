"""The lazy-format fixtures (tests/support/lazyfixtures.py) are what they claim.

Every check here reads the blobs with gzip/zlib/zstandard/tarfile directly,
following the format descriptions (eStargz spec, stargz-snapshotter's
zstdchunked package, containers/storage legacy zstd:chunked), independently of
csi-oci code and of the helpers' own decoding.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
import zlib

import pytest
import zstandard

from tests.support.images import Dir, File, build_tar
from tests.support.lazyfixtures import (
    TOC_DIGEST,
    UNCOMPRESSED_SIZE,
    ZSTD_MANIFEST_CHECKSUM,
    ZSTD_MANIFEST_POSITION,
    LazyBlob,
    estargz_blob,
    make_layer_tar,
    push_lazy_image,
    skopeo_zstd_chunked,
)

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
SKIPPABLE_MAGIC = bytes.fromhex("502a4d18")  # 0x184D2A50, little endian
ZSTD_CHUNKED_MAGIC = b"GnUlInUx"
CHUNK = 16_384


def _pseudo_random(n: int) -> bytes:
    out, seed = bytearray(), b"csi-oci"
    while len(out) < n:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return bytes(out[:n])


FILES = {
    "etc/a.txt": b"hello\n",
    "big.bin": _pseudo_random(50_000),
    "sub/dir/small": b"x" * 100,
    "empty": b"",
}
DIRS = ("etc", "sub", "sub/dir")
SYMLINKS = {"lnk": "etc/a.txt"}
HARDLINKS = {"hl": "etc/a.txt"}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def members(tar_bytes: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tf:
        for m in tf.getmembers():
            data = tf.extractfile(m).read() if m.isreg() else None
            out[m.name] = (m, data)
    return out


def zstd_all(blob: bytes) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True)
    return reader.read()


def one_gzip_member(data: bytes) -> tuple[bytes, bytes]:
    d = zlib.decompressobj(31)
    out = d.decompress(data)
    assert d.eof
    return out, d.unused_data


def one_zstd_frame(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def assert_original_content(tar_bytes: bytes, *, extra: set[str]) -> None:
    got = members(tar_bytes)
    assert set(got) == set(FILES) | set(DIRS) | set(SYMLINKS) | set(HARDLINKS) | extra
    for name, data in FILES.items():
        info, got_data = got[name]
        assert info.isreg() and info.mode == 0o644
        assert got_data == data
    for name in DIRS:
        assert got[name][0].isdir()
    assert got["lnk"][0].issym() and got["lnk"][0].linkname == "etc/a.txt"
    assert got["hl"][0].islnk() and got["hl"][0].linkname == "etc/a.txt"


def check_estargz_pieces(toc: dict, blob: bytes, decompress_piece) -> dict[str, list[dict]]:
    """Each reg/chunk piece decompresses at ``offset`` (+innerOffset) to its bytes."""
    pieces: dict[str, list[dict]] = {}
    for e in toc["entries"]:
        if e["type"] not in ("reg", "chunk"):
            continue
        if e["type"] == "reg" and e.get("size", 0) == 0:
            assert e["digest"] == sha(b"")  # empty files: digest of nothing, no offset
            assert "offset" not in e
            continue
        pieces.setdefault(e["name"], []).append(e)
        content = FILES.get(e["name"], b"\x0f")  # landmarks hold one 0x0f byte
        start = e.get("chunkOffset", 0)
        end = start + e["chunkSize"] if e.get("chunkSize") else len(content)
        inner = e.get("innerOffset", 0)
        payload = decompress_piece(blob[e["offset"] :])[inner : inner + end - start]
        assert payload == content[start:end], e
        assert e["chunkDigest"] == sha(payload)
        if e["type"] == "reg":
            assert e["digest"] == sha(content)
    for name, parts in pieces.items():
        offsets = [p.get("chunkOffset", 0) for p in parts]
        assert offsets == sorted(offsets) and offsets[0] == 0, name
        assert [p["type"] for p in parts] == ["reg"] + ["chunk"] * (len(parts) - 1)
    return pieces


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer_tar() -> bytes:
    return make_layer_tar(FILES, dirs=DIRS, symlinks=SYMLINKS, hardlinks=HARDLINKS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("lazyfixtures")


@pytest.fixture(scope="module")
def esgz(layer_tar, workdir) -> LazyBlob:
    return estargz_blob(layer_tar, workdir, chunk_size=CHUNK, level=1)


@pytest.fixture(scope="module")
def zchunked(layer_tar, workdir) -> LazyBlob:
    return estargz_blob(layer_tar, workdir, fmt="zstdchunked", chunk_size=CHUNK)


@pytest.fixture(scope="module")
def skopeo_blob(layer_tar, workdir) -> LazyBlob:
    return skopeo_zstd_chunked(layer_tar, workdir)


# -- estargz-gen: eStargz ---------------------------------------------------------


def test_make_layer_tar_ends_at_end_of_archive(layer_tar):
    assert layer_tar.endswith(bytes(1024))
    assert len(layer_tar) % 512 == 0 and len(layer_tar) % 10240 != 0
    assert_original_content(layer_tar, extra=set())


def test_estargz_decompresses_to_the_files_plus_toc(esgz):
    assert esgz.media_type == GZIP
    assert esgz.digest == sha(esgz.blob)
    tar_bytes = gzip.decompress(esgz.blob)  # every member, footer included
    assert esgz.diff_id == sha(tar_bytes)
    assert esgz.annotations == {
        TOC_DIGEST: esgz.toc_digest,
        UNCOMPRESSED_SIZE: str(len(tar_bytes)),
    }
    assert_original_content(tar_bytes, extra={"stargz.index.json", ".no.prefetch.landmark"})
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tf:
        names = tf.getnames()
    assert names[0] == ".no.prefetch.landmark"  # no prioritized files: landmark first
    assert names[-1] == "stargz.index.json"
    # -level 1 reached compress/gzip: XFL=4 ("fastest") in the first member's header
    assert esgz.blob[:4] == b"\x1f\x8b\x08\x00" and esgz.blob[8] == 4


def test_estargz_footer_and_toc(esgz):
    blob = esgz.blob
    footer = blob[-51:]
    assert footer[:10] == bytes([0x1F, 0x8B, 8, 4, 0, 0, 0, 0, 0, 0xFF])  # FEXTRA, OS=255
    assert footer[10:12] == (26).to_bytes(2, "little")  # XLEN
    assert footer[12:14] == b"SG" and footer[14:16] == (22).to_bytes(2, "little")
    match = re.fullmatch(rb"([0-9a-f]{16})STARGZ", footer[16:38])
    assert match, footer[16:38]
    assert footer[38:] == bytes([1, 0, 0, 0xFF, 0xFF]) + bytes(8)  # empty stored block, CRC/ISIZE 0
    assert gzip.decompress(footer) == b""
    toc_offset = int(match[1], 16)

    toc_tar, rest = one_gzip_member(blob[toc_offset:])
    assert rest == footer  # the TOC member is followed by the footer only
    with tarfile.open(fileobj=io.BytesIO(toc_tar), mode="r:") as tf:
        (info,) = tf.getmembers()
        assert info.name == "stargz.index.json"
        toc_json = tf.extractfile(info).read()
    assert sha(toc_json) == esgz.toc_digest
    assert toc_json.startswith(b'{\n\t"version": 1,\n\t"entries": [')  # Go MarshalIndent, tabs
    toc = json.loads(toc_json)
    assert toc["version"] == 1
    names = [e["name"] for e in toc["entries"]]
    assert "stargz.index.json" not in names
    assert {"etc/", "sub/", "sub/dir/"} <= set(names)  # dirs with a trailing "/"
    by_name = {e["name"]: e for e in toc["entries"] if e["type"] != "chunk"}
    assert by_name["lnk"]["type"] == "symlink" and by_name["lnk"]["linkName"] == "etc/a.txt"
    assert by_name["hl"]["type"] == "hardlink" and by_name["hl"]["linkName"] == "etc/a.txt"
    assert by_name["etc/"]["mode"] == 0o755 and by_name["etc/a.txt"]["mode"] == 0o644
    assert by_name["etc/a.txt"]["modtime"] == "2023-11-14T22:13:20Z"
    assert list(by_name["etc/a.txt"]) == [
        "name", "type", "size", "modtime", "mode", "offset", "digest", "chunkDigest",
    ]  # fmt: skip

    pieces = check_estargz_pieces(toc, blob, lambda data: one_gzip_member(data)[0])
    big = pieces["big.bin"]
    assert len(big) == -(-len(FILES["big.bin"]) // CHUNK) == 4
    assert all(p["chunkSize"] == CHUNK for p in big[:-1]) and "chunkSize" not in big[-1]
    assert all(len(p) == 1 for p in pieces.values() if p[0]["name"] != "big.bin")


def test_estargz_prioritized_files_and_landmark(layer_tar, workdir):
    lb = estargz_blob(layer_tar, workdir, prioritized=("sub/dir/small", "nope"))
    assert lb.info["missedPrioritized"] == ["nope"]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(lb.blob)), mode="r:") as tf:
        names = tf.getnames()
        assert tf.extractfile(".prefetch.landmark").read() == b"\x0f"
    assert ".no.prefetch.landmark" not in names
    # prioritized file (with its parent dirs) first, then the landmark, then the rest
    assert names[: names.index(".prefetch.landmark")] == ["sub", "sub/dir", "sub/dir/small"]
    assert lb.blob[8] == 2  # default level: gzip.BestCompression (XFL=2)


def test_estargz_min_chunk_size_packs_files(layer_tar, workdir):
    lb = estargz_blob(layer_tar, workdir, min_chunk_size=1 << 20)
    match = re.fullmatch(rb"([0-9a-f]{16})STARGZ", lb.blob[-35:-13])
    toc_tar, _ = one_gzip_member(lb.blob[int(match[1], 16) :])
    with tarfile.open(fileobj=io.BytesIO(toc_tar), mode="r:") as tf:
        toc = json.loads(tf.extractfile("stargz.index.json").read())
    check_estargz_pieces(toc, lb.blob, lambda data: one_gzip_member(data)[0])
    data_entries = [e for e in toc["entries"] if "offset" in e]
    assert len({e["offset"] for e in data_entries}) < len(data_entries)
    assert any(e.get("innerOffset", 0) > 0 for e in data_entries)


def test_estargz_keeps_names_as_in_the_tar(workdir):
    tar_bytes = build_tar([Dir("./"), Dir("./d"), File("./d/f", b"x"), File("/abs", b"y")])
    lb = estargz_blob(tar_bytes, workdir)
    tar_out = gzip.decompress(lb.blob)
    with tarfile.open(fileobj=io.BytesIO(tar_out), mode="r:") as tf:
        toc = json.loads(tf.extractfile("stargz.index.json").read())
    names = [e["name"] for e in toc["entries"]]
    assert names == [".no.prefetch.landmark", "./", "./d/", "./d/f", "abs"]


# -- estargz-gen: zstd:chunked (stargz-snapshotter dialect) ------------------------


def test_zstdchunked_blob(zchunked):
    blob = zchunked.blob
    assert zchunked.media_type == ZSTD
    assert zchunked.digest == sha(blob)
    tar_bytes = zstd_all(blob)  # data frames; the TOC and footer frames are skippable
    assert zchunked.diff_id == sha(tar_bytes)
    assert_original_content(tar_bytes, extra={".no.prefetch.landmark"})  # no TOC tar entry

    # footer: a skippable frame holding 40 bytes
    assert blob[-48:-40] == SKIPPABLE_MAGIC + (40).to_bytes(4, "little")
    footer = blob[-40:]
    offset, clen, ulen, kind = (int.from_bytes(footer[i : i + 8], "little") for i in (0, 8, 16, 24))
    assert (kind, footer[32:]) == (1, ZSTD_CHUNKED_MAGIC)
    assert blob[offset - 8 : offset] == SKIPPABLE_MAGIC + clen.to_bytes(4, "little")
    assert offset + clen == len(blob) - 48
    compressed_toc = blob[offset : offset + clen]
    toc_json = one_zstd_frame(compressed_toc)
    assert len(toc_json) == ulen

    assert zchunked.annotations == {
        TOC_DIGEST: sha(toc_json),
        UNCOMPRESSED_SIZE: str(len(tar_bytes)),
        ZSTD_MANIFEST_CHECKSUM: sha(compressed_toc),
        ZSTD_MANIFEST_POSITION: f"{offset}:{clen}:{ulen}:1",
    }
    assert zchunked.toc_digest == sha(toc_json)
    toc = json.loads(toc_json)  # eStargz TOC schema
    assert toc["version"] == 1
    pieces = check_estargz_pieces(toc, blob, one_zstd_frame)
    assert len(pieces["big.bin"]) == 4


# -- skopeo: zstd:chunked (containers/storage legacy dialect) ----------------------


def test_skopeo_zstd_chunked(skopeo_blob, layer_tar):
    blob = skopeo_blob.blob
    assert skopeo_blob.media_type == ZSTD
    assert skopeo_blob.digest == sha(blob)
    assert set(skopeo_blob.annotations) == {ZSTD_MANIFEST_CHECKSUM, ZSTD_MANIFEST_POSITION}

    tar_bytes = zstd_all(blob)
    assert tar_bytes == layer_tar  # byte for byte: diffID unchanged
    assert skopeo_blob.diff_id == sha(layer_tar)
    assert skopeo_blob.info["config_diff_ids"] == [sha(layer_tar)]

    offset, clen, ulen, kind = map(int, skopeo_blob.annotations[ZSTD_MANIFEST_POSITION].split(":"))
    assert kind == 1
    assert blob[offset - 8 : offset] == SKIPPABLE_MAGIC + clen.to_bytes(4, "little")
    compressed_toc = blob[offset : offset + clen]
    assert skopeo_blob.annotations[ZSTD_MANIFEST_CHECKSUM] == sha(compressed_toc)
    toc_json = one_zstd_frame(compressed_toc)
    assert len(toc_json) == ulen and skopeo_blob.toc_digest == sha(toc_json)

    assert blob[-48:-40] == SKIPPABLE_MAGIC + (40).to_bytes(4, "little")
    footer = blob[-40:]
    assert [int.from_bytes(footer[i : i + 8], "little") for i in (0, 8, 16, 24)] == [
        offset, clen, ulen, 1,
    ]  # fmt: skip
    assert footer[32:] == ZSTD_CHUNKED_MAGIC
    assert offset + clen == len(blob) - 48

    toc = json.loads(toc_json)  # containers/storage schema, compact JSON
    assert toc["version"] == 1 and b"\n" not in toc_json
    by_name = {e["name"]: e for e in toc["entries"]}
    assert set(by_name) == {"etc/", "sub/", "sub/dir/", *FILES, *SYMLINKS, *HARDLINKS}
    assert list(by_name["etc/a.txt"]) == [
        "type", "name", "mode", "size", "modtime", "accesstime", "changetime",
        "digest", "offset", "endOffset",
    ]  # fmt: skip
    assert "digest" not in by_name["empty"] and "offset" not in by_name["empty"]
    assert by_name["hl"]["type"] == "hardlink" and by_name["hl"]["linkName"] == "etc/a.txt"
    for name, data in FILES.items():
        e = by_name[name]
        if not data:
            continue
        assert e["digest"] == sha(data)
        assert one_zstd_frame(blob[e["offset"] : e["endOffset"]]) == data


def test_skopeo_rolling_checksum_chunks(workdir):
    data = _pseudo_random(1 << 20)  # incompressible: content-defined chunks
    lb = skopeo_zstd_chunked({"r": data}, workdir)
    offset, clen, _, _ = map(int, lb.annotations[ZSTD_MANIFEST_POSITION].split(":"))
    toc = json.loads(one_zstd_frame(lb.blob[offset : offset + clen]))
    first, *chunks = toc["entries"]
    assert first["type"] == "reg" and first["digest"] == sha(data)
    assert chunks and all(c["type"] == "chunk" and "endOffset" not in c for c in chunks)
    # the reg entry's endOffset is where the file's last chunk frame ends
    assert chunks[-1]["offset"] < first["endOffset"] < offset - 8
    last = one_zstd_frame(lb.blob[chunks[-1]["offset"] : first["endOffset"]])
    assert last == data[chunks[-1]["chunkOffset"] :]
    pos = 0
    for piece in [first, *chunks]:
        assert piece.get("chunkOffset", 0) == pos
        payload = one_zstd_frame(lb.blob[piece["offset"] :])
        assert payload == data[pos : pos + piece["chunkSize"]]  # one frame per chunk
        assert piece["chunkDigest"] == sha(payload)
        pos += piece["chunkSize"]
    assert pos == len(data)


def test_skopeo_drops_tar_record_padding(workdir):
    padded = make_layer_tar({"f": b"data"}, trim=False)  # tarfile pads to 10240 bytes
    assert len(padded) == 10240
    lb = skopeo_zstd_chunked(padded, workdir)
    tar_out = zstd_all(lb.blob)
    assert tar_out == padded[: len(tar_out)] and len(tar_out) == 2048  # header, data, 2 zero blocks
    # skopeo copies the source config: its diff_id no longer matches the layer
    assert lb.info["config_diff_ids"] == [sha(padded)] != [lb.diff_id]


# -- push -------------------------------------------------------------------------


def test_push_lazy_image(registry, esgz, zchunked, skopeo_blob, workdir):
    layers = [esgz, zchunked, skopeo_blob]
    pushed = push_lazy_image(registry, layers, "lazy/fixtures:v1", workdir)
    assert pushed.reference == f"{registry.host}/lazy/fixtures:v1"
    resp = registry.get_manifest("lazy/fixtures", "v1")
    assert resp.status_code == 200, resp.text
    assert sha(resp.content) == pushed.digest == registry.manifest_digest("lazy/fixtures", "v1")
    manifest = resp.json()
    assert manifest["layers"] == [
        {
            "mediaType": lb.media_type,
            "digest": lb.digest,
            "size": len(lb.blob),
            "annotations": lb.annotations,
        }
        for lb in layers
    ]
    config = registry.get_blob("lazy/fixtures", manifest["config"]["digest"]).json()
    assert config["rootfs"]["diff_ids"] == [lb.diff_id for lb in layers]
    for lb in layers:
        assert registry.get_blob("lazy/fixtures", lb.digest).content == lb.blob
