"""An upstream registry and a pull-through-cache mirror of it.

``mirror_pair(workdir)`` starts an upstream ``Registry`` and a second one
configured with ``proxy.remoteurl`` pointing at it (distribution's
pull-through cache).  With ``fault_proxy=True`` the mirror reaches the
upstream through a ``FaultProxy``, so a test can break the mirror's own
fetches (and count them: a blob the mirror has cached is not fetched again).

Behaviour of distribution 2.8.2 in proxy mode (pinned in tests/test_faultproxy.py):

* repository names are the upstream's; the mirror pings the upstream's
  ``/v2/`` before upstream requests (challenge manager);
* a manifest by tag is checked upstream (``HEAD``) on every pull, then served
  (from the cache when the digest is known); by digest it is served from the
  cache without contacting the upstream; when the upstream fails, a cached tag
  is still served;
* a blob pulled for the first time is fetched upstream *twice*,
  concurrently: one GET streamed to the client, one to store it
  (asynchronously: the blob appears in the mirror's storage shortly after the
  client got it).  Which of the two a ``FaultProxy`` fault hits is a race; a
  broken store fetch leaves the blob uncached, so the next pull refetches;
* an upstream error for an uncached blob (503 with ``Retry-After``, say)
  becomes ``500 UNKNOWN`` with the upstream status in ``detail`` and no
  ``Retry-After``;
* pushes and deletes are refused: ``405`` ``UNSUPPORTED``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .faultproxy import FaultProxy
from .registry import Registry


@dataclass
class MirrorPair:
    upstream: Registry
    mirror: Registry
    proxy: FaultProxy | None = None  # between mirror and upstream, if asked for

    def stop(self) -> None:
        self.mirror.stop()
        if self.proxy is not None:
            self.proxy.stop()
        self.upstream.stop()

    def __enter__(self) -> MirrorPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def mirror_pair(
    workdir: str | Path,
    *,
    upstream_kwargs: dict[str, Any] | None = None,
    mirror_kwargs: dict[str, Any] | None = None,
    fault_proxy: bool = False,
) -> MirrorPair:
    """Start ``upstream`` (``<workdir>/upstream``) and ``mirror`` (``<workdir>/mirror``).

    ``upstream_kwargs``/``mirror_kwargs`` go to the ``Registry`` constructors.
    When the upstream has credentials the mirror uses them
    (``proxy_credentials``) unless ``mirror_kwargs`` says otherwise.
    """
    workdir = Path(workdir)
    upstream = Registry(workdir / "upstream", **(upstream_kwargs or {}))
    proxy: FaultProxy | None = None
    try:
        remote = upstream.url
        if fault_proxy:
            proxy = FaultProxy(upstream.url)
            remote = proxy.url
        kwargs: dict[str, Any] = {"proxy_remote_url": remote}
        if upstream.credentials:
            kwargs["proxy_credentials"] = upstream.credentials
        kwargs.update(mirror_kwargs or {})
        mirror = Registry(workdir / "mirror", **kwargs)
    except BaseException:
        if proxy is not None:
            proxy.stop()
        upstream.stop()
        raise
    return MirrorPair(upstream, mirror, proxy)
