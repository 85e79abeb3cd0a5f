"""Volume attributes: the keys users put in PV volumeAttributes, inline CSI
volumes and StorageClass parameters, parsed into one immutable VolumeSpec.

The same parser serves NodePublishVolume, the thin controller (which checks
parameters at CreateVolume time so mistakes surface at provisioning, not at
pod start) and the CLI.
"""

from __future__ import annotations

import enum
import fnmatch
import platform as _platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from csi_oci.errors import InvalidArgument
from csi_oci.spec.reference import Reference, parse_reference

KEY_IMAGE = "image"
KEY_PULL_POLICY = "pullPolicy"
KEY_MODE = "mode"
KEY_SUB_PATH = "subPath"
KEY_PLATFORM = "platform"
KEY_INCLUDE = "include"
KEY_PREFETCH = "prefetch"
# The name of a rule of the node's signature policy that this volume must pass as
# well as the rule matching its image (csi_oci.verify.policy): stricter, never looser.
KEY_SIGNATURE_POLICY = "signaturePolicy"
KNOWN_KEYS = (
    KEY_IMAGE,
    KEY_PULL_POLICY,
    KEY_MODE,
    KEY_SUB_PATH,
    KEY_PLATFORM,
    KEY_INCLUDE,
    KEY_PREFETCH,
    KEY_SIGNATURE_POLICY,
)
PREFETCH_MODES = ("none", "landmark", "all")
MAX_INCLUDE_PATTERNS = 256


class PullPolicy(enum.StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class Mode(enum.StrEnum):
    AUTO = "auto"
    UNPACK = "unpack"
    LAZY = "lazy"


_GO_ARCH = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "i686": "386",
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


def node_platform() -> Platform:
    """The platform of this node, in OCI (GOOS/GOARCH) spelling."""
    machine = _platform.machine()
    arch = _GO_ARCH.get(machine, machine)
    variant = "v7" if machine == "armv7l" else None
    return Platform("linux", arch, variant)


def parse_platform(text: str) -> Platform:
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidArgument(
            f"invalid platform {text!r}: want os/arch[/variant], e.g. linux/amd64"
        )
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def normalize_sub_path(text: str) -> str:
    """Validate a subPath like a tar member name: relative, no `..`, no empties.

    Returns the canonical form ("a/b"); "" means the whole image.
    """
    raw = text.strip()
    if raw.startswith("/"):
        raise InvalidArgument(f"subPath {text!r} must be relative to the image root")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise InvalidArgument(f"subPath {text!r} must not contain '..'")
    if any("\0" in p for p in parts):
        raise InvalidArgument(f"subPath {text!r} contains a NUL byte")
    return "/".join(parts)


def parse_include(text: str) -> tuple[str, ...]:
    """`include`: comma-separated glob patterns; normalised, deduplicated, sorted.

    Sorting makes `a,b` and `b,a` the same cache entry.
    """
    patterns = sorted({p.strip().strip("/") for p in text.split(",") if p.strip().strip("/")})
    if len(patterns) > MAX_INCLUDE_PATTERNS:
        raise InvalidArgument(
            f"include has {len(patterns)} patterns; at most {MAX_INCLUDE_PATTERNS}"
        )
    for pattern in patterns:
        if "\0" in pattern or any(part == ".." for part in pattern.split("/")):
            raise InvalidArgument(f"include pattern {pattern!r} must not contain '..' or NUL")
    return tuple(patterns)


def include_matcher(patterns: tuple[str, ...]) -> Callable[[str], bool] | None:
    """A predicate on a file's path relative to the image root, or None for "all".

    A pattern with a `/` matches the whole path (`models/*.json`); one without
    matches the file's base name in any directory (`*.json`). Globs are
    fnmatch's: `*`, `?`, `[0-9]`.
    """
    if not patterns:
        return None
    with_slash = [p for p in patterns if "/" in p]
    basename_only = [p for p in patterns if "/" not in p]

    def matches(path: str) -> bool:
        base = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(base, p) for p in basename_only) or any(
            fnmatch.fnmatchcase(path, p) for p in with_slash
        )

    return matches


@dataclass(frozen=True)
class VolumeSpec:
    """What a volume should contain; compared to decide idempotent republish."""

    reference: Reference
    pull_policy: PullPolicy
    mode: Mode
    sub_path: str
    platform: Platform
    include: tuple[str, ...] = ()
    prefetch: str = "all"  # lazy mode: none | landmark | all
    signature_rule: str = ""  # signaturePolicy: a policy rule named by the volume

    def canonical(self) -> dict[str, str]:
        """A plain dict, stable across restarts, recorded with the volume."""
        out = {
            KEY_IMAGE: str(self.reference),
            KEY_PULL_POLICY: self.pull_policy.value,
            KEY_MODE: self.mode.value,
            KEY_SUB_PATH: self.sub_path,
            KEY_PLATFORM: str(self.platform),
        }
        if self.include:
            out[KEY_INCLUDE] = ",".join(self.include)
        if self.mode is not Mode.UNPACK and self.prefetch != "all":
            out[KEY_PREFETCH] = self.prefetch  # only when set: old records still match
        if self.signature_rule:
            out[KEY_SIGNATURE_POLICY] = self.signature_rule
        return out


def default_pull_policy(ref: Reference) -> PullPolicy:
    """As Kubernetes defaults containers: Always for `latest`/no tag, unless pinned by digest."""
    if ref.digest is None and ref.tag in (None, "latest"):
        return PullPolicy.ALWAYS
    return PullPolicy.IF_NOT_PRESENT


def parse_volume_attributes(attrs: Mapping[str, str]) -> VolumeSpec:
    """Parse volume attributes into a VolumeSpec; unknown keys are ignored.

    Unknown keys are expected: kubelet adds pod info (`csi.storage.k8s.io/*`)
    and external-provisioner adds its identity.
    """
    image = attrs.get(KEY_IMAGE, "").strip()
    if not image:
        raise InvalidArgument(
            "volume attribute 'image' is required (e.g. image: registry.example.com/models/llm:v1)"
        )
    ref = parse_reference(image)

    policy_text = attrs.get(KEY_PULL_POLICY, "").strip()
    if policy_text:
        try:
            policy = PullPolicy(policy_text)
        except ValueError:
            raise InvalidArgument(
                f"invalid pullPolicy {policy_text!r}: want Always, IfNotPresent or Never"
            ) from None
    else:
        policy = default_pull_policy(ref)

    mode_text = attrs.get(KEY_MODE, "").strip() or Mode.AUTO.value
    try:
        mode = Mode(mode_text)
    except ValueError:
        raise InvalidArgument(f"invalid mode {mode_text!r}: want auto, unpack or lazy") from None

    sub_path = normalize_sub_path(attrs.get(KEY_SUB_PATH, ""))
    platform_text = attrs.get(KEY_PLATFORM, "").strip()
    plat = parse_platform(platform_text) if platform_text else node_platform()
    include = parse_include(attrs.get(KEY_INCLUDE, ""))
    prefetch = attrs.get(KEY_PREFETCH, "").strip() or "all"
    if prefetch not in PREFETCH_MODES:
        raise InvalidArgument(f"invalid prefetch {prefetch!r}: want none, landmark or all")
    signature_rule = attrs.get(KEY_SIGNATURE_POLICY, "").strip()
    if len(signature_rule) > 128 or any(not c.isprintable() for c in signature_rule):
        raise InvalidArgument("signaturePolicy: want the name of a rule of the node's policy")
    return VolumeSpec(
        reference=ref,
        pull_policy=policy,
        mode=mode,
        sub_path=sub_path,
        platform=plat,
        include=include,
        prefetch=prefetch,
        signature_rule=signature_rule,
    )
