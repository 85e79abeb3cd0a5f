"""The Helm chart, the plain manifests rendered from it, and the examples.

Everything is checked offline with the real tools: helm (built by
hack/install-deps into .cache/bin) renders the chart, and kubernetes-validate
checks every object against the API schemas of every Kubernetes minor from 1.25 to 1.30 it
ships, in strict mode (unknown fields are errors, so a typo cannot hide).
Beyond the schemas, the tests pin what the schemas cannot know: the CSIDriver
settings, privileges and mount propagation of the node plugin, that every
kubelet path follows `kubeletDir`, sidecar major versions, the least RBAC,
that the flags in the manifests are ones the csi-oci CLI accepts, and that
the generated registries.toml is one the driver parses.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from csi_oci.cli import _parser as csi_oci_cli_parser
from csi_oci.oci.config import parse_config
from csi_oci.verify.policy import parse_policy

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "deploy" / "helm" / "csi-oci"
MANIFESTS = REPO / "deploy" / "manifests"
EXAMPLES = REPO / "deploy" / "examples"
HELM = REPO / ".cache" / "bin" / "helm"

KUBERNETES_VERSIONS = ["1.25", "1.26", "1.27", "1.28", "1.29", "1.30"]

# Non-default values touching every knob of the chart at once.
# A public key for the chart's signature policy (its private half was thrown away).
RELEASE_PUB = """-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEpSHHTFmY/CrhX7/mJkyopl6CqYCD
TF6zXH6SXRjXWUuyB/T8C8iPBIwU5K0G3gwTjupjbu1ZURrBdeImGxJi5g==
-----END PUBLIC KEY-----
"""
SIGNATURE_POLICY = """[[rule]]
name = "models"
match = ["registry.example.com/models"]
  [[rule.require]]
  type = "cosign"
  keys = ["release.pub"]
"""

CUSTOM_VALUES = {
    "driverName": "models.example.org",
    "kubeletDir": "/var/snap/microk8s/common/var/lib/kubelet",
    "stateDir": "/data/csi-oci",
    "namespace": {"create": True},
    "images": {
        "csiOci": {
            "repository": "mirror.internal/csi-oci",
            "tag": "0.1.0-test",
            "pullPolicy": "Always",
        },
        "csiProvisioner": {"repository": "mirror.internal/csi-provisioner", "tag": "v5.2.0"},
    },
    "imagePullSecrets": [{"name": "mirror-pull"}],
    "lazy": {"server": "external", "autoFormats": ["estargz", "zstd:chunked"]},
    "logging": {"level": "debug", "format": "text"},
    "metrics": {"port": 19808},
    "cache": {"maxBytes": "200Gi", "minFreeBytes": "10Gi", "maxImageBytes": "2Ti"},
    "pull": {
        "publishWaitSeconds": 60,
        "firstByteTimeoutSeconds": 300,
        "blobParallelism": 4,
        "verifyDiffIDs": False,
    },
    "registries": {
        "settings": {"first_byte_timeout": 300, "max_attempts": 8, "blob_parallelism": 4},
        "hosts": {
            "registry.example.com": {
                "ca": "/etc/csi-oci/certs/example-ca.pem",
                "mirrors": [
                    {
                        "url": "http://127.0.0.1:4001",
                        "headers": {"X-Dragonfly-Registry": "https://registry.example.com"},
                    },
                    {
                        "url": "https://harbor.internal",
                        "repository_prefix": "example-proxy",
                        "ca": "/etc/csi-oci/certs/harbor-ca.pem",
                    },
                ],
            },
            "docker.io": {"mirrors": ["https://distribution-cache.internal"]},
            "10.0.0.5:5000": {"insecure": True},
        },
        "extraConfig": '[hosts."quay.io"]\nskip_verify = false\n',
        "certificatesSecret": "registry-certs",
    },
    "nodeDockerConfig": {"hostPath": "/var/snap/microk8s/common/var/lib/kubelet/config.json"},
    "signatures": {"policy": SIGNATURE_POLICY, "files": {"release.pub": RELEASE_PUB}},
    "node": {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "nodeSelector": {"kubernetes.io/os": "linux", "gpu": "true"},
        "maxUnavailable": "10%",
        "extraArgs": ["--first-byte-timeout=400"],
    },
    "controller": {"replicas": 2, "extraArgs": ["--log-level=warning"]},
    "storageClasses": [
        {
            "name": "oci-tiny-llm-v1",
            "parameters": {"image": "registry.example.com/models/tiny-llm:v1", "mode": "lazy"},
            "nodePublishSecret": {"name": "models-pull-secret", "namespace": "${pvc.namespace}"},
        },
        {
            "name": "oci-granite",
            "parameters": {"image": "registry.example.com/models/granite:v2"},
            "reclaimPolicy": "Retain",
            "volumeBindingMode": "WaitForFirstConsumer",
        },
    ],
}

# Each variant is rendered and validated; the ids name them in test output.
VALUE_SETS = {
    "defaults": {},
    "custom": CUSTOM_VALUES,
    "lazy-inline-no-controller-no-metrics": {
        "lazy": {"server": "inline"},
        "controller": {"enabled": False},
        "csiDriver": {"create": False},
        "metrics": {"port": ""},
        "runtimeDir": {"hostPath": ""},
    },
}


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run hack/install-deps")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, check=False)


def _values_file(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def render(tmp_path: Path, values: dict, *extra: str) -> list[dict]:
    result = _helm(
        "template",
        "csi-oci",
        str(CHART),
        "--namespace",
        "csi-oci",
        "-f",
        str(_values_file(tmp_path, values)),
        *extra,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(pod_spec: dict, name: str) -> dict:
    matches = [c for c in pod_spec["containers"] if c["name"] == name]
    assert matches, f"no container {name}: {[c['name'] for c in pod_spec['containers']]}"
    return matches[0]


def mounts(c: dict) -> dict[str, dict]:
    return {m["name"]: m for m in c.get("volumeMounts", [])}


def volumes(pod_spec: dict) -> dict[str, dict]:
    return {v["name"]: v for v in pod_spec["volumes"]}


def load_yaml_files(directory: Path) -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


# Custom resources: not in the Kubernetes API schemas (their CRDs come with
# the operator that serves them), so only their envelope is checked.
CUSTOM_RESOURCE_GROUPS = ("monitoring.coreos.com/",)


def is_custom_resource(doc: dict) -> bool:
    return doc["apiVersion"].startswith(CUSTOM_RESOURCE_GROUPS)


def validate_all(docs: list[dict], version: str) -> int:
    """Validate every built-in object strictly; returns how many were validated."""
    validated = 0
    for doc in docs:
        if is_custom_resource(doc):
            assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}, doc["kind"]
            assert doc["metadata"]["name"], doc["kind"]
            continue
        what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            used = kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{what} is invalid for Kubernetes {version}: {e}")
        assert used == version, f"{what}: validated against {used}, wanted {version}"
        validated += 1
    return validated


# -- schema validation -------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", VALUE_SETS)
def test_chart_renders_valid_objects(tmp_path, variant, version):
    docs = render(tmp_path, VALUE_SETS[variant], "--kube-version", f"v{version}.0")
    assert validate_all(docs, version) == len(docs)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_plain_manifests_are_valid(version):
    docs = [doc for _, doc in load_yaml_files(MANIFESTS)]
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "CSIDriver", "DaemonSet", "Deployment", "ClusterRole"} <= kinds
    assert validate_all(docs, version) == len(docs)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_examples_are_valid(version):
    docs = [doc for _, doc in load_yaml_files(EXAMPLES)]
    builtin = [d for d in docs if not is_custom_resource(d)]
    assert validate_all(docs, version) == len(builtin) >= 15


def test_strict_validation_catches_a_misspelt_field():
    # Guards the guard: without strict schemas a typo would pass silently.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "i", "volumeMount": []}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, "1.25", strict=True)


# -- one source of truth ---------------------------------------------------------------


def test_plain_manifests_are_rendered_from_the_chart():
    result = subprocess.run(
        [sys.executable, str(REPO / "hack" / "render_manifests.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HELM": str(HELM)},
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("variant", ["defaults", "custom"])
def test_helm_lint(tmp_path, variant):
    result = _helm(
        "lint", "--strict", str(CHART), "-f", str(_values_file(tmp_path, VALUE_SETS[variant]))
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_invalid_lazy_server_value_is_refused(tmp_path):
    result = _helm("template", str(CHART), "--set", "lazy.server=sometimes")
    assert result.returncode != 0
    assert "lazy.server must be external or inline" in result.stderr


def test_examples_use_the_chart_default_driver_name():
    driver = yaml.safe_load((CHART / "values.yaml").read_text())["driverName"]
    for name, doc in load_yaml_files(EXAMPLES):
        text = yaml.safe_dump(doc)
        if doc["kind"] == "StorageClass":
            assert doc["provisioner"] == driver, name
        for line in text.splitlines():
            if line.strip().startswith("driver:"):
                assert line.split(":", 1)[1].strip() == driver, name


def test_examples_cover_every_volume_kind():
    docs = [doc for _, doc in load_yaml_files(EXAMPLES)]
    pods = by_kind(docs, "Pod")
    inline = [
        v["csi"]["volumeAttributes"] for p in pods for v in p["spec"]["volumes"] if "csi" in v
    ]
    assert by_kind(docs, "PersistentVolume"), "static PV example"
    assert any(d["spec"].get("storageClassName") for d in by_kind(docs, "PersistentVolumeClaim"))
    assert by_kind(docs, "StorageClass"), "dynamic provisioning example"
    assert inline, "inline ephemeral example"
    assert any(a.get("mode") == "lazy" for a in inline), "lazy eStargz example"
    assert any("include" in a for a in inline), "ModelPack partial pull example"
    assert any(
        d["spec"]["csi"].get("nodePublishSecretRef") for d in by_kind(docs, "PersistentVolume")
    ), "private registry example"
    # Examples must not teach anything but read-only volumes.
    for pod in pods:
        for volume in pod["spec"]["volumes"]:
            if "csi" in volume:
                assert volume["csi"].get("readOnly") is True, pod["metadata"]["name"]
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"].get("readOnly") is True


# -- what the schemas cannot check -----------------------------------------------------


def test_csidriver_object(tmp_path):
    spec = one(render(tmp_path, {}), "CSIDriver", "oci.csi.dev")["spec"]
    assert spec == {
        "attachRequired": False,
        "podInfoOnMount": True,
        "volumeLifecycleModes": ["Persistent", "Ephemeral"],
        "fsGroupPolicy": "None",
        "requiresRepublish": False,
    }


def _node_pod(docs: list[dict]) -> dict:
    return one(docs, "DaemonSet", "csi-oci-node")["spec"]["template"]["spec"]


@pytest.mark.parametrize("variant", ["defaults", "custom"])
def test_node_plugin_privileges_and_mounts(tmp_path, variant):
    values = VALUE_SETS[variant]
    kubelet_dir = values.get("kubeletDir", "/var/lib/kubelet")
    state_dir = values.get("stateDir", "/var/lib/csi-oci")
    driver_name = values.get("driverName", "oci.csi.dev")
    pod = _node_pod(render(tmp_path, values))
    vols = volumes(pod)

    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["automountServiceAccountToken"] is False
    assert pod["tolerations"]
    assert "hostNetwork" not in pod

    # Host paths: every kubelet path follows kubeletDir.
    assert vols["pods-dir"]["hostPath"] == {"path": f"{kubelet_dir}/pods", "type": "Directory"}
    assert vols["registration-dir"]["hostPath"]["path"] == f"{kubelet_dir}/plugins_registry"
    assert vols["plugin-dir"]["hostPath"]["path"] == f"{kubelet_dir}/plugins/{driver_name}"
    assert vols["state-dir"]["hostPath"] == {"path": state_dir, "type": "DirectoryOrCreate"}
    assert vols["dev-fuse"]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    assert vols["runtime-dir"]["hostPath"] == {"path": "/run/csi-oci", "type": "DirectoryOrCreate"}

    for name in ("csi-oci", "lazy-server"):
        c = container(pod, name)
        assert c["securityContext"]["privileged"] is True, name
        assert c["securityContext"]["runAsUser"] == 0, name
        m = mounts(c)
        # Same path as on the host (kubelet's target paths), propagating both ways.
        assert m["pods-dir"]["mountPath"] == f"{kubelet_dir}/pods", name
        assert m["pods-dir"]["mountPropagation"] == "Bidirectional", name
        assert m["state-dir"]["mountPath"] == state_dir, name
        assert m["state-dir"]["mountPropagation"] == "Bidirectional", name
        assert m["runtime-dir"]["mountPath"] == "/run/csi-oci", name
        assert "--runtime-dir=/run/csi-oci" in c["args"], name
    assert mounts(container(pod, "lazy-server"))["dev-fuse"]["mountPath"] == "/dev/fuse"

    driver_args = container(pod, "csi-oci")["args"]
    assert driver_args[:2] == ["serve", "--mode=node"]
    assert "--lazy-server=external" in driver_args
    assert f"--driver-name={driver_name}" in driver_args
    assert f"--state-dir={state_dir}" in driver_args
    lazy_args = container(pod, "lazy-server")["args"]
    assert lazy_args[0] == "lazy-server"
    assert f"--state-dir={state_dir}" in lazy_args

    registrar = container(pod, "node-driver-registrar")
    assert (
        f"--kubelet-registration-path={kubelet_dir}/plugins/{driver_name}/csi.sock"
        in registrar["args"]
    )
    # Sidecars: unprivileged.
    for name in ("node-driver-registrar", "liveness-probe"):
        sc = container(pod, name)["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]


def test_default_node_plugin_flags(tmp_path):
    pod = _node_pod(render(tmp_path, {}))
    args = container(pod, "csi-oci")["args"]
    for flag in ("--metrics-address=:9808", "--log-format=json", "--endpoint=unix:///csi/csi.sock"):
        assert flag in args
    driver = container(pod, "csi-oci")
    assert driver["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    ports = {p["name"]: p["containerPort"] for p in driver["ports"]}
    assert ports == {"metrics": 9808, "healthz": 9810}
    assert "--http-endpoint=:9810" in container(pod, "liveness-probe")["args"]
    assert "--http-endpoint=:9809" in container(pod, "node-driver-registrar")["args"]
    # No registry config, docker config or budget unless asked for; diff_ids checked.
    assert not [
        a
        for a in args
        if a.startswith(("--registry-config", "--docker-config", "--cache", "--no-verify"))
    ]


def test_inline_lazy_server_drops_the_container_and_fuse_device(tmp_path):
    docs = render(tmp_path, VALUE_SETS["lazy-inline-no-controller-no-metrics"])
    pod = _node_pod(docs)
    assert [c["name"] for c in pod["containers"]] == [
        "csi-oci",
        "node-driver-registrar",
        "liveness-probe",
    ]
    assert "dev-fuse" not in volumes(pod)
    assert volumes(pod)["runtime-dir"]["emptyDir"]["medium"] == "Memory"
    driver = container(pod, "csi-oci")
    assert "--lazy-server=inline" in driver["args"]
    assert "--metrics-address=" in driver["args"]
    assert "readinessProbe" not in driver
    assert not by_kind(docs, "Deployment") and not by_kind(docs, "CSIDriver")
    assert not by_kind(docs, "ClusterRole")


def test_sidecar_versions(tmp_path):
    docs = render(tmp_path, {})
    images = [
        c["image"]
        for d in by_kind(docs, "DaemonSet") + by_kind(docs, "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
    ]
    tags = {i.rsplit("/", 1)[1].split(":")[0]: i.rsplit(":", 1)[1] for i in images}
    assert tags["csi-node-driver-registrar"].startswith("v2.")
    assert tags["livenessprobe"].startswith("v2.")
    # v6 needs Kubernetes >= 1.34; the chart supports 1.25 on.
    assert tags["csi-provisioner"].startswith("v5.")
    assert tags["csi-oci"] == yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def test_controller_runs_unprivileged_with_least_rbac(tmp_path):
    docs = render(tmp_path, {})
    pod = one(docs, "Deployment", "csi-oci-controller")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert not sc.get("privileged"), c["name"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert all(v.get("hostPath") is None for v in pod["volumes"])
    rules = [
        r for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role") for r in role["rules"]
    ]
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        assert "secrets" not in rule["resources"], "no Secret access anywhere"
    writable = {
        res
        for r in rules
        for res in r["resources"]
        if set(r["verbs"]) & {"create", "update", "patch", "delete"}
    }
    assert writable == {"persistentvolumes", "persistentvolumeclaims", "events", "leases"}
    # The node plugin has no RBAC at all.
    bound = {
        s["name"]
        for b in by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding")
        for s in b["subjects"]
    }
    assert bound == {"csi-oci-controller"}


def test_custom_values_reach_the_objects(tmp_path):
    docs = render(tmp_path, CUSTOM_VALUES)
    pod = _node_pod(docs)
    args = container(pod, "csi-oci")["args"]
    for flag in (
        "--cache-max-bytes=200Gi",
        "--cache-min-free-bytes=10Gi",
        "--max-image-bytes=2Ti",
        "--first-byte-timeout=300",
        "--blob-parallelism=4",
        "--no-verify-diff-ids",
        "--auto-lazy=estargz,zstd:chunked",
        "--publish-wait=60",
        "--log-format=text",
        "--log-level=debug",
        "--metrics-address=:19808",
        "--registry-config=/etc/csi-oci/registries/registries.toml",
        "--docker-config=/etc/csi-oci/docker/config.json",
        "--first-byte-timeout=400",
    ):
        assert flag in args, flag
    assert container(pod, "csi-oci")["image"] == "mirror.internal/csi-oci:0.1.0-test"
    assert pod["imagePullSecrets"] == [{"name": "mirror-pull"}]
    vols = volumes(pod)
    assert vols["registry-certs"]["secret"]["secretName"] == "registry-certs"
    assert vols["node-docker-config"]["hostPath"]["type"] == "File"
    for name in ("csi-oci", "lazy-server"):
        assert {"registries", "registry-certs", "node-docker-config"} <= set(
            mounts(container(pod, name))
        )

    classes = {sc["metadata"]["name"]: sc for sc in by_kind(docs, "StorageClass")}
    tiny = classes["oci-tiny-llm-v1"]
    assert tiny["provisioner"] == "models.example.org"
    assert tiny["parameters"]["csi.storage.k8s.io/node-publish-secret-namespace"] == (
        "${pvc.namespace}"
    )
    assert classes["oci-granite"]["volumeBindingMode"] == "WaitForFirstConsumer"
    assert one(docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == (
        "privileged"
    )


def test_pod_monitor_selects_the_node_plugin_metrics_port(tmp_path):
    assert not by_kind(render(tmp_path, {}), "PodMonitor"), "off by default (needs CRDs)"
    docs = render(tmp_path, {"metrics": {"podMonitor": {"enabled": True}}})
    monitor = one(docs, "PodMonitor", "csi-oci-node")
    pod_template = one(docs, "DaemonSet", "csi-oci-node")["spec"]["template"]
    labels = pod_template["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    assert port in {p["name"] for p in container(pod_template["spec"], "csi-oci")["ports"]}


def test_generated_registry_config_is_what_the_driver_parses(tmp_path):
    docs = render(tmp_path, CUSTOM_VALUES)
    text = one(docs, "ConfigMap", "csi-oci-registries")["data"]["registries.toml"]
    config = parse_config(text, "chart registries.toml")
    assert config.first_byte_timeout == 300
    assert config.max_attempts == 8
    assert config.blob_parallelism == 4
    assert set(config.hosts) == {"registry.example.com", "docker.io", "10.0.0.5:5000", "quay.io"}
    assert config.hosts["10.0.0.5:5000"].insecure is True
    # Mirrors in order, then the registry itself; headers and prefixes kept.
    endpoints = config.endpoints("registry.example.com", "registry.example.com")
    assert [e.base_url for e in endpoints] == [
        "http://127.0.0.1:4001",
        "https://harbor.internal",
        "https://registry.example.com",
    ]
    assert endpoints[1].repository_prefix == "example-proxy"
    docker_io = config.endpoints("docker.io", "registry-1.docker.io")
    assert docker_io[0].base_url == "https://distribution-cache.internal"


def test_signature_policy_reaches_the_driver_as_it_parses_it(tmp_path):
    """signatures.policy and .files become one ConfigMap, mounted where
    --policy-config points, and the driver loads the rule with its key."""
    docs = render(tmp_path, CUSTOM_VALUES)
    data = one(docs, "ConfigMap", "csi-oci-signatures")["data"]
    assert set(data) == {"policy.toml", "release.pub"}
    pod = _node_pod(docs)
    driver = container(pod, "csi-oci")
    assert "--policy-config=/etc/csi-oci/signatures/policy.toml" in driver["args"]
    assert mounts(driver)["signatures"]["mountPath"] == "/etc/csi-oci/signatures"
    assert volumes(pod)["signatures"]["configMap"]["name"] == "csi-oci-signatures"
    # No rollout annotation: the driver re-reads the policy in place.
    annotations = one(docs, "DaemonSet", "csi-oci-node")["spec"]["template"]["metadata"].get(
        "annotations", {}
    )
    assert not any("signature" in k for k in annotations)
    mounted = tmp_path / "signatures"
    mounted.mkdir()
    for name, content in data.items():
        (mounted / name).write_text(content)
    policy = parse_policy(data["policy.toml"], mounted / "policy.toml")
    (rule,) = policy.rules
    assert rule.name == "models" and rule.requires[0].keys is not None
    # Without a policy, nothing is rendered or passed.
    plain = render(tmp_path, {})
    assert not [d for d in by_kind(plain, "ConfigMap") if d["metadata"]["name"].endswith("sig")]
    assert not any(
        a.startswith("--policy-config") for a in container(_node_pod(plain), "csi-oci")["args"]
    )


# -- the flags in the manifests are flags csi-oci has -------------------------------------


def _parse_cli(args: list[str]) -> argparse.Namespace:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return csi_oci_cli_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"csi-oci refuses `{shlex.join(args)}`: {err.getvalue().strip()}")


@pytest.mark.parametrize("variant", ["defaults", "custom"])
def test_manifest_flags_are_accepted_by_the_cli(tmp_path, variant):
    docs = render(tmp_path, VALUE_SETS[variant])
    node_pod = _node_pod(docs)
    controller_pod = one(docs, "Deployment", "csi-oci-controller")["spec"]["template"]["spec"]
    node_args = [
        a.replace("$(NODE_NAME)", "node-1") for a in container(node_pod, "csi-oci")["args"]
    ]
    parsed = _parse_cli(node_args)
    assert (parsed.command, parsed.mode) == ("serve", "node")
    parsed = _parse_cli(container(controller_pod, "csi-oci")["args"])
    assert (parsed.command, parsed.mode) == ("serve", "controller")

    lazy_args = container(node_pod, "lazy-server")["args"]
    assert _parse_cli(lazy_args).command == "lazy-server"
