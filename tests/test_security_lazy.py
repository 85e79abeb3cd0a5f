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

import os
from pathlib import Path

import grpc
import pytest
from support.driver import Driver, LazyServerProcess
from support.hostile import rewrite_containers_toc, rewrite_estargz_toc, toc_entry
from support.lazyfixtures import estargz_blob, make_layer_tar, push_lazy_image, skopeo_zstd_chunked

from csi_oci.digest import Digest, parse_digest
from csi_oci.errors import IntegrityError, InvalidArgument, InvalidLayer
from csi_oci.lazy import LazyReader, open_toc
from csi_oci.lazy.toc import Piece

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
    # Pieces on disk are flat files named <algo>-<hex>, inside the cache dir only.
    names = sorted(p.name for p in (tmp_path / "pieces").iterdir())
    assert names and all(n.startswith(("sha256-", "sha512-")) and "/" not in n for n in names)


def test_a_cached_piece_that_is_a_symlink_is_not_followed(blobs, tmp_path):
    """Someone (or a bug) plants a symlink where a piece lives: never read through it."""
    blob = blobs["estargz"]
    toc = open_toc(blob.media_type, blob.annotations, blob.size, fetch_of(blob))
    cache = tmp_path / "pieces"
    cache.mkdir()
    piece = toc.entries["a.txt"].pieces[0]
    assert piece.digest is not None
    secret = tmp_path / "secret"
    secret.write_bytes(b"hello")  # even matching bytes: a link is not a piece
    (cache / piece.digest.file_name).symlink_to(secret)
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
                p.name.startswith(("sha256-", "sha512-", ".piece-")) for p in chunks.iterdir()
            )
    finally:
        d.stop()
        if lazy_server is not None:
            lazy_server.stop()
    assert_canaries_untouched(secret, planted, tmp_path / "nowhere")
