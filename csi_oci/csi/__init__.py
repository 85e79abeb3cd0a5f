"""Container Storage Interface (CSI) wire bindings, by API version."""
