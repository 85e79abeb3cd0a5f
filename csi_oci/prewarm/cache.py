"""An ImageCache (oci.csi.dev/v1alpha1), as the node reads it: validated, with its selector.

The object comes from the API server, which has checked it against the
CRD's schema; it is still parsed here with explicit types (a CRD can be
installed without the schema, or an older one), and every field goes
through the same parsers as a volume's attributes: a reference, include
patterns, a platform, a signature rule name.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from csi_oci.errors import InvalidArgument
from csi_oci.spec.attributes import (
    Platform,
    node_platform,
    parse_include,
    parse_platform,
)
from csi_oci.spec.reference import Reference, parse_reference

GROUP = "oci.csi.dev"
VERSION = "v1alpha1"
PLURAL = "imagecaches"
KIND = "ImageCache"
MAX_PULL_SECRETS = 16
_DURATION = re.compile(r"^([0-9]{1,7})(s|m|h)$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # a DNS subdomain


class WarmMode(enum.StrEnum):
    UNPACK = "unpack"  # the tree in the store, as `mode: unpack` publishes it
    LAZY = "lazy"  # the lazy layer files filled completely (prefetch all)


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # In | NotIn | Exists | DoesNotExist
    values: tuple[str, ...]


@dataclass(frozen=True)
class LabelSelector:
    """A Kubernetes LabelSelector; the empty one selects every node."""

    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels):
            return False
        for req in self.expressions:
            present = req.key in labels
            if req.operator == "In" and not (present and labels[req.key] in req.values):
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True


@dataclass(frozen=True)
class ImageCacheSpec:
    name: str
    uid: str
    generation: int
    reference: Reference
    selector: LabelSelector
    include: tuple[str, ...]
    mode: WarmMode
    pull_secrets: tuple[str, ...]
    platform: Platform
    refresh: float | None  # seconds between resolutions of a tag; None: once
    signature_rule: str


def _strings(value: object, where: str, limit: int) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{where} must be a list of strings")
    if len(value) > limit:
        raise InvalidArgument(f"{where} has {len(value)} entries; at most {limit}")
    return tuple(value)


def parse_selector(value: object) -> LabelSelector:
    if value is None:
        return LabelSelector()
    if not isinstance(value, dict):
        raise InvalidArgument("spec.nodeSelector must be a label selector")
    labels = value.get("matchLabels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise InvalidArgument("spec.nodeSelector.matchLabels must map strings to strings")
    expressions = []
    for i, item in enumerate(value.get("matchExpressions") or []):
        where = f"spec.nodeSelector.matchExpressions[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise InvalidArgument(f"{where} needs a key")
        operator = item.get("operator")
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise InvalidArgument(f"{where}.operator must be In, NotIn, Exists or DoesNotExist")
        values = _strings(item.get("values"), f"{where}.values", 256)
        if operator in ("In", "NotIn") and not values:
            raise InvalidArgument(f"{where}: {operator} needs values")
        expressions.append(Requirement(item["key"], operator, values))
    return LabelSelector(tuple(sorted(labels.items())), tuple(expressions))


def parse_duration(text: object) -> float | None:
    if text is None or text == "":
        return None
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidArgument(f"spec.refresh {text!r}: want a number of s, m or h, e.g. 1h")
    seconds = int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]
    return float(max(seconds, 60))  # at most one resolution a minute per cache


def parse_image_cache(obj: Mapping[str, Any]) -> ImageCacheSpec:
    """An ImageCache object -> spec; InvalidArgument names the bad field."""
    meta = obj.get("metadata")
    spec = obj.get("spec")
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        raise InvalidArgument("an ImageCache needs metadata and spec")
    name = meta.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidArgument(f"ImageCache name {name!r} is not a DNS subdomain")
    image = spec.get("image")
    if not isinstance(image, str) or not image.strip():
        raise InvalidArgument("spec.image is required")
    mode_text = spec.get("mode") or WarmMode.UNPACK.value
    try:
        mode = WarmMode(mode_text)
    except ValueError:
        raise InvalidArgument(f"spec.mode {mode_text!r}: want unpack or lazy") from None
    platform_text = spec.get("platform")
    if platform_text is not None and not isinstance(platform_text, str):
        raise InvalidArgument("spec.platform must be os/arch[/variant]")
    rule = spec.get("signaturePolicy") or ""
    if not isinstance(rule, str) or len(rule) > 128:
        raise InvalidArgument("spec.signaturePolicy must be a rule name")
    secrets = _strings(spec.get("pullSecrets"), "spec.pullSecrets", MAX_PULL_SECRETS)
    for secret in secrets:
        if not _NAME.match(secret):
            raise InvalidArgument(f"spec.pullSecrets: {secret!r} is not a Secret name")
    return ImageCacheSpec(
        name=name,
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation") or 0),
        reference=parse_reference(image.strip()),
        selector=parse_selector(spec.get("nodeSelector")),
        include=parse_include(",".join(_strings(spec.get("include"), "spec.include", 256))),
        mode=mode,
        pull_secrets=secrets,
        platform=parse_platform(platform_text) if platform_text else node_platform(),
        refresh=parse_duration(spec.get("refresh")),
        signature_rule=rule,
    )
