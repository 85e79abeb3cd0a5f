"""What a failed pull says: one line naming the image, the cause and what to do."""

from __future__ import annotations

from csi_oci.errors import (
    CsiOciError,
    InvalidLayer,
    OutOfSpace,
    PullCancelled,
    is_out_of_space,
)
from csi_oci.pull.jobs import human
from csi_oci.pull.resolve import ResolvedImage
from csi_oci.storage.store import Store


def _most_telling(errors: list[BaseException]) -> BaseException:
    """Of parallel failures, the root cause rather than a consequent cancellation."""
    real = [e for e in errors if not isinstance(e, PullCancelled)]
    return (real or errors)[0]


SPACE_ADVICE = (
    "raise --cache-max-bytes or free disk space on the node, or publish fewer files "
    "with the include attribute"
)


def _space_facts(store: Store) -> str:
    """The numbers behind a full cache, with the flags that set them."""
    budget = (
        f"cache budget {store.space.max_bytes} bytes (--cache-max-bytes)"
        if store.space.max_bytes
        else "no --cache-max-bytes budget"
    )
    try:
        used, free = human(store.space.usage().total), human(store.space.free_bytes())
    except OSError:
        used = free = "unknown"
    return (
        f"({budget}, {used} in the cache, {free} free on disk, free-space floor "
        f"{store.space.min_free_bytes} bytes (--cache-min-free-bytes))"
    )


def _as_pull_error(exc: BaseException, resolved: ResolvedImage, store: Store) -> BaseException:
    """The error a publish reports: names the image, says what to do."""
    ref = str(resolved.reference)
    if is_out_of_space(exc):
        return OutOfSpace(
            f"no space left on the state directory {store.root} while pulling image {ref} "
            f"{_space_facts(store)}; {SPACE_ADVICE}"
        )
    if isinstance(exc, OutOfSpace) and exc.kind == OutOfSpace.CACHE_FULL and ref not in str(exc):
        # The cache budget stopped an image as its bytes landed.
        return OutOfSpace(
            f"not enough space for image {ref}: {exc} {_space_facts(store)}; {SPACE_ADVICE}",
            kind=OutOfSpace.CACHE_FULL,
        )
    if isinstance(exc, InvalidLayer):
        return InvalidLayer(
            f"image {ref} has a layer csi-oci refuses: {exc}; the image is malformed or "
            "unsafe: rebuild it with a standard image builder"
        )
    if isinstance(exc, CsiOciError | OSError):
        if ref in str(exc):
            return exc
        # Same class (so the same gRPC code and metric reason), with the image named.
        try:
            named = type(exc)(f"image {ref}: {exc}")
        except TypeError:  # an exception class with other constructor arguments
            return exc
        return named.with_traceback(exc.__traceback__)
    return CsiOciError(f"pull of image {ref} failed: {exc!r}")
