"""Render CSI messages for logs with every secret removed.

Fields the CSI proto marks `csi_secret` are replaced wholesale; in string
maps (volume_context, parameters) values under keys that carry credentials
are replaced too: kubelet's service-account tokens and docker configs can
arrive there. Only the key names remain, so a log reader sees *that* a
secret was passed, never its value."""

from __future__ import annotations

from typing import Any

from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from csi_oci.csi.v1 import csi_pb2
from csi_oci.telemetry.urls import REDACTED, redact_urls

_SECRET_KEY_MARKERS = (
    "token",
    "password",
    "secret",
    "dockerconfig",
    "dockercfg",
    "credential",
    "auth",
)


def is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(marker in lowered for marker in _SECRET_KEY_MARKERS)


def _is_csi_secret(field: FieldDescriptor) -> bool:
    # The stubs type Extensions[] for extension descriptors of another shape.
    extensions: Any = field.GetOptions().Extensions
    return bool(extensions[csi_pb2.csi_secret])


def redacted_copy(msg: Message) -> Message:
    out = type(msg)()
    out.CopyFrom(msg)
    _redact_in_place(out)
    return out


def _redact_in_place(msg: Message) -> None:
    for field, value in list(msg.ListFields()):
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if _is_csi_secret(field):
            if is_map:
                for key in list(value):
                    value[key] = REDACTED
            else:
                msg.ClearField(field.name)
            continue
        if is_map:
            assert field.message_type is not None  # a map field's entry type
            value_field = field.message_type.fields_by_name["value"]
            if value_field.type == FieldDescriptor.TYPE_STRING:
                for key in list(value):
                    if is_secret_key(key):
                        value[key] = REDACTED
            elif value_field.message_type is not None:
                for key in list(value):
                    _redact_in_place(value[key])
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                for item in value:
                    _redact_in_place(item)
            else:
                _redact_in_place(value)


def one_line(msg: Message) -> str:
    """The redacted message as one log line."""
    return text_format.MessageToString(redacted_copy(msg), as_one_line=True)


MAX_MESSAGE_CHARS = 1000  # kubelet's event note is capped near 1 KiB


def one_line_text(text: str) -> str:
    """An error text as one line without URL credentials or query strings.

    What a user sees in a pod event must fit one line: newlines from a
    registry's error body or a nested exception are folded into spaces.
    """
    text = redact_urls(text)
    flat = " ".join(text.split())
    if len(flat) > MAX_MESSAGE_CHARS:
        flat = flat[: MAX_MESSAGE_CHARS - 3] + "..."
    return flat
