"""The Prometheus instruments csi-oci updates as it works (a leaf: nothing else here).

They live in a registry of their own (not prometheus_client's global one), so
importing this module twice in a test process never trips over duplicate
registrations, and /metrics shows only what csi-oci defines plus the process
metrics. Values that exist on disk (store size, volumes) are not mirrored
here: the endpoint reads them (csi_oci.telemetry.endpoint).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from csi_oci.errors import CsiOciError, is_out_of_space

REGISTRY = CollectorRegistry(auto_describe=True)


# Model images take from seconds to an hour to pull: buckets span that range.
PULL_DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)


RPC_DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 90, 120)


PULLS = Counter(
    "csi_oci_pulls",
    "Pulls of an image tree into the node store that finished, by outcome",
    ["outcome"],
    registry=REGISTRY,
)


PULLS_IN_PROGRESS = Gauge(
    "csi_oci_pulls_in_progress", "Pulls running now (in the background)", registry=REGISTRY
)


PULL_BYTES = Counter(
    "csi_oci_pull_bytes",
    "Bytes of blobs (layers and configs) received from registries and mirrors by pulls, "
    "resent bytes included",
    registry=REGISTRY,
)


PULL_DURATION = Histogram(
    "csi_oci_pull_duration_seconds",
    "Time from the start of a pull to its commit into the store (or its failure)",
    ["outcome"],
    buckets=PULL_DURATION_BUCKETS,
    registry=REGISTRY,
)


PULL_ERRORS = Counter(
    "csi_oci_pull_errors",
    "Failures to resolve or pull an image, by reason",
    ["reason"],
    registry=REGISTRY,
)


EVICTIONS = Counter(
    "csi_oci_store_evictions",
    "Items removed from the node store to make room (or by gc), by kind",
    ["kind"],
    registry=REGISTRY,
)


EVICTED_BYTES = Counter(
    "csi_oci_store_evicted_bytes", "Bytes freed by evictions", registry=REGISTRY
)


RPCS = Counter(
    "csi_oci_rpcs",
    "CSI calls answered, by method and gRPC code",
    ["method", "code"],
    registry=REGISTRY,
)


RPC_DURATION = Histogram(
    "csi_oci_rpc_duration_seconds",
    "Time to answer a CSI call, by method",
    ["method"],
    buckets=RPC_DURATION_BUCKETS,
    registry=REGISTRY,
)


OUTCOMES = ("succeeded", "failed")


ERROR_REASONS = (
    "not_found",
    "auth_denied",
    "registry_unreachable",
    "registry_error",
    "digest_mismatch",
    "invalid_layer",
    "out_of_space",
    "unsupported",
    "invalid_argument",
    "failed_precondition",
    "internal",
)


EVICTION_KINDS = ("tree", "blob", "lazy_piece")


def error_reason(exc: BaseException) -> str:
    """The `reason` label of an error (see errors.py: every class names one)."""
    if isinstance(exc, CsiOciError):
        return exc.reason
    if is_out_of_space(exc):
        return "out_of_space"
    return "internal"


def count_pull_error(exc: BaseException) -> None:
    PULL_ERRORS.labels(error_reason(exc)).inc()


def count_eviction(kind: str, nbytes: int) -> None:
    EVICTIONS.labels(kind).inc()
    EVICTED_BYTES.inc(max(0, nbytes))


SIGNATURE_CHECKS = Counter(
    "csi_oci_signature_checks",
    "Signature policy checks at publish, by rule and outcome: verified (checked now), "
    "cached (an earlier verification of the same digest under the same rule), denied "
    "(publish refused), warned (a warn-mode rule failed; published anyway)",
    ["rule", "outcome"],
    registry=REGISTRY,
)


SIGNATURE_CHECK_DURATION = Histogram(
    "csi_oci_signature_check_duration_seconds",
    "Time a publish spent on the signature policy (finding and verifying signatures, or "
    "the cached result)",
    buckets=(0.001, 0.005, 0.02, 0.05, 0.2, 0.5, 1, 5, 30),
    registry=REGISTRY,
)


PREWARM_ENTRIES = Gauge(
    "csi_oci_prewarm_entries",
    "ImageCaches that select this node, by phase (Pending, Pulling, Ready, Failed)",
    ["phase"],
    registry=REGISTRY,
)


PREWARM_PINNED_BYTES = Gauge(
    "csi_oci_prewarm_pinned_bytes",
    "Bytes of trees pinned in the store by ImageCaches that select this node",
    registry=REGISTRY,
)
