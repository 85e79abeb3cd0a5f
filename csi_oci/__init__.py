"""csi-oci: a CSI driver that publishes OCI images and artifacts as read-only volumes."""

# The one place the version is written: pyproject reads it, the driver reports it
# (GetPluginInfo, --version, the registry User-Agent); the chart's appVersion is
# checked against it (tests/test_architecture.py).
__version__ = "0.1.0"
