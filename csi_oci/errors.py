"""Exceptions of csi-oci and the one place that maps them to gRPC status codes.

Every module raises one of these with a message written for the person who
reads `kubectl describe pod`: it names the image, path or entry at fault and,
where there is one, what to do about it. The gRPC layer never invents
messages; it only picks the status code from the exception class.
"""

from __future__ import annotations

import grpc


class CsiOciError(Exception):
    """Base class. `code` is the gRPC status a CSI caller receives."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(CsiOciError):
    """A request field or volume attribute is missing or malformed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CsiOciError):
    """The image, tag, repository, volume or sub-path does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CsiOciError):
    """Something incompatible already occupies the name or target path."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CsiOciError):
    """The request is valid but the node state forbids it (e.g. pullPolicy Never)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unsupported(CsiOciError):
    """A feature or format csi-oci does not handle (yet)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class AuthError(CsiOciError):
    """The registry refused our credentials (or asked for some we lack)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class RegistryError(CsiOciError):
    """The registry answered something we cannot use; usually retryable."""

    code = grpc.StatusCode.UNAVAILABLE


class IntegrityError(CsiOciError):
    """Bytes did not match the digest or size that was pinned for them.

    Not retryable by the caller in a useful way: the registry (or a proxy in
    front of it) is serving wrong content. Nothing from the pull is kept.
    """

    code = grpc.StatusCode.DATA_LOSS


class InvalidLayer(CsiOciError):
    """A layer's archive is malformed or tries something we refuse (escape, bomb)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class OutOfSpace(CsiOciError):
    """The state directory's filesystem ran out of space or a budget was exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PullInProgress(CsiOciError):
    """The pull goes on in the background; retry the call to join it.

    kubelet treats ABORTED as "uncertain" and retries with backoff, which is
    exactly what a pull longer than the 2-minute CSI call budget needs.
    """

    code = grpc.StatusCode.ABORTED


class MountError(CsiOciError):
    """A mount or unmount system call failed."""

    code = grpc.StatusCode.INTERNAL


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status for any exception; unknown ones are INTERNAL."""
    if isinstance(exc, CsiOciError):
        return exc.code
    if isinstance(exc, OSError) and exc.errno is not None:
        import errno

        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL
