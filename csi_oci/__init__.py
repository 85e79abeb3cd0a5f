"""csi-oci: a CSI driver that publishes OCI images and artifacts as read-only volumes."""

__version__ = "0.1.0"
