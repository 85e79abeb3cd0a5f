"""Crash points for restart tests: a process that dies mid-pull.

`CSI_OCI_CRASH_AT=<point>` makes the process exit abruptly (as SIGKILL or an
OOM kill would) the first time it reaches that point. Production never sets
it; reading one environment variable per point is the whole cost.

Points: `after-download` (a layer blob is verified and spooled),
`mid-extract` (a layer has written some entries), `before-commit` (the tree
is complete in staging, not yet renamed into the store).
"""

from __future__ import annotations

import os

POINTS = ("after-download", "mid-extract", "before-commit")


def crash_point(name: str) -> None:
    if os.environ.get("CSI_OCI_CRASH_AT") == name:
        os._exit(137)
