"""The cache's room for one pull, and the byte bound of an image.

Sizes in a manifest are claims. A pull whose declared sizes can never fit is
refused before anything is evicted; otherwise the pull's DiskBudget starts
from the room there is and evicts unused images only as bytes land.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from csi_oci.errors import OutOfSpace
from csi_oci.oci.packaging import LayerPlan
from csi_oci.pull.jobs import human
from csi_oci.pull.messages import SPACE_ADVICE, _space_facts
from csi_oci.spec.reference import Reference
from csi_oci.storage.store import Store
from csi_oci.unpack.budget import DiskBudget, Limits


def room_for(
    store: Store,
    reference: Reference,
    layers: tuple[LayerPlan, ...],
    in_use: Callable[[], set[str]],
) -> DiskBudget:
    """The cache's room for this pull; unused images are evicted only as bytes land.

    A descriptor that claims 90% of the cache for a 5-byte blob evicts nothing.
    """
    declared = [lp.declared_bytes for lp in layers]
    if declared and all(d is not None for d in declared):
        estimate = sum(d or 0 for d in declared)
        best = store.space.best_room(in_use())
        if estimate > best:
            raise OutOfSpace(
                f"not enough space for image {reference}: it needs {estimate} "
                f"bytes ({human(estimate)}) but the node has room for {human(best)} "
                f"{_space_facts(store)} even with every unused image evicted; "
                f"{SPACE_ADVICE}",
                kind=OutOfSpace.CACHE_FULL,
            )

    def make_room(short: int) -> int:
        return store.space.evict_for(short, in_use())

    return DiskBudget(store.space.room(), make_room)


def limits_for(limits: Limits, layers: tuple[LayerPlan, ...]) -> Limits:
    """The byte budget: what the producer declared when every layer did."""
    declared = [lp.declared_bytes for lp in layers]
    if declared and all(d is not None for d in declared):
        total = sum(d for d in declared if d is not None)
        return replace(limits, max_bytes=min(limits.max_bytes, total))
    return limits
