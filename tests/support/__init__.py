"""Test infrastructure: real registries (``registry``), a Docker token server
(``tokenserver``) and OCI image building/pushing with skopeo (``images``)."""
