"""Artifacts made by the real producers, published through `csi-oci serve`.

oras CLI 1.3.3, oras-py 0.2.43, modctl 0.2.2 (which still writes the older
`vnd.cnai` ModelPack spelling) and kit 1.15.0 (ModelKits, and CNCF ModelPack
with `--use-model-pack`) push to a loopback registry; the published tree
must hold exactly the files they were given.
"""

from __future__ import annotations

import os

import pytest

from tests.support.driver import tree_of
from tests.support.producers import (
    kit_push,
    modctl_push,
    oras_push_dir,
    oras_push_files,
    oraspy_push_files,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")

MODEL_FILES = {
    "config.json": b'{"hidden_size": 64}',
    "tokenizer.json": b'{"model": {"type": "BPE"}}',
    "model.safetensors": os.urandom(200_000),
    "README.md": b"# tiny model\n",
}


def published(driver, tmp_path, ref, **attrs):
    parent = tmp_path / "pod" / "volumes" / "v"
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / "mount"
    driver.publish(target, {"image": ref, **attrs})
    try:
        return {k: v for k, v in tree_of(target).items() if v != "dir"}
    finally:
        driver.unpublish(target)


@pytest.mark.slow
def test_oras_cli_files(driver, registry, tmp_path):
    files = {**MODEL_FILES, "sub/extra.bin": b"x"}
    pushed = oras_push_files(registry, "prod/oras-files:v1", tmp_path / "w", files)
    assert published(driver, tmp_path, pushed.reference) == files


def test_oras_cli_directory(driver, registry, tmp_path):
    files = {"vocab.json": b"{}", "inner/merges.txt": b"a b"}
    pushed = oras_push_dir(registry, "prod/oras-dir:v1", tmp_path / "w", "tokenizer", files)
    assert published(driver, tmp_path, pushed.reference) == {
        f"tokenizer/{k}": v for k, v in files.items()
    }


def test_oras_py_files_and_directory(driver, registry, tmp_path):
    files = {"config.json": MODEL_FILES["config.json"], "d/e/f.txt": b"f", "d/g.txt": b"g"}
    pushed = oraspy_push_files(registry, "prod/orasy:v1", tmp_path / "w", files, dirs=["d"])
    assert published(driver, tmp_path, pushed.reference) == files


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "tar"])
def test_modctl_modelpack(driver, registry, tmp_path, raw):
    files = {**MODEL_FILES, "src/run.py": b"print('serve')\n"}
    pushed = modctl_push(
        registry, f"prod/modctl-{str(raw).lower()}:v1", tmp_path / "w", files, raw=raw
    )
    assert published(driver, tmp_path, pushed.reference) == files


def test_modctl_partial_pull(driver, registry, tmp_path):
    files = {
        **MODEL_FILES,
        **{f"model-0000{i}-of-00003.safetensors": os.urandom(50_000) for i in (1, 2, 3)},
    }
    pushed = modctl_push(registry, "prod/modctl-partial:v1", tmp_path / "w", files)
    tree = published(
        driver, tmp_path, pushed.reference, include="*.json,model-00002-of-00003.safetensors"
    )
    assert set(tree) == {"config.json", "tokenizer.json", "model-00002-of-00003.safetensors"}


@pytest.mark.parametrize(
    ("compression", "layer_format", "model_pack"),
    [
        ("none", "tar", False),
        ("gzip", "tar", False),
        ("zstd", "tar", False),
        ("none", "raw", False),
        ("none", "tar", True),
    ],
    ids=["tar", "tar+gzip", "tar+zstd", "raw", "modelpack"],
)
def test_kit_modelkit(driver, registry, tmp_path, compression, layer_format, model_pack):
    files = {**MODEL_FILES, "data/train.csv": b"a,b\n1,2\n"}
    if layer_format == "tar":
        files["src/serve.py"] = b"print('hi')\n"  # a directory: tar layers only
    tag = f"prod/kit-{compression}-{layer_format}-{str(model_pack).lower()}:v1"
    pushed = kit_push(
        registry,
        tag,
        tmp_path / "w",
        files,
        compression=compression,
        layer_format=layer_format,
        model_pack=model_pack,
    )
    assert published(driver, tmp_path, pushed.reference) == files
