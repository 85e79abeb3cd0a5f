"""Identity and the thin Controller over the real socket of `csi-oci serve`."""

from __future__ import annotations

import grpc
import pytest

from csi_oci.csi.v1 import csi_pb2
from tests.support.driver import MOUNT_CAP, Driver

PARAMS = {"image": "registry.example.com/models/tiny:v1", "subPath": "models"}
BLOCK_CAP = csi_pb2.VolumeCapability(
    block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=MOUNT_CAP.access_mode
)


@pytest.fixture(scope="module")
def controller(make_module_driver):
    return make_module_driver(mode="controller")


def code_of(fn, req) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn(req)
    return info.value.code()


def test_plugin_info_and_capabilities(controller):
    info = controller.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "oci.csi.dev" and info.vendor_version
    caps = controller.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    kinds = [c.service.type for c in caps.capabilities]
    assert kinds == [csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE]
    ccaps = controller.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest()
    )
    assert [c.rpc.type for c in ccaps.capabilities] == [
        csi_pb2.ControllerServiceCapability.RPC.CREATE_DELETE_VOLUME
    ]
    assert controller.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True


def test_node_mode_does_not_advertise_controller(tmp_path):
    d = Driver(tmp_path / "node", mode="node")
    try:
        caps = d.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
        assert list(caps.capabilities) == []
        with pytest.raises(grpc.RpcError) as info:
            d.create_volume("x", PARAMS)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        node_info = d.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
        assert node_info.node_id == "test-node"
        # No staging; stats and condition only (tests/test_volume_stats.py).
        node_caps = d.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
        rpc = csi_pb2.NodeServiceCapability.RPC
        assert [c.rpc.type for c in node_caps.capabilities] == [
            rpc.GET_VOLUME_STATS,
            rpc.VOLUME_CONDITION,
        ]
    finally:
        d.stop()


def test_probe_not_ready_while_state_dir_is_unusable(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state dir's parent should be")
    d = Driver(tmp_path / "node", mode="node", state_dir=blocker / "state")
    try:
        assert d.identity.Probe(csi_pb2.ProbeRequest()).ready.value is False
        target = tmp_path / "t"
        with pytest.raises(grpc.RpcError) as info:
            d.publish(target, {"image": "127.0.0.1:9/a/b:v1"})
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "state directory" in info.value.details()
    finally:
        d.stop()


def test_create_volume_copies_parameters_and_is_idempotent(controller):
    vol = controller.create_volume("pvc-123", PARAMS)
    assert vol.capacity_bytes == 0
    assert dict(vol.volume_context) == PARAMS
    assert controller.create_volume("pvc-123", PARAMS).volume_id == vol.volume_id
    assert controller.create_volume("pvc-456", PARAMS).volume_id != vol.volume_id
    assert PARAMS["image"] not in vol.volume_id, "the id is never the image reference"


def test_create_volume_refusals(controller):
    create = controller.controller.CreateVolume
    controller.create_volume("pvc-conflict", PARAMS)
    other = {**PARAMS, "image": "registry.example.com/models/other:v2"}
    assert (
        code_of(
            create,
            csi_pb2.CreateVolumeRequest(
                name="pvc-conflict", volume_capabilities=[MOUNT_CAP], parameters=other
            ),
        )
        == grpc.StatusCode.ALREADY_EXISTS
    )
    assert (
        code_of(
            create, csi_pb2.CreateVolumeRequest(volume_capabilities=[MOUNT_CAP], parameters=PARAMS)
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code_of(create, csi_pb2.CreateVolumeRequest(name="n", parameters=PARAMS)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        code_of(
            create,
            csi_pb2.CreateVolumeRequest(
                name="n", volume_capabilities=[BLOCK_CAP], parameters=PARAMS
            ),
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    with pytest.raises(grpc.RpcError) as info:
        controller.create_volume("n2", {"image": "Not A Reference"})
    assert (
        info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "Not A Reference" in info.value.details()
    )
    with pytest.raises(grpc.RpcError) as info:
        controller.create_volume("n3", {"subPath": "x"})
    assert "'image' is required" in info.value.details()


def test_delete_and_validate(controller):
    vol = controller.create_volume("pvc-v", PARAMS)
    c = controller.controller
    c.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="anything-at-all"))
    assert (
        code_of(c.DeleteVolume, csi_pb2.DeleteVolumeRequest()) == grpc.StatusCode.INVALID_ARGUMENT
    )
    ok = c.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id,
            volume_capabilities=[MOUNT_CAP],
            volume_context=vol.volume_context,
        )
    )
    assert list(ok.confirmed.volume_capabilities) == [MOUNT_CAP]
    block = c.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=[BLOCK_CAP]
        )
    )
    assert not block.HasField("confirmed") and "block" in block.message
    assert (
        code_of(
            c.ValidateVolumeCapabilities,
            csi_pb2.ValidateVolumeCapabilitiesRequest(
                volume_id="fake-vol-id-0123456789", volume_capabilities=[MOUNT_CAP]
            ),
        )
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        code_of(
            c.ValidateVolumeCapabilities,
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id),
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )


def test_secrets_never_reach_the_log(controller):
    c = controller.controller
    c.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name="pvc-secret",
            volume_capabilities=[MOUNT_CAP],
            parameters=PARAMS,
            secrets={
                "password": "HUNTER2-SECRET",
                ".dockerconfigjson": '{"auths": {"x": {"auth": "QUJDREVG"}}}',
            },
        )
    )
    log = controller.log_text()
    assert "rpc=CreateVolume" in log
    assert "HUNTER2-SECRET" not in log and "QUJDREVG" not in log
