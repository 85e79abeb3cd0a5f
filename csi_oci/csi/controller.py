"""Thin, stateless CSI Controller: exists for dynamic PVCs and csi-sanity.

There is no storage to provision: CreateVolume validates the StorageClass
parameters (so mistakes show at provisioning, not at pod start) and copies
them into volume_context, which the node receives at publish time. The
volume id is derived from the name, and carries a check value so that
ValidateVolumeCapabilities can tell its own ids from foreign ones without
keeping any state. Same-name-different-parameters conflicts are detected
within one controller process (external-provisioner retries quickly).
"""

from __future__ import annotations

import hashlib
import threading

import grpc

from csi_oci.csi.v1 import csi_pb2, csi_pb2_grpc
from csi_oci.errors import AlreadyExists, InvalidArgument, NotFound, Unsupported
from csi_oci.spec.attributes import parse_volume_attributes

Cap = csi_pb2.ControllerServiceCapability


def volume_id_for(driver_name: str, name: str) -> str:
    digest = hashlib.sha256(name.encode()).hexdigest()[:40]
    return f"oci-{digest}-{_check(driver_name, digest)}"


def _check(driver_name: str, digest: str) -> str:
    return hashlib.sha256(f"csi-oci|{driver_name}|{digest}".encode()).hexdigest()[:8]


def is_our_volume_id(driver_name: str, volume_id: str) -> bool:
    parts = volume_id.split("-")
    return (
        len(parts) == 3
        and parts[0] == "oci"
        and len(parts[1]) == 40
        and parts[2] == _check(driver_name, parts[1])
    )


def check_capabilities(caps: list[csi_pb2.VolumeCapability]) -> None:
    """Only filesystem (mount) access is served; any access mode is fine (always read-only)."""
    if not caps:
        raise InvalidArgument("volume_capabilities must not be empty")
    for cap in caps:
        if cap.WhichOneof("access_type") == "block":
            raise Unsupported("block access is not supported: csi-oci volumes are directory trees")
        if cap.WhichOneof("access_type") is None:
            raise InvalidArgument("volume capability has no access type (mount or block)")


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, driver_name: str) -> None:
        self._driver = driver_name
        self._seen: dict[str, tuple[tuple[str, str], ...]] = {}
        self._lock = threading.Lock()

    def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeResponse:
        if not request.name:
            raise InvalidArgument("CreateVolume: name is required")
        check_capabilities(list(request.volume_capabilities))
        if request.HasField("volume_content_source"):
            raise Unsupported("volume content sources (snapshots, clones) are not supported")
        params = dict(request.parameters)
        parse_volume_attributes(params)  # reject bad StorageClass parameters now
        fingerprint = tuple(sorted(params.items()))
        with self._lock:
            previous = self._seen.setdefault(request.name, fingerprint)
        if previous != fingerprint:
            raise AlreadyExists(f"volume {request.name!r} already exists with different parameters")
        return csi_pb2.CreateVolumeResponse(
            volume=csi_pb2.Volume(
                volume_id=volume_id_for(self._driver, request.name),
                capacity_bytes=0,
                volume_context=params,
            )
        )

    def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("DeleteVolume: volume_id is required")
        return csi_pb2.DeleteVolumeResponse()

    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        if not request.volume_id:
            raise InvalidArgument("ValidateVolumeCapabilities: volume_id is required")
        if not request.volume_capabilities:
            raise InvalidArgument("ValidateVolumeCapabilities: volume_capabilities is required")
        if not is_our_volume_id(self._driver, request.volume_id):
            raise NotFound(f"volume {request.volume_id!r} was not created by {self._driver}")
        try:
            check_capabilities(list(request.volume_capabilities))
        except (InvalidArgument, Unsupported) as exc:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=str(exc))
        Confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
            )
        )

    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        rpc = Cap.RPC(type=Cap.RPC.CREATE_DELETE_VOLUME)
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[Cap(rpc=rpc)])
