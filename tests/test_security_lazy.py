"""Issue 14, finding 1: a TOC digest used as a path must never reach the host.

The attacker writes the TOC (they build the image) and re-seals it, so the
TOC digest annotation matches: every field of it is hostile. A digest that
names a host file must not make the driver serve that file to the pod, and
one that names a path that does not exist must not make it create one. Both
are tried on blobs from the reference writers (estargz-gen for eStargz,
skopeo for containers/storage zstd:chunked), at the library level and
end to end through NodePublishVolume with a real FUSE mount.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import grpc
import pytest

from csi_oci.errors import IntegrityError, InvalidArgument, InvalidLayer
from csi_oci.lazy.reader import LazyReader, open_toc
from csi_oci.lazy.toc import Piece
from csi_oci.spec.digest import Digest, parse_digest
from tests.support.driver import Driver, LazyServerProcess
from tests.support.hostile import rewrite_containers_toc, rewrite_estargz_toc, toc_entry
from tests.support.lazyfixtures import (
    estargz_blob,
    make_layer_tar,
    push_lazy_image,
    skopeo_zstd_chunked,
)

SECRET = b"TOPSECRET host file content, never for a pod"
FILES = {"a.txt": b"hello", "models/config.json": b'{"hidden_size": 64}'}
ALGOS = {"sha256": 64, "sha512": 128}


# -- one digest rule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "/etc/shadow",
        "../../etc/passwd",
        "sha256:/etc/passwd",
        "sha256:../" + "a" * 61,
        "sha256:" + "A" * 64,  # upper case: another spelling of the same digest, another path
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "a" * 64 + "\n",
        "sha256:" + "a" * 64 + "/",
        "md5:" + "a" * 32,
        "sha1:" + "a" * 40,
        "SHA256:" + "a" * 64,
        "sha256" + "a" * 64,
        "",
        ":",
        "sha512:" + "a" * 64,
        "sha256:" + "g" * 64,
        "sha256:" + "a" * 32 + "\x00" + "a" * 31,
    ],
)
def test_parse_digest_refuses_everything_but_allow_listed_lower_hex(text):
    with pytest.raises(InvalidArgument):
        parse_digest(text)


@pytest.mark.parametrize(
    "value", [None, 5, ["sha256:" + "a" * 64], {"a": 1}, b"sha256:" + b"a" * 64]
)
def test_parse_digest_refuses_non_strings(value):
    with pytest.raises(InvalidArgument):
        parse_digest(value)


@pytest.mark.parametrize("algo", ["sha256", "sha512"])
def test_a_digest_names_only_a_flat_file(algo):
    digest = parse_digest(f"{algo}:" + "0123456789abcdef" * (ALGOS[algo] // 16))
    assert str(digest).startswith(f"{algo}:")
    assert digest.file_name == f"{algo}-{digest.hex}"
    assert "/" not in digest.file_name and not digest.file_name.startswith(".")


def test_a_digest_cannot_be_built_around_the_parser():
    with pytest.raises(InvalidArgument):
        Digest("sha256", "/etc/passwd")
    with pytest.raises(InvalidArgument):
        Digest("md5", "a" * 32)


def test_verification_fails_closed():
    from csi_oci.lazy.estargz import verify_piece

    data = b"hello"
    piece = Piece(0, 10, 0, 0, 5, None)
    with pytest.raises(InvalidLayer):
        verify_piece(data, piece, "f")
    wrong = Piece(0, 10, 0, 0, 5, parse_digest("sha256:" + "0" * 64))
    with pytest.raises(IntegrityError):
        verify_piece(data, wrong, "f")


# -- hostile TOCs at the format level ------------------------------------------------------------


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile-toc")
    tar = make_layer_tar(FILES, dirs=("models",))
    return {
        "estargz": estargz_blob(tar, work, chunk_size=1 << 20),
        "containers": skopeo_zstd_chunked(tar, work),
    }


def rewrite(kind, blob, edit):
    if kind == "containers":
        return rewrite_containers_toc(blob, edit)
    return rewrite_estargz_toc(blob, edit)


def path_digest(entry, path):
    """The attack: no chunkDigest, and a `digest` that is a host path."""
    entry.pop("chunkDigest", None)
    entry["digest"] = path


def fetch_of(blob):
    data = blob.blob
    return lambda offset, length: data[offset : offset + length]


@pytest.mark.parametrize("kind", ["estargz", "containers"])
@pytest.mark.parametrize("field", ["digest", "chunkDigest"])
@pytest.mark.parametrize(
    "value", ["/etc/shadow", "../../../../etc/shadow", "sha256:../../x", "md5:" + "a" * 32]
)
def test_toc_with_a_path_for_a_digest_is_refused(blobs, tmp_path, kind, field, value):
    def edit(toc):
        entry = toc_entry(toc, "a.txt")
        if field == "digest":
            path_digest(entry, value)
        else:
            entry["chunkDigest"] = value

    hostile = rewrite(kind, blobs[kind], edit)
    with pytest.raises(InvalidLayer, match=r"a\.txt"):
        open_toc(hostile.media_type, hostile.annotations, hostile.size, fetch_of(hostile))


@pytest.mark.parametrize("kind", ["estargz", "containers"])
def test_unedited_reference_blobs_still_read(blobs, tmp_path, kind):
    blob = rewrite(kind, blobs[kind], lambda toc: None)  # re-sealed, nothing changed
    toc = open_toc(blob.media_type, blob.annotations, blob.size, fetch_of(blob))
    reader = LazyReader(toc, fetch_of(blob), cache_dir=tmp_path / "pieces")
    for name, data in FILES.items():
        assert reader.read_all(name) == data
    # Verified bytes land in one file inside the cache dir, named by the TOC's sha256 only.
    names = sorted(p.name for p in (tmp_path / "pieces").iterdir())
    assert names == [f"layer-v1-{toc.toc_sha256}.data"]
    assert re.fullmatch(r"[0-9a-f]{64}", toc.toc_sha256)


def test_a_layer_file_that_is_a_symlink_is_not_followed(blobs, tmp_path):
    """Someone (or a bug) plants a symlink where a layer file lives: never read
    or written through it; the reader serves from a private file instead."""
    blob = blobs["estargz"]
    toc = open_toc(blob.media_type, blob.annotations, blob.size, fetch_of(blob))
    cache = tmp_path / "pieces"
    cache.mkdir()
    secret = tmp_path / "secret"
    secret.write_bytes(b"hello")  # even matching bytes: a link is not our file
    (cache / f"layer-v1-{toc.toc_sha256}.data").symlink_to(secret)
    reader = LazyReader(toc, fetch_of(blob), cache_dir=cache)
    assert reader.read_all("a.txt") == b"hello"
    assert reader.cache_misses == 1  # fetched from the blob, not read through the link
    assert secret.read_bytes() == b"hello"


# -- end to end: NodePublishVolume, FUSE, both prefetch settings -----------------------------------

needs_fuse = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="FUSE mounts need root and /dev/fuse",
)


def canaries(tmp_path: Path) -> tuple[Path, Path]:
    host = tmp_path / "host"
    host.mkdir()
    secret = host / "token"
    secret.write_bytes(SECRET)
    return secret, host / "created-by-driver"


def assert_canaries_untouched(secret: Path, planted: Path, target: Path) -> None:
    assert secret.read_bytes() == SECRET
    assert not planted.exists(), "a TOC digest made the driver create a host file"
    try:
        served = (target / "a.txt").read_bytes()
    except OSError:
        return
    assert SECRET[:5] not in served, "a TOC digest served a host file to the pod"


@needs_fuse
@pytest.mark.parametrize(
    ("kind", "prefetch", "servers"),
    [
        ("estargz", "all", "inline"),
        ("estargz", "none", "inline"),
        ("containers", "all", "inline"),
        ("containers", "none", "inline"),
        ("estargz", "all", "external"),  # the DaemonSet's lazy-server container
        ("containers", "none", "external"),
    ],
)
@pytest.mark.slow
def test_lazy_volume_never_reads_or_creates_host_files(
    registry, blobs, tmp_path, kind, prefetch, servers
):
    secret, planted = canaries(tmp_path)
    read_attack = rewrite(
        kind, blobs[kind], lambda toc: path_digest(toc_entry(toc, "a.txt"), str(secret))
    )
    write_attack = rewrite(
        kind, blobs[kind], lambda toc: path_digest(toc_entry(toc, "a.txt"), str(planted))
    )
    lazy_server = None
    args: list[str] = []
    if servers == "external":
        runtime = tmp_path / "run"
        lazy_server = LazyServerProcess(tmp_path / "drv" / "state", runtime, tmp_path / "ls.log")
        args = ["--lazy-server", "external", "--runtime-dir", str(runtime)]
    d = Driver(tmp_path / "drv", extra_args=args)
    try:
        for n, hostile in enumerate((read_attack, write_attack)):
            ref = push_lazy_image(
                registry, [hostile], f"hostile/{kind}-{prefetch}:v{n}", tmp_path
            ).reference
            target = tmp_path / "pods" / f"p{n}" / "mount"
            target.parent.mkdir(parents=True)
            with pytest.raises(grpc.RpcError) as info:
                d.publish(
                    target, {"image": ref, "mode": "lazy", "prefetch": prefetch}, volume_id=f"v{n}"
                )
            details = info.value.details()
            assert "a.txt" in details and "digest" in details, details
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
            assert_canaries_untouched(secret, planted, target)
        # Nothing the attack named appeared under the state dir's piece cache either.
        chunks = d.state_dir / "lazy" / "chunks"
        if chunks.exists():
            assert all(
                re.fullmatch(r"layer-v1-[0-9a-f]{64}\.data", p.name) for p in chunks.iterdir()
            )
    finally:
        d.stop()
        if lazy_server is not None:
            lazy_server.stop()
    assert_canaries_untouched(secret, planted, tmp_path / "nowhere")


# -- finding 4: TOC size, entries, pieces and hardlinks are bounded ------------------------------


def parse_estargz(toc: dict, toc_offset: int = 1 << 30):
    import json

    from csi_oci.lazy.estargz import parse_toc_json

    return parse_toc_json(json.dumps(toc).encode(), toc_offset, "estargz", "gzip")


def reg(name, size, **extra):
    return {"name": name, "type": "reg", "size": size, "offset": 100, **extra}


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (reg("f", 5, chunkDigest="sha256:" + "a" * 64, offset=(1 << 30) + 5), "extent"),
        (reg("f", 5, chunkDigest="sha256:" + "a" * 64, offset=-1), "non-negative"),
        (reg("f", 1 << 30, chunkDigest="sha256:" + "a" * 64), "at most"),
        (reg("f", 5, chunkDigest="sha256:" + "a" * 64, innerOffset=1 << 30), "at most"),
    ],
)
def test_pieces_outside_the_blob_or_too_large_are_refused(entry, match):
    with pytest.raises(InvalidLayer, match=match):
        parse_estargz({"version": 1, "entries": [entry]})


def test_a_piece_whose_range_runs_to_a_far_toc_is_refused():
    """One piece at 0 and the TOC 10 GiB later: one read would fetch 10 GiB."""
    entry = reg("f", 5, chunkDigest="sha256:" + "a" * 64, offset=0)
    with pytest.raises(InvalidLayer, match="compressed bytes"):
        parse_estargz({"version": 1, "entries": [entry]}, toc_offset=10 << 30)


def test_empty_pieces_are_refused():
    """Zero-size chunks could tile a file with any number of pieces."""
    digest = "sha256:" + "a" * 64
    entries = [reg("f", 5, chunkDigest=digest, chunkSize=0, offset=100)]
    entries += [
        {
            "name": "f",
            "type": "chunk",
            "offset": 100,
            "chunkOffset": 0,
            "chunkSize": 0,
            "chunkDigest": digest,
        }
    ] * 3
    with pytest.raises(InvalidLayer):
        parse_estargz({"version": 1, "entries": entries})


@pytest.mark.parametrize(
    "text",
    [
        b'{"version": 2, "entries": []}',
        b'{"version": true, "entries": []}',
        b'{"entries": []}',
        b'{"version": 1}',
        b'{"version": 1, "entries": [], "entries": []}',
        b'{"version": 1, "entries": [1]}',
        b'{"version": 1, "entries": [{"name": "a", "type": "dir"},]}',
        b'{"version": 1, "entries": [{"name": "a", "type": "dir"} , \n ]}',
        b'{"version": 1, "entries": [{"name": "a", "type": "dir"}{"name": "b", "type": "dir"}]}',
        b'{"version": 1, "entries": [{"name": "a", "type": "dir"},,{"name": "b", "type": "dir"}]}',
        b'{"version": 1, "entries": [{"name": "a", "type": "dir"}',
        b'{"version": 1, "entries": []} trailing',
        b'{"version": 1, "entries": [' + b"[" * 100_000 + b"]",
        b"[]",
        b"\xff\xfe",
        b"",
    ],
)
def test_malformed_toc_json_is_a_clean_refusal(text):
    from csi_oci.lazy.estargz import parse_toc_json

    with pytest.raises(InvalidLayer):
        parse_toc_json(text, 1 << 20, "estargz", "gzip")


@pytest.mark.parametrize("gap", ["", " ", "\n\t ", "\r\n"])
def test_toc_entries_read_the_same_compact_or_spaced(gap):
    from csi_oci.lazy.toc import iter_toc_entries

    entries = [{"name": f"d{i}", "type": "dir"} for i in range(3)]
    text = (
        f'{{{gap}"version"{gap}:{gap}1{gap},{gap}"entries"{gap}:{gap}[{gap}'
        + f"{gap},{gap}".join(json.dumps(e) for e in entries)
        + f"{gap}]{gap}}}{gap}"
    ).encode()
    assert list(iter_toc_entries(text, "TOC")) == entries


def test_the_entry_budget_refuses_at_the_first_entry_too_many():
    from csi_oci.lazy.toc import TocBudget, iter_toc_entries

    text = (
        b'{"version": 1, "entries": [' + b",".join([b'{"name": "d", "type": "dir"}'] * 11) + b"]}"
    )
    seen = []
    with pytest.raises(InvalidLayer, match="more than 10 entries"):
        for raw in iter_toc_entries(text, "TOC", TocBudget(max_entries=10)):
            seen.append(raw)
    assert len(seen) == 10


def test_a_hardlink_to_a_directory_cannot_make_a_cycle(blobs, tmp_path):
    """`a/loop` hard-linked to `a`: the link count walk used to recurse forever."""
    from csi_oci.lazy.fs import LazyTree

    def edit(toc):
        toc["entries"].append({"name": "models/loop", "type": "hardlink", "linkName": "models/"})
        toc["entries"].append({"name": "models/again", "type": "hardlink", "linkName": "a.txt"})

    hostile = rewrite_estargz_toc(blobs["estargz"], edit)
    toc = open_toc(hostile.media_type, hostile.annotations, hostile.size, fetch_of(hostile))
    tree = LazyTree([LazyReader(toc, fetch_of(hostile))])
    models = tree.root.children["models"]
    assert "loop" not in models.children  # a directory is never hard-linked
    assert models.children["again"] is tree.root.children["a.txt"]
    assert tree.root.children["a.txt"].nlink == 2


PEAK_RSS = """
import json, sys
def hwm():  # VmHWM: this process's own peak (ru_maxrss carries the forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
from csi_oci.lazy.reader import open_toc
from csi_oci.errors import CsiOciError
meta = json.loads(open(sys.argv[1] + ".json").read())
data = open(sys.argv[1], "rb").read()
fetch = lambda offset, length: data[offset : offset + length]
base = hwm()
try:
    toc = open_toc(meta["media_type"], meta["annotations"], len(data), fetch)
    from csi_oci.lazy.reader import LazyReader
    from csi_oci.lazy.fs import LazyTree
    tree = LazyTree([LazyReader(toc, fetch)])  # what the FUSE server then serves
    outcome = "served %d entries, %d nodes" % (len(toc.entries), len(tree.nodes))
except CsiOciError as exc:
    outcome = "refused: %s: %s" % (type(exc).__name__, str(exc)[:160])
print(json.dumps({"outcome": outcome, "peak_mb": hwm(), "base_mb": base}))
"""


def peak_rss_of_opening(blob, path: Path) -> dict:
    """Open the layer's TOC in a fresh process, as a FUSE server does; its peak RSS."""
    import json
    import subprocess
    import sys

    path.write_bytes(blob.blob)
    path.with_name(path.name + ".json").write_text(
        json.dumps({"media_type": blob.media_type, "annotations": blob.annotations})
    )
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, timeout=300, check=True
    )
    result = json.loads(proc.stdout)
    print(f"\n[hostile TOC] {path.name}: {result}")
    return result


def _toc_bomb(kind: str, n: int) -> bytes:
    if kind == "dirs":
        entries = ",".join(f'{{"name":"d{i}/","type":"dir"}}' for i in range(n))
        return b'{"version":1,"entries":[' + entries.encode() + b"]}"
    if kind == "whitespace":
        return b'{"version":1,"entries":[' + b" " * n + b"]}"
    raise ValueError(kind)


@pytest.mark.parametrize(
    ("kind", "n", "refused"),
    [
        pytest.param("dirs", 300_000, True, marks=pytest.mark.slow),  # over the entry budget
        # just under it: the worst an image may cost
        pytest.param("dirs", 249_000, False, marks=pytest.mark.slow),
        ("whitespace", 40 << 20, True),  # over the JSON byte cap, tiny compressed
    ],
)
def test_a_hostile_toc_keeps_a_fuse_server_small(blobs, tmp_path, kind, n, refused):
    from csi_oci.lazy.toc import MAX_IMAGE_TOC_ENTRIES

    assert kind != "dirs" or (n > MAX_IMAGE_TOC_ENTRIES) == refused
    hostile = rewrite_estargz_toc(blobs["estargz"], None, raw_json=_toc_bomb(kind, n))
    result = peak_rss_of_opening(hostile, tmp_path / f"{kind}-{n}")
    assert result["outcome"].startswith("refused") == refused, result
    assert result["peak_mb"] < 260, result


@pytest.mark.slow
def test_a_gzip_bomb_for_a_toc_stops_at_the_cap(blobs, tmp_path):
    """The TOC member inflates to 512 MiB: the driver stops inflating at the cap."""
    import zlib

    from csi_oci.lazy.toc import MAX_TOC_JSON_BYTES

    lazy = blobs["estargz"]
    offset = int(lazy.blob[-51:][16:32].decode(), 16)
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    header = bytearray(512)
    header[:17] = b"stargz.index.json"
    member = comp.compress(bytes(header)) + comp.compress(bytes(512 << 20)) + comp.flush()
    blob = lazy.blob[:offset] + member + lazy.blob[-51:]
    from dataclasses import replace

    hostile = replace(lazy, blob=blob)
    result = peak_rss_of_opening(hostile, tmp_path / "gzip-bomb")
    assert result["outcome"].startswith("refused"), result
    assert result["peak_mb"] < 100 + 2 * MAX_TOC_JSON_BYTES / (1 << 20), result


@pytest.mark.parametrize(
    "entries, words",
    [
        ([reg("f", True, offset=0)], "Expected `int`, got `bool` - at `$.entries[0].size`"),
        ([reg("f", 5, offset=-1)], "Expected `int` >= 0 - at `$.entries[0].offset`"),
        ([reg("f", 5, offset=1.5)], "Expected `int`, got `float` - at `$.entries[0].offset`"),
        (
            [{"type": "dir", "name": "d", "xattrs": {f"user.{i}": "" for i in range(257)}}],
            "Expected `object` of length <= 256 - at `$.entries[0].xattrs`",
        ),
        ([{"type": "dir", "name": 7}], "Expected `str`, got `int` - at `$.entries[0].name`"),
    ],
)
def test_containers_toc_fields_are_typed_at_decode(entries, words):
    from csi_oci.lazy.zstdchunked import parse_containers_toc

    text = json.dumps({"version": 1, "entries": entries}).encode()
    with pytest.raises(InvalidLayer) as err:
        parse_containers_toc(text, 1 << 20)
    assert str(err.value) == f"zstd:chunked TOC is not a valid containers/storage TOC: {words}"


def test_containers_toc_entry_bomb_is_refused_before_decoding():
    """Two million tiny entries in 32 MiB: refused by counting, nothing built."""
    import resource

    from csi_oci.lazy.toc import TocBudget
    from csi_oci.lazy.zstdchunked import parse_containers_toc

    text = b'{"version":1,"entries":[' + b",".join([b"{}"] * 2_000_000) + b"]}"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InvalidLayer, match="more than 250000 entries"):
        parse_containers_toc(text, 1 << 20, TocBudget())
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 50, grown_mb
    # Within the budget, the exact count is charged.
    budget = TocBudget(max_entries=3)
    small = json.dumps({"version": 1, "entries": [{"type": "dir", "name": "d"}] * 4}).encode()
    with pytest.raises(InvalidLayer, match="more than 3 entries"):
        parse_containers_toc(small, 1 << 20, budget)
