"""The house: imports flow one way, down the data path.

Every import of csi_oci by csi_oci (at module level, inside functions, under
TYPE_CHECKING) is an edge. No module may reach itself again (a cycle), and a
package may import only from the packages below it:

    errors, faults < spec < telemetry < stream < unpack < oci < storage
        < pull < verify < lazy < publish < prewarm < app < csi < cli

telemetry sits low so that everything may count into it; it reads the store
and the volume records through Protocols. A lazy FUSE server process must not
load prometheus_client (it writes a stats file instead).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "csi_oci"
LAYERS = [
    {"errors", "faults", "__init__"},
    {"spec"},
    {"telemetry"},
    {"stream"},
    {"unpack"},
    {"oci"},
    {"storage"},
    {"pull"},
    {"verify"},
    {"lazy"},
    {"publish"},
    {"prewarm"},
    {"app"},
    {"csi"},
    {"cli"},
]


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        if "csi/v1" in path.as_posix():
            continue
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets.append(node.module)
                targets += [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for n, layer in enumerate(LAYERS):
        if top in layer:
            return n
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_packages_import_only_downwards():
    upward = [
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        for t in targets
        if layer_of(t) > layer_of(m)
    ]
    assert upward == []


def test_the_graph_is_real():
    """The checks above must see the code: a graph with no edges proves nothing."""
    graph = import_graph()
    assert len(graph) > 50
    assert "csi_oci.pull.puller" in graph["csi_oci.publish.volumes"]
    assert "csi_oci.spec.digest" in graph["csi_oci.lazy.estargz"]


def test_a_fuse_server_does_not_load_prometheus():
    probe = "import sys, csi_oci.lazy.fs; print('prometheus_client' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


def test_the_version_lives_in_one_place():
    import re

    import csi_oci

    repo = ROOT.parent
    pyproject = (repo / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "csi_oci.__version__"' in pyproject
    chart = (repo / "deploy/helm/csi-oci/Chart.yaml").read_text()
    assert re.search(rf'^appVersion: "{re.escape(csi_oci.__version__)}"$', chart, re.M), chart
    from importlib.metadata import version

    assert version("csi-oci") == csi_oci.__version__
