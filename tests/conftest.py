"""Shared pytest fixtures.

The registry fixtures run real ``docker-registry`` processes on 127.0.0.1
(see tests/support); they need no root.  Missing tools fail the tests rather
than skipping them: run hack/install-deps.

The driver fixtures run the real ``csi-oci serve`` (tests/support/driver.py):
``driver`` is one per module (flags from the module's ``driver_args``
fixture, when it overrides it), ``make_driver`` starts drivers of a test's own
and ``make_module_driver`` drivers shared by a module; all are stopped after
their scope.
"""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.driver import Driver
from tests.support.registry import (
    INSTALL_HINT,
    TEST_PASSWORD,
    TEST_USER,
    Registry,
    free_port,
    missing_tools,
)
from tests.support.tokenserver import TokenServer

# tests/e2e_kube needs the Kubernetes cluster hack/e2e-kube brings up; that
# script runs it (with CSI_OCI_E2E_KUBE=1). The default run never collects it.
collect_ignore = [] if os.environ.get("CSI_OCI_E2E_KUBE") == "1" else ["e2e_kube"]


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """bench and e2e tests are slow too (pyproject markers): `-m "not slow"` leaves them out."""
    for item in items:
        if item.get_closest_marker("slow") is None and any(
            item.get_closest_marker(name) for name in ("bench", "e2e")
        ):
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture
def no_mounts_left(tmp_path) -> Iterator[None]:
    """A failed test must not leave mounts under its directory (lazy-unmounted, deepest
    first); modules that mount use it with pytest.mark.usefixtures."""
    yield
    for line in reversed(open("/proc/self/mountinfo").read().splitlines()):
        point = line.split(" ")[4]
        if point.startswith(str(tmp_path)):
            subprocess.run(["umount", "-l", point], check=False)


# -- the driver ------------------------------------------------------------------------


class DriverFactory:
    """Starts `csi-oci serve` processes under one directory; `stop_all` stops them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[Driver] = []

    def __call__(
        self, *extra_args: str, config: str | None = None, metrics: bool = False, **kwargs
    ) -> Driver:
        """A driver with `extra_args` and, given, a registry config file holding
        `config` (--registry-config) and /metrics on a free loopback port (its
        number in ``.metrics_port``); other keywords go to Driver."""
        n = len(self.started)
        args = list(extra_args)
        if config is not None:
            path = self.root / f"registries-{n}.toml"
            path.write_text(config)
            args += ["--registry-config", str(path)]
        port = None
        if metrics:
            port = free_port()
            kwargs["metrics_address"] = f"127.0.0.1:{port}"
        d = Driver(self.root / f"driver-{n}", extra_args=args, **kwargs)
        d.metrics_port = port
        self.started.append(d)
        return d

    def stop_all(self) -> None:
        """Stop every driver (SIGKILL one that ignores SIGTERM), then raise the first error."""
        errors: list[Exception] = []
        for d in self.started:
            try:
                d.stop()
            except Exception as exc:
                d.kill()
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture(scope="module")
def driver_args() -> list[str]:
    """Extra flags of the module's ``driver``: a module overrides this fixture."""
    return []


@pytest.fixture(scope="module")
def driver(tmp_path_factory, driver_args) -> Iterator[Driver]:
    """One driver (mode all) shared by the tests of a module."""
    d = Driver(tmp_path_factory.mktemp("driver"), extra_args=driver_args)
    yield d
    d.stop()


@pytest.fixture
def make_driver(tmp_path) -> Iterator[DriverFactory]:
    """Factory: drivers of the test's own (empty stores), stopped after it."""
    factory = DriverFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def make_module_driver(tmp_path_factory) -> Iterator[DriverFactory]:
    """Factory: drivers shared by the tests of a module, stopped after it."""
    factory = DriverFactory(tmp_path_factory.mktemp("drivers"))
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def referrers_registry(tmp_path_factory):
    """An olareg registry (OCI 1.1 referrers API, in memory, plain HTTP, anonymous);
    see tests/support/signing.py.  Fails (like the other registries) when the
    olareg binary is missing: run hack/install-deps."""
    from tests.support.producers import missing_producers
    from tests.support.signing import OlaregRegistry

    if missing_producers("olareg"):
        pytest.fail(f"missing olareg: {INSTALL_HINT}", pytrace=False)
    reg = OlaregRegistry(tmp_path_factory.mktemp("olareg"))
    yield reg
    reg.stop()
