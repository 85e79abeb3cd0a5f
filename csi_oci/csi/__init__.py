"""The CSI services: one module per service, each a thin translation of gRPC calls
into calls on the data path (csi_oci.publish, csi_oci.pull); errors become
status codes in one place (csi_oci.errors.status_code_for). `v1` holds the
generated wire bindings.
"""
