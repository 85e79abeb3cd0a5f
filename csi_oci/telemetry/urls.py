"""URL credentials and query strings out of text meant for logs and events."""

from __future__ import annotations

import re

# `user:password@` in a URL, and query strings (presigned blob URLs carry
# their signature there) are what an error text can pick up from requests.
REDACTED = "***"  # what a secret becomes in a log line or event

_URL_USERINFO = re.compile(r"(?<=://)[^/\s@]+@")


_URL_QUERY = re.compile(r"(https?://[^\s?'\"]+)\?[^\s'\"]*")


# urllib3 names the request by path: "Max retries exceeded with url: /v2/...?X-Amz-...".
_PATH_QUERY = re.compile(r"(url: ?/[^\s?'\"]*)\?[^\s'\"]*")


def redact_urls(text: str) -> str:
    """`text` without URL credentials or query strings (every log line goes through this)."""
    text = _URL_USERINFO.sub(REDACTED + "@", text)
    text = _URL_QUERY.sub(r"\1?" + REDACTED, text)
    return _PATH_QUERY.sub(r"\1?" + REDACTED, text)
