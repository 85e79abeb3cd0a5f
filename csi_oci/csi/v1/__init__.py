"""CSI v1 (spec v1.12.0) generated bindings.

``csi_pb2`` (messages), ``csi_pb2_grpc`` (service stubs and servicers) and
``csi_pb2.pyi`` are generated from ``proto/csi.proto`` by ``hack/gen-proto``;
do not edit them by hand. Import them directly, e.g.
``from csi_oci.csi.v1 import csi_pb2, csi_pb2_grpc``.
"""
