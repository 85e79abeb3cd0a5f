"""Log output: the classic text lines, or JSON lines (`--log-format json`).

A JSON line is one object: `time` (RFC 3339, UTC, milliseconds), `level`,
`logger`, `message`, then the RPC fields where the line is about a CSI call
(`rpc`, `code`, `duration_seconds`, `request`, `error`) and `exception` with
the traceback when there is one. Log collectors (Loki, Elasticsearch,
Cloud Logging) parse these without a grok pattern.

Redaction happens before anything reaches a formatter: the interceptor puts
the request in the record already rendered by `redact.one_line`, and error
texts through `redact.one_line_text`. The formatter copies only the fields
named here, never arbitrary `extra` attributes, so nothing a library
attaches to a record can leak through it.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from csi_oci.telemetry.urls import redact_urls

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Fields the gRPC interceptor attaches with `extra=`.
RPC_FIELDS = ("rpc", "code", "duration_seconds", "request", "error")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, object] = {
            "time": f"{seconds}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in RPC_FIELDS:
            if name in record.__dict__:
                entry[name] = record.__dict__[name]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ensure_ascii keeps each entry on one line whatever bytes a name holds.
        return json.dumps(entry, ensure_ascii=True, default=str)


class RedactingFormatter(logging.Formatter):
    """Any formatter, with URL credentials and query strings taken out of every line.

    A library's exception text can carry a presigned blob URL (its signature
    is in the query string) or `user:password@`; no log line may.
    """

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact_urls(self._inner.format(record))


def setup_logging(level: str, log_format: str = "text") -> None:
    """Configure the root logger once, for every subcommand (and each FUSE server)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(RedactingFormatter(JsonFormatter()))
    else:
        handler.setFormatter(RedactingFormatter(logging.Formatter(TEXT_FORMAT)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))


__all__ = ["LOG_FORMATS", "JsonFormatter", "setup_logging"]
