"""Unit tests of csi_oci/store.py: records, their durability, pending-sync markers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from csi_oci.storage import atomic as store_mod
from csi_oci.storage.atomic import read_json, write_json_atomic
from csi_oci.storage.store import Store

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(store_mod.os, "fsync", counting)
    return calls


def test_write_json_atomic_fsyncs_only_when_durable(tmp_path: Path, fsyncs: list[int]) -> None:
    write_json_atomic(tmp_path / "durable.json", {"x": 1})
    assert len(fsyncs) == 1
    write_json_atomic(tmp_path / "volatile.json", {"x": 2}, durable=False)
    assert len(fsyncs) == 1
    assert read_json(tmp_path / "volatile.json") == {"x": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["durable.json", "volatile.json"]


def test_tag_record_is_written_once_per_change_and_never_fsynced(
    tmp_path: Path, fsyncs: list[int]
) -> None:
    """A cached publish must not rewrite (and wait on) an unchanged tag record."""
    store = Store(tmp_path)
    store.tags.remember("reg.example/m:v1", "linux/amd64", DIGEST_A)
    path = next(store.refs.iterdir())
    first = path.stat()
    store.tags.remember("reg.example/m:v1", "linux/amd64", DIGEST_A)
    again = path.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    store.tags.remember("reg.example/m:v1", "linux/amd64", DIGEST_B)
    assert store.tags.lookup("reg.example/m:v1", "linux/amd64") == DIGEST_B
    assert store.tags.lookup("reg.example/m:v1", "linux/arm64") is None
    assert fsyncs == []


@pytest.mark.parametrize("torn", [b"", b'{"reference": "reg.example/m:v1", "dig', b"\0" * 64])
def test_tag_record_torn_by_a_power_loss_is_ignored(tmp_path: Path, torn: bytes) -> None:
    store = Store(tmp_path)
    store.tags.remember("reg.example/m:v1", "linux/amd64", DIGEST_A)
    path = next(store.refs.iterdir())
    path.write_bytes(torn)
    assert store.tags.lookup("reg.example/m:v1", "linux/amd64") is None
    store.tags.remember("reg.example/m:v1", "linux/amd64", DIGEST_A)  # rewritten, not trusted
    assert json.loads(path.read_text())["digest"] == DIGEST_A


def test_pending_markers_from_an_earlier_boot_are_torn(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.durable.pending("image-this-boot")
    (store.durable.dir / "image-earlier-boot").write_text("another-boot-id")
    assert store.durable.torn() == ["image-earlier-boot"]
    store.durable.flush()
    assert list(store.durable.dir.iterdir()) == []
