"""kubectl, as the e2e scenarios use it: apply objects, wait for pods, exec, read events.

Everything goes through the kubectl that hack/e2e-kube built (the cluster's
own version), with the admin kubeconfig in ``KUBECONFIG``.  Objects are
passed as Python dicts and sent as JSON, so no YAML library is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[2]
# The cluster's own kubectl (hack/e2e-kube sets it per E2E_KUBE_VERSION).
KUBECTL = os.environ.get("E2E_KUBE_KUBECTL", str(REPO / ".cache" / "e2e-kube" / "bin" / "kubectl"))
NS = "e2e"  # every scenario's namespace
BUSYBOX = "e2e.local/busybox:1.35"  # pushed by hack/e2e-kube
DRIVER = "oci.csi.dev"


class KubeError(RuntimeError):
    pass


def kubectl(*args: str, input: str | None = None, timeout: float = 120, check: bool = True) -> str:
    exe = KUBECTL if os.path.exists(KUBECTL) else shutil.which("kubectl") or "kubectl"
    proc = subprocess.run(
        [exe, *args], input=input, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise KubeError(f"kubectl {' '.join(args)}: exit {proc.returncode}\n{proc.stderr}")
    return proc.stdout


def apply(*objects: dict[str, Any]) -> None:
    kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}),
    )


def get(kind: str, name: str, ns: str | None = NS) -> dict[str, Any] | None:
    args = ["get", kind, name, "-o", "json", "--ignore-not-found"]
    if ns:
        args += ["-n", ns]
    out = kubectl(*args)
    return json.loads(out) if out.strip() else None


def delete(kind: str, name: str, ns: str | None = NS, wait: bool = True) -> None:
    args = ["delete", kind, name, "--ignore-not-found", f"--wait={'true' if wait else 'false'}"]
    if ns:
        args += ["-n", ns]
    kubectl(*args, timeout=300)


def wait_until(what: str, check: Callable[[], Any], timeout: float, every: float = 2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f}s")
        time.sleep(every)


def pod_phase(name: str, ns: str = NS) -> str | None:
    pod = get("pod", name, ns)
    return None if pod is None else pod["status"].get("phase")


def wait_running(name: str, ns: str = NS, timeout: float = 180) -> dict[str, Any]:
    """The pod once all its containers are ready; on timeout the error carries its events."""

    def ready() -> dict[str, Any] | None:
        pod = get("pod", name, ns)
        if pod is None or pod["status"].get("phase") != "Running":
            return None
        statuses = pod["status"].get("containerStatuses", [])
        return pod if statuses and all(s.get("ready") for s in statuses) else None

    try:
        return wait_until(f"pod {ns}/{name} running", ready, timeout)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; events:\n" + "\n".join(event_messages(name, ns))) from None


def event_messages(name: str, ns: str = NS) -> list[str]:
    out = kubectl(
        "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json"
    )
    return [f"{e.get('reason')}: {e.get('message')}" for e in json.loads(out)["items"]]


def exec_pod(name: str, script: str, ns: str = NS, timeout: float = 120) -> str:
    return kubectl("exec", "-n", ns, name, "--", "sh", "-c", script, timeout=timeout)


def sha256_tree(pod: str, path: str, ns: str = NS) -> dict[str, str]:
    """{relative path: sha256} of every regular file under ``path``, read inside the pod."""
    out = exec_pod(pod, f"cd {path} && find . -type f -exec sha256sum {{}} +", ns, timeout=300)
    result = {}
    for line in out.splitlines():
        digest, _, file = line.partition("  ")
        result[file.removeprefix("./")] = digest
    return result


def reader_pod(
    name: str,
    volume: dict[str, Any],
    *,
    command: str = "sleep 3600",
    ns: str = NS,
    mount: str = "/models",
    propagation: str | None = None,
) -> dict[str, Any]:
    """A busybox pod mounting ``volume`` (a pod ``volumes[]`` entry named model) read-only.

    ``propagation`` is the volumeMount's mountPropagation (e.g. HostToContainer).
    """
    volume_mount: dict[str, Any] = {"name": "model", "mountPath": mount, "readOnly": True}
    if propagation:
        volume_mount["mountPropagation"] = propagation
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "reader",
                    "image": BUSYBOX,
                    "command": ["sh", "-c", command],
                    "volumeMounts": [volume_mount],
                }
            ],
            "volumes": [{"name": "model", **volume}],
        },
    }


def inline(attributes: dict[str, str], secret: str | None = None) -> dict[str, Any]:
    csi: dict[str, Any] = {"driver": DRIVER, "readOnly": True, "volumeAttributes": attributes}
    if secret:
        csi["nodePublishSecretRef"] = {"name": secret}
    return {"csi": csi}


def pod_uid(name: str, ns: str = NS) -> str:
    pod = get("pod", name, ns)
    assert pod is not None, f"pod {name} is gone"
    return str(pod["metadata"]["uid"])


def node_pod() -> dict[str, Any]:
    out = kubectl(
        "get", "pods", "-n", "csi-oci", "-l", "app.kubernetes.io/component=node", "-o", "json"
    )
    pods = [p for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")]
    assert len(pods) == 1, f"expected one node plugin pod, got {len(pods)}"
    return pods[0]


def host_mounts_under(prefix: str) -> list[str]:
    """Mount points (the host's view) at or below ``prefix``."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
            points.append(point)
    return points


def metrics(labels: str = "") -> dict[str, float]:
    """The node plugin's /metrics, summed per metric name over the samples whose
    labels contain ``labels`` (e.g. 'phase="Ready"'); the other labels dropped."""
    ip = node_pod()["status"]["podIP"]
    text = requests.get(f"http://{ip}:9808/metrics", timeout=10).text
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_labels, _, value = line.rpartition(" ")
        if labels and labels not in name_labels:
            continue
        name = name_labels.split("{", 1)[0]
        sums[name] = sums.get(name, 0.0) + float(value)
    return sums


def names(items: Iterable[dict[str, Any]]) -> list[str]:
    return [i["metadata"]["name"] for i in items]
