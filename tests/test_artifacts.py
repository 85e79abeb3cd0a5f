"""Artifacts published as directory trees, end to end through `csi-oci serve`:
ORAS files and directories, ModelPack (raw and tar), KitOps ModelKits,
KServe ModelCar images, partial pulls with `include`, and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest

from tests.support.artifacts import (
    ORAS_FILE,
    TITLE,
    Artifact,
    Blob,
    kitops,
    modelpack,
    oras_dir,
    oras_files,
    push_artifact,
)
from tests.support.driver import settled, tree_of
from tests.support.images import Dir, File, Image, Layer, push_image

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")

CONFIG = b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}'
TOKENIZER = b'{"model": {"type": "BPE"}}'


def target_in(tmp_path, name="vol"):
    parent = tmp_path / "pods" / "uid" / "volumes" / name
    parent.mkdir(parents=True, exist_ok=True)
    return parent / "mount"


def publish_tree(driver, tmp_path, ref, name="vol", **attrs):
    target = target_in(tmp_path, name)
    driver.publish(target, {"image": ref, **attrs}, volume_id=name)
    try:
        return tree_of(target)
    finally:
        driver.unpublish(target, volume_id=name)


def shards(n, size=100_000):
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": os.urandom(size) for i in range(n)}


def test_oras_files_are_files_named_by_title(driver, registry, tmp_path):
    files = {"config.json": CONFIG, "tokenizer.json": TOKENIZER, **shards(3)}
    ref = push_artifact(registry, oras_files(files), "art/oras-files:v1")
    assert publish_tree(driver, tmp_path, ref) == files


def test_oras_title_with_directories(driver, registry, tmp_path):
    files = {"weights/part-1.bin": b"1", "weights/part-2.bin": b"2", "README.md": b"hi"}
    ref = push_artifact(registry, oras_files(files), "art/oras-nested:v1")
    assert publish_tree(driver, tmp_path, ref) == {**files, "weights": "dir"}


def test_oras_directory_is_unpacked_under_its_title(driver, registry, tmp_path):
    art = oras_files({"top.txt": b"top"})
    art.layers.append(oras_dir("tokenizer", {"vocab.json": b"{}", "merges.txt": b"a b"}))
    ref = push_artifact(registry, art, "art/oras-dir:v1")
    assert publish_tree(driver, tmp_path, ref) == {
        "top.txt": b"top",
        "tokenizer": "dir",
        "tokenizer/vocab.json": b"{}",
        "tokenizer/merges.txt": b"a b",
    }


@pytest.mark.parametrize("fmt", ["raw", "tar", "tar+gzip"])
def test_modelpack(driver, registry, tmp_path, fmt):
    files = {
        "config.json": ("weight.config", CONFIG),
        "tokenizer.json": ("weight.config", TOKENIZER),
        "model.safetensors": ("weight", os.urandom(300_000)),
        "README.md": ("doc", b"# tiny"),
        "data/train.jsonl": ("dataset", b'{"q": 1}\n'),
    }
    ref = push_artifact(
        registry, modelpack(files, fmt=fmt), f"art/modelpack-{fmt.replace('+', '-')}:v1"
    )
    tree = publish_tree(driver, tmp_path, ref)
    assert tree == {**{k: v[1] for k, v in files.items()}, "data": "dir"}


def test_modelpack_wrong_diff_id_is_refused(driver, registry, tmp_path):
    art = modelpack({"m.bin": ("weight", b"weights")}, fmt="tar")
    config = json.loads(art.config.data)
    config["modelfs"]["diffIds"] = ["sha256:" + "1" * 64]
    art.config = Blob(json.dumps(config).encode(), art.config.media_type)
    ref = push_artifact(registry, art, "art/modelpack-baddiff:v1")
    target = target_in(tmp_path)
    with pytest.raises(grpc.RpcError) as info:
        driver.publish(target, {"image": ref})
    assert info.value.code() in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INVALID_ARGUMENT)
    assert "diff" in info.value.details()


def test_kitops_modelkit(driver, registry, tmp_path):
    parts = {
        "model": {"model/model.gguf": b"GGUF" + os.urandom(1000)},
        "code": {"src/serve.py": b"print('hi')\n"},
        "dataset": {"data/eval.csv": b"a,b\n1,2\n"},
        "docs": {"README.md": b"# kit"},
    }
    ref = push_artifact(registry, kitops(parts), "art/kit:v1")
    tree = publish_tree(driver, tmp_path, ref)
    expected = {k: v for files in parts.values() for k, v in files.items()}
    assert {k: v for k, v in tree.items() if v != "dir"} == expected


def test_modelcar_image_with_sub_path_models(driver, registry, tmp_path):
    """KServe ModelCar: an ordinary image whose model lives in /models."""
    image = Image(
        [
            Layer([Dir("bin"), File("bin/sh", b"#!busybox")]),
            Layer(
                [
                    Dir("models"),
                    File("models/config.json", CONFIG),
                    File("models/model.safetensors", b"w"),
                ]
            ),
        ]
    )
    push_image(registry, image, "art/modelcar:v1", tmp_path)
    tree = publish_tree(driver, tmp_path, f"{registry.host}/art/modelcar:v1", subPath="models")
    assert tree == {"config.json": CONFIG, "model.safetensors": b"w"}


def test_include_publishes_exactly_the_matching_files_and_skips_layers(driver, registry, tmp_path):
    weights = shards(8, 50_000)
    unique = os.urandom(8).hex().encode()  # blobs no earlier test put in the blob store
    files = {
        "config.json": CONFIG + unique,
        "tokenizer.json": TOKENIZER + unique,
        "README.md": b"x",
        **weights,
    }
    art = oras_files(files)
    ref = push_artifact(registry, art, "art/partial:v1")
    before = sum(registry.blob_gets("art/partial").values())
    include = "*.json,model-0000[1-2]-of-00008.safetensors"
    tree = publish_tree(driver, tmp_path, ref, "partial", include=include)
    wanted = {
        k: v
        for k, v in files.items()
        if k.endswith(".json") or k[:11] in ("model-00001", "model-00002")
    }
    assert tree == wanted
    fetched = settled(
        lambda: sum(registry.blob_gets("art/partial").values()) - before, len(wanted) + 1
    )
    assert fetched == len(wanted) + 1, "only the matching layers (and the config) are downloaded"
    # another include set: its own tree, sharing the blobs already downloaded
    before = sum(registry.blob_gets("art/partial").values())
    tree2 = publish_tree(
        driver, tmp_path, ref, "partial2", include="config.json,model-00002-of-00008.safetensors"
    )
    assert set(tree2) == {"config.json", "model-00002-of-00008.safetensors"}
    fetched = settled(lambda: sum(registry.blob_gets("art/partial").values()) - before, 1)
    assert fetched == 1, "only the config: blobs are shared"
    ls = subprocess.run(
        [sys.executable, "-m", "csi_oci.cli", "ls", "--state-dir", str(driver.state_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "include=*.json,model-0000[1-2]-of-00008.safetensors" in ls
    assert "oras: 4 files" in ls and "oras: 2 files" in ls


def test_include_filters_entries_of_image_layers(driver, registry, tmp_path):
    image = Image(
        [
            Layer(
                [
                    Dir("models"),
                    File("models/a.json", b"a"),
                    File("models/b.bin", b"b"),
                    File("etc/x", b"x"),
                ]
            )
        ]
    )
    push_image(registry, image, "art/image-include:v1", tmp_path)
    tree = publish_tree(
        driver, tmp_path, f"{registry.host}/art/image-include:v1", include="models/*.json"
    )
    assert tree == {"models": "dir", "models/a.json": b"a"}


def test_raw_file_is_written_once_and_shared(driver, registry, tmp_path):
    data = os.urandom(200_000)
    ref = push_artifact(registry, oras_files({"w.bin": data}), "art/shared:v1")
    target = target_in(tmp_path)
    driver.publish(target, {"image": ref})
    try:
        st = os.stat(target / "w.bin")
        assert st.st_nlink == 2, "the tree's file is a hard link to the one stored blob"
        blob = (
            driver.state_dir / "blobs" / "sha256" / __import__("hashlib").sha256(data).hexdigest()
        )
        assert os.stat(blob).st_ino == st.st_ino
    finally:
        driver.unpublish(target)


@pytest.mark.parametrize(
    ("title", "why"),
    [("../escape.bin", "'..'"), ("/etc/evil", "absolute"), ("", "empty"), (".", "root")],
)
def test_hostile_titles_are_refused(driver, registry, tmp_path, title, why):
    art = Artifact([Blob(b"x", ORAS_FILE, {TITLE: title})], oras_files({}).config, "application/x")
    ref = push_artifact(registry, art, f"art/hostile-{abs(hash(title))}:v1")
    target = target_in(tmp_path)
    with pytest.raises(grpc.RpcError) as info:
        driver.publish(target, {"image": ref})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert why in info.value.details()
    assert not target.exists()
    assert list((driver.state_dir / "staging").iterdir()) == []


def test_duplicate_paths_across_layers_are_refused(driver, registry, tmp_path):
    art = oras_files({"a.bin": b"1"})
    art.layers.append(Blob(b"2", ORAS_FILE, {TITLE: "a.bin"}))
    ref = push_artifact(registry, art, "art/dup:v1")
    with pytest.raises(grpc.RpcError) as info:
        driver.publish(target_in(tmp_path), {"image": ref})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a.bin" in info.value.details()


def test_unknown_media_types_are_named(driver, registry, tmp_path):
    art = Artifact(
        [Blob(b"x", "application/vnd.example.strange.v1")],
        Blob(b"{}", "application/vnd.example.config.v1+json"),
        "application/vnd.example",
    )
    ref = push_artifact(registry, art, "art/unknown:v1")
    with pytest.raises(grpc.RpcError) as info:
        driver.publish(target_in(tmp_path), {"image": ref})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "application/vnd.example.strange.v1" in info.value.details()
    art = modelpack({"m.bin": ("weight", b"w")})
    art.layers[0].media_type = "application/vnd.cncf.model.weight.v1.tar+lz4"
    ref = push_artifact(registry, art, "art/modelpack-unknown:v1")
    with pytest.raises(grpc.RpcError) as info:
        driver.publish(target_in(tmp_path, "mp"), {"image": ref})
    assert "application/vnd.cncf.model.weight.v1.tar+lz4" in info.value.details()
