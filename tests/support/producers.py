"""Push artifacts to a test registry with the real producer tools.

The tools are the upstream CLIs, built from the Go module proxy by
hack/install-deps into ``<repo>/.cache/bin`` (``oras``, ``modctl``, ``kit``),
plus oras-py (the ``oras`` Python package, a project dependency).  Every helper
returns a :class:`Pushed` ``(reference, digest)``: ``reference`` is
``host/repo:tag`` and ``digest`` the manifest digest the registry reports.

Each CLI runs with stdin from /dev/null, a timeout, a clean environment (no
proxies, no ``DOCKER_CONFIG``/``REGISTRY_AUTH_FILE`` from the caller) and with
``HOME``, the ``XDG_*`` dirs, ``DOCKER_CONFIG``, ``KITOPS_HOME`` and modctl's
storage/log dirs all inside the helper's ``workdir``, so no user configuration
is read or written.  Content is written to ``workdir/context`` and the tools
run from there; their state lives in ``workdir/.producer``.

What the pinned versions push (checked by tests/test_producers.py):

* ``oras push`` (oras 1.3.3), plain files: OCI image manifest (v1.1 style),
  ``artifactType`` ``application/vnd.unknown.artifact.v1`` (or
  ``--artifact-type``), config = the empty descriptor
  (``application/vnd.oci.empty.v1+json``, ``{}``, inlined as ``data``), one
  layer per file, uncompressed bytes (no tar), media type
  ``application/vnd.oci.image.layer.v1.tar``, annotation
  ``org.opencontainers.image.title`` = the path as given on the command line
  (``sub/b.bin`` keeps its directory).  Manifest annotation
  ``org.opencontainers.image.created`` (RFC 3339, seconds).
* ``oras push`` of a directory: one ``application/vnd.oci.image.layer.v1.tar+gzip``
  layer, annotations title = directory name, ``io.deis.oras.content.digest``
  = sha256 of the *uncompressed* tar, ``io.deis.oras.content.unpack`` =
  ``"true"``.  Tar members are prefixed by the directory name and include the
  directory itself (``mydir``, ``mydir/sub``, ``mydir/sub/f``), no ``./``,
  ustar headers, empty uname/gname, real uid/gid/mtime/mode, symlinks kept.
* oras-py 0.2.43: OCI manifest *without* ``artifactType``; config
  ``application/vnd.unknown.config.v1+json`` (``{}``); file layers
  ``application/vnd.oci.image.layer.v1.tar`` with title = *basename* only;
  directory layers ``application/vnd.oci.image.layer.v1.tar+gzip`` with title
  only (no ``io.deis.oras.content.*`` annotations), members prefixed by the
  directory name, directory entries with a trailing ``/`` (``d/``, ``d/e/``),
  mtime 0; manifest ``annotations`` present but empty (``{}``).  With a
  token-auth registry 0.2.43 fails to push (it reuses its first, pull-scoped
  bearer token for the upload); htpasswd needs ``auth_backend="basic"``.
* ``modctl`` 0.2.2: still the *legacy* CNAI wire format:
  ``artifactType`` ``application/vnd.cnai.model.manifest.v1+json``, config
  ``application/vnd.cnai.model.config.v1+json``, one layer per file,
  ``application/vnd.cnai.model.{weight,weight.config,code,doc}.v1.{raw,tar}``
  (raw by default; ``--raw=false`` gives uncompressed tars whose single
  member is the relative path, no parent directory entries, real mtime,
  uname from the system), annotations ``org.cnai.model.filepath`` and
  ``org.cnai.model.file.metadata+json``; manifest annotation
  ``org.cnai.modctl.modelfile`` = the (regenerated) Modelfile text.
  ``DATASET`` lines are parsed but produce no layer.
* ``kit`` 1.15.0: ``artifactType`` ``application/vnd.kitops.modelkit.manifest.v1+json``,
  config ``application/vnd.kitops.modelkit.config.v1+json`` (the Kitfile as
  JSON plus ``digest``/``diffId`` per entry), layers
  ``application/vnd.kitops.modelkit.{model,modelpart,dataset,code,docs}.v1.tar``
  (``+gzip``/``+zstd`` with ``--compression``, ``.raw`` with
  ``--layer-format raw``, which refuses directories), annotation
  ``org.cncf.model.filepath`` (plus ``org.cncf.model.file.metadata+json`` for
  raw).  Tar members are context-relative paths with an entry for each parent
  directory (``data``, ``data/train.csv``), uid 1000, gid 0, no uname, mtime 0.
  With ``--use-model-pack``: the CNCF ModelPack types
  (``application/vnd.cncf.model.*``) and the Kitfile in the manifest
  annotation ``ml.kitops.modelkit.kitfile``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Literal, NamedTuple

from .registry import Registry, ToolMissingError

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = REPO_ROOT / ".cache" / "bin"
PRODUCER_HINT = "run hack/install-deps to build oras, modctl and kit into .cache/bin"
DEFAULT_TIMEOUT = 120.0

MODEL_ROLES = ("config", "model", "code", "doc", "dataset")
KIT_ROLES = ("model", "part", "dataset", "code", "docs", "prompt")

_CONFIG_SUFFIXES = {".json", ".yaml", ".yml", ".toml", ".cfg", ".ini"}
_CODE_SUFFIXES = {".py", ".sh", ".ipynb", ".go", ".rs", ".js", ".ts"}
_DOC_SUFFIXES = {".md", ".txt", ".rst", ".pdf", ".html"}
_DATASET_SUFFIXES = {".csv", ".jsonl", ".parquet", ".arrow", ".tsv"}


class ProducerError(RuntimeError):
    """A producer tool failed (its output is in the message)."""


class Pushed(NamedTuple):
    """What a producer pushed: ``reference`` is ``host/repo:tag``."""

    reference: str
    digest: str

    @property
    def host(self) -> str:
        return self.reference.split("/", 1)[0]

    @property
    def repo(self) -> str:
        return self.reference.split("/", 1)[1].rsplit(":", 1)[0]

    @property
    def tag(self) -> str:
        return self.reference.rsplit(":", 1)[1]


# -- plumbing -----------------------------------------------------------------


def find_producer(name: str) -> str:
    """Path of a producer binary: ``.cache/bin/NAME`` first, then PATH."""
    candidate = BIN_DIR / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ToolMissingError(f"{name!r} not found in {BIN_DIR} or PATH; {PRODUCER_HINT}")
    return found


def missing_producers(*names: str) -> list[str]:
    missing = []
    for name in names:
        try:
            find_producer(name)
        except ToolMissingError:
            missing.append(name)
    return missing


def _split_repo_tag(repo_tag: str) -> tuple[str, str]:
    repo, sep, tag = repo_tag.rpartition(":")
    if not sep or not repo or not tag or "/" in tag or "@" in repo_tag:
        raise ValueError(f"expected 'repo:tag', got {repo_tag!r}")
    return repo, tag


def _state_dir(workdir: Path) -> Path:
    return Path(workdir) / ".producer"


def _context_dir(workdir: Path) -> Path:
    context = Path(workdir) / "context"
    context.mkdir(parents=True, exist_ok=True)
    return context


def tool_env(workdir: Path) -> dict[str, str]:
    """A clean environment whose HOME/XDG/tool config dirs are inside ``workdir``."""
    state = _state_dir(workdir)
    home = state / "home"
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_DATA_HOME": str(home / ".local/share"),
        "XDG_STATE_HOME": str(home / ".local/state"),
        "DOCKER_CONFIG": str(home / ".docker"),
        "KITOPS_HOME": str(state / "kitops"),
        "TMPDIR": str(state / "tmp"),
        "NO_PROXY": "127.0.0.1,localhost,::1",
        "no_proxy": "127.0.0.1,localhost,::1",
    }
    for key in ("HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "DOCKER_CONFIG", "TMPDIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


def run_tool(
    args: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float = DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run a producer; raise :class:`ProducerError` with its output on failure."""
    try:
        proc = subprocess.run(
            list(args),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ProducerError(f"{args[0]} timed out after {timeout}s: {' '.join(args)}") from exc
    if proc.returncode != 0:
        raise ProducerError(
            f"{' '.join(args)} exited with {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def write_files(root: Path, files: Mapping[str, bytes]) -> list[str]:
    """Write ``files`` (relative POSIX paths) under ``root``; return the names."""
    names = []
    for name, data in files.items():
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"file name must be relative and inside the context: {name!r}")
        path = root.joinpath(*rel.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        names.append(rel.as_posix())
    return names


def _reference(registry: Registry, repo_tag: str) -> str:
    _split_repo_tag(repo_tag)
    return f"{registry.host}/{repo_tag}"


def _registry_digest(registry: Registry, repo_tag: str) -> str:
    repo, tag = _split_repo_tag(repo_tag)
    return registry.manifest_digest(repo, tag)


def _oras_auth_args(registry: Registry) -> list[str]:
    if registry.credentials is None:
        return []
    user, password = registry.credentials
    return ["--username", user, "--password", password]


# -- oras CLI -----------------------------------------------------------------


def _oras_push(
    registry: Registry,
    repo_tag: str,
    workdir: Path,
    paths: Sequence[str],
    extra: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> Pushed:
    oras = find_producer("oras")
    reference = _reference(registry, repo_tag)
    context = _context_dir(workdir)
    args = [oras, "push", "--plain-http", "--no-tty", "--format", "json"]
    args += _oras_auth_args(registry)
    args += [*extra, reference, *paths]
    proc = run_tool(args, cwd=context, env=tool_env(workdir), timeout=timeout)
    try:
        digest = json.loads(proc.stdout)["digest"]
    except (ValueError, KeyError) as exc:
        raise ProducerError(
            f"unexpected 'oras push --format json' output: {proc.stdout!r}"
        ) from exc
    registry_digest = _registry_digest(registry, repo_tag)
    if registry_digest != digest:
        raise ProducerError(f"oras reported {digest} but the registry has {registry_digest}")
    return Pushed(reference, digest)


def oras_push_files(
    registry: Registry,
    repo_tag: str,
    workdir: Path,
    files: Mapping[str, bytes],
    artifact_type: str | None = None,
    *,
    annotations: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Pushed:
    """``oras push --plain-http REF name1 name2 ...`` from ``workdir/context``.

    One layer per file, title = the name as given (subdirectories kept).
    """
    names = write_files(_context_dir(workdir), files)
    extra: list[str] = []
    if artifact_type:
        extra += ["--artifact-type", artifact_type]
    for key, value in (annotations or {}).items():
        extra += ["--annotation", f"{key}={value}"]
    return _oras_push(registry, repo_tag, workdir, names, extra, timeout)


def oras_push_dir(
    registry: Registry,
    repo_tag: str,
    workdir: Path,
    dirname: str,
    files: Mapping[str, bytes],
    artifact_type: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Pushed:
    """Push directory ``dirname`` (``files`` are relative to it) with the oras CLI.

    oras tars and gzips it into one layer with ``io.deis.oras.content.unpack``.
    """
    root = _context_dir(workdir) / dirname
    root.mkdir(parents=True, exist_ok=True)
    write_files(root, files)
    extra = ["--artifact-type", artifact_type] if artifact_type else []
    return _oras_push(registry, repo_tag, workdir, [dirname], extra, timeout)


def oras_pull(
    registry: Registry,
    ref: str,
    dest: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """``oras pull --plain-http -o DEST REF``; ``ref`` is ``repo:tag``,
    ``repo@digest`` or a full ``host/...`` reference.  Returns ``dest``."""
    oras = find_producer("oras")
    if not ref.startswith(registry.host + "/"):
        ref = f"{registry.host}/{ref}"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="oras-pull-") as state:
        args = [oras, "pull", "--plain-http", "--no-tty", "-o", str(dest)]
        args += _oras_auth_args(registry)
        args.append(ref)
        run_tool(args, cwd=dest, env=tool_env(Path(state)), timeout=timeout)
    return dest


# -- oras-py ------------------------------------------------------------------

_ORASPY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import oras.provider

    spec = json.loads(sys.argv[1])
    reg = oras.provider.Registry(
        hostname=spec["host"], insecure=True, auth_backend=spec["auth_backend"]
    )
    if spec.get("user"):
        reg.auth.set_basic_auth(spec["user"], spec["password"])
    resp = reg.push(
        target=spec["target"],
        files=spec["files"],
        manifest_config=spec.get("manifest_config"),
        manifest_annotations=spec.get("annotations"),
        disable_path_validation=False,
        quiet=True,
    )
    print(json.dumps({"status": resp.status_code,
                      "digest": resp.headers.get("Docker-Content-Digest")}))
    """
)


def oraspy_push_files(
    registry: Registry,
    repo_tag: str,
    workdir: Path,
    files: Mapping[str, bytes],
    config_media_type: str | None = None,
    *,
    dirs: Sequence[str] = (),
    annotations: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Pushed:
    """Push ``files`` with oras-py's ``Registry.push`` (0.2.43).

    oras-py has no ``artifactType``; ``config_media_type`` sets the config
    descriptor's media type instead (the image-spec 1.0 way).  Each file
    becomes one layer titled with its *basename*; each name in ``dirs`` (a
    directory under the context, e.g. created by nested ``files`` keys) is
    pushed as one tar+gzip layer instead of its files.

    Runs in a child ``python`` (``sys.executable``) so HOME/DOCKER_CONFIG
    point into ``workdir`` and the cwd is the context (oras-py validates that
    paths are below the cwd).
    """
    context = _context_dir(workdir)
    names = write_files(context, files)
    dir_set = {PurePosixPath(d).as_posix().strip("/") for d in dirs}
    paths = list(dir_set) + [n for n in names if not any(n.startswith(d + "/") for d in dir_set)]
    spec: dict[str, object] = {
        "host": registry.host,
        "target": _reference(registry, repo_tag),
        "files": paths,
        "annotations": dict(annotations) if annotations else None,
    }
    if config_media_type:
        # ManifestConfig(path, media_type): a missing path means the empty "{}" config.
        spec["manifest_config"] = f"{context / '.no-config'}:{config_media_type}"
    # oras-py's default "token" backend never sends Basic credentials: a plain
    # htpasswd registry needs the "basic" backend.
    spec["auth_backend"] = "basic" if registry.htpasswd else "token"
    if registry.credentials is not None:
        spec["user"], spec["password"] = registry.credentials
    proc = run_tool(
        [sys.executable, "-c", _ORASPY_SCRIPT, json.dumps(spec)],
        cwd=context,
        env=tool_env(workdir),
        timeout=timeout,
    )
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise ProducerError(f"unexpected oras-py output: {proc.stdout!r}") from exc
    digest = _registry_digest(registry, repo_tag)
    if result.get("digest") and result["digest"] != digest:
        raise ProducerError(f"oras-py got {result['digest']} but the registry has {digest}")
    return Pushed(_reference(registry, repo_tag), digest)


# -- modctl -------------------------------------------------------------------


def classify_model_file(name: str) -> str:
    """Default role of a file in a Modelfile/Kitfile, from its suffix."""
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in _CONFIG_SUFFIXES:
        return "config"
    if suffix in _CODE_SUFFIXES:
        return "code"
    if suffix in _DOC_SUFFIXES or PurePosixPath(name).name.upper().startswith(
        ("README", "LICENSE")
    ):
        return "doc"
    if suffix in _DATASET_SUFFIXES:
        return "dataset"
    return "model"


def modelfile_text(
    roles: Mapping[str, str],
    *,
    name: str = "test-model",
    arch: str = "transformer",
    family: str = "test",
    fmt: str = "safetensors",
    paramsize: str = "1",
    precision: str = "fp32",
) -> str:
    """A Modelfile listing each path under its role (CONFIG/MODEL/CODE/DOC/DATASET)."""
    lines = [
        f"NAME {name}",
        f"ARCH {arch}",
        f"FAMILY {family}",
        f"FORMAT {fmt}",
        f"PARAMSIZE {paramsize}",
        f"PRECISION {precision}",
    ]
    for path, role in roles.items():
        if role not in MODEL_ROLES:
            raise ValueError(f"unknown Modelfile role {role!r} for {path!r}")
        if any(c in path for c in " *?[]\\"):
            raise ValueError(f"Modelfile paths are globs; refusing {path!r}")
        lines.append(f"{role.upper()} {path}")
    return "\n".join(lines) + "\n"


def modctl_push(
    registry: Registry,
    repo_tag: str,
    workdir: Path,
    files: Mapping[str, bytes],
    raw: bool = True,
    *,
    roles: Mapping[str, str] | None = None,
    output_remote: bool = False,
    no_creation_time: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> Pushed:
    """Build a ModelPack artifact with ``modctl build`` and push it.

    A Modelfile lists every file under a role (``roles`` overrides
    :func:`classify_model_file`).  ``raw=True`` (modctl's default) stores each
    file as is; ``raw=False`` wraps each in an uncompressed tar.  By default
    the artifact is built into modctl's local storage (inside ``workdir``) and
    then pushed with ``modctl push``; ``output_remote=True`` builds straight
    into the registry (``build --output-remote``).
    """
    modctl = find_producer("modctl")
    reference = _reference(registry, repo_tag)
    context = _context_dir(workdir)
    names = write_files(context, files)
    role_map = {n: (roles or {}).get(n) or classify_model_file(n) for n in names}
    (context / "Modelfile").write_text(modelfile_text(role_map))
    state = _state_dir(workdir)
    common = [
        modctl,
        "--storage-dir",
        str(state / "modctl"),
        "--log-dir",
        str(state / "modctl-logs"),
        "--no-progress",
    ]
    env = tool_env(workdir)
    if registry.credentials is not None:
        user, password = registry.credentials
        login = [*common, "login", "--plain-http", "--password-stdin=false"]
        login += ["-u", user, "-p", password, registry.host]
        run_tool(login, cwd=context, env=env, timeout=timeout)
    build = [*common, "build", "-t", reference, "-f", "Modelfile", "--plain-http"]
    build.append(f"--raw={'true' if raw else 'false'}")
    if no_creation_time:
        build.append("--no-creation-time")
    if output_remote:
        build.append("--output-remote")
    build.append(".")
    run_tool(build, cwd=context, env=env, timeout=timeout)
    if not output_remote:
        run_tool(
            [*common, "push", "--plain-http", reference], cwd=context, env=env, timeout=timeout
        )
    return Pushed(reference, _registry_digest(registry, repo_tag))


# -- kit ------------------------------------------------------------------------


def kitfile_data(
    roles: Mapping[str, str],
    *,
    name: str = "test-kit",
    version: str = "1.0.0",
) -> dict[str, object]:
    """A Kitfile (as a dict) for paths mapped to KIT_ROLES.

    The first ``model`` path becomes ``model.path``; further ``model`` and all
    ``part`` paths become ``model.parts``.  ``config`` paths (a Modelfile role)
    count as parts, ``doc`` as ``docs``.
    """
    kitfile: dict[str, object] = {
        "manifestVersion": "1.0.0",
        "package": {
            "name": name,
            "version": version,
            "description": "csi-oci test ModelKit",
            "authors": ["csi-oci tests"],
        },
    }
    model: dict[str, object] | None = None
    parts: list[dict[str, str]] = []
    sections: dict[str, list[dict[str, str]]] = {}
    for i, (path, role) in enumerate(roles.items()):
        role = {"config": "part", "doc": "docs"}.get(role, role)
        if role not in KIT_ROLES:
            raise ValueError(f"unknown Kitfile role {role!r} for {path!r}")
        if role == "model" and model is None:
            model = {
                "name": f"{name}-model",
                "path": path,
                "framework": "test",
                "version": version,
                "description": "test model",
                "license": "Apache-2.0",
            }
        elif role in ("model", "part"):
            parts.append({"name": f"part{i}", "path": path, "type": "test-part"})
        elif role == "dataset":
            sections.setdefault("datasets", []).append(
                {"name": f"dataset{i}", "path": path, "description": "test data"}
            )
        elif role == "code":
            sections.setdefault("code", []).append(
                {"path": path, "description": "test code", "license": "Apache-2.0"}
            )
        else:  # docs, prompt
            key = "prompts" if role == "prompt" else "docs"
            sections.setdefault(key, []).append({"path": path, "description": f"test {role}"})
    if parts and model is None:
        model = {"name": f"{name}-model", "framework": "test", "version": version}
    if model is not None:
        if parts:
            model["parts"] = parts
        kitfile["model"] = model
    kitfile.update(sections)
    return kitfile


def kit_push(
    registry: Registry,
    repo_tag: str,
    workdir: Path,
    files: Mapping[str, bytes],
    *,
    roles: Mapping[str, str] | None = None,
    compression: Literal["none", "gzip", "gzip-fastest", "zstd"] = "none",
    layer_format: Literal["tar", "raw"] = "tar",
    model_pack: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> Pushed:
    """Write a Kitfile for ``files`` and run ``kit pack`` + ``kit push --plain-http``.

    ``roles`` maps a path (a file, or a directory made by nested ``files``
    keys) to a role in :data:`KIT_ROLES`; without it every file is classified
    by :func:`classify_model_file`.  ``compression``, ``layer_format`` and
    ``model_pack`` are ``kit pack``'s ``--compression``, ``--layer-format``
    and ``--use-model-pack`` (raw layers need regular files, not directories).
    """
    kit = find_producer("kit")
    reference = _reference(registry, repo_tag)
    context = _context_dir(workdir)
    names = write_files(context, files)
    role_map = dict(roles) if roles else {n: classify_model_file(n) for n in names}
    (context / "Kitfile").write_text(json.dumps(kitfile_data(role_map), indent=2) + "\n")
    env = tool_env(workdir)
    common = ["--progress", "none"]
    if registry.credentials is not None:
        user, password = registry.credentials
        login = [kit, "login", registry.host, "--plain-http", "-u", user, "-p", password]
        run_tool([*login, *common], cwd=context, env=env, timeout=timeout)
    pack = [kit, "pack", ".", "-t", reference, "--compression", compression]
    pack += ["--layer-format", layer_format, *common]
    if model_pack:
        pack.append("--use-model-pack")
    run_tool(pack, cwd=context, env=env, timeout=timeout)
    run_tool(
        [kit, "push", reference, "--plain-http", *common], cwd=context, env=env, timeout=timeout
    )
    return Pushed(reference, _registry_digest(registry, repo_tag))
