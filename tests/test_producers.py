"""The real artifact producers (oras CLI, oras-py, modctl, kit) and what they push.

Each test pushes with a helper from tests/support/producers.py and asserts the
exact wire format (manifest, config, layer media types, annotations, tar
members), so an upgrade of a pinned tool that changes any of it fails here.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import zstandard

from tests.support import producers
from tests.support.producers import (
    Pushed,
    kit_push,
    modctl_push,
    oras_pull,
    oras_push_dir,
    oras_push_files,
    oraspy_push_files,
)
from tests.support.registry import Registry, ToolMissingError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"

TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"
UNPACK = "io.deis.oras.content.unpack"
CONTENT_DIGEST = "io.deis.oras.content.digest"
CNAI_FILEPATH = "org.cnai.model.filepath"
CNAI_METADATA = "org.cnai.model.file.metadata+json"
CNCF_FILEPATH = "org.cncf.model.filepath"
CNCF_METADATA = "org.cncf.model.file.metadata+json"
MODCTL_MODELFILE = "org.cnai.modctl.modelfile"
KIT_CLI_VERSION = "ml.kitops.modelkit.cli-version"
KIT_KITFILE = "ml.kitops.modelkit.kitfile"

FILE_METADATA_KEYS = {"name", "mode", "uid", "gid", "size", "mtime", "typeflag"}

# A small model project; classify_model_file gives: config, model, code, doc, dataset.
MODEL_FILES = {
    "config.json": b'{"hidden_size": 8}\n',
    "model.safetensors": bytes(range(256)) * 4,
    "src/run.py": b"print('hi')\n",
    "README.md": b"# tiny model\n",
    "data/train.csv": b"x,y\n1,2\n",
}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def unique(prefix: str) -> str:
    return f"producers/{prefix}-{uuid.uuid4().hex[:8]}:v1"


@pytest.fixture(scope="module", autouse=True)
def _require_producers() -> None:
    missing = producers.missing_producers("oras", "modctl", "kit")
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: {producers.PRODUCER_HINT}", pytrace=False)


def fetch_manifest(registry: Registry, pushed: Pushed) -> dict:
    """GET the manifest by tag as OCI; check the digest the helper returned."""
    if registry.credentials is None:
        resp = requests.get(
            f"{registry.url}/v2/{pushed.repo}/manifests/{pushed.tag}",
            headers={"Accept": OCI_MANIFEST},
            timeout=30,
        )
    else:  # Basic or bearer auth, done by the Registry helper
        resp = registry.request(
            "GET", f"/v2/{pushed.repo}/manifests/{pushed.tag}", headers={"Accept": OCI_MANIFEST}
        )
    resp.raise_for_status()
    assert resp.headers["Content-Type"] == OCI_MANIFEST
    assert sha(resp.content) == pushed.digest
    assert resp.headers["Docker-Content-Digest"] == pushed.digest
    return resp.json()


def fetch_blob(registry: Registry, pushed: Pushed, digest: str) -> bytes:
    resp = registry.get_blob(pushed.repo, digest)
    resp.raise_for_status()
    assert sha(resp.content) == digest
    return resp.content


def decompress(blob: bytes) -> tuple[str, bytes]:
    """(compression, uncompressed bytes) from the blob's magic number."""
    if blob[:2] == b"\x1f\x8b":
        return "gzip", gzip.decompress(blob)
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)) as reader:
            return "zstd", reader.read()
    return "none", blob


@dataclass
class Member:
    name: str  # as stored in the raw header (trailing "/" kept)
    type: str  # tar typeflag character
    mode: int
    uid: int
    gid: int
    uname: str
    mtime: int
    magic: bytes


def tar_members(data: bytes) -> list[Member]:
    """Members of an uncompressed tar, with names as raw header bytes show them."""
    members = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar.getmembers():
            header = data[info.offset : info.offset + 512]
            raw_name = header[:100].rstrip(b"\0").decode()
            prefix = header[345:500].rstrip(b"\0").decode()
            members.append(
                Member(
                    name=f"{prefix}/{raw_name}" if prefix else raw_name,
                    type=info.type.decode(),
                    mode=info.mode,
                    uid=info.uid,
                    gid=info.gid,
                    uname=info.uname,
                    mtime=info.mtime,
                    magic=header[257:265],
                )
            )
    return members


def layer_summary(manifest: dict) -> list[tuple[str, str]]:
    return [
        (
            layer["mediaType"],
            layer["annotations"].get(CNAI_FILEPATH)
            or layer["annotations"].get(CNCF_FILEPATH)
            or layer["annotations"].get(TITLE),
        )
        for layer in manifest["layers"]
    ]


# -- oras CLI -----------------------------------------------------------------


def test_oras_push_files(registry, tmp_path):
    files = {"a.txt": b"hello\n", "sub/b.bin": b"\x00\x01nested"}
    pushed = oras_push_files(registry, unique("oras-files"), tmp_path, files)
    assert pushed.reference == f"{registry.host}/{pushed.repo}:v1"
    manifest = fetch_manifest(registry, pushed)

    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["artifactType"] == "application/vnd.unknown.artifact.v1"
    assert manifest["config"] == {
        "mediaType": OCI_EMPTY,
        "digest": EMPTY_DIGEST,
        "size": 2,
        "data": "e30=",
    }
    assert fetch_blob(registry, pushed, EMPTY_DIGEST) == b"{}"
    assert set(manifest["annotations"]) == {CREATED}
    assert "subject" not in manifest
    # One layer per file, bytes as is (no tar), title = the path as given.
    assert [layer["mediaType"] for layer in manifest["layers"]] == [OCI_LAYER, OCI_LAYER]
    assert [layer["annotations"] for layer in manifest["layers"]] == [
        {TITLE: "a.txt"},
        {TITLE: "sub/b.bin"},
    ]
    for layer, data in zip(manifest["layers"], files.values(), strict=True):
        assert layer["digest"] == sha(data)
        assert fetch_blob(registry, pushed, layer["digest"]) == data


def test_oras_push_files_artifact_type(registry, tmp_path):
    pushed = oras_push_files(
        registry, unique("oras-at"), tmp_path, {"w.bin": b"w"}, "application/vnd.example.test"
    )
    manifest = fetch_manifest(registry, pushed)
    assert manifest["artifactType"] == "application/vnd.example.test"
    assert manifest["config"]["mediaType"] == OCI_EMPTY


def test_oras_push_dir(registry, tmp_path):
    files = {"x.txt": b"x\n", "inner/y.txt": b"y\n", "inner/deeper/z.bin": b"z" * 1000}
    pushed = oras_push_dir(registry, unique("oras-dir"), tmp_path, "mydir", files)
    manifest = fetch_manifest(registry, pushed)

    assert manifest["artifactType"] == "application/vnd.unknown.artifact.v1"
    assert manifest["config"]["mediaType"] == OCI_EMPTY
    assert set(manifest["annotations"]) == {CREATED}
    [layer] = manifest["layers"]
    assert layer["mediaType"] == OCI_LAYER_GZIP
    assert set(layer["annotations"]) == {TITLE, UNPACK, CONTENT_DIGEST}
    assert layer["annotations"][TITLE] == "mydir"
    assert layer["annotations"][UNPACK] == "true"

    compression, tar = decompress(fetch_blob(registry, pushed, layer["digest"]))
    assert compression == "gzip"
    # io.deis.oras.content.digest is the digest of the *uncompressed* tar.
    assert layer["annotations"][CONTENT_DIGEST] == sha(tar)
    members = tar_members(tar)
    # Prefixed by the directory name, the directory itself included, walk order,
    # no "./" and no trailing "/" on directories.
    assert [m.name for m in members] == [
        "mydir",
        "mydir/inner",
        "mydir/inner/deeper",
        "mydir/inner/deeper/z.bin",
        "mydir/inner/y.txt",
        "mydir/x.txt",
    ]
    assert [m.type for m in members] == ["5", "5", "5", "0", "0", "0"]
    assert {m.magic for m in members} == {b"ustar\x0000"}
    assert {m.uname for m in members} == {""}
    assert all(m.mtime > 0 for m in members)  # real mtimes are kept


def test_oras_pull_round_trip(registry, tmp_path):
    files = {"a.txt": b"A", "sub/b.txt": b"B"}
    pushed = oras_push_files(registry, unique("oras-pull"), tmp_path / "push", files)
    dest = oras_pull(registry, f"{pushed.repo}:{pushed.tag}", tmp_path / "out")
    assert (dest / "a.txt").read_bytes() == b"A"
    assert (dest / "sub/b.txt").read_bytes() == b"B"

    pushed = oras_push_dir(registry, unique("oras-pull-dir"), tmp_path / "push2", "d", files)
    dest = oras_pull(registry, pushed.reference, tmp_path / "out2")
    assert (dest / "d/a.txt").read_bytes() == b"A"
    assert (dest / "d/sub/b.txt").read_bytes() == b"B"


# -- oras-py --------------------------------------------------------------------


def test_oraspy_push_files(registry, tmp_path):
    files = {"a.txt": b"hello\n", "sub/b.bin": b"nested"}
    pushed = oraspy_push_files(registry, unique("oraspy"), tmp_path, files)
    manifest = fetch_manifest(registry, pushed)

    assert manifest["mediaType"] == OCI_MANIFEST
    assert "artifactType" not in manifest
    assert manifest["config"] == {
        "mediaType": "application/vnd.unknown.config.v1+json",
        "size": 2,
        "digest": EMPTY_DIGEST,
    }
    assert manifest["annotations"] == {}
    assert [layer["mediaType"] for layer in manifest["layers"]] == [OCI_LAYER, OCI_LAYER]
    # oras-py titles are basenames: "sub/b.bin" becomes "b.bin".
    assert [layer["annotations"] for layer in manifest["layers"]] == [
        {TITLE: "a.txt"},
        {TITLE: "b.bin"},
    ]
    for layer, data in zip(manifest["layers"], files.values(), strict=True):
        assert fetch_blob(registry, pushed, layer["digest"]) == data


def test_oraspy_push_dir_and_config_media_type(registry, tmp_path):
    files = {"d/e/f.txt": b"f", "d/g.txt": b"g", "top.txt": b"t"}
    pushed = oraspy_push_files(
        registry,
        unique("oraspy-dir"),
        tmp_path,
        files,
        "application/vnd.example.config",
        dirs=["d"],
    )
    manifest = fetch_manifest(registry, pushed)
    assert "artifactType" not in manifest
    assert manifest["config"]["mediaType"] == "application/vnd.example.config"
    assert manifest["config"]["digest"] == EMPTY_DIGEST

    dir_layer, file_layer = manifest["layers"]
    assert file_layer == {
        "mediaType": OCI_LAYER,
        "size": 1,
        "digest": sha(b"t"),
        "annotations": {TITLE: "top.txt"},
    }
    # A directory: tar+gzip but *no* io.deis.oras.content.* annotations.
    assert dir_layer["mediaType"] == OCI_LAYER_GZIP
    assert dir_layer["annotations"] == {TITLE: "d"}
    compression, tar = decompress(fetch_blob(registry, pushed, dir_layer["digest"]))
    assert compression == "gzip"
    members = tar_members(tar)
    # Prefixed by the directory name; directory entries end with "/" (Python tarfile).
    assert [m.name for m in members] == ["d/", "d/e/", "d/e/f.txt", "d/g.txt"]
    assert {m.mtime for m in members} == {0}
    assert {m.magic for m in members} == {b"ustar\x0000"}


# -- modctl ---------------------------------------------------------------------

CNAI = "application/vnd.cnai.model"


def _check_modctl_config(registry, pushed, manifest, *, created: bool) -> dict:
    assert manifest["config"]["mediaType"] == f"{CNAI}.config.v1+json"
    config = json.loads(fetch_blob(registry, pushed, manifest["config"]["digest"]))
    descriptor = dict(config["descriptor"])
    assert (descriptor.pop("createdAt", None) is not None) == created
    assert descriptor == {"family": "test", "name": "test-model"}
    assert config["config"] == {
        "architecture": "transformer",
        "format": "safetensors",
        "paramSize": "1",
        "precision": "fp32",
    }
    assert config["modelfs"]["type"] == "layers"
    return config


def test_modctl_push_raw(registry, tmp_path):
    pushed = modctl_push(registry, unique("modctl-raw"), tmp_path, MODEL_FILES)
    manifest = fetch_manifest(registry, pushed)

    assert manifest["mediaType"] == OCI_MANIFEST
    # modctl 0.2.2 still writes the legacy CNAI identifiers, not vnd.cncf.*.
    assert manifest["artifactType"] == f"{CNAI}.manifest.v1+json"
    config = _check_modctl_config(registry, pushed, manifest, created=True)
    # Order: CONFIG, MODEL, CODE, DOC; the DATASET line produces no layer.
    assert layer_summary(manifest) == [
        (f"{CNAI}.weight.config.v1.raw", "config.json"),
        (f"{CNAI}.weight.v1.raw", "model.safetensors"),
        (f"{CNAI}.code.v1.raw", "src/run.py"),
        (f"{CNAI}.doc.v1.raw", "README.md"),
    ]
    assert config["modelfs"]["diffIds"] == [layer["digest"] for layer in manifest["layers"]]
    for layer in manifest["layers"]:
        assert set(layer["annotations"]) == {CNAI_FILEPATH, CNAI_METADATA}
        path = layer["annotations"][CNAI_FILEPATH]
        assert fetch_blob(registry, pushed, layer["digest"]) == MODEL_FILES[path]
        meta = json.loads(layer["annotations"][CNAI_METADATA])
        assert set(meta) == FILE_METADATA_KEYS
        assert meta["name"] == Path(path).name  # basename, not the path
        assert meta["size"] == len(MODEL_FILES[path])
        assert meta["mode"] == 0o644
        assert meta["typeflag"] == 0
    # The manifest carries the Modelfile (as modctl regenerates it).
    assert set(manifest["annotations"]) == {MODCTL_MODELFILE}
    modelfile = manifest["annotations"][MODCTL_MODELFILE]
    assert modelfile.startswith("# Generated at ")
    assert "\nNAME test-model\n" in modelfile
    assert "\nMODEL model.safetensors\n" in modelfile
    assert "DATASET" not in modelfile


def test_modctl_push_tar_output_remote(registry, tmp_path):
    pushed = modctl_push(
        registry,
        unique("modctl-tar"),
        tmp_path,
        MODEL_FILES,
        raw=False,
        output_remote=True,
        no_creation_time=True,
    )
    manifest = fetch_manifest(registry, pushed)
    assert manifest["artifactType"] == f"{CNAI}.manifest.v1+json"
    config = _check_modctl_config(registry, pushed, manifest, created=False)
    assert layer_summary(manifest) == [
        (f"{CNAI}.weight.config.v1.tar", "config.json"),
        (f"{CNAI}.weight.v1.tar", "model.safetensors"),
        (f"{CNAI}.code.v1.tar", "src/run.py"),
        (f"{CNAI}.doc.v1.tar", "README.md"),
    ]
    # Uncompressed tars, so diffIds equal the layer digests.
    assert config["modelfs"]["diffIds"] == [layer["digest"] for layer in manifest["layers"]]
    for layer in manifest["layers"]:
        path = layer["annotations"][CNAI_FILEPATH]
        compression, tar = decompress(fetch_blob(registry, pushed, layer["digest"]))
        assert compression == "none"
        # One member: the relative path itself, no directory entries, no "./".
        [member] = tar_members(tar)
        assert member.name == path
        assert member.type == "0"
        assert member.magic == b"ustar\x0000"
        assert member.mtime > 0
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            assert tf.extractfile(path).read() == MODEL_FILES[path]


# -- kit ------------------------------------------------------------------------

KIT = "application/vnd.kitops.modelkit"
CNCF = "application/vnd.cncf.model"


def _kit_config(registry, pushed, manifest) -> dict:
    return json.loads(fetch_blob(registry, pushed, manifest["config"]["digest"]))


def test_kit_push_default_tar(registry, tmp_path):
    pushed = kit_push(registry, unique("kit"), tmp_path, MODEL_FILES)
    manifest = fetch_manifest(registry, pushed)

    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["artifactType"] == f"{KIT}.manifest.v1+json"
    assert manifest["config"]["mediaType"] == f"{KIT}.config.v1+json"
    assert set(manifest["annotations"]) == {KIT_CLI_VERSION, CREATED}
    assert manifest["annotations"][KIT_CLI_VERSION] == "1.15.0"
    # Order: model, model parts, code, datasets, docs.
    assert layer_summary(manifest) == [
        (f"{KIT}.model.v1.tar", "model.safetensors"),
        (f"{KIT}.modelpart.v1.tar", "config.json"),
        (f"{KIT}.code.v1.tar", "src/run.py"),
        (f"{KIT}.dataset.v1.tar", "data/train.csv"),
        (f"{KIT}.docs.v1.tar", "README.md"),
    ]
    members_by_path = {}
    for layer in manifest["layers"]:
        assert set(layer["annotations"]) == {CNCF_FILEPATH}
        compression, tar = decompress(fetch_blob(registry, pushed, layer["digest"]))
        assert compression == "none"
        members = tar_members(tar)
        members_by_path[layer["annotations"][CNCF_FILEPATH]] = [m.name for m in members]
        assert {(m.uid, m.gid, m.uname, m.mtime) for m in members} == {(1000, 0, "", 0)}
        assert {m.magic for m in members} == {b"ustar\x0000"}
    # Paths relative to the context; parent directories get their own entries.
    assert members_by_path == {
        "model.safetensors": ["model.safetensors"],
        "config.json": ["config.json"],
        "src/run.py": ["src", "src/run.py"],
        "data/train.csv": ["data", "data/train.csv"],
        "README.md": ["README.md"],
    }

    # The config is the Kitfile as JSON plus digest/diffId for each entry.
    config = _kit_config(registry, pushed, manifest)
    assert set(config) == {"manifestVersion", "package", "model", "code", "datasets", "docs"}
    digests = {layer["annotations"][CNCF_FILEPATH]: layer["digest"] for layer in manifest["layers"]}
    model = config["model"]
    assert (model["path"], model["digest"], model["diffId"]) == (
        "model.safetensors",
        digests["model.safetensors"],
        digests["model.safetensors"],
    )
    assert [(p["path"], p["digest"]) for p in model["parts"]] == [
        ("config.json", digests["config.json"])
    ]
    assert config["code"][0]["digest"] == digests["src/run.py"]
    assert config["datasets"][0]["diffId"] == digests["data/train.csv"]
    assert config["docs"][0]["path"] == "README.md"


def test_kit_push_directories(registry, tmp_path):
    files = {"model.gguf": b"GGUF", "src/a.py": b"a", "src/pkg/b.py": b"b"}
    roles = {"model.gguf": "model", "src": "code"}
    pushed = kit_push(registry, unique("kit-dir"), tmp_path, files, roles=roles)
    manifest = fetch_manifest(registry, pushed)
    code = manifest["layers"][1]
    assert code["mediaType"] == f"{KIT}.code.v1.tar"
    assert code["annotations"] == {CNCF_FILEPATH: "src"}
    _, tar = decompress(fetch_blob(registry, pushed, code["digest"]))
    members = tar_members(tar)
    # Members are prefixed by the directory path (not relative to it).
    assert [(m.name, m.type) for m in members] == [
        ("src", "5"),
        ("src/a.py", "0"),
        ("src/pkg", "5"),
        ("src/pkg/b.py", "0"),
    ]


@pytest.mark.parametrize(("compression", "suffix"), [("gzip", "gzip"), ("zstd", "zstd")])
def test_kit_push_compressed(registry, tmp_path, compression, suffix):
    pushed = kit_push(
        registry, unique(f"kit-{compression}"), tmp_path, MODEL_FILES, compression=compression
    )
    manifest = fetch_manifest(registry, pushed)
    assert [mt for mt, _ in layer_summary(manifest)] == [
        f"{KIT}.model.v1.tar+{suffix}",
        f"{KIT}.modelpart.v1.tar+{suffix}",
        f"{KIT}.code.v1.tar+{suffix}",
        f"{KIT}.dataset.v1.tar+{suffix}",
        f"{KIT}.docs.v1.tar+{suffix}",
    ]
    config = _kit_config(registry, pushed, manifest)
    layer = manifest["layers"][0]
    found, tar = decompress(fetch_blob(registry, pushed, layer["digest"]))
    assert found == suffix
    assert [m.name for m in tar_members(tar)] == ["model.safetensors"]
    # Config: digest = compressed blob, diffId = uncompressed tar.
    assert config["model"]["digest"] == layer["digest"]
    assert config["model"]["diffId"] == sha(tar)


def test_kit_push_raw(registry, tmp_path):
    pushed = kit_push(registry, unique("kit-raw"), tmp_path, MODEL_FILES, layer_format="raw")
    manifest = fetch_manifest(registry, pushed)
    assert manifest["artifactType"] == f"{KIT}.manifest.v1+json"
    assert layer_summary(manifest) == [
        (f"{KIT}.model.v1.raw", "model.safetensors"),
        (f"{KIT}.modelpart.v1.raw", "config.json"),
        (f"{KIT}.code.v1.raw", "src/run.py"),
        (f"{KIT}.dataset.v1.raw", "data/train.csv"),
        (f"{KIT}.docs.v1.raw", "README.md"),
    ]
    for layer in manifest["layers"]:
        assert set(layer["annotations"]) == {CNCF_FILEPATH, CNCF_METADATA}
        path = layer["annotations"][CNCF_FILEPATH]
        assert fetch_blob(registry, pushed, layer["digest"]) == MODEL_FILES[path]
        meta = json.loads(layer["annotations"][CNCF_METADATA])
        assert set(meta) == FILE_METADATA_KEYS
        assert meta["name"] == Path(path).name
        assert meta["typeflag"] == 48  # ord("0"), unlike modctl's 0


def test_kit_push_raw_rejects_directories(registry, tmp_path):
    files = {"model.gguf": b"GGUF", "src/a.py": b"a"}
    with pytest.raises(producers.ProducerError, match="not a regular file"):
        kit_push(
            registry,
            unique("kit-raw-dir"),
            tmp_path,
            files,
            roles={"model.gguf": "model", "src": "code"},
            layer_format="raw",
        )


def test_kit_push_model_pack(registry, tmp_path):
    pushed = kit_push(registry, unique("kit-mp"), tmp_path, MODEL_FILES, model_pack=True)
    manifest = fetch_manifest(registry, pushed)
    assert manifest["artifactType"] == f"{CNCF}.manifest.v1+json"
    assert manifest["config"]["mediaType"] == f"{CNCF}.config.v1+json"
    assert set(manifest["annotations"]) == {KIT_CLI_VERSION, KIT_KITFILE, CREATED}
    kitfile = json.loads(manifest["annotations"][KIT_KITFILE])
    assert kitfile["model"]["path"] == "model.safetensors"
    # Model parts become weight.config; docs become doc.
    assert layer_summary(manifest) == [
        (f"{CNCF}.weight.v1.tar", "model.safetensors"),
        (f"{CNCF}.weight.config.v1.tar", "config.json"),
        (f"{CNCF}.code.v1.tar", "src/run.py"),
        (f"{CNCF}.dataset.v1.tar", "data/train.csv"),
        (f"{CNCF}.doc.v1.tar", "README.md"),
    ]
    config = _kit_config(registry, pushed, manifest)
    assert set(config) == {"descriptor", "modelfs", "config"}
    assert config["modelfs"] == {
        "type": "layers",
        "diffIds": [layer["digest"] for layer in manifest["layers"]],
    }
    assert config["config"] == {}
    descriptor = dict(config["descriptor"])
    assert descriptor.pop("createdAt")
    assert descriptor == {
        "authors": ["csi-oci tests"],
        "name": "test-kit",
        "version": "1.0.0",
        "licenses": ["Apache-2.0"],
        "title": "test-kit",
        "description": "csi-oci test ModelKit",
    }


# -- authentication, missing tools ------------------------------------------------


@pytest.mark.parametrize("fixture", ["basic_registry", "token_registry"])
@pytest.mark.parametrize("producer", ["oras", "oras-py", "modctl", "kit"])
def test_push_to_authenticated_registry(request, tmp_path, producer, fixture):
    reg = request.getfixturevalue(fixture)
    files = {"model.bin": b"weights", "README.md": b"# r\n"}
    ref = unique(producer)
    if producer == "oras":
        pushed = oras_push_files(reg, ref, tmp_path, files)
    elif producer == "oras-py" and fixture == "token_registry":
        # oras-py 0.2.43 keeps the first (pull-scoped) bearer token and reuses
        # it for the upload, which then needs push: the registry says 401.
        with pytest.raises(producers.ProducerError, match="UNAUTHORIZED"):
            oraspy_push_files(reg, ref, tmp_path, files)
        return
    elif producer == "oras-py":
        pushed = oraspy_push_files(reg, ref, tmp_path, files)
    elif producer == "modctl":
        pushed = modctl_push(reg, ref, tmp_path, files)
    else:
        pushed = kit_push(reg, ref, tmp_path, files)
    assert len(fetch_manifest(reg, pushed)["layers"]) == 2


def test_missing_tool_is_a_clear_error(registry, tmp_path, monkeypatch):
    monkeypatch.setattr(producers, "BIN_DIR", tmp_path / "nothing")
    monkeypatch.setenv("PATH", str(tmp_path))
    for helper, args in [
        (oras_push_files, ({"a": b"a"},)),
        (modctl_push, ({"a": b"a"},)),
        (kit_push, ({"a": b"a"},)),
    ]:
        with pytest.raises(ToolMissingError, match="hack/install-deps"):
            helper(registry, "x/y:z", tmp_path / "w", *args)
