"""CSI Node service: a thin translation of gRPC into VolumeManager calls."""

from __future__ import annotations

import grpc

from csi_oci.csi.v1 import csi_pb2, csi_pb2_grpc
from csi_oci.errors import InvalidArgument, Unsupported
from csi_oci.publish.volumes import VolumeManager
from csi_oci.spec.attributes import parse_volume_attributes
from csi_oci.spec.credentials import NodeCredentials, lookup_for


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(
        self, node_id: str, volumes: VolumeManager, node_credentials: NodeCredentials | None = None
    ) -> None:
        self._node_id = node_id
        self._volumes = volumes
        self._node_credentials = node_credentials

    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        # Field checks come first and in this order: csi-sanity sends requests
        # that lack exactly one of them and expects INVALID_ARGUMENT.
        if not request.volume_id:
            raise InvalidArgument("NodePublishVolume: volume_id is required")
        if not request.target_path:
            raise InvalidArgument("NodePublishVolume: target_path is required")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("NodePublishVolume: volume_capability is required")
        access = request.volume_capability.WhichOneof("access_type")
        if access == "block":
            raise Unsupported("block access is not supported: csi-oci volumes are directory trees")
        if access != "mount":
            raise InvalidArgument("NodePublishVolume: volume_capability needs mount access")
        if not request.target_path.startswith("/"):
            raise InvalidArgument(f"target_path {request.target_path!r} must be absolute")
        # readonly=false and SINGLE_NODE_WRITER are accepted (kubelet sends them
        # for inline volumes); the mount is read-only regardless.
        spec = parse_volume_attributes(request.volume_context)
        # The volume's secret first, then the node's docker config, per host.
        creds = lookup_for(dict(request.secrets), self._node_credentials, spec.reference.registry)
        self._volumes.publish(request.volume_id, request.target_path, spec, creds)
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("NodeUnpublishVolume: volume_id is required")
        if not request.target_path:
            raise InvalidArgument("NodeUnpublishVolume: target_path is required")
        self._volumes.unpublish(request.volume_id, request.target_path)
        return csi_pb2.NodeUnpublishVolumeResponse()

    def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        if not request.volume_id:
            raise InvalidArgument("NodeGetVolumeStats: volume_id is required")
        if not request.volume_path:
            raise InvalidArgument("NodeGetVolumeStats: volume_path is required")
        usage = self._volumes.usage.usage(request.volume_id, request.volume_path)
        unit = csi_pb2.VolumeUsage.Unit
        return csi_pb2.NodeGetVolumeStatsResponse(
            # Read-only trees: all of it is used, nothing is available.
            usage=[
                csi_pb2.VolumeUsage(
                    total=usage.bytes, used=usage.bytes, available=0, unit=unit.BYTES
                ),
                csi_pb2.VolumeUsage(
                    total=usage.inodes, used=usage.inodes, available=0, unit=unit.INODES
                ),
            ],
            volume_condition=csi_pb2.VolumeCondition(
                abnormal=usage.abnormal, message=usage.message
            ),
        )

    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        # No staging (kubelet never stages inline volumes); stats and condition
        # for kubelet's volume metrics and health events.
        rpc = csi_pb2.NodeServiceCapability.RPC
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.NodeServiceCapability(rpc=rpc(type=kind))
                for kind in (rpc.GET_VOLUME_STATS, rpc.VOLUME_CONDITION)
            ]
        )

    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(node_id=self._node_id, max_volumes_per_node=0)
