# csi-oci container image: one image for the node plugin (DaemonSet) and the
# thin controller (Deployment); `serve --mode node|controller` picks the role.
#
#   buildah bud -t registry.example.com/csi-oci:0.1.0 .
#   docker build -t registry.example.com/csi-oci:0.1.0 .
#
# Where no public container registry is reachable, build FROM a base image
# made locally (any Debian-based image with python3.11, pip and apt):
#
#   docker build --build-arg BASE_IMAGE=localhost/python:3.11-slim-bookworm -t ... .
#
# The build stage needs a Python package index (PyPI, or a mirror given with
# --build-arg PIP_INDEX_URL=...); the runtime stage installs from the wheels
# of the build stage only (--no-index), so it needs no index at all.
#
# Needs BuildKit (docker >= 23 default) or buildah/podman for
# `RUN --mount=type=bind,from=...`, which keeps the wheels out of the final
# image's layers. There is deliberately no `# syntax=` line: it would make
# BuildKit fetch a frontend image from Docker Hub, which breaks offline builds.
#
# Who runs as root, and why:
#   * node plugin (deploy/node.yaml): root AND privileged. It calls mount(2)
#     and umount2(2) to bind-mount image trees into
#     /var/lib/kubelet/pods/<uid>/volumes/..., and those mounts must reach the
#     host through `mountPropagation: Bidirectional`, which Kubernetes allows
#     only in privileged containers. It also owns the node store in the host
#     directory /var/lib/csi-oci.
#   * controller (deploy/controller.yaml): needs no privileges at all (it only
#     validates StorageClass parameters and answers CreateVolume/DeleteVolume
#     over a unix socket), so it runs as the non-root user `csi-oci`
#     (uid/gid 65532) that this image defines, selected by the Deployment's
#     securityContext (runAsUser: 65532, runAsNonRoot, readOnlyRootFilesystem).
#   * The image's default user stays root so that `csi-oci mount` / `umount`
#     and the node plugin work without extra flags; every manifest sets
#     runAsUser explicitly anyway.

ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

# --- build: wheels for csi-oci and all its runtime dependencies -------------
FROM ${BASE_IMAGE} AS build

ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INPUT=1 \
    PIP_INDEX_URL=${PIP_INDEX_URL}

# pyfuse3 (lazy volumes) is compiled against libfuse3.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        gcc libc6-dev libfuse3-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# The context is filtered by .dockerignore (no .venv, .git, caches, tests).
COPY . .
# requirements-dev.txt holds the exact versions the test suite runs with;
# used as constraints (not requirements) so the image ships the tested
# grpcio/protobuf/oras/zstandard/requests, and nothing of the dev extras.
RUN pip wheel --wheel-dir /wheels --constraint requirements-dev.txt . \
    && ls -l /wheels

# --- runtime ----------------------------------------------------------------
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="csi-oci" \
      org.opencontainers.image.description="CSI driver that publishes OCI images and artifacts (AI models) as read-only volumes" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# util-linux: mount/umount/findmnt for debugging mounts from inside the node
# plugin (the driver itself calls mount(2) directly). fuse3: for the FUSE-served
# lazy mode to come (not used yet; /dev/fuse is not mounted by deploy/ yet).
# ca-certificates: the system trust store. The driver (python-requests) trusts
# certifi's bundle by default; for a registry behind a private CA, add the CA
# here and set REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt.
# Versions come from the base image's Debian release (not pinned: pins break
# as soon as the release gets a security update).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates \
        fuse3 \
        util-linux \
    && rm -rf /var/lib/apt/lists/*

# Non-root identity for the controller (see the header).
RUN groupadd --system --gid 65532 csi-oci \
    && useradd --system --uid 65532 --gid 65532 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin csi-oci

# Install from the build stage's wheels only. pip byte-compiles at install
# time, so nothing is written under site-packages at run time (the controller
# runs with a read-only root filesystem). No version pin needed: /wheels holds
# exactly one csi-oci and the constrained dependencies, and --no-index allows
# nothing else.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels csi-oci \
    && csi-oci --version

ENTRYPOINT ["csi-oci"]
CMD ["serve"]
