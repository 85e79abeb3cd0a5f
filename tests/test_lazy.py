"""csi_oci.lazy on blobs written by the reference implementations:
eStargz and zstd:chunked (stargz dialect) by the Go stargz-snapshotter
`estargz` module (hack/tools/estargz-gen), zstd:chunked (containers/storage
dialect) by skopeo. Every file read through the library equals the original;
the TOC digest and the piece digests refuse tampered blobs. Footer variants
(legacy 47-byte eStargz, 56/64-byte zstd:chunked) and the new annotation
prefix are made by rewriting those reference blobs."""

from __future__ import annotations

import hashlib
import itertools
import os

import pytest

from csi_oci.errors import IntegrityError, InvalidLayer
from csi_oci.lazy.estargz import TOC_DIGEST_ANNOTATION, parse_footer
from csi_oci.lazy.reader import LazyReader, NotLazy, lazy_format, open_toc
from tests.support.lazyfixtures import estargz_blob, make_layer_tar, skopeo_zstd_chunked

FILES = {
    "models/config.json": b'{"hidden_size": 64}',
    "models/tokenizer.json": b'{"model": {"type": "BPE"}}' * 50,
    "models/model-00001-of-00002.safetensors": os.urandom(5_000_000),
    "models/model-00002-of-00002.safetensors": os.urandom(1_500_000)
    + bytes(300_000)
    + os.urandom(7),
    "README.md": b"# tiny\n",
    "empty": b"",
}
TAR = make_layer_tar(
    FILES,
    dirs=("models",),
    symlinks={"latest": "models/config.json"},
    hardlinks={"models/config-link.json": "models/config.json"},
)


def reader_for(blob, annotations=None):
    ann = blob.annotations if annotations is None else annotations
    data = blob.blob
    fetch = lambda offset, length: data[offset : offset + length]  # noqa: E731
    toc = open_toc(blob.media_type, ann, len(data), fetch)
    return toc, LazyReader(toc, fetch)


def assert_all_files(toc, reader):
    for name, data in FILES.items():
        assert toc.entries[name].type == "reg"
        assert reader.read(name, 0, len(data)) == data, name
    assert toc.entries["latest"].type == "symlink"
    assert toc.entries["latest"].link_name == "models/config.json"
    assert toc.entries["models/config-link.json"].type == "hardlink"
    assert toc.entries["models"].type == "dir"
    big = FILES["models/model-00001-of-00002.safetensors"]
    for offset, length in ((0, 1), (4_194_300, 10), (4_999_990, 100), (123_457, 2_000_000)):
        assert (
            reader.read("models/model-00001-of-00002.safetensors", offset, length)
            == big[offset : offset + length]
        )
    shown = {e.name for e in toc.files()}
    assert not shown & {"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("lazy")


@pytest.mark.parametrize(
    ("chunk_size", "min_chunk_size", "level"),
    [(None, None, None), (1 << 20, None, 1), (300_000, 64_000, None)],
    ids=["defaults", "1MiB-chunks", "innerOffset"],
)
def test_estargz_from_the_reference_writer(workdir, chunk_size, min_chunk_size, level):
    blob = estargz_blob(
        TAR,
        workdir / f"e-{chunk_size}-{min_chunk_size}",
        chunk_size=chunk_size,
        min_chunk_size=min_chunk_size,
        level=level,
    )
    assert lazy_format(blob.media_type, blob.annotations) == "estargz"
    toc, reader = reader_for(blob)
    assert toc.format == "estargz" and toc.compression == "gzip"
    assert_all_files(toc, reader)
    pieces = toc.entries["models/model-00001-of-00002.safetensors"].pieces
    if chunk_size:
        assert len(pieces) >= 5_000_000 // chunk_size
    if min_chunk_size:
        assert any(p.inner_offset for e in toc.entries.values() for p in e.pieces)


def test_estargz_prioritized_files_mark_the_prefetch_region(workdir):
    blob = estargz_blob(TAR, workdir / "prio", prioritized=("models/config.json", "README.md"))
    toc, reader = reader_for(blob)
    assert toc.prefetch_end is not None
    for name in ("models/config.json", "README.md"):
        assert toc.entries[name].pieces[0].offset < toc.prefetch_end
    assert_all_files(toc, reader)


def test_estargz_reading_one_small_file_fetches_a_small_part(workdir):
    blob = estargz_blob(TAR, workdir / "small")
    _toc, reader = reader_for(blob)
    assert reader.read_all("models/config.json") == FILES["models/config.json"]
    assert reader.fetched_bytes < 64 * 1024, "one small file costs one small member"


def test_a_read_over_many_chunks_is_one_range_request(workdir, tmp_path):
    blob = estargz_blob(TAR, workdir / "small-chunks", chunk_size=64 * 1024)
    data = blob.blob
    requests = []

    def fetch(offset, length):
        requests.append((offset, length))
        return data[offset : offset + length]

    toc = open_toc(blob.media_type, blob.annotations, len(data), fetch)
    name = "models/model-00001-of-00002.safetensors"
    reader = LazyReader(toc, fetch, cache_dir=tmp_path / "pieces")
    requests.clear()
    got = reader.read(name, 100_000, 1 << 20)  # about 17 chunks of 64 KiB
    assert got == FILES[name][100_000 : 100_000 + (1 << 20)]
    assert len(requests) == 1, requests
    # The run reads ahead in the same file (a loader reads on), never past it.
    start, length = requests[0]
    piece_ends = [p.end for p in toc.entries[name].pieces]
    assert length >= 1 << 20 and start + length <= max(piece_ends)
    assert reader.cache_misses >= 16
    # Verified bytes land in one file per layer, named by the TOC's digest.
    assert [p.name for p in (tmp_path / "pieces").iterdir()] == [f"layer-v1-{toc.toc_sha256}.data"]
    requests.clear()
    assert reader.read(name, 100_000, 1 << 20) == got and requests == []  # all landed now
    # A new reader (a restart) checks what the file holds: only the gap is fetched.
    fresh = LazyReader(toc, fetch, cache_dir=tmp_path / "pieces")
    assert fresh.read(name, 0, 2 << 20) == FILES[name][: 2 << 20]
    assert len(requests) == 1 and requests[0][0] == toc.entries[name].pieces[0].offset, requests


def test_no_piece_is_fetched_twice_by_reads_and_the_background_fill(workdir, tmp_path):
    """Readers and the fill race over one layer: every piece crosses the network once."""
    import threading

    from csi_oci.lazy.prefetch import prefetch

    blob = estargz_blob(TAR, workdir / "race", chunk_size=64 * 1024)
    data = blob.blob
    fetched: list[tuple[int, int]] = []
    lock = threading.Lock()

    def fetch(offset, length):
        with lock:
            fetched.append((offset, length))
        return data[offset : offset + length]

    toc = open_toc(blob.media_type, blob.annotations, len(data), fetch)
    fetched.clear()
    reader = LazyReader(toc, fetch, cache_dir=tmp_path / "race")
    results: dict[str, bytes] = {}

    def read(name: str) -> None:
        out = bytearray()
        for offset in range(0, len(FILES[name]), 128 * 1024):
            out += reader.read(name, offset, 128 * 1024)
        results[name] = bytes(out)

    names = [n for n in FILES if FILES[n]]
    threads = [threading.Thread(target=read, args=(n,)) for n in names]
    threads.append(threading.Thread(target=prefetch, args=(reader, "all")))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {n: FILES[n] for n in names}
    covered = sorted(fetched)
    for (a, n), (b, _m) in itertools.pairwise(covered):
        assert a + n <= b, f"bytes {b}..{a + n} were fetched twice"
    assert sum(n for _o, n in fetched) <= toc.toc_offset


def test_estargz_legacy_47_byte_footer(workdir):
    blob = estargz_blob(TAR, workdir / "legacy")
    toc_offset, size = parse_footer(blob.blob)
    assert size == 51
    extra = f"{toc_offset:016x}STARGZ".encode()
    legacy = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + (22).to_bytes(2, "little") + extra
    legacy += b"\x01\x00\x00\xff\xff" + bytes(8)  # empty stored block, CRC32 0, ISIZE 0
    assert len(legacy) == 47
    assert parse_footer(blob.blob[:-51] + legacy) == (toc_offset, 47)
    rewritten = blob.blob[:-51] + legacy
    fetch = lambda o, n: rewritten[o : o + n]  # noqa: E731
    toc = open_toc(blob.media_type, blob.annotations, len(rewritten), fetch)
    assert LazyReader(toc, fetch).read_all("README.md") == FILES["README.md"]


def test_estargz_toc_digest_must_match(workdir):
    blob = estargz_blob(TAR, workdir / "tocdigest")
    wrong = {**blob.annotations, TOC_DIGEST_ANNOTATION: "sha256:" + "0" * 64}
    with pytest.raises(IntegrityError, match="TOC digest mismatch"):
        reader_for(blob, wrong)


@pytest.mark.parametrize("fmt", ["estargz", "zstdchunked"])
def test_tampered_piece_is_refused(workdir, fmt):
    blob = estargz_blob(TAR, workdir / f"tamper-{fmt}")
    toc, _ = reader_for(blob)
    piece = toc.entries["models/model-00001-of-00002.safetensors"].pieces[0]
    bad = bytearray(blob.blob)
    bad[piece.offset + (piece.end - piece.offset) // 2] ^= 0xFF
    reader = LazyReader(toc, lambda o, n: bytes(bad[o : o + n]))
    with pytest.raises((IntegrityError, InvalidLayer)):
        reader.read("models/model-00001-of-00002.safetensors", 0, 10)
    # other files are untouched and still served
    assert reader.read_all("models/config.json") == FILES["models/config.json"]


def test_zstd_chunked_stargz_dialect(workdir):
    blob = estargz_blob(TAR, workdir / "zc", fmt="zstdchunked", chunk_size=1 << 20)
    assert lazy_format(blob.media_type, blob.annotations) == "zstd:chunked/stargz"
    toc, reader = reader_for(blob)
    assert toc.format == "zstd:chunked/stargz" and toc.compression == "zstd"
    assert_all_files(toc, reader)
    # annotations first; the 40-byte footer locates the TOC when position is absent
    no_position = {k: v for k, v in blob.annotations.items() if not k.endswith("manifest-position")}
    toc2, reader2 = reader_for(blob, no_position)
    assert toc2.entries.keys() == toc.entries.keys()
    assert reader2.read_all("README.md") == FILES["README.md"]
    wrong = {**blob.annotations, TOC_DIGEST_ANNOTATION: "sha256:" + "1" * 64}
    with pytest.raises(IntegrityError):
        reader_for(blob, wrong)


@pytest.fixture(scope="module")
def skopeo_blob(workdir):
    return skopeo_zstd_chunked(TAR, workdir / "skopeo")


def test_zstd_chunked_containers_dialect_from_skopeo(skopeo_blob):
    assert lazy_format(skopeo_blob.media_type, skopeo_blob.annotations) == "zstd:chunked/containers"
    assert any(k.startswith("io.containers.zstd-chunked.") for k in skopeo_blob.annotations)
    toc, reader = reader_for(skopeo_blob)
    assert toc.format == "zstd:chunked/containers"
    assert_all_files(toc, reader)
    pieces = toc.entries["models/model-00002-of-00002.safetensors"].pieces
    assert any(p.zeros for p in pieces), "runs of zeros become zeros chunks"
    assert len(toc.entries["models/model-00001-of-00002.safetensors"].pieces) > 10


def test_zstd_chunked_new_annotation_prefix(skopeo_blob):
    renamed = {
        k.replace("io.containers.", "io.github.containers."): v
        for k, v in skopeo_blob.annotations.items()
    }
    _toc, reader = reader_for(skopeo_blob, renamed)
    assert reader.read_all("README.md") == FILES["README.md"]


def _refooter(blob: bytes, payload_size: int) -> bytes:
    """The same blob with its 40-byte footer rewritten as a 56- or 64-byte one."""
    old = blob[-40:]
    assert blob[-48:-44] == b"\x50\x2a\x4d\x18" and old[-8:] == b"GnUlInUx"
    fields = old[:32]
    if payload_size == 64:
        payload = fields + bytes(24) + b"GNUlInUx"  # + tar-split position (none)
    else:
        payload = fields + b"GnUlInUx" + bytes(16)
    return blob[:-48] + b"\x50\x2a\x4d\x18" + payload_size.to_bytes(4, "little") + payload


@pytest.mark.parametrize("payload_size", [56, 64])
def test_zstd_chunked_footer_variants(skopeo_blob, payload_size):
    blob = _refooter(skopeo_blob.blob, payload_size)
    checksum = {k: v for k, v in skopeo_blob.annotations.items() if k.endswith("manifest-checksum")}
    fetch = lambda o, n: blob[o : o + n]  # noqa: E731
    toc = open_toc(skopeo_blob.media_type, checksum, len(blob), fetch)
    assert LazyReader(toc, fetch).read_all("models/config.json") == FILES["models/config.json"]


def test_zstd_chunked_checksum_must_match(skopeo_blob):
    wrong = dict(skopeo_blob.annotations)
    key = next(k for k in wrong if k.endswith("manifest-checksum"))
    wrong[key] = "sha256:" + hashlib.sha256(b"other").hexdigest()
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        reader_for(skopeo_blob, wrong)


def test_layers_without_a_trust_anchor_are_not_lazy(skopeo_blob):
    with pytest.raises(NotLazy, match="no eStargz or zstd:chunked TOC digest annotation"):
        open_toc(skopeo_blob.media_type, {}, len(skopeo_blob.blob), lambda o, n: b"")
    assert lazy_format("application/vnd.oci.image.layer.v1.tar+gzip", {}) is None


def test_disk_cache_is_verified_when_loaded(workdir, tmp_path):
    blob = estargz_blob(TAR, workdir / "cache", chunk_size=1 << 20)
    data = blob.blob
    fetches = []

    def fetch(offset, length):
        fetches.append((offset, length))
        return data[offset : offset + length]

    toc = open_toc(blob.media_type, blob.annotations, len(data), fetch)
    cache = tmp_path / "chunks"
    name = "models/model-00001-of-00002.safetensors"
    first = LazyReader(toc, fetch, cache_dir=cache)
    assert first.read_all(name) == FILES[name]
    first.close()
    (layer_file,) = cache.iterdir()
    fetches.clear()
    assert LazyReader(toc, fetch, cache_dir=cache).read_all(name) == FILES[name]
    assert fetches == [], "a new reader (another volume, a restart) uses the layer file"
    # Tear the second piece as a crash (or anyone) might: it is fetched again, never served.
    piece = toc.entries[name].pieces[1]
    where = layer_file.read_bytes().find(FILES[name][piece.chunk_offset :][:64])
    assert where > 0
    with open(layer_file, "r+b") as f:
        f.seek(where + 10)
        f.write(b"torn or tampered")
    reader = LazyReader(toc, fetch, cache_dir=cache)
    assert reader.read_all(name) == FILES[name]
    assert len(fetches) == 1 and fetches[0][0] == piece.offset, fetches


def test_prefetch_merges_ranges_and_fills_the_cache(workdir, tmp_path):
    from csi_oci.lazy.prefetch import prefetch

    blob = estargz_blob(TAR, workdir / "prefetch", chunk_size=1 << 20, prioritized=("README.md",))
    data = blob.blob
    fetches = []

    def fetch(offset, length):
        fetches.append((offset, length))
        return data[offset : offset + length]

    toc = open_toc(blob.media_type, blob.annotations, len(data), fetch)
    fetches.clear()
    reader = LazyReader(toc, fetch, cache_dir=tmp_path / "chunks")
    prefetch(reader, "landmark")
    assert len(fetches) == 1 and fetches[0][0] + fetches[0][1] <= toc.prefetch_end + 4096
    prefetch(reader, "all")
    assert 1 < len(fetches) <= 3, "the whole layer in a few merged requests (16 MiB each)"
    fetches.clear()
    for name, content in FILES.items():
        assert reader.read(name, 0, len(content)) == content
    assert fetches == [], "once complete, reads never touch the network"


def test_a_failing_fetch_releases_its_pieces_and_the_fill_retries(workdir, tmp_path, monkeypatch):
    """A registry error mid-run: the claimed pieces go back to missing (a waiting
    read takes them over, nothing half-landed is served) and the fill retries."""
    from csi_oci.errors import RegistryError
    from csi_oci.lazy import prefetch as prefetch_module

    monkeypatch.setattr(prefetch_module, "RETRY_BASE", 0.01)
    blob = estargz_blob(TAR, workdir / "flaky", chunk_size=256 * 1024)
    data = blob.blob
    calls = {"n": 0}

    def fetch(offset, length):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RegistryError("connection reset by peer")
        return data[offset : offset + length]

    toc = open_toc(blob.media_type, blob.annotations, len(data), lambda o, n: data[o : o + n])
    reader = LazyReader(toc, fetch, cache_dir=tmp_path / "flaky")
    prefetch_module.prefetch(reader, "all", workers=2)
    assert all(reader.present(i) for i, p in enumerate(reader.pieces) if not p.zeros)
    assert reader.prefetch_done_bytes == reader.prefetch_total_bytes
    calls["n"] = -(10**9)  # no more failures; nothing is fetched now anyway
    for name, content in FILES.items():
        assert reader.read_all(name) == content
    # On demand: an error fails that read only; the next read fetches again.
    fresh = LazyReader(toc, fetch, cache_dir=tmp_path / "flaky2")
    calls["n"] = 2  # the next fetch fails
    name = "models/model-00001-of-00002.safetensors"
    with pytest.raises(RegistryError):
        fresh.read(name, 0, 4096)
    assert fresh.read(name, 0, 4096) == FILES[name][:4096]
