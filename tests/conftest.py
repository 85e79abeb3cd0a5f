"""Shared pytest fixtures.

The registry fixtures run real ``docker-registry`` processes on 127.0.0.1
(see tests/support); they need no root.  Missing tools fail the tests rather
than skipping them: run hack/install-deps.
"""

import os
from collections.abc import Iterator

import pytest
from support.registry import INSTALL_HINT, TEST_PASSWORD, TEST_USER, Registry, missing_tools
from support.tokenserver import TokenServer

# tests/e2e_kube needs the Kubernetes cluster hack/e2e-kube brings up; that
# script runs it (with CSI_OCI_E2E_KUBE=1). The default run never collects it.
collect_ignore = [] if os.environ.get("CSI_OCI_E2E_KUBE") == "1" else ["e2e_kube"]


def _require_registry_tools() -> None:
    missing = missing_tools("docker-registry", "skopeo")
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: {INSTALL_HINT}", pytrace=False)


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Iterator[Registry]:
    """Anonymous registry (pull and push without credentials)."""
    _require_registry_tools()
    reg = Registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory) -> Iterator[Registry]:
    """Registry with htpasswd (HTTP Basic) auth for alice/wonderland."""
    _require_registry_tools()
    reg = Registry(tmp_path_factory.mktemp("basic-registry"), htpasswd=(TEST_USER, TEST_PASSWORD))
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory) -> Iterator[Registry]:
    """Registry with Docker bearer-token auth; ``.token_server`` issues the tokens."""
    _require_registry_tools()
    workdir = tmp_path_factory.mktemp("token-registry")
    server = TokenServer(username=TEST_USER, password=TEST_PASSWORD, workdir=workdir / "tokens")
    try:
        reg = Registry(workdir / "registry", token_auth=server)
    except BaseException:
        server.stop()
        raise
    yield reg
    reg.stop()
    server.stop()
