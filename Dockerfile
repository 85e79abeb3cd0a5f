# csi-oci container image: one image for every role of the driver
#   * node plugin    (DaemonSet container `csi-oci`:      csi-oci serve --mode node)
#   * lazy server    (DaemonSet container `lazy-server`:  csi-oci lazy-server)
#   * thin controller (Deployment container `csi-oci`:    csi-oci serve --mode controller)
#
# Build (hack/build-image does all of this on a machine without Docker and
# without access to any public container registry):
#
#   buildah bud --isolation chroot -t localhost/csi-oci:dev .
#   docker build -t registry.example.com/csi-oci:0.1.0 .
#
# BASE_IMAGE is any Debian 12 (bookworm) image with apt. The default is the
# public debian:bookworm-slim; hack/make-base-image makes an equivalent one
# locally with debootstrap from the machine's Debian mirror, and
# hack/build-image passes it as --build-arg BASE_IMAGE=localhost/...
# Python is Debian's python3 (3.11), from apt in both stages, so a base made
# with debootstrap and the public one give the same image.
#
# The build stage needs PyPI (or a mirror: --build-arg PIP_INDEX_URL=...) and
# the Debian mirror; the runtime stage needs only the Debian mirror.
#
# Who runs as root, and why (the image's default user is the unprivileged
# `csi-oci`, uid/gid 65532; the node containers ask for root explicitly):
#   * node plugin: root and privileged. It calls mount(2)/umount2(2) to
#     bind-mount image trees into <kubelet dir>/pods/<uid>/volumes/..., and
#     those mounts must reach the host through `mountPropagation:
#     Bidirectional`, which Kubernetes allows only in privileged containers.
#     It owns the root-owned node store in the host's /var/lib/csi-oci.
#   * lazy server: root and privileged. It opens /dev/fuse and mounts FUSE
#     filesystems (CAP_SYS_ADMIN), which must propagate to the host and into
#     pods the same way (Bidirectional), and re-binds them into pods after a
#     restart.
#   * controller: no privileges at all (it validates StorageClass parameters
#     over a unix socket): it runs as `csi-oci` with a read-only root.
#   * node-driver-registrar / livenessprobe / csi-provisioner are upstream
#     images, not this one.

ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

# --- build: a virtual environment with csi-oci and its pinned dependencies ---
FROM ${BASE_IMAGE} AS build

ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INPUT=1 \
    PIP_INDEX_URL=${PIP_INDEX_URL} \
    DEBIAN_FRONTEND=noninteractive

# python3-dev, gcc, pkg-config, libfuse3-dev: pyfuse3 (lazy volumes) has no
# wheel and compiles against libfuse3. python3-venv: the target environment.
# Versions come from the base's Debian release (pins would break with every
# security update of the release).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev pkg-config libfuse3-dev \
    && rm -rf /var/lib/apt/lists/*

# A venv, not the system site-packages: Debian's python3 refuses `pip install`
# outside one (PEP 668), and a single directory is easy to copy into the
# runtime stage without the compilers.
RUN python3 -m venv /opt/csi-oci

WORKDIR /src
# The context holds only what the wheel needs (.dockerignore is an allowlist).
COPY pyproject.toml requirements-dev.txt README.md ./
COPY csi_oci ./csi_oci
# requirements-dev.txt holds the exact versions the test suite runs with; as
# constraints (not requirements) it pins grpcio/protobuf/oras/pyfuse3/... to
# the tested versions without installing any of the dev tools. Not editable
# (-e): the package is copied into site-packages. pip, setuptools and wheel
# are removed afterwards: nothing installs packages at run time. The compiled
# extensions (grpcio, zstandard, pyfuse3...) ship with debug symbols; stripping
# them takes a third off the environment and changes nothing at run time.
#
# Behind a TLS-intercepting proxy, give pip the CA bundle that trusts it as a
# build secret (hack/build-image passes the machine's):
#   --secret id=build-ca-bundle,src=/etc/ssl/certs/ca-certificates.crt
# A secret, not a COPY or ARG: it is never written into any layer, so the
# image does not end up trusting the build machine's proxy.
RUN --mount=type=secret,id=build-ca-bundle \
    if [ -s /run/secrets/build-ca-bundle ]; then \
        export PIP_CERT=/run/secrets/build-ca-bundle; \
    fi \
    && /opt/csi-oci/bin/pip install --constraint requirements-dev.txt . \
    && /opt/csi-oci/bin/pip uninstall -y pip setuptools wheel \
    && find /opt/csi-oci -name '*.so' -exec strip --strip-unneeded {} + \
    && /opt/csi-oci/bin/csi-oci --version

# --- runtime ----------------------------------------------------------------
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="csi-oci" \
      org.opencontainers.image.description="CSI driver that publishes OCI images and artifacts (AI models) as read-only volumes" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/csi-oci/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# python3: the interpreter the venv points at (same Debian package as in the
# build stage). fuse3 (brings libfuse3-3): lazy volumes; pyfuse3 links
# against libfuse3, and fusermount3 comes along for debugging (`fusermount3
# -u` of a wedged FUSE mount from inside the lazy server container).
# ca-certificates: the system trust store (python-requests uses certifi's
# bundle by default; set REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
# after adding a private CA). mount/umount/findmnt (util-linux) are already in
# every Debian base and help debugging from inside the node plugin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 fuse3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/log/apt /var/log/dpkg.log

COPY --from=build /opt/csi-oci /opt/csi-oci

# The unprivileged identity for the controller (and the default for anyone
# running the image without a securityContext).
RUN groupadd --gid 65532 csi-oci \
    && useradd --uid 65532 --gid 65532 --no-create-home --no-log-init \
        --home-dir /nonexistent --shell /usr/sbin/nologin csi-oci \
    && csi-oci --version

USER 65532:65532
ENTRYPOINT ["csi-oci"]
CMD ["serve"]
