"""The Helm chart, the plain manifests rendered from it, and the examples.

Everything is checked offline with the real tools: helm (built by
hack/install-deps into .cache/bin) renders the chart, and kubernetes-validate
checks every object against the API schemas of every Kubernetes minor from 1.25 to 1.30 it
ships, in strict mode (unknown fields are errors, so a typo cannot hide).
Beyond the schemas, the tests pin what the schemas cannot know: the CSIDriver
settings, privileges and mount propagation of the node plugin, that every
kubelet path follows `kubeletDir`, sidecar major versions, the least RBAC,
that the flags in the manifests are ones the csi-oci CLI accepts, and that
the generated registries.toml is one the driver parses. Custom resources of
the chart's own CRDs (ImageCache) are validated against the CRD's schema as
rendered from the chart, with jsonschema (a dependency of kubernetes-validate).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import io
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
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

IMAGECACHE_CRD = "imagecaches.oci.csi.dev"
# Where in-cluster Kubernetes clients look for the token, CA and namespace.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

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
    # The CRD managed elsewhere (e.g. a second installation): RBAC and flags only.
    "prewarm": {"enabled": True, "installCRD": False},
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
    "no-prewarm": {"prewarm": {"enabled": False}},
}


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run hack/install-deps")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, check=False)


def _values_file(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def render(tmp_path: Path, values: dict, *extra: str, namespace: str = "csi-oci") -> list[dict]:
    result = _helm(
        "template",
        "csi-oci",
        str(CHART),
        "--namespace",
        namespace,
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


# Custom resources of other projects: not in the Kubernetes API schemas (their
# CRDs come with the operator that serves them), so only their envelope is
# checked. Those of the chart's own CRDs are validated against the CRD.
CUSTOM_RESOURCE_GROUPS = ("monitoring.coreos.com/",)


def is_custom_resource(doc: dict) -> bool:
    return doc["apiVersion"].startswith(CUSTOM_RESOURCE_GROUPS)


@functools.cache
def chart_crds() -> dict[tuple[str, str], dict]:
    """The CustomResourceDefinitions of the chart (default values), by (apiVersion, kind)."""
    result = _helm("template", "csi-oci", str(CHART), "--namespace", "csi-oci")
    assert result.returncode == 0, result.stderr
    crds = {}
    for doc in yaml.safe_load_all(result.stdout):
        if doc and doc["kind"] == "CustomResourceDefinition":
            for version in doc["spec"]["versions"]:
                api_version = f"{doc['spec']['group']}/{version['name']}"
                crds[(api_version, doc["spec"]["names"]["kind"])] = doc
    return crds


def is_chart_resource(doc: dict) -> bool:
    return (doc["apiVersion"], doc["kind"]) in chart_crds()


def structural_problems(schema: dict, where: str = "") -> list[str]:
    """Why `schema` is not a structural schema (apiextensions.k8s.io/v1 requires one):
    every node has a type, unless it preserves unknown fields or is int-or-string."""
    problems = []
    if not schema.get("type") and not (
        schema.get("x-kubernetes-preserve-unknown-fields")
        or schema.get("x-kubernetes-int-or-string")
    ):
        problems.append(f"{where or '.'}: no type")
    for forbidden in ("$ref", "allOf", "oneOf", "anyOf", "not"):
        if forbidden in schema:
            problems.append(f"{where or '.'}: {forbidden} (not checked here)")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{where or '.'}: both properties and additionalProperties")
    for name, sub in schema.get("properties", {}).items():
        problems += structural_problems(sub, f"{where}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        problems += structural_problems(schema["additionalProperties"], f"{where}.*")
    if "items" in schema:
        problems += structural_problems(schema["items"], f"{where}[]")
    item = schema.get("items", {})
    for key in schema.get("x-kubernetes-list-map-keys", []):
        if key not in item.get("required", []) and "default" not in item["properties"][key]:
            problems.append(f"{where}: list-map key {key} neither required nor defaulted")
    return problems


def _strict(schema: dict) -> dict:
    """The CRD schema as a JSON Schema that refuses unknown fields, as the API
    server does with strict field validation (it would prune them otherwise)."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
        stack += list(node.get("properties", {}).values())
        if isinstance(node.get("additionalProperties"), dict):
            stack.append(node["additionalProperties"])
        if "items" in node:
            stack.append(node["items"])
    return schema


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: the keys identify each item."""
    if not validator.is_type(instance, "array"):
        return
    seen = set()
    for item in instance:
        key = tuple(item.get(k) for k in keys) if isinstance(item, dict) else item
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate list-map key {key}")
        seen.add(key)


# OpenAPI v3.0 schema objects mean what JSON Schema draft 4 says, plus Kubernetes'
# extensions; formats as the API server checks them.
_CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-map-keys": _list_map_keys}
)
_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    return not isinstance(value, str) or bool(datetime.datetime.fromisoformat(value).tzinfo)


@_FORMATS.checks("int64")
def _is_int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


def custom_resource_errors(doc: dict) -> list[str]:
    """What the API server would refuse in a custom resource of the chart's CRDs."""
    crd = chart_crds()[(doc["apiVersion"], doc["kind"])]
    version = doc["apiVersion"].split("/")[1]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    errors = []
    if not served["served"]:
        errors.append(f"version {version} is not served")
    metadata = doc.get("metadata", {})
    if not metadata.get("name"):
        errors.append("metadata.name is missing")
    if crd["spec"]["scope"] == "Cluster" and "namespace" in metadata:
        errors.append(f"{doc['kind']} is cluster-scoped: no metadata.namespace")
    schema = _strict(served["schema"]["openAPIV3Schema"])
    validator = _CRDValidator(schema, format_checker=_FORMATS)
    errors += [
        f"{'.'.join(map(str, e.absolute_path)) or '.'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]
    return errors


def validate_all(docs: list[dict], version: str) -> int:
    """Validate every built-in object strictly, and the chart's own custom
    resources against their CRD; returns how many were validated."""
    validated = 0
    for doc in docs:
        if is_custom_resource(doc):
            assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}, doc["kind"]
            assert doc["metadata"]["name"], doc["kind"]
            continue
        if is_chart_resource(doc):
            errors = custom_resource_errors(doc)
            assert not errors, f"{doc['kind']}/{doc['metadata'].get('name')}: {errors}"
            validated += 1
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
    checked = [d for d in docs if not is_custom_resource(d)]
    assert validate_all(docs, version) == len(checked) >= 15
    assert by_kind(docs, "ImageCache"), "pre-warm example"


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
    # Only the node plugin's pre-warm role is left.
    assert [r["metadata"]["name"] for r in by_kind(docs, "ClusterRole")] == ["csi-oci-node"]


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


@pytest.mark.parametrize("prewarm", [True, False], ids=["prewarm", "no-prewarm"])
def test_controller_runs_unprivileged_with_least_rbac(tmp_path, prewarm):
    docs = render(tmp_path, {"prewarm": {"enabled": prewarm}})
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
        assert "*" not in rule["apiGroups"], rule
    # Secrets: at most `get` in the release namespace, for pre-warm's pull Secrets
    # (test_prewarm_rbac pins that Role).
    secret_roles = [
        role
        for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role")
        if any("secrets" in r["resources"] for r in role["rules"])
    ]
    expected_secret_roles = [("Role", "csi-oci-node-secrets")] if prewarm else []
    assert [(r["kind"], r["metadata"]["name"]) for r in secret_roles] == expected_secret_roles
    writable = {
        res
        for r in rules
        for res in r["resources"]
        if set(r["verbs"]) & {"create", "update", "patch", "delete"}
    }
    expected = {"persistentvolumes", "persistentvolumeclaims", "events", "leases"}
    assert writable == expected | ({"imagecaches/status"} if prewarm else set())
    # The node plugin has RBAC only for pre-warm.
    bound = {
        s["name"]
        for b in by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding")
        for s in b["subjects"]
    }
    assert bound == {"csi-oci-controller"} | ({"csi-oci-node"} if prewarm else set())


# -- pre-warm (ImageCache) -----------------------------------------------------------------


def _rules(role: dict) -> list[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]]:
    return [
        (tuple(r["apiGroups"]), tuple(r["resources"]), tuple(sorted(r["verbs"])))
        for r in role["rules"]
    ]


def _imagecache_crd(docs: list[dict]) -> dict:
    return one(docs, "CustomResourceDefinition", IMAGECACHE_CRD)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_imagecache_crd(tmp_path, version):
    docs = render(tmp_path, {}, "--kube-version", f"v{version}.0")
    crd = _imagecache_crd(docs)
    assert validate_all([crd], version) == 1
    # helm uninstall must not take the users' ImageCaches with it.
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    spec = crd["spec"]
    assert spec["group"] == "oci.csi.dev" and spec["scope"] == "Cluster"
    assert spec["names"] == {
        "kind": "ImageCache",
        "listKind": "ImageCacheList",
        "plural": "imagecaches",
        "singular": "imagecache",
        "shortNames": ["imgcache"],
    }
    (v1alpha1,) = spec["versions"]
    assert (v1alpha1["name"], v1alpha1["served"], v1alpha1["storage"]) == ("v1alpha1", True, True)
    assert v1alpha1["subresources"] == {"status": {}}
    assert v1alpha1["additionalPrinterColumns"] == [
        {"name": "Image", "type": "string", "jsonPath": ".spec.image"},
        {"name": "Digest", "type": "string", "jsonPath": ".status.digest"},
        {
            "name": "Ready",
            "type": "string",
            "description": "Nodes with the image ready / nodes selected.",
            "jsonPath": ".status.ready",
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]

    schema = v1alpha1["schema"]["openAPIV3Schema"]
    assert structural_problems(schema) == []
    assert structural_problems({"type": "object", "properties": {"x": {}}}) == [".x: no type"]
    _CRDValidator.check_schema(_strict(schema))
    fields = schema["properties"]["spec"]["properties"]
    assert schema["properties"]["spec"]["required"] == ["image"]
    assert set(fields) == {
        "image",
        "nodeSelector",
        "include",
        "mode",
        "pullSecrets",
        "platform",
        "refresh",
        "signaturePolicy",
    }
    assert fields["mode"]["enum"] == ["unpack", "lazy"] and fields["mode"]["default"] == "unpack"
    assert (fields["include"]["maxItems"], fields["pullSecrets"]["maxItems"]) == (256, 16)
    expression = fields["nodeSelector"]["properties"]["matchExpressions"]["items"]
    assert expression["properties"]["operator"]["enum"] == ["In", "NotIn", "Exists", "DoesNotExist"]
    status = schema["properties"]["status"]["properties"]
    assert set(status) == {"nodes", "selectedNodes", "readyNodes", "ready", "digest"}
    nodes = status["nodes"]
    assert nodes["x-kubernetes-list-type"] == "map"
    assert nodes["x-kubernetes-list-map-keys"] == ["node"]
    assert nodes["items"]["properties"]["phase"]["enum"] == [
        "Pending",
        "Pulling",
        "Ready",
        "Failed",
    ]
    assert nodes["items"]["properties"]["bytes"]["format"] == "int64"


GOOD_IMAGECACHE = {
    "apiVersion": "oci.csi.dev/v1alpha1",
    "kind": "ImageCache",
    "metadata": {"name": "llm"},
    "spec": {
        "image": "registry.example.com/models/llm:v1",
        "nodeSelector": {
            "matchLabels": {"models.example.com/llm": "true"},
            "matchExpressions": [{"key": "gpu", "operator": "Exists"}],
        },
        "include": ["*.json"],
        "mode": "lazy",
        "pullSecrets": ["pull"],
        "platform": "linux/arm64/v8",
        "refresh": "90s",
        "signaturePolicy": "models",
    },
    "status": {
        "nodes": [
            {
                "node": "n1",
                "digest": "sha256:" + "a" * 64,
                "phase": "Ready",
                "bytes": 5 * 2**40,
                "totalBytes": 5 * 2**40,
                "percent": 100,
                "message": "",
                "lastUpdate": "2025-01-02T03:04:05Z",
                "pinned": True,
            },
            {"node": "n2", "phase": "Pulling", "percent": 3},
        ],
        "selectedNodes": 2,
        "readyNodes": 1,
        "ready": "1/2",
        "digest": "sha256:" + "a" * 64,
    },
}


def _changed(path: str, value: object) -> dict:
    """GOOD_IMAGECACHE with the field at dotted `path` set (None: removed)."""
    doc = copy.deepcopy(GOOD_IMAGECACHE)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    target = doc
    for p in parents:
        target = target[p]
    if value is None:
        del target[last]
    else:
        target[last] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.image", None),
        ("spec.image", ""),
        ("spec.image", "r/" + "x" * 1023),
        ("spec.mode", "eager"),
        ("spec.imagePullSecrets", ["pull"]),
        ("spec.refresh", "1d"),
        ("spec.refresh", "1h30m"),
        ("spec.platform", "linux"),
        ("spec.platform", "Linux/amd64"),
        ("spec.pullSecrets", [f"s{i}" for i in range(17)]),
        ("spec.include", ["*"] * 257),
        ("spec.include", "*.json"),
        ("spec.signaturePolicy", "r" * 129),
        ("spec.nodeSelector.matchExpressions.0.operator", "Gt"),
        ("spec.nodeSelector.matchExpressions.0.key", None),
        ("spec.nodeSelector.matchLabels", {"gpu": True}),
        ("spec", None),
        ("metadata.namespace", "default"),
        ("status.nodes.1.node", "n1"),
        ("status.nodes.1.node", None),
        ("status.nodes.1.phase", "Done"),
        ("status.nodes.1.percent", 101),
        ("status.nodes.1.bytes", 2**63),
        ("status.nodes.1.lastUpdate", "yesterday"),
        ("status.ready", 1),
    ],
)
def test_imagecache_schema_refuses_mistakes(path, value):
    # Guards the guard: the validator used for the examples refuses what the
    # API server would.
    assert custom_resource_errors(GOOD_IMAGECACHE) == []
    assert custom_resource_errors(_changed(path, value)), (path, value)


def test_imagecache_example(tmp_path):
    docs = [doc for _, doc in load_yaml_files(EXAMPLES)]
    caches = by_kind(docs, "ImageCache")
    assert caches
    for cache in caches:
        assert custom_resource_errors(cache) == [], cache["metadata"]["name"]
    first = caches[0]["spec"]
    assert ":" in first["image"].rsplit("/", 1)[1] and "@" not in first["image"], "by tag"
    assert first["refresh"] == "1h"
    assert first["pullSecrets"] and first["include"]
    assert first["nodeSelector"]["matchLabels"] == {"models.example.com/llm": "true"}
    keys = {
        e["key"]
        for c in caches
        for e in c["spec"].get("nodeSelector", {}).get("matchExpressions", [])
    }
    assert "node.kubernetes.io/instance-type" in keys
    # The pod in the example asks for what the first ImageCache warms.
    (pod,) = by_kind(docs_named(EXAMPLES / "imagecache.yaml"), "Pod")
    (attributes,) = [v["csi"]["volumeAttributes"] for v in pod["spec"]["volumes"] if "csi" in v]
    assert attributes["image"] == first["image"]
    assert attributes["include"].split(",") == first["include"]
    assert pod["spec"]["nodeSelector"].items() <= first["nodeSelector"]["matchLabels"].items()


def docs_named(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("namespace", ["csi-oci", "models-system"])
def test_prewarm_rbac(tmp_path, namespace):
    docs = render(tmp_path, {}, namespace=namespace)
    node_role = one(docs, "ClusterRole", "csi-oci-node")
    assert _rules(node_role) == [
        (("oci.csi.dev",), ("imagecaches",), ("get", "list", "watch")),
        (("oci.csi.dev",), ("imagecaches/status",), ("patch",)),
        (("",), ("nodes",), ("get",)),
    ]
    secrets_role = one(docs, "Role", "csi-oci-node-secrets")
    assert secrets_role["metadata"]["namespace"] == namespace
    assert _rules(secrets_role) == [(("",), ("secrets",), ("get",))]
    node_sa = {"kind": "ServiceAccount", "name": "csi-oci-node", "namespace": namespace}
    binding = one(docs, "ClusterRoleBinding", "csi-oci-node")
    assert binding["subjects"] == [node_sa]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "csi-oci-node",
    }
    binding = one(docs, "RoleBinding", "csi-oci-node-secrets")
    assert binding["metadata"]["namespace"] == namespace
    assert binding["subjects"] == [node_sa]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "csi-oci-node-secrets",
    }
    # Nothing else of the node's touches Secrets, and no ClusterRole does.
    for role in by_kind(docs, "ClusterRole"):
        assert all("secrets" not in r["resources"] for r in role["rules"]), role["metadata"]
    node_bindings = [
        b
        for b in by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding")
        if node_sa in b["subjects"]
    ]
    assert len(node_bindings) == 2

    controller_rules = _rules(one(docs, "ClusterRole", "csi-oci-provisioner"))
    for rule in (
        (("oci.csi.dev",), ("imagecaches",), ("get", "list", "watch")),
        (("oci.csi.dev",), ("imagecaches/status",), ("patch",)),
        (("",), ("nodes",), ("get", "list", "watch")),
    ):
        assert rule in controller_rules
    imagecache_rules = [r for r in controller_rules if r[0] == ("oci.csi.dev",)]
    assert len(imagecache_rules) == 2


@pytest.mark.parametrize("variant", ["defaults", "custom"])
def test_prewarm_token_reaches_the_driver_container_only(tmp_path, variant):
    docs = render(tmp_path, VALUE_SETS[variant])
    assert one(docs, "ServiceAccount", "csi-oci-node")["automountServiceAccountToken"] is False
    pod = _node_pod(docs)
    assert pod["automountServiceAccountToken"] is False
    assert volumes(pod)["api-access"] == {
        "name": "api-access",
        "projected": {
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
                {
                    "configMap": {
                        "name": "kube-root-ca.crt",
                        "items": [{"key": "ca.crt", "path": "ca.crt"}],
                    }
                },
                {
                    "downwardAPI": {
                        "items": [
                            {
                                "path": "namespace",
                                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                            }
                        ]
                    }
                },
            ]
        },
    }
    users = {
        c["name"]: m
        for c in pod["containers"]
        for m in c.get("volumeMounts", [])
        if m["name"] == "api-access" or m["mountPath"].startswith("/var/run/secrets")
    }
    assert users == {
        "csi-oci": {"name": "api-access", "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True}
    }
    driver = container(pod, "csi-oci")
    assert "--prewarm" in driver["args"]
    assert "--namespace=$(POD_NAMESPACE)" in driver["args"]
    env = {e["name"]: e for e in driver["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert not [a for a in container(pod, "lazy-server")["args"] if "prewarm" in a]
    controller = one(docs, "Deployment", "csi-oci-controller")["spec"]["template"]["spec"]
    assert "--prewarm" in container(controller, "csi-oci")["args"]
    assert bool(by_kind(docs, "CustomResourceDefinition")) == (variant == "defaults")


def test_prewarm_disabled_renders_none_of_it(tmp_path):
    docs = render(tmp_path, VALUE_SETS["no-prewarm"])
    assert not by_kind(docs, "CustomResourceDefinition")
    roles = by_kind(docs, "ClusterRole") + by_kind(docs, "Role")
    assert [r["metadata"]["name"] for r in roles] == [
        "csi-oci-provisioner",
        "csi-oci-provisioner-leader-election",
    ]
    for rule in [r for role in roles for r in role["rules"]]:
        assert "oci.csi.dev" not in rule["apiGroups"] and "secrets" not in rule["resources"]
    bindings = by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding")
    assert {s["name"] for b in bindings for s in b["subjects"]} == {"csi-oci-controller"}
    pod = _node_pod(docs)
    assert "api-access" not in volumes(pod)
    assert "POD_NAMESPACE" not in {e["name"] for e in container(pod, "csi-oci")["env"]}
    for c in pod["containers"]:
        assert not [a for a in c["args"] if a.startswith(("--prewarm", "--namespace"))], c["name"]
        assert not [m for m in c.get("volumeMounts", []) if "/var/run/secrets" in m["mountPath"]]
    controller = one(docs, "Deployment", "csi-oci-controller")["spec"]["template"]["spec"]
    assert "--prewarm" not in container(controller, "csi-oci")["args"]
    # installCRD=false: RBAC and flags, but no CRD.
    docs = render(tmp_path, {"prewarm": {"installCRD": False}})
    assert not by_kind(docs, "CustomResourceDefinition")
    assert one(docs, "ClusterRole", "csi-oci-node")
    assert "--prewarm" in container(_node_pod(docs), "csi-oci")["args"]


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
        a.replace("$(NODE_NAME)", "node-1").replace("$(POD_NAMESPACE)", "csi-oci")
        for a in container(node_pod, "csi-oci")["args"]
    ]
    parsed = _parse_cli(node_args)
    assert (parsed.command, parsed.mode) == ("serve", "node")
    assert (parsed.prewarm, parsed.namespace) == (True, "csi-oci")
    parsed = _parse_cli(container(controller_pod, "csi-oci")["args"])
    assert (parsed.command, parsed.mode) == ("serve", "controller")
    assert parsed.prewarm is True

    lazy_args = container(node_pod, "lazy-server")["args"]
    assert _parse_cli(lazy_args).command == "lazy-server"
