"""Session fixtures of the e2e scenarios on the cluster hack/e2e-kube brings up.

The test registries are the suite's own (tests/conftest.py: ``registry``,
``basic_registry``) on 127.0.0.1, exposed to pods on the node's address by
forwarders (forward.py).  The driver is the chart rendered by helm with only
those forwarders' plain-HTTP opt-in added (``registries.hosts``), applied with
kubectl; its images come from the loopback image registry hack/e2e-kube fills.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.registry import Registry

from .forward import Forwarder
from .kube import NS, REPO, kubectl, wait_until

# The throttled forwarder: ~36 MiB take ~2.4 minutes, beyond kubelet's 2-minute
# NodePublishVolume timeout.
SLOW_RATE = 256 * 1024


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not os.environ.get("KUBECONFIG"):
        raise pytest.UsageError("run through hack/e2e-kube (needs KUBECONFIG of its cluster)")


@pytest.fixture(scope="session")
def node_ip() -> str:
    ip = os.environ.get("E2E_KUBE_NODE_IP")
    if not ip:
        pytest.fail("E2E_KUBE_NODE_IP is not set: run through hack/e2e-kube", pytrace=False)
    return ip


@pytest.fixture(scope="session")
def anon(registry: Registry, node_ip: str) -> Iterator[Forwarder]:
    fwd = Forwarder(node_ip, registry.port)
    yield fwd
    fwd.stop()


@pytest.fixture(scope="session")
def basic(basic_registry: Registry, node_ip: str) -> Iterator[Forwarder]:
    fwd = Forwarder(node_ip, basic_registry.port)
    yield fwd
    fwd.stop()


@pytest.fixture(scope="session")
def slow(registry: Registry, node_ip: str) -> Iterator[Forwarder]:
    fwd = Forwarder(node_ip, registry.port, rate=SLOW_RATE)
    yield fwd
    fwd.stop()


@pytest.fixture(scope="session")
def flaky(registry: Registry, node_ip: str) -> Iterator[Forwarder]:
    """The registry behind a forwarder a test may turn off (Forwarder.refuse)."""
    fwd = Forwarder(node_ip, registry.port)
    yield fwd
    fwd.stop()


def _render_chart(hosts: list[str], workdir: Path) -> str:
    values = {
        "namespace": {"create": True},
        "registries": {"hosts": {host: {"insecure": True} for host in hosts}},
    }
    values_file = workdir / "values.json"
    values_file.write_text(json.dumps(values))
    helm = REPO / ".cache" / "bin" / "helm"
    cmd = [str(helm), "template", "csi-oci", str(REPO / "deploy/helm/csi-oci")]
    cmd += ["--namespace", "csi-oci", "-f", str(values_file)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _driver_registered() -> bool:
    out = kubectl("get", "csinode", "-o", "json")
    return any(
        d["name"] == "oci.csi.dev"
        for node in json.loads(out)["items"]
        for d in node["spec"].get("drivers") or []
    )


def wait_driver_ready() -> None:
    for kind in ("daemonset/csi-oci-node", "deployment/csi-oci-controller"):
        kubectl("rollout", "status", "-n", "csi-oci", kind, "--timeout=300s", timeout=320)
    wait_until("driver registered in CSINode", _driver_registered, 120)


@pytest.fixture(scope="session")
def driver(
    anon: Forwarder, basic: Forwarder, slow: Forwarder, flaky: Forwarder, tmp_path_factory
) -> str:
    """The chart deployed; the test namespace exists.  Returns the namespace."""
    hosts = [anon.host, basic.host, slow.host, flaky.host]
    manifests = _render_chart(hosts, tmp_path_factory.mktemp("chart"))
    kubectl("apply", "-f", "-", input=manifests)
    wait_driver_ready()
    kubectl("create", "namespace", NS, check=False)
    wait_until(
        "default ServiceAccount", lambda: kubectl("get", "sa", "default", "-n", NS, check=False), 60
    )
    return NS
