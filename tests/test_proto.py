"""Checks on the CSI v1.12.0 wire definitions and their generated Python code.

The generated modules in csi_oci/csi/v1/ must match what hack/gen-proto
produces from proto/csi.proto, and the descriptor must carry the field
numbers, options and services of CSI spec v1.12.0.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, wrappers_pb2
from google.protobuf.descriptor import FieldDescriptor

from csi_oci.csi.v1 import csi_pb2, csi_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
GEN_SCRIPT = REPO_ROOT / "hack" / "gen-proto"
PKG_REL = Path("csi_oci") / "csi" / "v1"
GENERATED = ("csi_pb2.py", "csi_pb2_grpc.py", "csi_pb2.pyi")

# Every field the v1.12.0 spec marks with [(csi_secret) = true].
# (ListVolumesRequest and GetCapacityRequest carry no secrets.)
SPEC_SECRET_FIELDS = {
    "csi.v1.CreateVolumeRequest.secrets",
    "csi.v1.DeleteVolumeRequest.secrets",
    "csi.v1.ControllerPublishVolumeRequest.secrets",
    "csi.v1.ControllerUnpublishVolumeRequest.secrets",
    "csi.v1.ValidateVolumeCapabilitiesRequest.secrets",
    "csi.v1.ControllerModifyVolumeRequest.secrets",
    "csi.v1.CreateSnapshotRequest.secrets",
    "csi.v1.DeleteSnapshotRequest.secrets",
    "csi.v1.ListSnapshotsRequest.secrets",
    "csi.v1.GetSnapshotRequest.secrets",
    "csi.v1.ControllerExpandVolumeRequest.secrets",
    "csi.v1.NodeStageVolumeRequest.secrets",
    "csi.v1.NodePublishVolumeRequest.secrets",
    "csi.v1.NodeExpandVolumeRequest.secrets",
    "csi.v1.CreateVolumeGroupSnapshotRequest.secrets",
    "csi.v1.DeleteVolumeGroupSnapshotRequest.secrets",
    "csi.v1.GetVolumeGroupSnapshotRequest.secrets",
    "csi.v1.GetMetadataAllocatedRequest.secrets",
    "csi.v1.GetMetadataDeltaRequest.secrets",
}

# Alpha markers of v1.12.0, by kind.
SPEC_ALPHA = {
    "alpha_service": {"csi.v1.SnapshotMetadata"},
    "alpha_method": {
        "csi.v1.Controller.GetSnapshot",
        "csi.v1.Controller.ControllerGetVolume",
    },
    "alpha_message": {
        "csi.v1.ControllerGetVolumeRequest",
        "csi.v1.ControllerGetVolumeResponse",
        "csi.v1.GetSnapshotRequest",
        "csi.v1.GetSnapshotResponse",
        "csi.v1.VolumeCondition",
    },
    "alpha_field": {
        "csi.v1.ListVolumesResponse.VolumeStatus.volume_condition",
        "csi.v1.GetCapacityResponse.minimum_volume_size",
        "csi.v1.NodeGetVolumeStatsResponse.volume_condition",
        "csi.v1.NodeExpandVolumeRequest.secrets",
    },
    "alpha_enum_value": {
        "csi.v1.PluginCapability.Service.Type.SNAPSHOT_METADATA_SERVICE",
        "csi.v1.VolumeCapability.AccessMode.Mode.SINGLE_NODE_SINGLE_WRITER",
        "csi.v1.VolumeCapability.AccessMode.Mode.SINGLE_NODE_MULTI_WRITER",
        "csi.v1.ControllerServiceCapability.RPC.Type.VOLUME_CONDITION",
        "csi.v1.ControllerServiceCapability.RPC.Type.GET_VOLUME",
        "csi.v1.ControllerServiceCapability.RPC.Type.SINGLE_NODE_MULTI_WRITER",
        "csi.v1.ControllerServiceCapability.RPC.Type.GET_SNAPSHOT",
        "csi.v1.NodeServiceCapability.RPC.Type.VOLUME_CONDITION",
        "csi.v1.NodeServiceCapability.RPC.Type.SINGLE_NODE_MULTI_WRITER",
    },
}

SPEC_SERVICES = {
    "Identity": ["GetPluginInfo", "GetPluginCapabilities", "Probe"],
    "Controller": [
        "CreateVolume",
        "DeleteVolume",
        "ControllerPublishVolume",
        "ControllerUnpublishVolume",
        "ValidateVolumeCapabilities",
        "ListVolumes",
        "GetCapacity",
        "ControllerGetCapabilities",
        "CreateSnapshot",
        "DeleteSnapshot",
        "ListSnapshots",
        "GetSnapshot",
        "ControllerExpandVolume",
        "ControllerGetVolume",
        "ControllerModifyVolume",
    ],
    "GroupController": [
        "GroupControllerGetCapabilities",
        "CreateVolumeGroupSnapshot",
        "DeleteVolumeGroupSnapshot",
        "GetVolumeGroupSnapshot",
    ],
    "SnapshotMetadata": ["GetMetadataAllocated", "GetMetadataDelta"],
    "Node": [
        "NodeStageVolume",
        "NodeUnstageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeGetVolumeStats",
        "NodeExpandVolume",
        "NodeGetCapabilities",
        "NodeGetInfo",
    ],
}


def _all_messages(descs):
    for m in descs:
        yield m
        yield from _all_messages(m.nested_types)


def _all_enums():
    yield from csi_pb2.DESCRIPTOR.enum_types_by_name.values()
    for m in _all_messages(csi_pb2.DESCRIPTOR.message_types_by_name.values()):
        yield from m.enum_types


def _field_numbers(message_desc):
    return {f.name: f.number for f in message_desc.fields}


# --- (a) committed gencode is what hack/gen-proto produces -------------------


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen-proto")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        [str(GEN_SCRIPT), str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"hack/gen-proto failed:\n{proc.stdout}\n{proc.stderr}"
    return out / PKG_REL


def test_gen_script_is_executable():
    assert GEN_SCRIPT.is_file()
    assert os.access(GEN_SCRIPT, os.X_OK), "hack/gen-proto must be executable"


@pytest.mark.parametrize("name", GENERATED)
def test_generated_code_is_up_to_date(regenerated, name):
    committed = REPO_ROOT / PKG_REL / name
    fresh = regenerated / name
    assert fresh.is_file(), f"hack/gen-proto did not produce {name}"
    assert committed.is_file(), f"{committed} is missing: run hack/gen-proto"
    assert committed.read_bytes() == fresh.read_bytes(), (
        f"{PKG_REL / name} is stale relative to proto/csi.proto: run hack/gen-proto "
        "(with the grpcio-tools version pinned in pyproject.toml) and commit the result"
    )


# --- (b) wire facts of CSI v1.12.0 -------------------------------------------


def test_file_identity():
    fd = csi_pb2.DESCRIPTOR
    assert fd.package == "csi.v1"
    proto = descriptor_pb2.FileDescriptorProto()
    fd.CopyToProto(proto)
    assert proto.syntax == "proto3"
    assert fd.name == "csi_oci/csi/v1/csi.proto"
    assert fd.GetOptions().go_package == "github.com/container-storage-interface/spec/lib/go/csi"
    assert {d.name for d in fd.dependencies} == {
        "google/protobuf/descriptor.proto",
        "google/protobuf/timestamp.proto",
        "google/protobuf/wrappers.proto",
    }


def test_custom_option_extensions():
    expected = {
        "csi_secret": (1059, "google.protobuf.FieldOptions"),
        "alpha_field": (1060, "google.protobuf.FieldOptions"),
        "alpha_enum": (1060, "google.protobuf.EnumOptions"),
        "alpha_enum_value": (1060, "google.protobuf.EnumValueOptions"),
        "alpha_message": (1060, "google.protobuf.MessageOptions"),
        "alpha_method": (1060, "google.protobuf.MethodOptions"),
        "alpha_service": (1060, "google.protobuf.ServiceOptions"),
    }
    exts = csi_pb2.DESCRIPTOR.extensions_by_name
    assert set(exts) == set(expected)
    for name, (number, extendee) in expected.items():
        ext = exts[name]
        assert ext.number == number, name
        assert ext.containing_type.full_name == extendee, name
        assert ext.type == FieldDescriptor.TYPE_BOOL, name


def test_node_publish_volume_request_field_numbers():
    assert _field_numbers(csi_pb2.NodePublishVolumeRequest.DESCRIPTOR) == {
        "volume_id": 1,
        "publish_context": 2,
        "staging_target_path": 3,
        "target_path": 4,
        "volume_capability": 5,
        "readonly": 6,
        "secrets": 7,
        "volume_context": 8,
    }


def test_other_request_field_numbers():
    assert _field_numbers(csi_pb2.NodeStageVolumeRequest.DESCRIPTOR) == {
        "volume_id": 1,
        "publish_context": 2,
        "staging_target_path": 3,
        "volume_capability": 4,
        "secrets": 5,
        "volume_context": 6,
    }
    assert _field_numbers(csi_pb2.NodeUnpublishVolumeRequest.DESCRIPTOR) == {
        "volume_id": 1,
        "target_path": 2,
    }
    assert _field_numbers(csi_pb2.NodeGetInfoResponse.DESCRIPTOR) == {
        "node_id": 1,
        "max_volumes_per_node": 2,
        "accessible_topology": 3,
    }
    assert _field_numbers(csi_pb2.GetPluginInfoResponse.DESCRIPTOR) == {
        "name": 1,
        "vendor_version": 2,
        "manifest": 3,
    }
    assert _field_numbers(csi_pb2.CreateVolumeRequest.DESCRIPTOR) == {
        "name": 1,
        "capacity_range": 2,
        "volume_capabilities": 3,
        "parameters": 4,
        "secrets": 5,
        "volume_content_source": 6,
        "accessibility_requirements": 7,
        "mutable_parameters": 8,
    }
    assert _field_numbers(csi_pb2.VolumeCapability.MountVolume.DESCRIPTOR) == {
        "fs_type": 1,
        "mount_flags": 2,
        "volume_mount_group": 3,
    }


def test_node_publish_volume_request_wire_bytes():
    req = csi_pb2.NodePublishVolumeRequest(volume_id="v", target_path="/t", readonly=True)
    # tag(1, LEN) "v" | tag(4, LEN) "/t" | tag(6, VARINT) 1
    assert req.SerializeToString() == b"\x0a\x01v\x22\x02/t\x30\x01"
    req = csi_pb2.NodePublishVolumeRequest(secrets={"k": "s"})
    # tag(7, LEN) entry{ tag(1) "k", tag(2) "s" }
    assert req.SerializeToString() == b"\x3a\x06\x0a\x01k\x12\x01s"


def test_secret_fields_match_spec():
    marked = {
        f.full_name
        for m in _all_messages(csi_pb2.DESCRIPTOR.message_types_by_name.values())
        for f in m.fields
        if f.GetOptions().Extensions[csi_pb2.csi_secret]
    }
    assert marked == SPEC_SECRET_FIELDS
    for name in SPEC_SECRET_FIELDS:
        field = csi_pb2.DESCRIPTOR.pool.FindFieldByName(name)
        assert field.message_type.GetOptions().map_entry, f"{name} must be map<string,string>"
    assert "secrets" not in csi_pb2.ListVolumesRequest.DESCRIPTOR.fields_by_name
    assert "secrets" not in csi_pb2.GetCapacityRequest.DESCRIPTOR.fields_by_name


def test_alpha_markers_match_spec():
    messages = list(_all_messages(csi_pb2.DESCRIPTOR.message_types_by_name.values()))
    services = list(csi_pb2.DESCRIPTOR.services_by_name.values())
    found = {
        "alpha_service": {
            s.full_name for s in services if s.GetOptions().Extensions[csi_pb2.alpha_service]
        },
        "alpha_method": {
            m.full_name
            for s in services
            for m in s.methods
            if m.GetOptions().Extensions[csi_pb2.alpha_method]
        },
        "alpha_message": {
            m.full_name for m in messages if m.GetOptions().Extensions[csi_pb2.alpha_message]
        },
        "alpha_field": {
            f.full_name
            for m in messages
            for f in m.fields
            if f.GetOptions().Extensions[csi_pb2.alpha_field]
        },
        "alpha_enum_value": {
            f"{e.full_name}.{v.name}"
            for e in _all_enums()
            for v in e.values
            if v.GetOptions().Extensions[csi_pb2.alpha_enum_value]
        },
    }
    assert found == SPEC_ALPHA
    assert not [e.full_name for e in _all_enums() if e.GetOptions().Extensions[csi_pb2.alpha_enum]]


def test_probe_response_ready_is_bool_value():
    field = csi_pb2.ProbeResponse.DESCRIPTOR.fields_by_name["ready"]
    assert field.number == 1
    assert field.message_type is wrappers_pb2.BoolValue.DESCRIPTOR
    assert field.message_type.full_name == "google.protobuf.BoolValue"


def test_access_mode_enum_values():
    mode = csi_pb2.VolumeCapability.AccessMode.Mode
    assert {v.name: v.number for v in mode.DESCRIPTOR.values} == {
        "UNKNOWN": 0,
        "SINGLE_NODE_WRITER": 1,
        "SINGLE_NODE_READER_ONLY": 2,
        "MULTI_NODE_READER_ONLY": 3,
        "MULTI_NODE_SINGLE_WRITER": 4,
        "MULTI_NODE_MULTI_WRITER": 5,
        "SINGLE_NODE_SINGLE_WRITER": 6,
        "SINGLE_NODE_MULTI_WRITER": 7,
    }
    assert csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY == 3


def test_capability_enum_values():
    assert dict(csi_pb2.NodeServiceCapability.RPC.Type.items()) == {
        "UNKNOWN": 0,
        "STAGE_UNSTAGE_VOLUME": 1,
        "GET_VOLUME_STATS": 2,
        "EXPAND_VOLUME": 3,
        "VOLUME_CONDITION": 4,
        "SINGLE_NODE_MULTI_WRITER": 5,
        "VOLUME_MOUNT_GROUP": 6,
    }
    assert dict(csi_pb2.PluginCapability.Service.Type.items()) == {
        "UNKNOWN": 0,
        "CONTROLLER_SERVICE": 1,
        "VOLUME_ACCESSIBILITY_CONSTRAINTS": 2,
        "GROUP_CONTROLLER_SERVICE": 3,
        "SNAPSHOT_METADATA_SERVICE": 4,
    }
    assert csi_pb2.ControllerServiceCapability.RPC.Type.Value("GET_SNAPSHOT") == 15
    assert csi_pb2.ControllerServiceCapability.RPC.Type.Value("MODIFY_VOLUME") == 14


def test_oneofs():
    vc = csi_pb2.VolumeCapability.DESCRIPTOR
    assert [f.name for f in vc.oneofs_by_name["access_type"].fields] == ["block", "mount"]
    src = csi_pb2.VolumeContentSource.DESCRIPTOR
    assert [f.name for f in src.oneofs_by_name["type"].fields] == ["snapshot", "volume"]


def test_services_and_methods():
    services = csi_pb2.DESCRIPTOR.services_by_name
    assert list(services) == list(SPEC_SERVICES)
    for name, methods in SPEC_SERVICES.items():
        assert [m.name for m in services[name].methods] == methods, name
    for m in services["SnapshotMetadata"].methods:
        assert m.server_streaming and not m.client_streaming, m.name
    node_publish = services["Node"].methods_by_name["NodePublishVolume"]
    assert node_publish.input_type is csi_pb2.NodePublishVolumeRequest.DESCRIPTOR
    assert node_publish.output_type is csi_pb2.NodePublishVolumeResponse.DESCRIPTOR


def test_grpc_module_has_stubs_and_servicers():
    for name in SPEC_SERVICES:
        assert hasattr(csi_pb2_grpc, f"{name}Stub"), name
        assert hasattr(csi_pb2_grpc, f"{name}Servicer"), name
        assert hasattr(csi_pb2_grpc, f"add_{name}Servicer_to_server"), name


# --- (c) generated modules import each other by package path -----------------


def test_grpc_module_imports_pb2_by_package_path():
    text = (REPO_ROOT / PKG_REL / "csi_pb2_grpc.py").read_text()
    assert re.search(r"^from csi_oci\.csi\.v1 import csi_pb2 as \w+$", text, re.M)
    assert not re.search(r"^import csi_pb2\b", text, re.M)
    assert "sys.path" not in text
    assert csi_pb2_grpc.__name__ == "csi_oci.csi.v1.csi_pb2_grpc"
    assert csi_pb2.__name__ == "csi_oci.csi.v1.csi_pb2"
