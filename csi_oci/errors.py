"""Exceptions of csi-oci and the one place that maps them to gRPC status codes.

Every module raises one of these with a message written for the person who
reads `kubectl describe pod`: it names the image, path or entry at fault and,
where there is one, what to do about it. The gRPC layer never invents
messages; it only picks the status code from the exception class.
"""

from __future__ import annotations

import errno

import grpc


class CsiOciError(Exception):
    """Base class. `code` is the gRPC status a CSI caller receives."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # The `reason` label of csi_oci_pull_errors_total (metrics.py).
    reason: str = "internal"


class InvalidArgument(CsiOciError):
    """A request field or volume attribute is missing or malformed."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid_argument"


class NotFound(CsiOciError):
    """The image, tag, repository, volume or sub-path does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "not_found"


class AlreadyExists(CsiOciError):
    """Something incompatible already occupies the name or target path."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "already_exists"


class FailedPrecondition(CsiOciError):
    """The request is valid but the node state forbids it (e.g. pullPolicy Never)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "failed_precondition"


class Unsupported(CsiOciError):
    """A feature or format csi-oci does not handle (yet)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "unsupported"


class AuthError(CsiOciError):
    """The registry refused our credentials (or asked for some we lack)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "auth_denied"


class SignatureDenied(CsiOciError):
    """The node's signature policy refuses this image (csi_oci.verify).

    The message names the image and digest, the rule, and what was found
    instead of a trusted signature.
    """

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "signature_denied"


class RegistryError(CsiOciError):
    """The registry answered something we cannot use; usually retryable."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "registry_error"


class IntegrityError(CsiOciError):
    """Bytes did not match the digest or size that was pinned for them.

    Not retryable by the caller in a useful way: the registry (or a proxy in
    front of it) is serving wrong content. Nothing from the pull is kept.
    """

    code = grpc.StatusCode.DATA_LOSS
    reason = "digest_mismatch"


class InvalidLayer(CsiOciError):
    """A layer's archive is malformed or tries something we refuse (escape, bomb)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid_layer"


class OutOfSpace(CsiOciError):
    """The state directory's filesystem ran out of space or a budget was exceeded.

    `kind` says which: DISK_FULL (the filesystem said ENOSPC/EDQUOT) or
    CACHE_FULL (the cache budget, --cache-max-bytes / --cache-min-free-bytes,
    has no room even after evicting unused images).
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "out_of_space"
    DISK_FULL = "disk_full"
    CACHE_FULL = "cache_full"

    def __init__(self, message: str, kind: str = DISK_FULL) -> None:
        super().__init__(message)
        self.kind = kind


class PullInProgress(CsiOciError):
    """The pull goes on in the background; retry the call to join it.

    kubelet treats ABORTED as "uncertain" and retries with backoff, which is
    exactly what a pull longer than the 2-minute CSI call budget needs.
    """

    code = grpc.StatusCode.ABORTED
    reason = "in_progress"


class PullCancelled(CsiOciError):
    """This part of a pull stopped because another part of it failed (not the cause)."""

    reason = "cancelled"


class MountError(CsiOciError):
    """A mount or unmount system call failed."""

    code = grpc.StatusCode.INTERNAL
    reason = "mount_failed"


def human_bytes(n: int | float) -> str:
    """Sizes in messages people read: 1.5 GiB, not 1610612736."""
    value = float(n)
    if abs(value) < 1024:
        return f"{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status for any exception; unknown ones are INTERNAL."""
    if isinstance(exc, CsiOciError):
        return exc.code
    if is_out_of_space(exc):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


def is_out_of_space(exc: BaseException) -> bool:
    """The filesystem is full or over quota (the one place this test is written)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def error_from_record(kind: object, message: str) -> CsiOciError:
    """An error another process of ours recorded (class name + message), rebuilt.

    A lazy FUSE server that cannot start writes why (csi_oci.lazy.fs); the
    publish waiting for it raises the same class, so the caller gets the
    status that names the problem (INVALID_ARGUMENT for a hostile TOC, not
    INTERNAL). Unknown names fall back to MountError.
    """
    classes = {cls.__name__: cls for cls in _error_classes(CsiOciError)}
    cls = classes.get(str(kind), MountError)
    return cls(message)


def _error_classes(base: type[CsiOciError]) -> list[type[CsiOciError]]:
    found = [base]
    for sub in base.__subclasses__():
        found += _error_classes(sub)
    return found
